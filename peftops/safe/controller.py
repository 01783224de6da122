"""SAFE, the controller: the step protocol (``begin_step`` / ``end_step`` / ``step``), the schedule's
freezing decisions and the log, manual control, checkpoint state, and the one-SAFE-per-model rule.
It composes the parts: ``Freezer`` (freezing.py), ``Measurer`` (hooks.py), the rank agreement and
``DDPGuard`` (distributed.py), ``parse_state`` (state.py) and ``report`` (report.py)."""
from __future__ import annotations

import copy
import weakref
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from . import distributed
from .config import SAFEConfig, _is_int
from .freezing import Freezer
from .hooks import Measurer
from .report import report
from .schedule import compared_score
from .state import STATE_VERSION, parse_state
from .units import AdapterUnit, find_adapter_units

_MANAGED_BY: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()  # model -> its SAFE


def _managed(model: nn.Module) -> nn.Module:
    """The module that carries the one-SAFE-per-model mark: DDP's inner module, else the model."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


class SAFE:
    """Selective adapter freezing controller for ``model`` (see the ``peftops.safe`` docstring).

    ``optimizer``: optimizer(s) whose state is released when parameters freeze (more can be added
    with ``release``). ``start_step``: the global step training (re)starts at. ``units``: the
    adapter units to manage (default: ``find_adapter_units(model)``).

    Plain loop: call ``safe.step(global_step)`` after each optimizer step, global_step = optimizer
    steps done so far. Fine-grained: ``begin_step(t)`` before step t's forward (freezes by T(t),
    arms the measuring hooks), ``end_step(t)`` after it (collects the scores, disarms).

    Distributed: ``process_group`` (default: the WORLD group when ``torch.distributed`` is
    initialised with world size > 1) is the group whose ranks must take identical decisions. Every
    rank builds SAFE (same units, same config, same ``start_step``: checked by one collective here)
    and calls ``step``/``end_step`` at the same steps; ``end_step`` of a measuring step all-reduces
    the per-rank scores (fp64, sum and count per unit) and records their mean: the score is the
    mean over ranks of each rank's CKA-based importance on its own tokens, not 1 - CKA over the
    union of the tokens of all ranks. ``record_scores`` and ``freeze`` are not synchronised: call
    them with the same arguments on every rank. ``model`` may be the DDP-wrapped model or the inner
    one; ``ddp``: the ``DistributedDataParallel`` wrapping the inner ``model``, when there is one
    (not given: SAFE sees the wrapper in the first forward it runs, see ``DDPGuard``). Freezing a
    parameter that the wrapper registered requires it to have ``find_unused_parameters=True`` and
    ``static_graph=False``: otherwise DDP skips the gradient all-reduce of that step (replicas
    silently diverge) and fails at the next forward, so SAFE raises a RuntimeError naming the fix,
    at construction when ``final_threshold > 0`` (wrapper known), when it first sees the wrapper
    if it froze something already, and again before any freeze.
    """

    STATE_VERSION = STATE_VERSION

    def __init__(self, model: nn.Module, config: SAFEConfig, optimizer=None, *, start_step: int = 0,
                 units: Sequence[AdapterUnit] | None = None, process_group=None, ddp=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, SAFEConfig):
            raise TypeError(f"config: expected a peftops.SAFEConfig, got {type(config).__name__}")
        config.validate()
        if not _is_int(start_step) or start_step < 0:
            raise ValueError(f"start_step: expected an integer >= 0, got {start_step!r}")
        self.model = model
        self.config = config
        self.units: list[AdapterUnit] = list(units) if units is not None else find_adapter_units(model)
        if not self.units:
            raise ValueError("model: found no trainable adapter (no module with peftops_adapter = True and no "
                             "PEFT tuner layer with trainable parameters); apply an adapter method first")
        names = [u.name for u in self.units]
        if len(set(names)) != len(names):
            raise ValueError("units: adapter unit names must be unique")
        self._freezer = Freezer(model, self.units, optimizer, before_freeze=lambda ps: self._ddp.check(ps))
        self._ddp = distributed.DDPGuard(model, ddp, params=self._freezer.unique_params,
                                         frozen=self._freezer.frozen_params)
        self._by_name = self._freezer.by_name
        self._measurer = Measurer(model, config)
        self.log: list[dict[str, Any]] = []
        self._current: int | None = None
        self._entry: dict[str, Any] | None = None
        self._group = distributed.resolve_group(process_group)
        self._await_reduce = False  # a measuring step whose scores still need the cross-rank mean
        if self._group is not None:
            distributed.check_ranks_agree(self._group, self.units, config, start_step)
        if float(config.final_threshold) > 0:
            self._ddp.check(self._freezer.unique_params())
        self._check_not_managed()
        self.begin_step(start_step)

    # -- public views -----------------------------------------------------------------------------
    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]

    @property
    def frozen(self) -> list[str]:
        return [u.name for u in self.units if u.frozen]

    @property
    def step_index(self) -> int | None:
        """The step currently prepared (the next one to run)."""
        return self._current

    def scores(self) -> dict[str, float | None]:
        """Each unit's compared score (by ``score_mode``) as of now; None if it has none."""
        return {u.name: self._compared_score(u) for u in self.units}

    def threshold(self, step: int | None = None) -> float:
        return self.config.threshold(self._current if step is None else step)

    def report(self) -> str:
        """A readable table: one row per unit (type, parameters, scores, when frozen), then the
        steps at which units were frozen."""
        return report(self)

    # -- step protocol ----------------------------------------------------------------------------
    def step(self, global_step: int | None = None) -> list[str]:
        """After optimizer step ``global_step - 1`` (``global_step`` = optimizer steps done;
        default: one more than the last call): collect that step's scores, then prepare step
        ``global_step``. Returns the names frozen now."""
        if global_step is None:
            global_step = (self._current if self._current is not None else -1) + 1
        if not _is_int(global_step) or global_step < 1:
            raise ValueError(f"global_step: expected an integer >= 1 (optimizer steps done), got {global_step!r}")
        self.end_step(global_step - 1)
        return self.begin_step(global_step)

    def begin_step(self, step: int) -> list[str]:
        """Prepare step ``step``: freeze units whose score < T(step), arm hooks if it measures.
        Steps only move forward (a restart from a checkpoint builds a new SAFE with ``start_step``
        and ``load_state_dict``)."""
        if not _is_int(step) or step < 0:
            raise ValueError(f"step: expected an integer >= 0, got {step!r}")
        if self._current is not None and step < self._current:
            raise ValueError(f"step: expected a step >= {self._current} (the step already prepared; steps only move "
                             f"forward), got {step}; to restart from a checkpoint build a new SAFE with start_step")
        self._check_not_managed()
        self._ddp.arm()
        if self._current == step and self._entry is not None:
            return []
        self._measurer.disarm()
        self._current = step
        thr = self.config.threshold(step)
        newly = []
        if step >= self.config.warmup_steps:
            newly = [u for u in self.units if not u.frozen and (s := self._compared_score(u)) is not None and s < thr]
        newly = self._freezer.keep_something_training(newly, self.config.allow_freezing_all, self._compared_score,
                                                      thr)
        self._freezer.freeze(newly, step)
        self._freezer.reassert()
        measuring = self.config.measures(step) and any(not u.frozen for u in self.units)
        self._entry = {
            "step": step, "threshold": thr, "measuring": measuring, "newly_frozen": [u.name for u in newly],
            "n_frozen": sum(u.frozen for u in self.units), "n_units": len(self.units),
            "trainable_adapter_params": sum(p.numel() for p in self._freezer.unique_params() if p.requires_grad),
        }
        self.log.append(self._entry)
        if measuring:
            self._measurer.arm(self.units)
        # decided identically on every rank (same schedule, same frozen set), so every rank joins
        self._await_reduce = measuring and self._group is not None
        return [u.name for u in newly]

    def end_step(self, step: int | None = None) -> dict[str, float]:
        """Finish step ``step`` (default: the prepared one): disarm the hooks and record the mean
        importance of each unit measured during it (one host sync). Returns those scores."""
        step = self._current if step is None else step
        self._measurer.disarm()
        scores = self._collect()
        if self._await_reduce:
            self._await_reduce = False
            scores = distributed.mean_over_ranks(self._group, self.units, scores)
        if scores:
            self.record_scores(step, scores)
        return scores

    def record_scores(self, step: int, scores: dict[str, float]) -> None:
        """Record importances measured at ``step`` (what the hooks do; also for external scores)."""
        for name, s in scores.items():
            if name not in self._by_name:
                raise KeyError(f"scores: unknown adapter unit {name!r}")
            self._by_name[name].history.append((int(step), float(s)))
        entry = next((e for e in reversed(self.log) if e["step"] == step), None)
        if entry is not None:
            entry.setdefault("scores", {}).update({k: float(v) for k, v in scores.items()})

    # -- manual control ---------------------------------------------------------------------------
    def freeze(self, names: Iterable[str] | Callable[[str], bool], step: int | None = None) -> list[str]:
        """Freeze units by name (or by a predicate on the name) now, outside the schedule."""
        if callable(names):
            chosen = [u for u in self.units if names(u.name)]
        else:
            names = [names] if isinstance(names, str) else list(names)
            unknown = [n for n in names if n not in self._by_name]
            if unknown:
                raise KeyError(f"names: unknown adapter units {unknown[:5]}; known e.g. {self.unit_names[:3]}")
            chosen = [self._by_name[n] for n in names]
        chosen = [u for u in chosen if not u.frozen]
        if not self.config.allow_freezing_all and self._freezer.nothing_would_train(chosen):
            raise ValueError(f"names: freezing {[u.name for u in chosen][:5]} would leave nothing in the model to "
                             "train; keep one unit, or set SAFEConfig(allow_freezing_all=True)")
        self._freezer.freeze(chosen, self._current if step is None else step)
        if self._entry is not None:
            self._entry["newly_frozen"] = self._entry["newly_frozen"] + [u.name for u in chosen]
            self._entry["n_frozen"] = sum(u.frozen for u in self.units)
        return [u.name for u in chosen]

    def release(self, optimizer) -> None:
        """Track ``optimizer`` too and drop its state for every parameter frozen so far."""
        self._freezer.release(optimizer)

    def remove(self) -> None:
        """Remove every hook SAFE registered (frozen parameters stay frozen) and let another SAFE
        manage the model (a later ``begin_step`` takes it back if no other one did)."""
        self._measurer.disarm()
        self._ddp.disarm()
        key = _managed(self.model)
        ref = _MANAGED_BY.get(key)
        if ref is not None and ref() is self:
            del _MANAGED_BY[key]

    def _check_not_managed(self) -> None:
        """One SAFE per model: two would each freeze by their own scores and hooks."""
        key = _managed(self.model)
        ref = _MANAGED_BY.get(key)
        other = ref() if ref is not None else None
        if other is not None and other is not self:
            raise ValueError("model: another SAFE already manages this model; call .remove() on it first "
                             "(two controllers would freeze by separate scores)")
        _MANAGED_BY[key] = weakref.ref(self)

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly as the uninterrupted one: the prepared
        step (and whether its measuring hooks were live), every unit's score history and freezing
        step, the log, the units whose measurement failed, and the state of the token-sampling
        generators (per device type). JSON-safe (str, int, float, bool, None, lists, dicts; NaN scores
        stay NaN), so it can live in a Trainer checkpoint's trainer_state.json (``SAFECallback``).
        The config is not part of it: the resumed SAFE is built with its own."""
        return {
            "version": self.STATE_VERSION,
            "step": self._current,
            "armed": self._measurer.armed,
            "units": self.unit_names,
            "history": {u.name: [[t, s] for t, s in u.history] for u in self.units},
            "frozen": {u.name: u.frozen_at for u in self.units if u.frozen},
            "failed": sorted(self._measurer.failed),
            "sampling": self._measurer.sampling_state(),
            "log": copy.deepcopy(self.log),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` (of a SAFE over the same adapter units): histories, log,
        failed units and sampling state are replaced by the state's; the state's frozen units are
        frozen again (units this SAFE froze stay frozen; optimizer state of what freezes is
        released). Then the step is prepared again, the later of this SAFE's ``step_index`` and the
        state's step, with the restored scores: a resume (``SAFE(model, config, optimizer,
        start_step=global_step)`` then ``load_state_dict``) freezes at its first step exactly what
        the uninterrupted run froze there. Call it after the optimizer has loaded its checkpoint
        (the parameters frozen here have no optimizer state in it).

        All-or-nothing: every field is checked first (errors begin with "state: ..."); nothing
        changes on an error."""
        parsed = parse_state(state, self.unit_names)
        self._check_not_managed()
        to_freeze = [(self._by_name[n], t) for n, t in parsed["frozen"].items() if not self._by_name[n].frozen]
        off = self._freezer.turning_off([u for u, _ in to_freeze])
        if off:
            self._ddp.check(off)
        saved_step = parsed["step"]
        target = max(t for t in (self._current, saved_step, 0) if t is not None)
        thr = self.config.threshold(target)
        scored = [sc for hist in parsed["history"].values() for _, sc in hist]
        if target >= self.config.warmup_steps and any(sc < thr for sc in scored):
            self._ddp.check(self._freezer.unique_params())  # the step prepared below may freeze more
        # -- nothing below raises: checked above
        self._measurer.disarm()
        for name, hist in parsed["history"].items():
            self._by_name[name].history = hist
        for t in sorted({t for _, t in to_freeze}):
            self._freezer.freeze([u for u, tu in to_freeze if tu == t], t)
        self._measurer.failed |= set(parsed["failed"])
        self._measurer.load_sampling_state(parsed["sampling"], {p.device for p in self._freezer.unique_params()})
        own, loaded = self._entry, parsed["log"]
        self.log = loaded + [e for e in self.log if e is not own and e not in loaded]
        self._current, self._entry, self._await_reduce = None, None, False
        last = loaded[-1] if loaded else None
        if saved_step == target and last is not None and last["step"] == target:
            # the state was saved with this step prepared: its decisions are in the state already
            self._current, self._entry = target, last
            if parsed["armed"] and last["measuring"] and any(not u.frozen for u in self.units):
                self._measurer.arm(self.units)
                self._await_reduce = self._group is not None
        else:
            self.begin_step(target)

    # -- internals --------------------------------------------------------------------------------
    def _compared_score(self, u: AdapterUnit) -> float | None:
        return compared_score(u.history, self.config.score_mode, self.config.warmup_steps)

    def _collect(self) -> dict[str, float]:
        """The importances the hooks measured since the last call (one host sync per device)."""
        return self._measurer.collect()

    @property
    def _pending(self) -> dict[str, list[torch.Tensor]]:
        """The CKAs measured this step, still on the device (unit name -> one per forward)."""
        return self._measurer.pending
