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
    assert "nan" not in table.lower() and "GB/s" not in table
    for r in results:
        assert r.times_us["reference"] == r.times_us["reference"], f"{r.name} reference failed"
        assert r.times_us["peftops"] == r.times_us["peftops"], f"{r.name} peftops failed"
        assert r.name in table


# ----------------------------------------------------------------------------------------------
# measuring: interleaved paths, dispersion, UNSTABLE flags (a fake or noisy clock: fast, deterministic)
# ----------------------------------------------------------------------------------------------
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402

import bench.harness as H  # noqa: E402
from bench import __main__ as bench_cli  # noqa: E402

CPU = torch.device("cpu")


class FakeClock:
    """harness._now replaced: time moves only when a fake path says it ran (seconds)."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def run(self, cost_s):
        self.t += cost_s


def _result(name, m, policy):
    return H.Result(name, "fake", {k: v["median"] for k, v in m["stats"].items()}, {}, None, None, None,
                    device_type="cpu", samples_us=m["samples"], stats=m["stats"], comparisons=m["comparisons"],
                    rounds=m["rounds"], inner_reps=m["inner_reps"], stop=m["stop"], measure_s=m["measure_s"],
                    policy=dict(vars(policy)))


def _row(table: str, name: str) -> str:
    (line,) = [ln for ln in table.splitlines() if ln.startswith(name + " ")]
    return line


def _claims_ratio(line: str) -> bool:
    """A bare "N.NNx" speedup in the row (the CI column has no "x")."""
    return re.search(r"(?<![\d.])~?\d+\.\d+x\b", line) is not None


def test_quiet_fake_clock_converges_and_claims_the_speedup(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(H, "_now", clock)
    rng = random.Random(0)
    fns = {"reference": lambda: clock.run(200e-6 * (1 + 0.01 * rng.random())),
           "peftops": lambda: clock.run(100e-6 * (1 + 0.01 * rng.random()))}
    policy = H.Policy(budget_s=30, min_rounds=10)
    m = H.measure(fns, CPU, policy)
    r = _result("fake.quiet", m, policy)
    assert m["stop"] == "converged" and m["rounds"] == policy.min_rounds
    assert r.stable and r.unstable_reasons == []
    assert r.speedup() == pytest.approx(2.0, rel=0.02)
    c = r.comparisons["reference"]
    assert c["ci_low"] <= c["ratio"] <= c["ci_high"] and c["ci_halfwidth"] <= policy.max_spread / 2
    line = _row(H.format_table([r], {}), "fake.quiet")
    assert "ok" in line and "2.0" in line and "UNSTABLE" not in line


def test_noisy_timer_is_flagged_unstable_and_claims_no_speedup(monkeypatch):
    """The reported bug: background load hits some samples of the reference (16,000 us vs 97 us). Equal paths;
    the timing function adds random large delays to 60% of the reference's samples: a median of those alone
    says "~20x faster". The row must say UNSTABLE, give the reason and claim no speedup."""
    clock = FakeClock()
    monkeypatch.setattr(H, "_now", clock)
    real_sample = H._sample_cpu
    rng = random.Random(1)
    ref = lambda: clock.run(100e-6)  # noqa: E731
    ours = lambda: clock.run(100e-6)  # noqa: E731

    def noisy_sample(fn, inner):
        t = real_sample(fn, inner)
        if fn is ref and rng.random() < 0.6:
            t += rng.uniform(5, 60) * 100  # +0.5 .. 6 ms per call
        return t

    monkeypatch.setattr(H, "_sample_cpu", noisy_sample)
    policy = H.Policy(budget_s=30, min_rounds=10, max_rounds=200)
    m = H.measure({"reference": ref, "peftops": ours}, CPU, policy)
    r = _result("fake.noisy", m, policy)
    assert m["stop"] == "max rounds"  # never converged: sampled to the limit
    assert r.ratio() > 5  # what a bare median ratio would have claimed
    assert r.stable is False and r.speedup() is None
    assert any(re.fullmatch(r"reference spread \d+% > 10%", why) for why in r.unstable_reasons), r.unstable_reasons
    js = H.to_json([r], {}, {})["results"][0]
    assert js["speedup_vs_reference"] is None and js["stable"] is False and js["unstable_reasons"]
    assert len(js["samples_us"]["reference"]) == len(js["samples_us"]["peftops"]) == m["rounds"]
    line = _row(H.format_table([r], {}), "fake.noisy")
    assert "UNSTABLE" in line and "reference spread" in line and not _claims_ratio(line), line


def test_real_clock_with_injected_delays_is_flagged(monkeypatch):
    """Real work, the real clock, plus a clock that jumps ahead by 0.5-5 ms at random reads: whatever this
    machine's own noise, the row is UNSTABLE and claims nothing."""
    rng = random.Random(2)
    offset = [0.0]
    real = H._now

    def noisy_now():
        if rng.random() < 0.3:
            offset[0] += rng.uniform(5e-4, 5e-3)
        return real() + offset[0]

    monkeypatch.setattr(H, "_now", noisy_now)
    a = torch.randn(64, 64)
    policy = H.Policy(budget_s=0.5, min_rounds=10, min_sample_s=1e-4)
    m = H.measure({"reference": lambda: a @ a, "peftops": lambda: a @ a}, CPU, policy)
    r = _result("fake.delays", m, policy)
    assert r.stable is False and r.speedup() is None
    assert any("spread" in why for why in r.unstable_reasons)
    assert not _claims_ratio(_row(H.format_table([r], {}), "fake.delays"))


