"""Count host synchronisations on a CPU-only machine.

On a GPU a host sync is any read of device data by the host: ``.item()``/``bool()``/``int()`` of a
tensor, ``.tolist()``, ``.cpu()``/``.numpy()``, and the ops whose output size depends on the data
(nonzero, boolean-mask indexing, masked_select, unique, repeat_interleave without output_size).
On CPU none of them costs anything, so they are counted instead: ``count_host_syncs`` records
every such call made while it is active, at two levels:

* the ATen ops (a TorchDispatchMode sees ``_local_scalar_dense``, ``nonzero``, ``_unique2``, ...);
* the Python methods and functions that read tensor data (``tolist``, ``numpy``, ``cpu``, ``item``,
  ``bool()``/``int()``/``float()``, ``nonzero``, ``unique``, ``masked_select``), wrapped for the duration
  only: on CPU some of them make no ATen op, and the dispatch mode does not see inside torch.library
  custom ops, where most of peftops' work runs.

Calls made from inside triton (the CPU interpreter runs kernels on host arrays) are not counted:
on a GPU those are kernel launches. Tensors that live on the host by design (an optimizer's step
counter, which torch keeps on the CPU unless ``capturable``) are passed as ``allow``.

``torch.cuda.set_sync_debug_mode("error")`` is the GPU counterpart (tests/test_no_host_sync.py).
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# ops whose result the host must read (a scalar) or whose output shape depends on the data
_SYNC_OPS = {
    _aten._local_scalar_dense.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.unique_dim_consecutive.default,
    _aten.equal.default,
    _aten.is_nonzero.default,
}
# Python-level entry points, wrapped too: the dispatch mode does not see inside torch.library custom ops
_PY_METHODS = ("tolist", "numpy", "cpu", "__array__", "item", "__bool__", "__int__", "__float__", "__index__",
               "nonzero", "unique", "unique_consecutive", "masked_select")
_PY_FUNCTIONS = ("nonzero", "unique", "unique_consecutive", "masked_select")
_OURS = (f"{os.sep}peftops{os.sep}", f"{os.sep}kernels{os.sep}")


def _from_triton() -> bool:
    f = sys._getframe(2)
    for _ in range(40):
        if f is None:
            return False
        if f.f_globals.get("__name__", "").startswith("triton"):
            return True
        f = f.f_back
    return False


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


@dataclass
class SyncLog:
    allow: list
    events: list = field(default_factory=list)

    def allowed(self, tensors) -> bool:
        ts = list(tensors)
        return bool(ts) and all(any(t is a or _same_storage(t, a) for a in self.allow) for t in ts)

    def record(self, what: str) -> None:
        frames = traceback.extract_stack(sys._getframe(2), limit=60)
        self.events.append((what, frames))

    def __len__(self) -> int:
        return len(self.events)

    def ours(self, packages=_OURS) -> list:
        """The events with a frame of peftops (the library or its kernels) on the stack: the
        model's own code (transformers' mask helpers, say) may sync; that is not ours to fix."""
        return [(what, frames) for what, frames in self.events
                if any(any(p in f.filename for p in packages) for f in frames)]

    @staticmethod
    def report(events) -> str:
        return "\n\n".join(f"{what}\n" + "".join(traceback.format_list(frames[-14:])) for what, frames in events)


def _same_storage(t: torch.Tensor, a: torch.Tensor) -> bool:
    try:
        return t.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() and t.device == a.device
    except (RuntimeError, NotImplementedError):
        return False


class _SyncMode(TorchDispatchMode):
    def __init__(self, log: SyncLog):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sync = func in _SYNC_OPS
        if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            sync = True
        if func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            sync = any(i is not None and i.dtype == torch.bool for i in indices)
        if sync and not _from_triton() and not self.log.allowed(_tensors(args)):
            self.log.record(f"aten.{func.overloadpacket.__name__}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs(allow=()):
    """``with count_host_syncs(allow=[...]) as log:`` ... ``log.events`` lists (what, frames) of
    every host read of tensor data made inside, except from triton and on ``allow``'s tensors."""
    log = SyncLog(allow=list(allow))
    saved = {name: getattr(torch.Tensor, name) for name in _PY_METHODS}

    def wrap(name, orig):
        def method(self, *args, **kwargs):
            if not _from_triton() and not log.allowed([self]):
                log.record(f"Tensor.{name}")
            return orig(self, *args, **kwargs)
        return method

    saved_fns = {name: getattr(torch, name) for name in _PY_FUNCTIONS}

    def wrap_fn(name, orig):
        def fn(*args, **kwargs):
            if not _from_triton() and not log.allowed(_tensors(args)):
                log.record(f"torch.{name}")
            return orig(*args, **kwargs)
        return fn

    for name, orig in saved.items():
        setattr(torch.Tensor, name, wrap(name, orig))
    for name, orig in saved_fns.items():
        setattr(torch, name, wrap_fn(name, orig))
    try:
        with _SyncMode(log):
            yield log
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)
        for name, orig in saved_fns.items():
            setattr(torch, name, orig)
