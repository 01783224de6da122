"""Helpers the kernel families share: the accumulation dtype rule, the GPU's SM count, torch ->
triton dtypes and the bit-exact fp32 -> bf16 rounding used inside kernels.

Input validation (tensors and scalars) is in kernels/_checks.py; where an op runs (Triton or the
PyTorch reference) in kernels/_dispatch.py.

Constexpr convention of every kernel: upper case (``BLOCK_D``, ``HAS_MASK``); the accumulation
flag is ``ACC_FP64`` (``acc_fp64`` below: accumulate in fp64, else fp32); pointer arguments are
lower case and end in ``_ptr`` (``x_ptr``).
"""
from __future__ import annotations

import torch

from ._dispatch import HAS_TRITON

__all__ = ["acc_dtype", "acc_fp64", "sm_count", "TL_DTYPES", "bf16_rne"]


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """What an op over operands of ``dtypes`` accumulates in: fp32, or fp64 when any of them is fp64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def acc_fp64(*dtypes: torch.dtype) -> bool:
    """``acc_dtype(*dtypes)`` is fp64: the value of a kernel's ``ACC_FP64`` constexpr."""
    return acc_dtype(*dtypes) == torch.float64


_SM_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device, off_gpu: int) -> int:
    """Streaming multiprocessors of the CUDA ``device`` (queried once per device); ``off_gpu`` on any
    other device (triton's interpreter, and the compile check's capture on CPU tensors: grids sized
    from it there are the ones the check records, so each launcher keeps its own value)."""
    if device.type != "cuda":
        return off_gpu
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


if HAS_TRITON:
    import triton
    import triton.language as tl

    TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
                 torch.float64: tl.float64}

    @triton.jit
    def bf16_rne(x):
        """fp32 ``x`` -> bf16, round to nearest even, done on the bits: what torch's and the GPU's
        fp32 -> bf16 cast give, also under triton's CPU interpreter (which truncates a plain cast).
        A NaN becomes the canonical NaN 0x7FFF, as cvt.rn.bf16.f32 gives on the GPU: adding the
        rounding bias to a NaN's mantissa would carry into the exponent and sign (0x7FFFFFFF ->
        0x8000 = -0, 0x7FFF8000 -> +Inf). ±Inf, ±0, subnormals, ties and the overflow of values past
        the largest finite bf16 to ±Inf all come out of the integer rounding."""
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        return tl.where(is_nan, 0x7FFF, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
