"""SAFE: selective adapter freezing (DESIGN §4), for every peftops adapter and Hugging Face PEFT layers.

Importance of adapter unit i is 1 - CKA(X_i, Y_i), the linear CKA (``peftops.linear_cka``) of the
representation entering the unit and the one it produces, over the batch's non-padding tokens.
Steps are counted like ``TrainerState.global_step``: step t is the (t+1)-th optimizer step.

    steps 0 .. t_w-1     warm-up: importances are measured (every ``measure_interval`` steps and
                         always at step t_w-1), nothing is frozen
    step t >= t_w        before the step runs, every unit whose compared score < T(t) is frozen:
                         T(t) = T_f * (1 - (1 - p)^3),  p = clip((t - t_w) / (t_f - t_w), 0, 1)
    compared score       "last" warm-up score (default) | "mean" of the warm-up scores |
                         "current": latest score; measurement then goes on every
                         ``measure_interval`` steps until t_f for the units still training
Frozen stays frozen; units without a score (never measured, NaN) are never frozen.

What a unit is (found by walking ``model.named_modules()``, outermost match only):
  - a peftops adapter module (class attribute ``peftops_adapter = True``): parameters =
    ``adapter_parameters()``, X = the first tensor argument of its forward, Y = its output;
  - a Hugging Face PEFT tuner layer (``peft.tuners.tuners_utils.BaseTunerLayer``: LoRA Linear /
    Embedding / Conv ...): parameters = the active adapters' entries of ``adapter_layer_names``
    (lora_A, lora_B, ...), X = the wrapped layer's input, Y = its output. Units whose input is not
    a float tensor (LoRA on an embedding: X are token ids) get no score and are never frozen.
Shared parameters (e.g. WeGeFT generators shared across layers) stop training only once every
unit owning them is frozen.

Freezing is real: ``requires_grad`` goes False, ``.grad`` is dropped and the optimizer state of the
parameter is released (optimizers passed to SAFE or to ``release``). With the base model frozen,
once every unit below a layer is frozen nothing below that layer requires grad, so autograd
records no graph there and keeps no activation (measure it with ``SavedTensorMeter``). Exception:
``model.enable_input_require_grads()`` (used for reentrant gradient checkpointing) makes the
embedding output require grad, which keeps activations all the way down.

Cost: hooks exist only during measuring steps (zero cost otherwise). A measuring forward runs,
per unit, a gather of at most ``max_tokens`` random valid tokens of X and Y and three CKA kernel
launches, all asynchronous; the scores reach the host with one sync when the step ends. Modules in
eval mode are not measured, nor activation-checkpoint recomputations (they run inside backward).
Micro-batches of one optimizer step (gradient accumulation) are averaged.

Distributed (DDP, torchrun, accelerate, Trainer): with ``torch.distributed`` initialised and more than
one rank, every rank measures on its own data shard and the scores are averaged across ranks (one
all-reduce of the score vector per measuring step) before any decision, so every rank freezes the
same units at the same steps. The score is the mean of the per-rank scores, not the CKA over the union
of every rank's tokens. Freezing under ``DistributedDataParallel`` needs ``find_unused_parameters=True``
and ``static_graph=False`` (the Trainer's default unless activation checkpointing is on); otherwise
SAFE raises before freezing (see ``SAFE``). docs/distributed.md has what is and is not released.

Checkpoints: ``SAFE.state_dict()`` (JSON-safe: scores, frozen units, log, the token-sampling
generators' states) and ``load_state_dict`` resume a run exactly; ``SAFECallback`` puts it into every
Trainer checkpoint (trainer_state.json) and restores it on ``trainer.train(resume_from_checkpoint=...)``.

    safe = peftops.SAFE(model, peftops.SAFEConfig(warmup_steps=100, ramp_end_step=600,
                                                  final_threshold=0.3), optimizer=opt)
    for t, batch in enumerate(loader):            # plain loop
        model(**batch).loss.backward(); opt.step(); opt.zero_grad()
        safe.step(t + 1)                           # = optimizer steps done so far
    trainer = Trainer(..., callbacks=[peftops.SAFECallback(config)])   # or with transformers
    print(safe.report())
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import inspect
import math
import numbers
import sys
import warnings
import weakref
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .kernels.cka import linear_cka

__all__ = [
    "SAFEConfig", "SAFE", "AdapterUnit", "find_adapter_units", "safe_threshold", "SavedTensorMeter",
    "SCORE_MODES",
]  # plus SAFECallback, built on first access (importing transformers' trainer stack takes seconds)

SCORE_MODES = ("last", "mean", "current")


# ----------------------------------------------------------------------------------------------
# Config and schedule
# ----------------------------------------------------------------------------------------------
_MANAGED_BY: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()  # model -> its SAFE


def _managed(model: nn.Module) -> nn.Module:
    """The module that carries the one-SAFE-per-model mark: DDP's inner module, else the model."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclasses.dataclass
