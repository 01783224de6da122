"""Repository-wide pytest setup.

On a machine without CUDA the Triton kernels run in triton's CPU interpreter: TRITON_INTERPRET
must be set before triton is first imported, so it is set here, before any test module loads.
``--benchmark`` enables the pytest-benchmark cases in tests/test_bench.py (skipped otherwise).
Every test starts from the same seeds (``_seed``: torch, random and numpy, from the test's id).
The shared helpers and the test conventions are in tests/helpers.py.
"""
import os
import random
import sys
import zlib

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before conftest could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

try:  # the property suites (tests/test_properties_*.py); deterministic, so CI is reproducible
    from hypothesis import HealthCheck, settings

    _suppress = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    # "ci": few examples, derandomized (the same cases every run); "thorough": a local bug hunt
    settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None,
                              suppress_health_check=_suppress, print_blob=True)
    settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=_suppress,
                              print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is in the [test] extra; without it the property suites skip
    pass


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch (CPU and CUDA), ``random`` and numpy before each test with a number derived from its
    id: a test sees the same random stream whatever ran before it or beside it, and a failure reruns
    alike. Tests that need a particular stream seed their own generator; hypothesis seeds its own."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy
    except ImportError:  # pragma: no cover
        return
    numpy.random.seed(seed)


@pytest.fixture
def reference_backend():
    """The test runs on the reference kernels: model-plumbing files take it for every test with
    ``pytestmark = pytest.mark.usefixtures("reference_backend")`` (the kernels' Triton paths are
    covered by the backend-parametrized tests)."""
    from peftops.kernels import force_backend  # not at the top: triton must load after TRITON_INTERPRET

    with force_backend("reference"):
        yield


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the microbenchmarks (tests/test_bench.py) through pytest-benchmark")


def pytest_configure(config):
    config.addinivalue_line("markers", "benchmark_case: a bench/ case run through pytest-benchmark (needs --benchmark)")
    config.addinivalue_line("markers", "slow: a longer end-to-end test")


# Long end-to-end files (multi-process launches, the real SmolLM2, the GPU-run driver): marked slow so
# `pytest -m "not slow"` is the quick subset (the compile check and the README run are marked in place).
SLOW_FILES = {"test_distributed.py", "test_launchers.py", "test_fsdp.py", "test_safe_distributed.py",
              "test_example_smollm2.py", "test_gpu_run.py", "test_trl_smollm2.py"}
SLOW_TESTS = {"test_demo_runs_every_method"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmark case: run with pytest --benchmark")
    for item in items:
        if "benchmark_case" in item.keywords:
            item.add_marker(skip)
