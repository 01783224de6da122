import os

import pytest
import torch

import peftops
from peftops.kernels import force_backend, interpreting, triton_runs_on, use_triton


def test_interpreter_is_on_without_cuda():
    if not torch.cuda.is_available():
        assert interpreting(), "conftest must set TRITON_INTERPRET=1 on CPU-only machines"


def test_dispatch_rule_and_override():
    t = torch.zeros(2)
    assert use_triton(t) == triton_runs_on(t.device)
    with force_backend("reference"):
        assert not use_triton(t)
    if triton_runs_on(t.device):
        with force_backend("triton"):
            assert use_triton(t)
    with pytest.raises(ValueError, match=r"^force_backend: name must be one of"):
        with force_backend("cuda"):
            pass


def test_top_level_kernels_name_is_not_installed():
    import importlib.util

    # the import name `kernels` belongs to Hugging Face; peftops ships its kernels as peftops.kernels
    spec = importlib.util.find_spec("kernels")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert spec is None or not os.path.abspath(spec.origin or "").startswith(here), spec
    assert peftops.kernels.__name__ == "peftops.kernels"