class SAFEConfig:
    """SAFE's schedule. ``warmup_steps`` t_w >= 1, ``ramp_end_step`` t_f > t_w,
    ``final_threshold`` T_f in [0, 1], ``score_mode`` in SCORE_MODES, ``measure_interval`` >= 1
    (warm-up step t measures when t % interval == 0, and step t_w - 1 always does; the default 10
    keeps the measuring cost of a warm-up near 1-3% of its time even on small models, where one
    measuring step costs 10-30% extra), ``max_tokens`` (random valid tokens per measurement;
    None = all; >= 2; 1024 keeps most adapters in the cheap T x T form), ``seed`` of that
    sampling. ``allow_freezing_all``: False (default) keeps the most important unit training when
    the schedule would otherwise freeze the last trainable parameter of the model (with a warning
    naming it), so a high threshold never ends in autograd's "does not require grad"; True lets
    the schedule freeze everything."""

    warmup_steps: int
    ramp_end_step: int
    final_threshold: float
    score_mode: str = "last"
    measure_interval: int = 10
    max_tokens: int | None = 1024
    seed: int = 0
    allow_freezing_all: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not _is_int(self.warmup_steps) or self.warmup_steps < 1:
            raise ValueError(f"warmup_steps: expected an integer >= 1 (t_w), got {self.warmup_steps!r}")
        if not _is_int(self.ramp_end_step) or self.ramp_end_step <= self.warmup_steps:
            raise ValueError(f"ramp_end_step: expected an integer > warmup_steps={self.warmup_steps} "
                             f"(t_f > t_w), got {self.ramp_end_step!r}")
        ft = self.final_threshold
        if isinstance(ft, bool) or not isinstance(ft, numbers.Real) or not (0.0 <= float(ft) <= 1.0):
            raise ValueError(f"final_threshold: expected a number in [0, 1] (importance = 1 - CKA lies in "
                             f"[0, 1]), got {ft!r}")
        if self.score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode: expected one of {SCORE_MODES}, got {self.score_mode!r}")
        if not _is_int(self.measure_interval) or self.measure_interval < 1:
            raise ValueError(f"measure_interval: expected an integer >= 1, got {self.measure_interval!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 2):
            raise ValueError(f"max_tokens: expected None or an integer >= 2 (CKA needs 2 tokens), "
                             f"got {self.max_tokens!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed: expected an integer, got {self.seed!r}")
        if not isinstance(self.allow_freezing_all, bool):
            raise ValueError(f"allow_freezing_all: expected True or False, got {self.allow_freezing_all!r}")

    def threshold(self, step: int) -> float:
        """T(t) = T_f (1 - (1 - p)^3), p = clip((t - t_w) / (t_f - t_w), 0, 1)."""
        return safe_threshold(step, self.warmup_steps, self.ramp_end_step, self.final_threshold)

    def measures(self, step: int) -> bool:
        """Whether step ``step`` measures importances (for the units still training)."""
        t_w, k = self.warmup_steps, self.measure_interval
        if step < 0:
            return False
        if step < t_w:
            return step % k == 0 or step == t_w - 1
        if self.score_mode == "current" and step < self.ramp_end_step:
            return (step - t_w) % k == 0
        return False


def safe_threshold(step: int, warmup_steps: int, ramp_end_step: int, final_threshold: float) -> float:
    """The cubic freezing threshold T(t) = T_f (1 - (1 - p)^3), p = clip((t - t_w)/(t_f - t_w), 0, 1)."""
    p = min(max((step - warmup_steps) / (ramp_end_step - warmup_steps), 0.0), 1.0)
    return float(final_threshold) * (1.0 - (1.0 - p) ** 3)


# ----------------------------------------------------------------------------------------------
# Adapter units
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class AdapterUnit:
    """One freezable adapter: a module, the trainable parameters it owns, its score history."""

    name: str
    module: nn.Module
    kind: str
    params: list[nn.Parameter]
    history: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (step, importance)
    frozen_at: int | None = None

    @property
    def frozen(self) -> bool:
        return self.frozen_at is not None

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def _peft_tuner_layer_class():
    if "peft" not in sys.modules:
        try:
            import peft  # noqa: F401
        except Exception:
            return None
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:
        return None
    return BaseTunerLayer


def _peft_params(layer) -> list[nn.Parameter]:
    out = []
    for attr in getattr(layer, "adapter_layer_names", ()):
        container = getattr(layer, attr, None)
        if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            continue
        for adapter in layer.active_adapters:
            if adapter not in container:
                continue
            entry = container[adapter]
            out.extend(entry.parameters() if isinstance(entry, nn.Module) else [entry])
    return out


def find_adapter_units(model: nn.Module) -> list[AdapterUnit]:
    """Every peftops adapter module and PEFT tuner layer of ``model`` (outermost match, module
    order) with its trainable parameters; units with none are left out."""
    tuner_cls = _peft_tuner_layer_class()
    units: list[AdapterUnit] = []
    taken: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        if getattr(type(mod), "peftops_adapter", False):
            params, kind = list(mod.adapter_parameters()), type(mod).__name__
        elif tuner_cls is not None and isinstance(mod, tuner_cls):
            params = _peft_params(mod)
            kind = f"{type(mod).__module__.split('.')[-2]}.{type(mod).__name__}"  # e.g. lora.Linear
        else:
            continue
        taken.append(name)
        seen, uniq = set(), []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                uniq.append(p)
        if uniq:
            units.append(AdapterUnit(name or type(mod).__name__, mod, kind, uniq))
    return units


# ----------------------------------------------------------------------------------------------
# Saved-tensor accounting
# ----------------------------------------------------------------------------------------------
class SavedTensorMeter:
    """Bytes autograd saves for backward inside the ``with`` block (unique storages).

        with SavedTensorMeter(model) as m:
            loss = model(**batch).loss
        m.activation_bytes, m.parameter_bytes, m.total_bytes

    ``parameter_bytes`` are saved tensors that share storage with a parameter or buffer of the
    given modules (weights kept for the input gradient: no extra memory); ``activation_bytes``
    is everything else, i.e. what the forward keeps alive for backward."""

    def __init__(self, *modules: nn.Module):
        self._modules = modules
        self.activation_bytes = 0
        self.parameter_bytes = 0
        self.count = 0
        self._seen: set = set()
        self._param_ptrs: set = set()
        self._ctx = None

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + self.parameter_bytes

    def _pack(self, t: torch.Tensor):
        self.count += 1
        try:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), t.device)
            nbytes = storage.nbytes()
        except Exception:  # tensors without a plain storage (sparse, nested ...)
            key, nbytes = (id(t), t.device), t.numel() * t.element_size()
        if key not in self._seen:
            self._seen.add(key)
            if key in self._param_ptrs:
                self.parameter_bytes += nbytes
            else:
                self.activation_bytes += nbytes
        return t

    @staticmethod
    def _unpack(t):
        return t

    def __enter__(self):
        for m in self._modules:
            for t in list(m.parameters()) + list(m.buffers()):
                self._param_ptrs.add((t.untyped_storage().data_ptr(), t.device))
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self._ctx = None
        return False