def test_interleaving_cancels_load_that_hits_both(monkeypatch):
    """Load that grows 10x during the case hits both paths alike: each path's spread is huge (flagged), but the
    paired ratio of each round stays 2.0, so the ratio and its CI are exact."""
    clock = FakeClock()
    monkeypatch.setattr(H, "_now", clock)
    calls = [0]

    def path(cost):
        def fn():
            calls[0] += 1
            clock.run(cost * (1 + 9 * min(1.0, calls[0] / 1500)))
        return fn

    policy = H.Policy(budget_s=30, min_rounds=10, max_rounds=60)
    m = H.measure({"reference": path(200e-6), "peftops": path(100e-6)}, CPU, policy)
    c = m["comparisons"]["reference"]
    assert c["ratio"] == pytest.approx(2.0, rel=0.02)
    assert c["ci_low"] > 1.9 and c["ci_high"] < 2.1
    assert all("spread" in why for why in c["reasons"]) and not c["stable"]


def test_rounds_interleave_every_path_in_rotated_order(monkeypatch):
    seq = []
    monkeypatch.setattr(H, "_sample_cpu", lambda fn, inner: (seq.append(fn.__name__), 10.0)[1])

    def reference():
        pass

    def compiled():
        pass

    def peftops():
        pass

    policy = H.Policy(budget_s=30, min_rounds=4, max_rounds=4)
    m = H.measure({"reference": reference, "compiled": compiled, "peftops": peftops}, CPU, policy)
    seq = seq[9:]  # 3 calibration samples per path first
    assert m["rounds"] == 4 and len(seq) == 12
    rounds = [seq[i:i + 3] for i in range(0, 12, 3)]
    assert all(sorted(r) == ["compiled", "peftops", "reference"] for r in rounds)
    assert [r[0] for r in rounds] == ["reference", "compiled", "peftops", "reference"]


