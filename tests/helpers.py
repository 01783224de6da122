"""Shared test helpers: devices, backends, per-dtype tolerances, NaN poisoning."""
from __future__ import annotations

import pytest
import torch

from peftops.kernels import force_backend, triton_runs_on

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (atol, rtol) against a float64 reference computed from the same (rounded) inputs.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def device_backend_params():
    """(device, backend) pairs every op is tested on: the reference everywhere, triton where it runs."""
    out = []
    for dev in DEVICES:
        out.append(pytest.param(dev, "reference", id=f"{dev}-reference"))
        marks = [] if triton_runs_on(torch.device(dev)) else [pytest.mark.skip(reason=f"triton does not run on {dev} here")]
        out.append(pytest.param(dev, "triton", id=f"{dev}-triton", marks=marks))
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0, msg: str = ""):
    """Compare with the tolerance of ``dtype`` (default: actual's dtype); ``scale`` widens atol for
    reductions whose magnitude grows with the reduced length (pass e.g. sqrt(K))."""
    dtype = dtype or actual.dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol * scale, rtol=rtol, msg=msg or None)


def poisoned(shape, dtype, device):
    """A fresh tensor full of NaN: any element a kernel fails to write shows up in the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


__all__ = ["DEVICES", "TOL", "device_backend_params", "assert_close", "poisoned", "force_backend"]


def load_bench():
    """Import the repository's bench/ package (not installed; the repo root stays off sys.path so the
    top-level name `kernels` is never importable from here)."""
    import importlib.util
    import os
    import sys

    if "bench" in sys.modules:
        return sys.modules["bench"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "bench", os.path.join(root, "bench", "__init__.py"), submodule_search_locations=[os.path.join(root, "bench")]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = mod
    spec.loader.exec_module(mod)
    return mod
