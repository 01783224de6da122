"""Input validation shared by every op: each failure names the argument and what was expected.

One rule for every check: TypeError when the argument has the wrong type (not a tensor, a float
dtype where an index is needed, a bool or a string where a number is), ValueError when its type is
right and its value is not (a shape, a device, NaN/Inf, a number out of range); IndexError for
indices out of range."""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Raise TypeError/ValueError naming ``name`` unless ``t`` matches every given constraint."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name}: expected {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous()), got strides {t.stride()}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given (non-None) tensors share one device; returns it."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise ValueError(f"{k}: expected a tensor on {dev} (same device as {items[0][0]}), got one on {v.device}")
    return dev


def check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: expected finite values, found {bad} NaN/Inf entries")


def check_index_range(name: str, idx: torch.Tensor, upper: int, *, what: str = "entries") -> None:
    """0 <= idx < upper, checked on the host before any kernel reads memory at those indices."""
    if idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= upper:
        raise IndexError(f"{name}: {what} must lie in [0, {upper}), found values in [{lo}, {hi}]")


# ---------------------------------------------------------------------------------------------- scalars
def check_real(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
               hi_open: bool = False) -> float:
    """A real number (not a bool), finite, within the given bounds; returned as a float.

    TypeError unless a real number; ValueError for NaN/Inf or a value out of [lo, hi] (``lo_open`` /
    ``hi_open``: the bound itself excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite real number, got {value!r}")
    below = lo is not None and (v <= lo if lo_open else v < lo)
    above = hi is not None and (v >= hi if hi_open else v > hi)
    if below or above:
        if lo is not None and hi is not None:
            want = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        elif lo is not None:
            want = f"{'>' if lo_open else '>='} {lo}"
        else:
            want = f"{'<' if hi_open else '<='} {hi}"
        raise ValueError(f"{name}: expected a value {want}, got {v}")
    return v


def check_count(name: str, value, minimum: int | None = 1) -> int:
    """An int (not a bool) >= ``minimum`` (None: any int); returned as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def check_flag(name: str, value, *, allow_none: bool = False) -> None:
    """A bool (or None where allowed): a truthy string or number is a mistake, not a setting."""
    if not (isinstance(value, bool) or (allow_none and value is None)):
        raise TypeError(f"{name}: expected {'True, False or None' if allow_none else 'a bool'}, "
                        f"got {type(value).__name__} {value!r}")