def test_a_failing_path_is_recorded_and_the_rest_still_compares(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(H, "_now", clock)
    n = [0]

    def flaky():
        n[0] += 1
        if n[0] > 8:
            raise RuntimeError("inductor gave up")
        clock.run(1e-4)

    errors = {}
    m = H.measure({"reference": lambda: clock.run(2e-4), "compiled": flaky, "peftops": lambda: clock.run(1e-4)},
                  CPU, H.Policy(budget_s=30), errors=errors)
    assert "compiled" in errors and "compiled" not in m["samples"] and set(m["comparisons"]) == {"reference"}
    assert len(m["samples"]["reference"]) == len(m["samples"]["peftops"]) == m["rounds"]


# ----------------------------------------------------------------------------------------------
# a real case through run_case: the dispersion fields, the columns shown on CPU
# ----------------------------------------------------------------------------------------------
def _quick_case(name):
    return next(c for c in load_cases(CPU, True, [name.split(".")[0]]) if c.name == name)


def test_dispersion_fields_of_a_real_case():
    from peftops.kernels import force_backend

    policy = H.Policy(budget_s=0.3, min_rounds=5, min_sample_s=2e-4)
    with force_backend("reference"):
        r = run_case(_quick_case("sift.scatter"), CPU, compile_ref=False, policy=policy)
    assert r.rounds >= 3 and r.stop in ("converged", "budget", "max rounds")
    assert set(r.samples_us) == {"reference", "peftops"}
    js = json.loads(json.dumps(H.to_json([r], {"copy_bytes_per_s": float("nan"), "gemm_flops_per_s": float("nan")},
                                         {}), default=float))["results"][0]
    for path in ("reference", "peftops"):
        xs, st = js["samples_us"][path], js["stats"][path]
        assert len(xs) == r.rounds == st["n"] and all(x > 0 for x in xs)  # every sample is kept
        assert st["min"] <= st["p10"] <= st["median"] <= st["p90"] <= st["max"]
        assert st["median"] == pytest.approx(js["times_us"][path]) and st["spread"] >= 0
        assert js["inner_reps"][path] >= 1
    c = js["comparisons"]["reference"]
    assert c["ci_low"] <= c["ratio"] <= c["ci_high"] and c["n"] == r.rounds
    assert js["ratio_vs_reference"] == c["ratio"] and js["ratio_vs_reference_ci"] == [c["ci_low"], c["ci_high"]]
    assert js["stable"] == c["stable"] and (js["speedup_vs_reference"] is None) == (not c["stable"])
    assert js["policy"]["budget_s"] == 0.3 and js["percent_of_roofline"] is None and js["peak_mib"] == {}


def test_cpu_table_shows_only_meaningful_columns(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(H, "_now", clock)
    policy = H.Policy(budget_s=30)
    m = H.measure({"reference": lambda: clock.run(2e-4), "peftops": lambda: clock.run(1e-4)}, CPU, policy)
    r = _result("fake.cols", m, policy)
    r.bytes, r.flops = 1e6, 1e6
    nan_roof = {"copy_bytes_per_s": float("nan"), "gemm_flops_per_s": float("nan")}
    table = H.format_table([r], nan_roof)
    head = table.splitlines()[0]
    for absent in ("GB/s", "TFLOP", "roofline", "peak", "compiled", "vs compiled"):
        assert absent not in head, (absent, head)
    assert "nan" not in table.lower() and "0 GB/s" not in table
    assert "reference us" in head and "speedup" in head and "flag" in head
    # with a measured roofline (a GPU, not the interpreter) the rate columns come back
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gpu_head = H.format_table([r], {"copy_bytes_per_s": 3e12, "gemm_flops_per_s": 8e14}).splitlines()[0]
    assert "GB/s | TFLOP/s" in gpu_head and "% roofline" in gpu_head
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "GB/s" not in H.format_table([r], {"copy_bytes_per_s": 3e12, "gemm_flops_per_s": 8e14}).splitlines()[0]


def test_once_claims_nothing(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(H, "_now", clock)
    policy = H.Policy()
    m = H.measure({"reference": lambda: clock.run(2e-4), "peftops": lambda: clock.run(1e-4)}, CPU, policy, once=True)
    r = _result("fake.once", m, policy)
    assert m["rounds"] == 1 and m["stop"] == "once" and r.speedup() is None
    assert r.unstable_reasons == ["1 sample (--once): no dispersion, no ratio claimed"]


# ----------------------------------------------------------------------------------------------
# where results go: outside the source tree by default, bench/results/ only for GPU runs asked to
# ----------------------------------------------------------------------------------------------
def _tree(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def test_default_output_is_outside_the_source_tree(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFTOPS_BENCH_OUT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    default = H.default_out_dir()
    assert default == str(tmp_path / "cache" / "peftops" / "bench")
    assert not os.path.abspath(default).startswith(H.SOURCE_ROOT + os.sep)
    monkeypatch.setenv("PEFTOPS_BENCH_OUT", str(tmp_path / "mine"))
    assert H.default_out_dir() == str(tmp_path / "mine") and H.default_out_dir("gpu-run").endswith("gpu-run")
    assert H.resolve_out_dir(None, official=True) == str(tmp_path / "mine")
    assert H.resolve_out_dir(H.RESULTS_DIR, official=False) == str(tmp_path / "mine")  # CPU: not there
    assert H.resolve_out_dir(H.RESULTS_DIR + os.sep, official=True) == H.RESULTS_DIR + os.sep  # a GPU run, asked
    assert H.resolve_out_dir(str(tmp_path / "x"), official=False) == str(tmp_path / "x")


def test_cli_writes_to_the_default_dir_and_never_into_bench_results(tmp_path, monkeypatch, capsys):
    from peftops.kernels import force_backend

    monkeypatch.delenv("PEFTOPS_BENCH_OUT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    before = _tree(H.RESULTS_DIR)
    args = ["--only", "sift.scatter", "--device", "cpu", "--no-compile", "--case-budget-s", "0.05",
            "--min-rounds", "3"]
    with force_backend("reference"):
        assert bench_cli.main(args) == 0
        assert bench_cli.main(args + ["--out", H.RESULTS_DIR]) == 0  # a CPU run asked to write there: refused
    out = capsys.readouterr().out
    assert "bench/results/ holds only measured GPU results" in out
    assert _tree(H.RESULTS_DIR) == before
    written = tmp_path / "cache" / "peftops" / "bench" / "cpu-cpu-partial.json"
    assert f"wrote {written}" in out and written.exists()
    doc = json.loads(written.read_text())
    assert doc["environment"]["cpu_threads"] == 1 and doc["environment"]["policy"]["budget_s"] == 0.05
    assert all("samples_us" in r and "stable" in r for r in doc["results"])
    assert "GB/s" not in out and " nan " not in out
