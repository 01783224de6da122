"""Every Triton kernel variant that runs compiles for Hopper (sm_90a), checked without a GPU.

The interpreter runs kernels the real compiler would reject (non-power-of-two blocks, bad casts,
an fp64 dot triton 3.6 refuses); the compile check (kernels/_compile_check.py) captures what the
launchers launch, expands autotune configs as the runtime does, compiles each variant as the JIT
specializes it and gates on ptxas' spills and on shared memory. The compiles run in subprocesses:
this process has TRITON_INTERPRET=1, under which triton builds no JIT functions.
"""
import json
import os
import subprocess
import sys

import pytest

from peftops.kernels import HAS_TRITON
from peftops.kernels._compile_check import FAMILIES, SM90, Variant, gate, occupancy

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


def _check(*args, timeout=1800):
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, "-m", "peftops.kernels._compile_check", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def _check_showing_progress(*args, capsys, timeout=1800):
    """Like _check, but the compile check's progress lines ("  sift: 50/212 compiled (31 s)") also go
    to the terminal as they come, past pytest's capture (capsys.disabled() lifts the fd-level capture
    too): a family takes minutes on 2 cores."""
    import tempfile

    env = dict(os.environ, TRITON_INTERPRET="0")
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a full stderr pipe would block the child
        proc = subprocess.Popen([sys.executable, "-m", "peftops.kernels._compile_check", *args], env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if line.startswith(("  ", "captured", "FAIL")) or " compiled, " in line:
                    with capsys.disabled():
                        sys.stderr.write(f"\n[compile check] {line.rstrip()}")
                        sys.stderr.flush()
            proc.wait(timeout=timeout)
        except BaseException:
            proc.kill()
            raise
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines), err.read())


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_variant_that_runs_compiles_within_the_resource_gate(family, tmp_path, capsys):
    out = tmp_path / "report.json"
    r = _check_showing_progress(family, "--json", str(out), capsys=capsys)
    print(r.stdout[-3000:])  # the per-family progress and summary show with -s / on failure
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["summary"]["variants"] > 0 and report["summary"]["failed"] == 0
    for v in report["variants"]:
        res = v["resources"]
        assert res["registers"] > 0 and res["warps_per_sm"] > 0, v
        assert "enable_fp_fusion" in v["options"], v  # an explicit FP-contraction choice per launch


@needs_triton
def test_variants_are_what_the_jit_specializes():
    """The listing holds what a CPU compile check used to miss: every autotune config with its own
    warps, integers equal to 1 as constexprs, aligned and unaligned pointers, fp64."""
    r = _check("sift", "cka", "--list", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("sift.", "cka."))]
    sddmm = [ln for ln in lines if ln.startswith("sift._sddmm_chunk_kernel")]
    # one fixed config per dtype (kernels/sift.py _sddmm_params): fp64, fp32, 16-bit
    for dt, block_e, warps in (("fp64", 64, 4), ("fp32/i", 128, 8), ("bf16", 128, 16), ("fp16", 128, 16)):
        assert any(ln.split("[", 1)[1].startswith(dt) and f"BLOCK_E={block_e}" in ln and f"w{warps} " in ln
                   for ln in sddmm), (dt, block_e, warps, sddmm[:8])
    assert any("=1:" in ln for ln in lines), "no unit-size (constexpr 1) variant captured"
    # CKA's column means of y are a view at offset dx of one buffer: unaligned for odd dx
    assert any(ln.startswith("cka.") and "unaligned:" in ln for ln in lines)
    assert any("aligned16" in ln for ln in lines)
    assert any("fp64" in ln for ln in sddmm)
    # the elementwise launchers run 8 warps on a GPU; the old check compiled them at 4
    assert any(ln.startswith("sift._sparse_adamw_kernel") and " w8 " in ln for ln in lines)


