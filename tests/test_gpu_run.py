"""``python -m bench.gpu_run`` (the first GPU hour as one command) end to end on CPU at tiny sizes, so it
does not rot before a GPU is lent: a short run writes the JSON and the markdown with every section, a
run whose bench share is ~0 records the cut, Ctrl-C still writes what was done, bad arguments are refused
with one clear line. About 45 s on 2 CPU cores (three subprocess runs: torch import + one pytest child each)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import load_bench

load_bench()
from bench import gpu_run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(out, *args, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as from a fresh shell
    return subprocess.run([sys.executable, "-m", "bench.gpu_run", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _load(out):
    with open(os.path.join(out, "gpu_run.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# bad input: one clear line, exit 2, no traceback, nothing run
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,expected", [
    (["--budget-s", "10"], "at least 60"),
    (["--budget-s", "nan"], "at least 60"),
    (["--phases", "tests,benchmarks"], "unknown phase benchmarks; choose from tests, bench, model, static"),
    (["--phases", ","], "unknown phase (none given)"),
    (["--shares", "bench=-1"], "--shares: 'bench=-1'"),
    (["--shares", "warmup=0.5"], "--shares: 'warmup=0.5'"),
    (["--tests-files", "tests/test_nope.py"], "no such file"),
    (["--model-methods", "full,dora"], "unknown dora"),
    (["--case-budget-s", "0"], "--case-budget-s 0: give a positive number"),
])
def test_bad_arguments_are_refused_clearly(tmp_path, capsys, args, expected):
    out = tmp_path / "out"
    assert gpu_run.main(["--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert err.count("\n") == 1, err
    assert not (out / "gpu_run.json").exists()


def test_out_pointing_at_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "results.json"
    f.write_text("{}")
    assert gpu_run.main(["--out", str(f)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert f.read_text() == "{}"


def test_argparse_errors_are_one_line_too(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_run.main(["--out", str(tmp_path), "--budget-s", "eight minutes"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid float value" in err and "Traceback" not in err


def test_default_selection_is_the_full_gpu_run(tmp_path):
    """No options: every phase, the whole TEST_SELECTION with 'cuda' in every -k, the 480 s budget."""
    args = gpu_run.parse_args(["--out", str(tmp_path)])
    assert args.phases == list(gpu_run.PHASES) and args.budget_s == 480
    entries = gpu_run.select_tests(args, "cuda")
    assert [e["file"] for e in entries] == [f for f, _, _ in gpu_run.TEST_SELECTION]
    assert all("cuda" in e["k"] and "{dev}" not in e["k"] for e in entries)
    assert all(os.path.isfile(os.path.join(ROOT, e["file"])) for e in entries)


def test_default_out_is_outside_the_source_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTOPS_BENCH_OUT", str(tmp_path / "bench-out"))
    args = gpu_run.parse_args([])
    assert args.out == str(tmp_path / "bench-out" / "gpu-run") and os.path.isdir(args.out)
    monkeypatch.delenv("PEFTOPS_BENCH_OUT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    default = gpu_run.parse_args([]).out
    assert default == str(tmp_path / "cache" / "peftops" / "bench" / "gpu-run")
    assert not default.startswith(ROOT + os.sep)


def test_pytest_log_fallback():
    """What a run cut before pytest wrote its XML yields: finished outcomes, the number selected, the test
    running at the cut (the "-ra" summary lines are not counted twice)."""
    log = ("collected 106 items / 54 deselected / 52 selected\n\n"
           "tests/test_cka.py::test_a[cpu-triton] PASSED    [  1%]\n"
           "tests/test_cka.py::test_b[(1, 2)-cpu] FAILED    [  2%]\n"
           "tests/test_cka.py::test_c[x] SKIPPED (no gpu)   [  3%]\n"
           "FAILED tests/test_cka.py::test_b[(1, 2)-cpu] - AssertionError: PASSED\n"
           "tests/test_cka.py::test_d[cpu] ")
    cases, selected, running = gpu_run.parse_pytest_log(log)
    assert [(c["id"].split("::")[1], c["outcome"]) for c in cases] == [
        ("test_a[cpu-triton]", "passed"), ("test_b[(1, 2)-cpu]", "failed"), ("test_c[x]", "skipped")]
    assert selected == 52 and running == "tests/test_cka.py::test_d[cpu]"


def test_static_summary_per_family():
    report = {"summary": {"variants": 3, "failed": 1}, "problems": ["aot._k [x]: spills 8 B"],
              "variants": [
                  {"family": "aot", "kernel": "_k", "variant": "bf16 w4", "resources": {
                      "registers": 40, "spill_store_bytes": 8, "spill_load_bytes": 8, "smem_bytes": 2048,
                      "warps_per_sm": 48, "limited_by": "registers"}},
                  {"family": "aot", "kernel": "_j", "variant": "fp32 w8", "resources": {
                      "registers": 90, "spill_store_bytes": 0, "spill_load_bytes": 0, "smem_bytes": 65536,
                      "warps_per_sm": 16, "limited_by": "smem"}},
                  {"family": "cka", "kernel": "_c", "variant": "bf16", "resources": None, "error": "boom"}]}
    s = gpu_run.summarize_static(report)
    aot, cka = s["families"]["aot"], s["families"]["cka"]
    assert (aot["variants"], aot["failed"], aot["spilling"], aot["max_registers"], aot["max_smem_kib"],
            aot["min_warps_per_sm"]) == (2, 0, 1, 90, 64.0, 16)
    assert aot["lowest_occupancy"].startswith("_j [fp32 w8]")
    assert (cka["variants"], cka["failed"]) == (1, 1)
    assert s["problems_total"] == 1


# ----------------------------------------------------------------------------------------------
# end to end on CPU
# ----------------------------------------------------------------------------------------------
DELIBERATE = '''
import pytest

def test_leading_dims_triton_fails():
    assert 1 + 1 == 3, "deliberate failure"

def test_leading_dims_triton_skips():
    pytest.skip("deliberately skipped")
'''


def test_cpu_run_writes_json_and_markdown(tmp_path):
    """One real kernel test (passes) and a file with a deliberate failure and skip: exit 1, and everything
    is written anyway (failing id, its traceback, the skip reason), bench rows, the static section."""
    out = tmp_path / "run"
    bad = tmp_path / "test_gpu_run_deliberate.py"
    bad.write_text(DELIBERATE)
    # 180 s: room for a loaded CI machine (the run takes what it needs, ~40 s on 2 idle cores)
    p = _run(out, "--budget-s", "180", "--phases", "tests,bench,static",  # the model phase: next test
             "--tests-files", f"tests/test_cka.py,{bad}", "--tests-k", "leading_dims and triton",
             "--bench-only", "sift.scatter", "--no-compile", "--bench-once",
             # an unknown family: the compile check refuses it at once; its message must be recorded
             "--static-families", "nosuchfamily", timeout=240)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]  # a test failed: 1, outputs written
    doc = _load(out)
    assert doc["schema"] == gpu_run.SCHEMA and doc["status"] == "complete" and doc["exit_code"] == 1
    assert 0 < doc["budget_used_s"] <= 180
    assert set(doc["phases"]) == {"env", "tests", "bench", "static"} and doc["model"] is None
    for name in ("env", "tests", "bench"):
        assert doc["phases"][name]["status"] == ("failed" if name == "tests" else "ok"), (name, doc["phases"][name])
        assert doc["phases"][name]["wall_s"] > 0

    env = doc["environment"]
    assert env["device_type"] == "cpu" and env["torch"] and "commit" in env and "dirty" in env
    assert "hostname" not in json.dumps(env).lower()

    entry, deliberate = doc["tests"]["entries"]
    assert entry["file"] == "tests/test_cka.py" and entry["k"] == "leading_dims and triton"
    assert (entry["status"], entry["passed"], entry["failed"], entry["source"]) == ("ok", 1, 0, "junit")
    assert (out / entry["junit"]).exists() and (out / entry["log"]).exists()
    assert (deliberate["status"], deliberate["passed"], deliberate["failed"], deliberate["skipped"]) == ("failed", 0, 1, 1)
    (failure,) = deliberate["failures"]
    assert failure["id"].endswith("::test_leading_dims_triton_fails") and "deliberate failure" in failure["traceback"]
    assert deliberate["skip_reasons"] == {"deliberately skipped": 1}
    assert doc["tests"]["totals"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1, "not_run": 0}

    rows = doc["bench"]["rows"]
    assert rows and all(r["name"] == "sift.scatter" and r["status"] == "ok" for r in rows)
    for r in rows:
        assert r["times_us"]["reference"] > 0 and r["times_us"]["peftops"] > 0 and "compiled" not in r["times_us"]
        assert "percent_of_roofline" in r
        # --bench-once: one sample per path, no dispersion: no speedup is claimed, and the row says why
        assert r["rounds"] == 1 and len(r["samples_us"]["reference"]) == 1 and r["ratio_vs_reference"] > 0
        assert r["speedup_vs_reference"] is None and r["stable"] is False
        assert r["unstable_reasons"] == ["1 sample (--once): no dispersion, no ratio claimed"]
    assert doc["bench"]["not_run"] == []

    st = doc["static"]
    assert doc["phases"]["static"]["status"] in ("error", "cut: budget", "ok", "gate failures")
    assert st["cmd"].startswith("TRITON_INTERPRET=0 python -m peftops.kernels._compile_check --json DIR/static.json "
                                "--markdown DIR/static.md")
    assert st["rc"] is not None and (st.get("families") is not None or st.get("error"))

    md = (out / "summary.md").read_text()
    for heading in ("# peftops GPU run", "| phase | status", "## Per kernel family", "## Tests",
                    "## Microbenchmarks", "## Static resources"):
        assert heading in md, heading
    assert "sift.scatter" in md and "leading_dims and triton" in md
    assert "UNSTABLE: 1 sample (--once)" in md and "| 95% CI |" in md
    assert "### Failures (1)" in md and "test_leading_dims_triton_fails" in md


def test_budget_cut_is_recorded_and_the_model_phase_runs(tmp_path):
    """Shares of ~0 for the tests and the bench: no pytest starts, every bench case is listed as not run,
    both phases say so; the model phase gets the rest of the budget and runs; exit 0 (a cut is no failure)."""
    out = tmp_path / "cut"
    p = _run(out, "--budget-s", "60", "--phases", "tests,bench,model", "--shares", "tests=0.0001,bench=0.0001,model=1",
             "--tests-files", "tests/test_cka.py", "--bench-only", "sift.scatter", "--model-methods", "aot")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = _load(out)
    assert doc["status"] == "complete" and doc["exit_code"] == 0
    assert doc["phases"]["tests"]["status"] == "cut: budget" and doc["phases"]["tests"]["share_s"] < 0.1
    (entry,) = doc["tests"]["entries"]
    assert entry["status"] == "not run: budget" and "rc" not in entry
    assert doc["phases"]["bench"]["status"] == "cut: budget" and doc["phases"]["bench"]["share_s"] < 0.1
    rows = doc["bench"]["rows"]
    assert rows and all(r["status"] == "not run: budget" for r in rows)
    assert doc["bench"]["not_run"] == [f"{r['name']} [{r['shape']}]" for r in rows]
    whats = {s["what"]: s["why"] for s in doc["skipped"]}
    assert whats["tests tests/test_cka.py"] == "not run: budget"
    assert any(w.startswith("bench:") and why == "not run: budget" for w, why in whats.items())

    assert doc["phases"]["model"]["status"] == "ok"
    (m,) = doc["model"]["rows"]
    assert m["method"] == "aot" and m["status"] == "ok" and m["step_ms"] > 0 and m["trainable"] > 0
    assert doc["model"]["settings"]["config"] == "tiny" and doc["model"]["smoke"] is True
    assert any(n.startswith("smoke run: tiny Llama") for n in doc["phases"]["model"]["notes"])
    md = (out / "summary.md").read_text()
    assert "not run: budget" in md and "## Skipped or cut" in md
    assert "## Whole-model training step" in md and "| aot | ok |" in md and "**SMOKE RUN**" in md


def test_interrupt_writes_what_is_done(tmp_path):
    """SIGINT while the tests run (Ctrl-C; SIGTERM takes the same path): the pytest child is stopped,
    the outputs are written, exit 130."""
    out = tmp_path / "int"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-m", "bench.gpu_run", "--out", str(out), "--budget-s", "300",
                             "--phases", "tests,bench", "--tests-files", "tests/test_cka.py", "--tests-k", "triton"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = out / "tests" / "00-test_cka.log"
        end = time.monotonic() + 60
        while time.monotonic() < end and not (log.exists() and log.stat().st_size):  # pytest has started
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    doc = _load(out)
    assert doc["status"] == "interrupted" and doc["exit_code"] == 130
    assert doc["phases"]["tests"]["status"] == "interrupted"
    assert doc["tests"]["entries"][0]["status"] == "interrupted"
    assert "bench" not in doc["phases"]
    assert "interrupted" in (out / "summary.md").read_text()
