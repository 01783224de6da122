"""Distributed SAFE: the process group whose ranks must decide alike, the construction check that they
agree, the cross-rank mean of a measuring step's scores (one fp64 all-reduce), and ``DDPGuard``: the
``DistributedDataParallel`` wrapper of the model and the check that it lets adapters freeze
(``find_unused_parameters=True``, ``static_graph=False``)."""
from __future__ import annotations

import weakref
import zlib
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

_DDP_FIX = (
    "freezing adapters would stop their gradients, which that DDP cannot handle (it skips the step's "
    "gradient all-reduce, so replicas diverge, then fails at the next forward). Wrap with "
    "DistributedDataParallel(model, find_unused_parameters=True) (static_graph=False); with "
    "transformers.Trainer set TrainingArguments(ddp_find_unused_parameters=True) (and leave "
    "ddp_static_graph unset); with accelerate pass "
    "DistributedDataParallelKwargs(find_unused_parameters=True)")


def resolve_group(process_group):
    """The group whose ranks take identical decisions; None when SAFE runs alone (no process group
    initialised, or a group of one rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError("process_group: given, but torch.distributed is not initialised")
        return None
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


def comm_device(group, units) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    dev = units[0].params[0].device
    if dev.type != "cpu":
        return dev
    if torch.cuda.is_available():  # nccl with the adapters on CPU
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_ranks_agree(group, units, config, start_step: int) -> None:
    """One all-reduce (max of [v, -v]): every rank has the same units, config and start step."""
    c = config
    sig = repr(([u.name for u in units], [u.numel for u in units], c.warmup_steps, c.ramp_end_step,
                float(c.final_threshold), c.score_mode, c.measure_interval, start_step))
    v = torch.tensor([len(units), zlib.crc32(sig.encode())], dtype=torch.int64)
    both = torch.cat([v, -v]).to(comm_device(group, units))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    both = both.cpu()
    if not torch.equal(both[:2], -both[2:]):
        raise RuntimeError(
            f"SAFE: the ranks of the process group disagree on the adapter units ({len(units)} here), "
            "the SAFEConfig or start_step; build SAFE on every rank from identical models and configs")


def mean_over_ranks(group, units, local: dict[str, float]) -> dict[str, float]:
    """Per unit: mean of the ranks' defined scores; NaN if ranks measured it but none defined
    it; absent if no rank measured it. One fp64 all-reduce of [sum, n defined, n measured]."""
    n = len(units)
    buf = torch.zeros(3, n, dtype=torch.float64)
    for i, u in enumerate(units):
        s = local.get(u.name)
        if s is None:
            continue
        buf[2, i] = 1.0
        if s == s:
            buf[0, i], buf[1, i] = s, 1.0
    buf = buf.to(comm_device(group, units))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    total, defined, measured = buf.cpu().tolist()
    out = {}
    for i, u in enumerate(units):
        if measured[i] > 0:
            out[u.name] = total[i] / defined[i] if defined[i] > 0 else float("nan")
    return out


def _ddp_class():
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel


def _registered(wrapper) -> list[nn.Parameter]:
    """The parameters a DDP wrapper registered (those trainable when it was built)."""
    return getattr(wrapper, "_module_parameters", None) or list(wrapper.module.parameters())


class DDPGuard:
    """The DistributedDataParallel wrapper of SAFE's model, and the check that freezing is safe under it.

    The wrapper is ``model`` itself when it is one, else ``ddp`` when given (checked to wrap
    ``model``), else the one whose forward runs ``model``: while ``torch.distributed`` is initialised
    and no wrapper is known, a forward pre-hook on ``model`` (``arm``) reads DDP's marker of the
    wrapper running (``DistributedDataParallel._active_ddp_module``) and is removed once it found
    one that registered the adapters' parameters. No wrapper known: nothing to check. When found,
    the parameters frozen so far are checked (``strict_when_found``: every managed parameter, as a
    construction check would) and the forward raises if that wrapper cannot freeze them.
    ``params()``: the managed parameters; ``frozen()``: those frozen so far. Not seen (so not
    checked unless given as ``ddp``): a wrapper whose forward runs the model inside a
    ``torch.compile`` graph, or DDP's python reducer (compiled autograd), which sets no marker."""

    def __init__(self, model: nn.Module, ddp, params: Callable[[], list], frozen: Callable[[], list]):
        DDP = _ddp_class()
        if ddp is not None:
            if not isinstance(ddp, DDP):
                raise TypeError(f"ddp: expected the torch.nn.parallel.DistributedDataParallel wrapping model, "
                                f"got {type(ddp).__name__}")
            if isinstance(model, DDP):
                if ddp is not model:
                    raise ValueError("ddp: model is a DistributedDataParallel already; give the inner model or "
                                     "leave ddp unset")
            elif not {id(p) for p in model.parameters()} & {id(p) for p in ddp.module.parameters()}:
                raise ValueError("ddp: this DistributedDataParallel does not wrap model (no parameter in common)")
        self._model = model
        self._explicit = model if isinstance(model, DDP) else ddp
        self._found: weakref.ref | None = None
        self._probe = None
        self._params, self._frozen = params, frozen
        self.strict_when_found = False

    @property
    def wrapper(self):
        """The known DDP wrapper (None: none known, or it is gone)."""
        if self._explicit is not None:
            return self._explicit
        return self._found() if self._found is not None else None

    def wrappers(self, params: list[nn.Parameter]) -> list:
        """The known DistributedDataParallel wrapper, if it registered any of ``params``."""
        d = self.wrapper
        if d is None:
            return []
        ids = {id(p) for p in params}
        return [d] if any(id(p) in ids for p in _registered(d)) else []

    def check(self, params: list[nn.Parameter]) -> None:
        """Raise unless the wrapper that registered any of ``params`` lets them stop getting gradients."""
        for d in self.wrappers(params):
            bad = []
            if not getattr(d, "find_unused_parameters", True):
                bad.append("find_unused_parameters=False")
            if getattr(d, "static_graph", False):
                bad.append("static_graph=True")
            if bad:
                raise RuntimeError(f"SAFE: the model is wrapped in DistributedDataParallel with {' and '.join(bad)}; "
                                   + _DDP_FIX)

    def arm(self) -> None:
        """Watch ``model``'s forwards for the DDP wrapper running them (when none is known yet)."""
        if self._probe is not None or self.wrapper is not None:
            return
        if not (dist.is_available() and dist.is_initialized()):
            return
        self._probe = self._model.register_forward_pre_hook(self._on_forward)

    def disarm(self) -> None:
        if self._probe is not None:
            self._probe.remove()
            self._probe = None

    def _on_forward(self, module, args):
        if torch.compiler.is_compiling():
            return
        active = getattr(_ddp_class(), "_active_ddp_module", None)
        if active is None:
            return
        ids = {id(p) for p in self._params()}
        if not any(id(p) in ids for p in _registered(active)):
            return  # another DDP (e.g. an inner one around other modules)
        self._found = weakref.ref(active)
        self.disarm()
        self.check(self._params() if self.strict_when_found else self._frozen())