@needs_triton
@pytest.mark.parametrize("args, message", [
    (["nosuchfamily"], "unknown kernel family nosuchfamily"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--budget-s", "0"], "--budget-s must be > 0"),
])
def test_bad_arguments_get_a_message_not_a_traceback(args, message):
    r = _check(*args, timeout=120)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


@needs_triton
def test_a_budget_that_runs_out_writes_a_partial_report(tmp_path):
    out = tmp_path / "partial.json"
    r = _check("sift", "--budget-s", "1", "--jobs", "1", "--json", str(out), timeout=600)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert "partial report" in r.stderr and "Traceback" not in r.stderr
    s = json.loads(out.read_text())["summary"]
    assert s["partial"] is True and s["not_compiled"] > 0 and s["variants"] > s["not_compiled"] - 1


def test_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "peftops.kernels._compile_check"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unset TRITON_INTERPRET" in r.stderr and "Traceback" not in r.stderr


@needs_triton
def test_missing_ptxas_is_named():
    from peftops.kernels._compile_check import ptxas_problem

    msg = ptxas_problem("/nonexistent/ptxas")
    assert msg and "no bundled ptxas" in msg and "TRITON_PTXAS_PATH" in msg


def _variant(**kw):
    base = dict(family="sift", kernel="_k", signature={"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                constexprs={(2,): 128}, attrs={(0,): [["tt.divisibility", 16]]},
                options={"num_warps": 4, "num_stages": 3, "enable_fp_fusion": False}, fusion_explicit=True)
    base.update(kw)
    return Variant(**base)


def _resources(**kw):
    r = dict(registers=32, spill_store_bytes=0, spill_load_bytes=0, smem_bytes=0)
    r.update(kw)
    return r


def test_gate_fails_on_spills_shared_memory_defaults_and_forgotten_kernels(monkeypatch):
    import peftops.kernels._variants as variants

    vs = [_variant(), _variant(kernel="_spills"), _variant(kernel="_smem"), _variant(kernel="_implicit", fusion_explicit=False),
          _variant(kernel="_broken")]
    results = {0: _resources(), 1: _resources(spill_store_bytes=8, spill_load_bytes=8),
               2: _resources(smem_bytes=SM90["smem_per_block"] + 1), 3: _resources()}
    problems = gate(vs, results, {4: "Traceback ...\nCompilationError: boom"}, {"aot": ["_orphan_kernel"]})
    text = "\n".join(problems)
    assert len(problems) == 5, text
    for needle in ("_orphan_kernel", "_spills", "spills 8 B", "_smem", "shared memory", "_implicit",
                   "enable_fp_fusion", "_broken", "CompilationError: boom"):
        assert needle in text, needle
    assert not any("sift._k " in p for p in problems)
    # a listed exception with its reason passes, and the reason lands in the report
    monkeypatch.setitem(variants.ACCEPTED_RESOURCE_EXCEPTIONS, ("_spills", ""), "measured: spill is in the epilogue")
    problems = gate(vs[:2], results, {}, {})
    assert problems == [] and results[1]["accepted"] == "measured: spill is in the epilogue"


@pytest.mark.parametrize("regs, smem, warps, expect_warps, limit", [
    (32, 0, 4, 64, "warps"),            # 16 blocks x 4 warps: the 64-warp limit
    (128, 0, 4, 16, "registers"),       # 4096 regs per warp -> 16 warps
    (255, 0, 8, 8, "registers"),        # 8192 regs per warp (rounded to 256) -> 8 warps, one block
    (32, 100 * 1024, 4, 8, "shared memory"),  # two 100 KiB blocks fit in 228 KiB
])
def test_occupancy_matches_the_sm90_limits(regs, smem, warps, expect_warps, limit):
    occ = occupancy(regs, smem, warps)
    assert occ["warps_per_sm"] == expect_warps and occ["limited_by"] == limit, occ


@needs_triton
def test_bench_static_prints_the_committed_report(tmp_path):
    """python -m bench --static prints the report of the installed triton from --out (building it only
    when it is missing or --rebuild is given)."""
    import triton

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / f"static-sm90a-triton{triton.__version__}.md").write_text("# sm_90a static resource report (test)\n")
    r = subprocess.run([sys.executable, "-m", "bench", "--static", "--out", str(tmp_path)], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "static resource report (test)" in r.stdout and "building" not in r.stderr
