"""Where an op runs: the Triton kernel or its PyTorch reference.

Rule (docs/design.md#dispatch): CUDA tensors run the Triton kernels, CPU tensors run the reference, and with
``TRITON_INTERPRET=1`` (set before triton is imported) the Triton kernels also run on CPU tensors.
``force_backend("reference" | "triton")`` overrides the rule inside a ``with`` block; tests use it
to run both paths on the same inputs.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch

try:  # triton is optional: CPU-only machines without it run the references
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("peftops_backend", default=None)
# set only by kernels/_compile_check.py while it records launches on CPU tensors (nothing executes)
_CAPTURING: contextvars.ContextVar[bool] = contextvars.ContextVar("peftops_capturing", default=False)
BACKENDS = ("reference", "triton")


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can execute on tensors of ``device``."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return not interpreting()
    return device.type == "cpu" and (interpreting() or _CAPTURING.get())


def use_triton(t: torch.Tensor) -> bool:
    """Dispatch decision for an op whose main input is ``t``."""
    forced = _FORCED.get()
    if forced == "reference":
        return False
    if forced == "triton":
        if not triton_runs_on(t.device):
            raise RuntimeError(
                f"force_backend('triton'): triton cannot run on {t.device} tensors here "
                f"(triton installed: {HAS_TRITON}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})"
            )
        return True
    return triton_runs_on(t.device)


@contextlib.contextmanager
def force_backend(name: str | None):
    """Run every peftops op in the block on ``name`` ("reference" or "triton"); None = default rule."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"force_backend: name must be one of {BACKENDS} or None, got {name!r}")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def autotune(configs, key, interpret_config=None, **kwargs):
    """``triton.autotune`` over ``configs`` on a GPU. Under the interpreter a single config
    (``interpret_config`` or the first), so nothing is benchmarked on the CPU."""
    import triton

    if interpreting():
        configs = [interpret_config or configs[0]]
    return triton.autotune(configs=configs, key=key, **kwargs)


def gpu_like(t: torch.Tensor) -> bool:
    """``t`` is on a GPU, or the compile check is recording launches as a GPU would make them:
    launchers branch on this where CUDA takes another path than the interpreter (fp64, SM counts)."""
    return t.is_cuda or _CAPTURING.get()


@contextlib.contextmanager
def capturing_launches():
    """Inside the block CPU tensors take the Triton path, so the compile check can record what the
    launchers would launch on a GPU (the kernel objects' ``run`` is replaced by a recorder there)."""
    token = _CAPTURING.set(True)
    try:
        yield
    finally:
        _CAPTURING.reset(token)