# ----------------------------------------------------------------------------------------------
# The controller
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("peftops::safe_linear_cka", mutates_args=())
def _cka_op(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """linear_cka as one opaque op, so a measuring forward traces under torch.compile(fullgraph=True)
    (the kernel dispatch reads Python state that dynamo cannot trace)."""
    return linear_cka(x, y, mask)


@_cka_op.register_fake
def _(x, y, mask):
    return x.new_empty((), dtype=torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32)


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    for a in kwargs.values():
        if isinstance(a, torch.Tensor):
            return a
    return None


def _output_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((o for o in out if isinstance(o, torch.Tensor)), None)
    if isinstance(out, dict):
        return next((o for o in out.values() if isinstance(o, torch.Tensor)), None)
    return None


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation-checkpoint recomputation)."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


class SAFE:
    """Selective adapter freezing controller for ``model`` (see the module docstring).

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
    one. Freezing a parameter that a ``DistributedDataParallel`` wrapper registered (found through
    the wrapper given, or among live DDP objects when the inner model is given) requires the wrapper
    to have ``find_unused_parameters=True`` and ``static_graph=False``: otherwise DDP skips the
    gradient all-reduce of that step (replicas silently diverge) and fails at the next forward, so
    SAFE raises a RuntimeError naming the fix, at construction when ``final_threshold > 0`` and
    again before any freeze.
    """

    def __init__(self, model: nn.Module, config: SAFEConfig, optimizer=None, *, start_step: int = 0,
                 units: Sequence[AdapterUnit] | None = None, process_group=None):
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
        self._by_name = {u.name: u for u in self.units}
        self._owners: dict[int, list[AdapterUnit]] = {}
        for u in self.units:
            for p in u.params:
                self._owners.setdefault(id(p), []).append(u)
        self._optimizers: list = []
        for opt in (optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]):
            if opt is not None:
                self._optimizers.append(opt)
        self.log: list[dict[str, Any]] = []
        self._handles: list = []
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._x_stack: dict[str, list] = {}
        self._batch_mask: torch.Tensor | None = None
        self._batch_mask_flat: torch.Tensor | None = None
        self._rows_cache: dict = {}
        self._generators: dict = {}
        self._rng_pending: dict[str, torch.Tensor] = {}  # device type -> sampling state from load_state_dict
        self._failed: set[str] = set()
        self._forward_arg_names = self._arg_names(model)
        self._current: int | None = None
        self._entry: dict[str, Any] | None = None
        self._warned_all_frozen = False
        self._group = self._resolve_group(process_group)
        self._await_reduce = False  # a measuring step whose scores still need the cross-rank mean
        self._ddp_found = None  # weakref to the DDP wrapper found around the inner model
        if self._group is not None:
            self._check_ranks_agree(start_step)
        if float(config.final_threshold) > 0:
            self._check_ddp_allows_freezing(self._unique_params())
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
        if self._current == step and self._entry is not None:
            return []
        self._disarm()
        self._current = step
        thr = self.config.threshold(step)
        newly = []
        if step >= self.config.warmup_steps:
            for u in self.units:
                if u.frozen:
                    continue
                s = self._compared_score(u)
                if s is not None and s < thr:
                    newly.append(u)
        newly = self._keep_something_training(newly)
        self._freeze_units(newly, step)
        self._reassert_frozen()
        measuring = self.config.measures(step) and any(not u.frozen for u in self.units)
        self._entry = {
            "step": step, "threshold": thr, "measuring": measuring, "newly_frozen": [u.name for u in newly],
            "n_frozen": sum(u.frozen for u in self.units), "n_units": len(self.units),
            "trainable_adapter_params": sum(p.numel() for p in self._unique_params() if p.requires_grad),
        }
        self.log.append(self._entry)
        if measuring:
            self._arm()
        # decided identically on every rank (same schedule, same frozen set), so every rank joins
        self._await_reduce = measuring and self._group is not None
        return [u.name for u in newly]

    def end_step(self, step: int | None = None) -> dict[str, float]:
        """Finish step ``step`` (default: the prepared one): disarm the hooks and record the mean
        importance of each unit measured during it (one host sync). Returns those scores."""
        step = self._current if step is None else step
        self._disarm()
        scores = self._collect()
        if self._await_reduce:
            self._await_reduce = False
            scores = self._mean_over_ranks(scores)
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
        if not self.config.allow_freezing_all and self._nothing_would_train(chosen):
            raise ValueError(f"names: freezing {[u.name for u in chosen][:5]} would leave nothing in the model to "
                             "train; keep one unit, or set SAFEConfig(allow_freezing_all=True)")
        self._freeze_units(chosen, self._current if step is None else step)
        if self._entry is not None:
            self._entry["newly_frozen"] = self._entry["newly_frozen"] + [u.name for u in chosen]
            self._entry["n_frozen"] = sum(u.frozen for u in self.units)
        return [u.name for u in chosen]

    def release(self, optimizer) -> None:
        """Track ``optimizer`` too and drop its state for every parameter frozen so far."""
        if optimizer not in self._optimizers:
            self._optimizers.append(optimizer)
        for p in self._unique_params():
            if not p.requires_grad:
                self._drop_state(optimizer, p)

    def remove(self) -> None:
        """Remove every hook SAFE registered (frozen parameters stay frozen) and let another SAFE
        manage the model (a later ``begin_step`` takes it back if no other one did)."""
        self._disarm()
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
    STATE_VERSION = 1

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
            "armed": bool(self._handles),
            "units": self.unit_names,
            "history": {u.name: [[t, s] for t, s in u.history] for u in self.units},
            "frozen": {u.name: u.frozen_at for u in self.units if u.frozen},
            "failed": sorted(self._failed),
            "sampling": self._sampling_state(),
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
        parsed = self._parse_state(state)
        self._check_not_managed()
        to_freeze = [(self._by_name[n], t) for n, t in parsed["frozen"].items() if not self._by_name[n].frozen]
        off = self._turning_off([u for u, _ in to_freeze])
        if off:
            self._check_ddp_allows_freezing(off)
        saved_step = parsed["step"]
        target = max(t for t in (self._current, saved_step, 0) if t is not None)
        thr = self.config.threshold(target)
        if target >= self.config.warmup_steps and any(sc < thr for hist in parsed["history"].values() for _, sc in hist):
            self._check_ddp_allows_freezing(self._unique_params())  # the step prepared below may freeze more
        # -- nothing below raises: checked above
        self._disarm()
        for name, hist in parsed["history"].items():
            self._by_name[name].history = hist
        by_step: dict[int, list[AdapterUnit]] = {}
        for u, t in to_freeze:
            by_step.setdefault(t, []).append(u)
        for t, us in sorted(by_step.items()):
            self._freeze_units(us, t)
        self._failed = set(parsed["failed"]) | self._failed
        self._load_sampling_state(parsed["sampling"])
        own, loaded = self._entry, parsed["log"]
        self.log = loaded + [e for e in self.log if e is not own and e not in loaded]
        self._current, self._entry, self._await_reduce = None, None, False
        last = loaded[-1] if loaded else None
        if saved_step == target and last is not None and last["step"] == target:
            # the state was saved with this step prepared: its decisions are in the state already
            self._current, self._entry = target, last
            if parsed["armed"] and last["measuring"] and any(not u.frozen for u in self.units):
                self._arm()
                self._await_reduce = self._group is not None
        else:
            self.begin_step(target)

    def _parse_state(self, state) -> dict[str, Any]:
        """``state`` checked and converted (fresh objects: nothing aliases the caller's dict)."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected the dict of SAFE.state_dict(), got {type(state).__name__}")
        fields = {"version", "step", "armed", "units", "history", "frozen", "failed", "sampling", "log"}
        extra = sorted(map(str, set(state) - fields))
        if extra:
            raise ValueError(f"state: unknown fields {extra[:5]} (expected those of SAFE.state_dict(): {sorted(fields)})")
        version = state.get("version", self.STATE_VERSION)
        if type(version) is not int or version != self.STATE_VERSION:
            raise ValueError(f"state: version: expected {self.STATE_VERSION}, got {version!r} (written by another "
                             "peftops?)")
        known = self._by_name

        def bad(field, what, got):
            return ValueError(f"state: {field}: expected {what}, got {got!r:.120}")

        def unit(field, name):
            if not isinstance(name, str) or name not in known:
                raise ValueError(f"state: {field}: unknown adapter unit {name!r:.80}; this SAFE's units are e.g. "
                                 f"{self.unit_names[:3]}")
            return name

        def step_of(field, t, allow_none=False):
            if t is None and allow_none:
                return None
            if not _is_int(t) or t < 0:
                raise bad(field, "an integer step >= 0" + (" or None" if allow_none else ""), t)
            return int(t)

        def score_of(field, s):
            if isinstance(s, bool) or not isinstance(s, numbers.Real):
                raise bad(field, "a number (an importance score)", s)
            return float(s)

        def mapping(field):
            v = state.get(field, {})
            if not isinstance(v, dict):
                raise bad(field, "a mapping unit name -> ...", v)
            return v

        out: dict[str, Any] = {"step": step_of("step", state.get("step"), allow_none=True)}
        armed = state.get("armed", True)
        if not isinstance(armed, bool):
            raise bad("armed", "True or False", armed)
        out["armed"] = armed
        units = state.get("units")
        if units is not None:
            if not isinstance(units, list) or not all(isinstance(n, str) for n in units):
                raise bad("units", "a list of adapter unit names", units)
            missing, unexpected = sorted(set(known) - set(units)), sorted(set(units) - set(known))
            if missing or unexpected:
                raise ValueError(f"state: units: the state's adapter units are not this SAFE's (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}): a checkpoint of another model or adapter config?")
        history = {}
        for name, hist in mapping("history").items():
            unit("history", name)
            if not isinstance(hist, (list, tuple)):
                raise bad(f"history[{name!r}]", "a list of [step, score] pairs", hist)
            pairs = []
            for i, pair in enumerate(hist):
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise bad(f"history[{name!r}][{i}]", "a [step, score] pair", pair)
                pairs.append((step_of(f"history[{name!r}][{i}]", pair[0]),
                              score_of(f"history[{name!r}][{i}]", pair[1])))
            history[name] = pairs
        out["history"] = history
        out["frozen"] = {unit("frozen", name): step_of(f"frozen[{name!r}]", t) for name, t in mapping("frozen").items()}
        failed = state.get("failed", [])
        if not isinstance(failed, (list, tuple)):
            raise bad("failed", "a list of adapter unit names", failed)
        out["failed"] = [unit("failed", n) for n in failed]
        sampling = state.get("sampling", {})
        if not isinstance(sampling, dict):
            raise bad("sampling", "a mapping device type -> generator state (hex)", sampling)
        out["sampling"] = {}
        for dev_type, hexstate in sampling.items():
            try:
                raw = torch.tensor(list(bytes.fromhex(hexstate)), dtype=torch.uint8)
                try:
                    probe = torch.Generator(device=dev_type)
                except (RuntimeError, TypeError, ValueError):  # a device type this process lacks: kept, unused
                    probe = None
                if probe is not None:
                    probe.set_state(raw)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"state: sampling[{dev_type!r:.40}]: not a torch.Generator state ({e})") from None
            out["sampling"][dev_type] = raw
        log = state.get("log", [])
        if not isinstance(log, (list, tuple)):
            raise bad("log", "a list of step entries", log)
        entries = []
        for i, e in enumerate(log):
            where = f"log[{i}]"
            if not isinstance(e, dict):
                raise bad(where, "a dict (one step's entry)", e)
            step_of(f"{where}['step']", e.get("step"))
            score_of(f"{where}['threshold']", e.get("threshold"))
            if not isinstance(e.get("measuring"), bool):
                raise bad(f"{where}['measuring']", "True or False", e.get("measuring"))
            newly = e.get("newly_frozen")
            if not isinstance(newly, list):
                raise bad(f"{where}['newly_frozen']", "a list of adapter unit names", newly)
            for n in newly:
                unit(f"{where}['newly_frozen']", n)
            scores = e.get("scores", {})
            if not isinstance(scores, dict):
                raise bad(f"{where}['scores']", "a mapping unit name -> score", scores)
            for n, sc in scores.items():
                unit(f"{where}['scores']", n)
                score_of(f"{where}['scores'][{n!r}]", sc)
            entries.append(copy.deepcopy(e))
        out["log"] = entries
        return out

    def _sampling_state(self) -> dict[str, str]:
        """The token-sampling generators' states by device type (hex of torch.Generator.get_state())."""
        out = {t: bytes(s.tolist()).hex() for t, s in self._rng_pending.items()}
        for dev, gen in self._generators.items():
            out[dev.type] = bytes(gen.get_state().tolist()).hex()
        return out

    def _load_sampling_state(self, states: dict[str, torch.Tensor]) -> None:
        self._generators, self._rng_pending = {}, dict(states)
        for dev in {p.device for p in self._unique_params()}:  # where the hooks will sample: set it now
            saved = self._rng_pending.pop(dev.type, None)
            if saved is not None:
                gen = torch.Generator(device=dev)
                gen.set_state(saved)
                self._generators[dev] = gen

    # -- report -----------------------------------------------------------------------------------
    def report(self) -> str:
        """A readable table: one row per unit (type, parameters, scores, when frozen), then the
        steps at which units were frozen."""
        c = self.config
        total = sum(p.numel() for p in self._unique_params())
        frozen_params = sum(p.numel() for p in self._unique_params() if not p.requires_grad)
        n_frozen = sum(u.frozen for u in self.units)
        lines = [
            f"SAFE: warm-up steps 0..{c.warmup_steps - 1}, threshold ramps to {c.final_threshold:g} at step "
            f"{c.ramp_end_step}; score = {c.score_mode}; measured every {c.measure_interval} step(s) on <= "
            f"{c.max_tokens if c.max_tokens else 'all'} tokens",
            f"step {self._current}: threshold {self.threshold():.4f}; {n_frozen}/{len(self.units)} units frozen, "
            f"{frozen_params:,}/{total:,} adapter parameters frozen ({100.0 * frozen_params / max(total, 1):.1f}%)",
            "",
        ]
        head = ["unit", "type", "params", "score", "last", "warm-up mean", "measured", "frozen at"]
        rows = [head]
        for u in self.units:
            warm = [s for t, s in u.history if t < c.warmup_steps and s == s]
            used = self._compared_score(u)
            rows.append([
                u.name, u.kind, f"{u.numel:,}", "-" if used is None else f"{used:.4f}",
                f"{u.history[-1][1]:.4f}" if u.history else "-",
                f"{sum(warm) / len(warm):.4f}" if warm else "-", str(len(u.history)),
                "-" if u.frozen_at is None else f"step {u.frozen_at}",
            ])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        for i, r in enumerate(rows):
            lines.append("  ".join(v.ljust(w) if j < 2 else v.rjust(w) for j, (v, w) in enumerate(zip(r, widths))))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        events = [e for e in self.log if e.get("newly_frozen")]
        if events:
            lines += ["", "freezing decisions:"]
            for e in events:
                lines.append(f"  step {e['step']} (threshold {e['threshold']:.4f}): froze {len(e['newly_frozen'])}: "
                             + ", ".join(e["newly_frozen"]))
        return "\n".join(lines)

    # -- internals: scores and freezing -----------------------------------------------------------
    def _compared_score(self, u: AdapterUnit) -> float | None:
        mode, t_w = self.config.score_mode, self.config.warmup_steps
        hist = [(t, s) for t, s in u.history if s == s]  # NaN: undefined measurement
        if mode != "current":
            hist = [(t, s) for t, s in hist if t < t_w]
        if not hist:
            return None
        if mode == "mean":
            return sum(s for _, s in hist) / len(hist)
        return hist[-1][1]

    def _unique_params(self) -> list[nn.Parameter]:
        seen, out = set(), []
        for u in self.units:
            for p in u.params:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    @staticmethod
    def _drop_state(optimizer, p) -> None:
        state = getattr(optimizer, "state", None)
        if state is not None and p in state:
            del state[p]

    def _turning_off(self, units: list[AdapterUnit]) -> list[nn.Parameter]:
        """The parameters freezing ``units`` would stop (a parameter shared by units stops with the last)."""
        chosen = {id(u) for u in units}
        return [p for u in units for p in u.params if p.requires_grad
                and all(o.frozen or id(o) in chosen for o in self._owners[id(p)])]

    def _nothing_would_train(self, units: list[AdapterUnit]) -> bool:
        off = {id(p) for p in self._turning_off(units)}
        return bool(off) and not any(p.requires_grad and id(p) not in off for p in self.model.parameters())

    def _keep_something_training(self, units: list[AdapterUnit]) -> list[AdapterUnit]:
        """Unless ``allow_freezing_all``: drop from the schedule's freeze list the most important
        unit when freezing them all would leave the model with no trainable parameter."""
        if self.config.allow_freezing_all or not units or not self._nothing_would_train(units):
            return units
        keep = max(units, key=lambda u: self._compared_score(u) or 0.0)
        if not self._warned_all_frozen:
            self._warned_all_frozen = True
            warnings.warn(f"SAFE: threshold {self.config.threshold(self._current):.4f} would freeze every adapter unit "
                          f"and leave nothing in the model to train; keeping the most important one, {keep.name!r}, "
                          "training (lower final_threshold, or set SAFEConfig(allow_freezing_all=True) to freeze "
                          "everything)", stacklevel=3)
        return [u for u in units if u is not keep]

    def _freeze_units(self, units: list[AdapterUnit], step) -> None:
        turning_off = self._turning_off(units)
        if turning_off:
            self._check_ddp_allows_freezing(turning_off)  # before any state changes
        for u in units:
            u.frozen_at = step
        for u in units:
            for p in u.params:
                if all(o.frozen for o in self._owners[id(p)]) and p.requires_grad:
                    p.requires_grad_(False)
                    p.grad = None
                    for opt in self._optimizers:
                        self._drop_state(opt, p)
        if units and all(u.frozen for u in self.units) and not self._warned_all_frozen:
            self._warned_all_frozen = True
            warnings.warn("SAFE: every adapter unit is frozen; unless other parameters train, the loss no longer "
                          "requires grad (lower final_threshold to keep some adapters training)", stacklevel=4)

    def _reassert_frozen(self) -> None:
        # PEFT's set_adapter / enable_adapters turn requires_grad back on: frozen stays frozen.
        for u in self.units:
            if u.frozen:
                for p in u.params:
                    if p.requires_grad and all(o.frozen for o in self._owners[id(p)]):
                        p.requires_grad_(False)
                        p.grad = None

    # -- internals: distributed ------------------------------------------------------------------
    @staticmethod
    def _resolve_group(process_group):
        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise RuntimeError("process_group: given, but torch.distributed is not initialised")
            return None
        group = dist.group.WORLD if process_group is None else process_group
        return group if dist.get_world_size(group) > 1 else None

    def _comm_device(self) -> torch.device:
        backend = str(dist.get_backend(self._group)).lower()
        if "gloo" in backend or "mpi" in backend:
            return torch.device("cpu")
        dev = self.units[0].params[0].device
        if dev.type != "cpu":
            return dev
        if torch.cuda.is_available():  # nccl with the adapters on CPU
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _check_ranks_agree(self, start_step: int) -> None:
        """One all-reduce (max of [v, -v]): every rank has the same units, config and start step."""
        import zlib

        c = self.config
        sig = repr((self.unit_names, [u.numel for u in self.units], c.warmup_steps, c.ramp_end_step,
                    float(c.final_threshold), c.score_mode, c.measure_interval, start_step))
        v = torch.tensor([len(self.units), zlib.crc32(sig.encode())], dtype=torch.int64)
        both = torch.cat([v, -v]).to(self._comm_device())
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self._group)
        both = both.cpu()
        if not torch.equal(both[:2], -both[2:]):
            raise RuntimeError(
                f"SAFE: the ranks of the process group disagree on the adapter units ({len(self.units)} here), "
                "the SAFEConfig or start_step; build SAFE on every rank from identical models and configs")

    def _mean_over_ranks(self, local: dict[str, float]) -> dict[str, float]:
        """Per unit: mean of the ranks' defined scores; NaN if ranks measured it but none defined
        it; absent if no rank measured it. One fp64 all-reduce of [sum, n defined, n measured]."""
        n = len(self.units)
        buf = torch.zeros(3, n, dtype=torch.float64)
        for i, u in enumerate(self.units):
            s = local.get(u.name)
            if s is None:
                continue
            buf[2, i] = 1.0
            if s == s:
                buf[0, i], buf[1, i] = s, 1.0
        buf = buf.to(self._comm_device())
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self._group)
        total, defined, measured = buf.cpu().tolist()
        out = {}
        for i, u in enumerate(self.units):
            if measured[i] > 0:
                out[u.name] = total[i] / defined[i] if defined[i] > 0 else float("nan")
        return out

    def _ddp_wrappers(self, params: list[nn.Parameter]) -> list:
        """The DistributedDataParallel objects that registered any of ``params``."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        if isinstance(self.model, DDP):
            candidates = [self.model]
        elif not (dist.is_available() and dist.is_initialized()):
            return []  # no process group, no live DDP
        elif self._ddp_found is not None and self._ddp_found() is not None:
            candidates = [self._ddp_found()]  # found before and still alive: no rescan
        else:
            ddp_types, todo = set(), [DDP]
            while todo:
                t = todo.pop()
                ddp_types.add(t)
                todo.extend(t.__subclasses__())
            # the inner model was given (the Trainer callback sees only that): find its wrapper among
            # the gc-tracked objects. Only at construction and freeze events until found (measured
            # ~0.1 s without a DDP, ~0.2 s with one, in a process holding 430k objects).
            objs = gc.get_objects()
            candidates = ([o for o in objs if type(o) in ddp_types]
                          if ddp_types.intersection(map(type, objs)) else [])
            del objs
        ids = {id(p) for p in params}
        found = [d for d in candidates
                 if any(id(p) in ids for p in getattr(d, "_module_parameters", None) or d.module.parameters())]
        if found and not isinstance(self.model, DDP):
            self._ddp_found = weakref.ref(found[0])
        return found

    def _check_ddp_allows_freezing(self, params: list[nn.Parameter]) -> None:
        for d in self._ddp_wrappers(params):
            bad = []
            if not getattr(d, "find_unused_parameters", True):
                bad.append("find_unused_parameters=False")
            if getattr(d, "static_graph", False):
                bad.append("static_graph=True")
            if bad:
                raise RuntimeError(
                    f"SAFE: the model is wrapped in DistributedDataParallel with {' and '.join(bad)}; freezing "
                    "adapters would stop their gradients, which that DDP cannot handle (it skips the step's "
                    "gradient all-reduce, so replicas diverge, then fails at the next forward). Wrap with "
                    "DistributedDataParallel(model, find_unused_parameters=True) (static_graph=False); with "
                    "transformers.Trainer set TrainingArguments(ddp_find_unused_parameters=True) (and leave "
                    "ddp_static_graph unset); with accelerate pass "
                    "DistributedDataParallelKwargs(find_unused_parameters=True)")

    # -- internals: measurement hooks -------------------------------------------------------------
    @staticmethod
    def _arg_names(model) -> list[str]:
        try:
            return list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            return []

    def _arm(self) -> None:
        self._batch_mask, self._rows_cache = None, {}
        self._handles.append(self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        for u in self.units:
            if u.frozen or u.name in self._failed:
                continue
            self._handles.append(u.module.register_forward_pre_hook(self._make_pre(u), with_kwargs=True))
            self._handles.append(u.module.register_forward_hook(self._make_post(u), with_kwargs=True))

    def _disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._x_stack = {}
        self._batch_mask, self._rows_cache = None, {}

    def _capture_mask(self, module, args, kwargs):
        self._batch_mask, self._rows_cache = None, {}
        am = kwargs.get("attention_mask")
        if am is None and "attention_mask" in self._forward_arg_names:
            i = self._forward_arg_names.index("attention_mask")
            am = args[i] if i < len(args) else None
        if isinstance(am, torch.Tensor) and am.dim() == 2:
            # bool once per forward (not per unit); one object, so it also keys the row cache
            self._batch_mask = am.detach() if am.dtype == torch.bool else am.detach() != 0
            self._batch_mask_flat = self._batch_mask.reshape(-1)

    def _mask_for(self, lead: tuple) -> torch.Tensor | None:
        m = self._batch_mask
        if m is None:
            return None
        if tuple(m.shape) == tuple(lead) or (len(lead) == 1 and m.numel() == lead[0]):
            return self._batch_mask_flat
        return None  # e.g. unpadded (varlen) token layouts: every row is a real token

    def _rows(self, T: int, mask: torch.Tensor | None, device: torch.device):
        """(row index or None, mask of those rows or None) for a [T, d] representation: at most
        max_tokens random valid rows, drawn once per forward and shared by every unit. No host
        sync: padding rows get keys above every valid one, so top-k keeps valid rows first."""
        key = (T, device, None if mask is None else id(mask))
        hit = self._rows_cache.get(key)
        if hit is not None:
            return hit
        k = self.config.max_tokens
        if k is None or T <= k:
            out = (None, mask)
        else:
            gen = self._generators.get(device)
            if gen is None:
                gen = torch.Generator(device=device)
                saved = self._rng_pending.pop(device.type, None)
                if saved is not None and not torch.compiler.is_compiling():  # resumed: continue the stream
                    gen.set_state(saved)
                else:
                    gen.manual_seed(self.config.seed)
                self._generators[device] = gen
            keys = torch.rand(T, generator=gen, device=device)
            if mask is not None:
                keys = keys.masked_fill(~mask, 2.0)
            idx = keys.topk(k, largest=False, sorted=False).indices
            out = (idx, None if mask is None else mask[idx])
        self._rows_cache[key] = out
        return out

    @staticmethod
    def _measuring(module) -> bool:
        # Not under grad-mode checks: reentrant activation checkpointing runs the real forward
        # under no_grad. Its recomputation (inside backward) is skipped: it would measure twice.
        if torch.compiler.is_compiling():  # a compiled graph's recomputation never reruns module hooks
            return module.training
        return module.training and not _in_backward()

    def _make_pre(self, unit: AdapterUnit):
        name = unit.name

        def pre_hook(module, args, kwargs):
            snap = None
            x = _first_tensor(args, kwargs) if self._measuring(module) else None
            if x is not None and x.is_floating_point() and x.dim() >= 2 and math.prod(x.shape[:-1]) >= 2:
                lead = tuple(x.shape[:-1])
                T = math.prod(lead)
                mask = self._mask_for(lead)
                if mask is not None and mask.device != x.device:
                    mask = None
                idx, m = self._rows(T, mask, x.device)
                x2 = x.detach().reshape(T, x.shape[-1])
                # a copy: the module may update its input in place (e.g. AoT's bias add)
                snap = (x2[idx] if idx is not None else x2.clone(), idx, m, lead)
            self._x_stack.setdefault(name, []).append(snap)

        return pre_hook

    def _make_post(self, unit: AdapterUnit):
        name = unit.name

        def post_hook(module, args, kwargs, output):
            stack = self._x_stack.get(name)
            snap = stack.pop() if stack else None
            if snap is None:
                return
            x2, idx, m, lead = snap
            y = _output_tensor(output)
            if y is None or not y.is_floating_point() or tuple(y.shape[:-1]) != lead:
                return
            y2 = y.detach().reshape(-1, y.shape[-1])
            if idx is not None:
                y2 = y2[idx]
            if x2.dtype != y2.dtype:  # autocast: measure both in the narrower dtype (a measurement)
                narrow = x2.dtype if x2.element_size() < y2.element_size() else y2.dtype
                x2, y2 = x2.to(narrow), y2.to(narrow)
            try:
                # 0-dim, stays on the device until the step ends
                cka = _cka_op(x2, y2, m) if torch.compiler.is_compiling() else linear_cka(x2, y2, m)
            except Exception as e:  # never break training over a measurement
                self._failed.add(name)
                warnings.warn(f"SAFE: cannot measure {name} ({type(e).__name__}: {e}); it will not be scored",
                              stacklevel=2)
                return
            self._pending.setdefault(name, []).append(cka)

        return post_hook

    def _collect(self) -> dict[str, float]:
        pending, self._pending = self._pending, {}
        if not pending:
            return {}
        flat = [(name, t) for name, ts in pending.items() for t in ts]
        by_device: dict = {}
        for i, (_, t) in enumerate(flat):
            by_device.setdefault(t.device, []).append(i)
        values = [0.0] * len(flat)
        for idxs in by_device.values():  # one sync per device
            for i, v in zip(idxs, torch.stack([flat[i][1].float() for i in idxs]).tolist()):
                values[i] = v
        sums: dict[str, list[float]] = {}
        for (name, _), cka in zip(flat, values):  # importance = 1 - CKA, clipped to [0, 1] (rounding)
            sums.setdefault(name, []).append(min(max(1.0 - cka, 0.0), 1.0) if cka == cka else float("nan"))
        out = {}
        for name, vs in sums.items():
            good = [v for v in vs if v == v]
            out[name] = sum(good) / len(good) if good else float("nan")
        return out


# ----------------------------------------------------------------------------------------------
# transformers integration
# ----------------------------------------------------------------------------------------------
def _make_callback_class():
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class SAFECallback(TrainerCallback, ExportableState):
        """Runs SAFE inside ``transformers.Trainer``: ``SAFECallback(SAFEConfig(...))`` builds the
        controller at train begin from the Trainer's model and optimizer (state released there);
        ``SAFECallback(safe)`` uses an existing one. Step t measures/freezes between
        ``on_step_begin`` and ``on_step_end`` (evaluation in between steps is never measured).
        ``callback.safe.report()`` after training; ``callback.safe.log`` has every step.
        ``process_group``: as in ``SAFE`` (under DDP the default WORLD group keeps the ranks'
        decisions identical; freezing needs ``ddp_find_unused_parameters=True``).

        Checkpoints: SAFE's state (``SAFE.state_dict()``: scores, frozen units, log, sampling state)
        goes into every Trainer checkpoint (trainer_state.json, ``stateful_callbacks['SAFECallback']``,
        through transformers' ``ExportableState``). ``trainer.train(resume_from_checkpoint=...)``
        restores it at train begin, after the Trainer loaded the weights and the optimizer state and
        before the first step: the checkpoint's frozen units are frozen again, and the run continues
        as the uninterrupted one would. This needs no Trainer option; with
        ``restore_callback_states_from_checkpoint=True`` transformers replaces this callback object
        by a copy built from its config (``trainer.callback_handler`` holds it), which restores the
        same way. A checkpoint's SAFE state that does not fit raises (starting "resume_from_checkpoint:")
        before anything changes; a checkpoint without one (written without SAFECallback) warns and
        SAFE starts with no scores."""

        def __init__(self, config_or_safe: SAFEConfig | SAFE | dict, *, verbose: bool = False, process_group=None):
            if isinstance(config_or_safe, dict):  # rebuilt from a checkpoint's args (ExportableState)
                try:
                    config_or_safe = SAFEConfig(**config_or_safe)
                except TypeError as e:
                    raise ValueError(f"config_or_safe: expected a SAFEConfig's fields, got {sorted(config_or_safe)} "
                                     f"({e})") from None
            if isinstance(config_or_safe, SAFE):
                self.safe, self.config = config_or_safe, config_or_safe.config
            elif isinstance(config_or_safe, SAFEConfig):
                self.safe, self.config = None, config_or_safe
            else:
                raise TypeError(f"config_or_safe: expected a SAFEConfig or a SAFE, got {type(config_or_safe).__name__}")
            if not isinstance(verbose, bool):
                raise TypeError(f"verbose: expected True or False, got {verbose!r}")
            self.verbose = verbose
            self.process_group = process_group

        def state(self) -> dict:
            """What a Trainer checkpoint keeps of this callback (ExportableState)."""
            return {"args": {"config_or_safe": dataclasses.asdict(self.config), "verbose": self.verbose},
                    "attributes": {"safe_state": None if self.safe is None else self.safe.state_dict()}}

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            saved = _checkpoint_safe_state(state, type(self).__name__)
            if self.safe is None:
                if model is None:
                    raise ValueError("model: the Trainer passed no model to SAFECallback.on_train_begin")
                safe = SAFE(model, self.config, optimizer=optimizer, start_step=state.global_step,
                            process_group=self.process_group)
                if saved is not None:
                    try:
                        _load_checkpoint_state(safe, saved, type(self).__name__)
                    except BaseException:
                        safe.remove()  # built above, froze nothing: gone again
                        raise
                self.safe = safe
            else:
                if saved is not None:
                    _load_checkpoint_state(self.safe, saved, type(self).__name__)
                if optimizer is not None:
                    self.safe.release(optimizer)
                self.safe.begin_step(state.global_step)
            entries = getattr(state, "stateful_callbacks", None)
            if isinstance(entries, dict) and type(self).__name__ not in entries:
                # resumed from a checkpoint written without this callback: the Trainer's next save
                # indexes stateful_callbacks[name] and would raise KeyError
                entries[type(self).__name__] = self.state()

        def on_step_begin(self, args, state, control, **kwargs):
            newly = self.safe.begin_step(state.global_step)
            if newly and self.verbose:
                print(f"SAFE step {state.global_step}: froze {len(newly)} adapter unit(s): {', '.join(newly)}")

        def on_step_end(self, args, state, control, **kwargs):
            self.safe.end_step(state.global_step - 1)

        def on_train_end(self, args, state, control, **kwargs):
            if self.safe is not None:
                self.safe.remove()

    SAFECallback.__module__ = __name__
    SAFECallback.__qualname__ = "SAFECallback"
    return SAFECallback


_CHECKPOINT_WHAT = "resume_from_checkpoint: the checkpoint's SAFE state (trainer_state.json, stateful_callbacks[{!r}])"


def _checkpoint_safe_state(state, name: str) -> dict | None:
    """The SAFE state a resumed Trainer run restores (None: a fresh run, or a checkpoint without one)."""
    if not getattr(state, "global_step", 0):
        return None  # a fresh run: stateful_callbacks holds this run's own (initial) states
    entries = getattr(state, "stateful_callbacks", None) or {}
    data = entries.get(name) if isinstance(entries, dict) else None
    if isinstance(data, list):  # several callbacks of this class: one SAFE per model, so the first
        data = data[0] if data else None
    saved = None
    if data is not None:
        attrs = data.get("attributes") if isinstance(data, dict) else None
        if not isinstance(attrs, dict):
            raise ValueError(f"{_CHECKPOINT_WHAT.format(name)}: expected {{'args': ..., 'attributes': {{'safe_state': "
                             f"...}}}}, got {data!r:.120}")
        saved = attrs.get("safe_state")
    if saved is None:
        warnings.warn(f"SAFE: resuming at step {state.global_step} from a checkpoint without SAFE state (written "
                      "without SAFECallback, or by an older peftops); SAFE starts with no scores, so units are frozen "
                      "only after they are measured again", stacklevel=3)
    return saved


def _load_checkpoint_state(safe: SAFE, saved, name: str) -> None:
    try:
        safe.load_state_dict(saved)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{_CHECKPOINT_WHAT.format(name)} does not fit this run: {e}") from None


def __getattr__(name: str):
    if name == "SAFECallback":
        cls = _make_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
