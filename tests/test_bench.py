"""The bench/ cases through pytest-benchmark (``pytest --benchmark``), plus a CPU smoke run of the
harness that always runs (so a broken case is caught in CI, not on the GPU day)."""
import pytest
import torch

from helpers import load_bench

load_bench()
from bench.harness import format_table, load_cases, run_case, to_json  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _all_cases(quick, device=DEVICE):
    return load_cases(device, quick)


_CASES = _all_cases(quick=DEVICE.type != "cuda")


@pytest.mark.benchmark_case
@pytest.mark.parametrize("path", ["reference", "peftops"])
@pytest.mark.parametrize("case", _CASES, ids=[f"{c.name}[{c.shape}]" for c in _CASES])
def test_bench_case(benchmark, case, path):
    inputs = case.make()
    fn = case.reference if path == "reference" else case.peftops

    def call():
        out = fn(inputs)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"{case.name} {case.shape}"
    benchmark(call)


def test_harness_smoke_on_cpu():
    """Every family's first quick case runs through the harness on CPU and gives a table + JSON."""
    from peftops.kernels import force_backend

    cases = {}
    for c in _all_cases(quick=True, device=torch.device("cpu")):
        cases.setdefault(c.name.split(".")[0], c)
    if not cases:
        pytest.skip("no bench family yet")
    with force_backend("reference"):
        results = [run_case(c, torch.device("cpu"), once=True, compile_ref=False) for c in cases.values()]
    roof = {"copy_bytes_per_s": float("nan"), "gemm_flops_per_s": float("nan")}
    table = format_table(results, roof)
    js = to_json(results, roof, {})
    assert len(js["results"]) == len(cases)
    for r in results:
        assert r.times_us["reference"] == r.times_us["reference"], f"{r.name} reference failed"
        assert r.times_us["peftops"] == r.times_us["peftops"], f"{r.name} peftops failed"
        assert r.name in table
