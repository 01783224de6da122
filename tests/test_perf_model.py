"""The performance model (kernels/_perf_model.py, docs/perf-model.md): its arithmetic on hand-computed
cases, the SDDMM dispatch rule on both sides of its threshold, the compile-report lookup, agreement
with the SDDMM configuration kernels/sift.py launches, and ``python -m bench --predict`` on CPU."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import load_bench
from peftops.kernels import _perf_model as PM

load_bench()
from bench import __main__ as bench_cli  # noqa: E402
from bench import harness as H  # noqa: E402

D = 4096
K1 = 167773  # 1% of 4096 x 4096, as bench/sift.py's _k gives it


# ----------------------------------------------------------------------------------------------
# arithmetic, by hand
# ----------------------------------------------------------------------------------------------
def test_sddmm_sparse_bytes_flops_by_hand():
    """T = 4096, 4096 x 4096 bf16, k = 1%: 164 chunks of 8 x 128 entries, 32 token slices of 128."""
    est = PM.sddmm_sparse(4096, D, D, K1, 2, "h100", occupancy=2)
    assert PM.sddmm_split(4096, K1, 2) == (164, 32, 128)
    transpose, chunk, reduce = est.launches
    assert transpose.bytes == 2 * 4096 * (D + D) * 2 == 134_217_728
    assert chunk.bytes == 4096 * 8192 * 2 + K1 * 8 + 32 * K1 * 4 == 89_925_992
    assert chunk.flops == 2 * K1 * 4096 == 1_374_396_416 and chunk.unit == "fp32"
    assert chunk.l1_bytes == K1 * 4096 * 4 + K1 * 8 * 32
    assert reduce.bytes == (32 * 4 + 8 + 4) * K1
    assert est.bytes == 134_217_728 + 89_925_992 + 140 * K1
    assert chunk.programs == 164 * 32 and chunk.iterations == 8
    # the chunk's W tile holds ~1024 entries at 1%: 320 x 320
    assert PM.sddmm_tile(K1, D, D, 1024) == (320, 320)
    # the transposes' floor is their bytes over HBM at peak, on each device
    assert transpose.floor_s(PM.DEVICES["h100"]) == pytest.approx(134_217_728 / 3.35e12, rel=1e-12)
    assert transpose.floor_s(PM.DEVICES["h200"]) == pytest.approx(134_217_728 / 4.8e12, rel=1e-12)


def test_sddmm_dense_bytes_flops_by_hand():
    est = PM.sddmm_dense(4096, D, D, K1, 2)
    *gemms, gather = est.launches
    # the fp32 G in blocks of at most half the bf16 weight's 32 MiB: 4 blocks of 1024 rows
    assert PM.sddmm_dense_rows(D, D, 2) == 1024 and len(gemms) == 4
    for gemm in gemms:
        assert gemm.bytes == (1024 + D) * 4096 * 2 + 1024 * D * 4
        assert gemm.flops == 2 * 4096 * 1024 * D and gemm.unit == "tensor16"
    assert gather.bytes == K1 * (32 + 8 + 4)
    # compute-bound GEMMs: flops / 989 TFLOPS; the gather: bytes / 3.35 TB/s
    assert est.floor_s("h100") == pytest.approx(2 * 4096**3 / 989e12 + K1 * 44 / 3.35e12, rel=1e-12)
    # fp32 inputs run on the CUDA cores (no TF32), fp64 on the tensor cores (DMMA)
    assert PM.sddmm_dense(64, 64, 64, 10, 4).launches[0].unit == "fp32"
    assert PM.sddmm_dense(64, 64, 64, 10, 8).launches[0].unit == "tensor64"


def test_structural_bound_and_prediction_by_hand():
    dev = PM.DEVICES["h100"]
    x = PM.Launch("x", bytes=1e6, chain_cycles=100, iterations=10, tail_cycles=50, programs=1000,
                  occupancy=PM.Occupancy(2))
    assert x.waves(dev) == math.ceil(1000 / (132 * 2)) == 4
    assert x.structural_s(dev) == pytest.approx(4 * 1050 / 1.98e9, rel=1e-12)
    floor_eff = 1e6 / (3.35e12 * 0.9)
    assert x.predicted_s(dev) == pytest.approx(max(floor_eff, 4 * 1050 / 1.98e9) + 2e-6, rel=1e-12)
    # one long program bounds the launch whatever the waves (a skewed grid)
    y = PM.Launch("y", chain_cycles=100, iterations=1, programs=1, occupancy=PM.Occupancy(1), critical_cycles=1e6)
    assert y.structural_s(dev) == pytest.approx(1e6 / 1.98e9, rel=1e-12)


def test_design_comparisons_hold_their_stated_direction():
    # old design: one program per (row group, T slice), latency-bound; the chunk design beats it at 1%
    new, old = PM.sddmm_sparse(16384, D, D, K1, 2), PM.sddmm_sparse_old(16384, D, D, K1, 2)
    assert old.bound().endswith("structure") and old.predicted_s() > 1.3 * new.predicted_s()
    # AoT: a 50% id is the old kernel's critical path; chunks remove it, uniform ids are unchanged
    skew, uni = PM.skewed_counts(16384, 32000), PM.uniform_counts(16384, 32000)
    assert max(skew) == 8192 and sum(skew) == sum(uni) == 16384
    assert PM.segment_sum_old(skew, D, 2).predicted_s() > 3 * PM.segment_sum(skew, D, 2).predicted_s()
    assert PM.segment_sum_old(uni, D, 2).predicted_s() == pytest.approx(PM.segment_sum(uni, D, 2).predicted_s(), rel=0.05)
    # WeGeFT generate: 1024 rows = 32 CTAs on 132 SMs, structure-bound; 4096 rows HBM-bound
    small, large = PM.wegeft_generate(1024, D, 64, 2), PM.wegeft_generate(4096, D, 64, 2)
    assert small.launches[0].programs == 32 and small.bound().endswith("structure")
    assert small.predicted_s() > 2 * small.floor_s() and large.bound().endswith("hbm")
    assert PM.generate_splits(1024, D, 64) == 4
    assert PM.wegeft_generate(1024, D, 64, 2, splits=4).predicted_s() < small.predicted_s()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"^T: expected a positive int, got 0"):
        PM.sddmm_sparse(0, D, D, K1, 2)
    with pytest.raises(ValueError, match=r"^elem_bytes: expected 2, 4 or 8, got 3"):
        PM.sddmm_prefers_dense(64, D, D, K1, 3)
    with pytest.raises(ValueError, match=r"^device: expected one of \['h100', 'h200'\], got 'a100'"):
        PM.sddmm_dense(64, D, D, K1, 2, "a100")
    with pytest.raises(ValueError, match=r"^counts: expected a non-empty list of positive ints"):
        PM.segment_sum([], D, 2)


# ----------------------------------------------------------------------------------------------
# the dispatch rule
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,elem", [(1024, 2), (16384, 2), (4096, 4), (4096, 8)])
def test_dispatch_flips_at_its_threshold(T, elem):
    numel = D * D
    c = PM.sddmm_crossover_density(T, D, D, elem)
    assert c is not None and 0 < c < 1
    k_hi = math.ceil(c * numel)
    k_lo = max(1, k_hi - max(2, numel // 100000))
    assert PM.sddmm_prefers_dense(T, D, D, k_hi, elem)
    assert not PM.sddmm_prefers_dense(T, D, D, k_lo, elem)
    t = PM.sddmm_times(T, D, D, k_lo, elem)
    assert t["sparse"] * (1 + PM.SDDMM_DENSE_MARGIN) < t["dense"]
    assert not PM.sddmm_prefers_dense(T, D, D, 16, elem)  # a handful of entries: never dense


def test_dispatch_margin(monkeypatch):
    """Sparse only when predicted more than SDDMM_DENSE_MARGIN faster: sparse 1.0 vs dense 1.09 / 1.11."""
    monkeypatch.setattr(PM, "_sddmm_sparse_s", lambda *a: 1.0)
    monkeypatch.setattr(PM, "_sddmm_dense_s", lambda *a: 1.09)
    assert PM.sddmm_prefers_dense(64, 64, 64, 10, 2)
    monkeypatch.setattr(PM, "_sddmm_dense_s", lambda *a: 1.11)
    assert not PM.sddmm_prefers_dense(64, 64, 64, 10, 2)


def test_sddmm_model_matches_the_kernel_configuration(monkeypatch):
    """SDDMM_PARAMS, sddmm_split and sddmm_tile mirror kernels/sift.py: a change there fails here."""
    from peftops.kernels import sift as K

    missing = [n for n in ("_sddmm_params", "sddmm_grid", "sddmm_tile") if not hasattr(K, n)]
    if missing:
        pytest.skip(f"kernels/sift.py has no {missing} (the chunk design is not in this tree)")
    monkeypatch.setattr(K, "interpreting", lambda: False)
    for dtype, e in ((torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 4), (torch.float64, 8)):
        assert tuple(K._sddmm_params(dtype)) == PM.SDDMM_PARAMS[e], dtype
        block_e, _, n_sub, _, t_slice = PM.SDDMM_PARAMS[e]
        for T, k in ((1, 1), (511, 37), (4096, K1), (16384, 838861), (997, 1024 * 300)):
            assert tuple(K.sddmm_grid(T, k, block_e, n_sub, t_slice)) == PM.sddmm_split(T, k, e)[:2], (T, k)
            assert tuple(K.sddmm_tile(k, D, D, n_sub * block_e)) == PM.sddmm_tile(k, D, D, n_sub * block_e)
    for d_out, d_in in ((4096, 4096), (1024, 4096), (14336, 4096), (7, 5), (4096, 14336)):
        for e in (2, 4, 8):
            assert K.sddmm_dense_rows(d_out, d_in, e) == PM.sddmm_dense_rows(d_out, d_in, e)


def test_other_mirrored_choices_match_the_kernels(monkeypatch):
    """The WeGeFT split count and the AoT chunk size the model replicates."""
    from peftops.kernels import aot as KA
    from peftops.kernels import wegeft as KW

    monkeypatch.setattr(KW, "interpreting", lambda: False)
    for d_out, d_in, r in ((512, 4096, 64), (1024, 4096, 64), (2048, 4096, 64), (1408, 4096, 16), (4096, 4096, 64),
                           (1024, 11008, 16), (97, 4096, 128)):
        for e in (2, 4):
            rp = PM._rank_pad(r)
            bm, bk, bn, _ = KW._generate_blocks(rp, e)
            assert (bm, bk) == PM.generate_blocks(r, e) and bn == bk, (r, e)
            assert KW.generate_splits(d_out, d_in, rp, bm, bk, 132) == PM.generate_splits(d_out, d_in, r, e), (d_out, r)
    if not hasattr(KA, "segment_chunk"):
        pytest.skip("kernels/aot.py has no segment_chunk (the chunked backward is not in this tree)")
    monkeypatch.setattr(KA, "interpreting", lambda: False)
    assert KA.segment_chunk() == PM.SEGMENT_CHUNK


def test_prefers_dense_is_cheap():
    import time

    PM.sddmm_prefers_dense(4096, D, D, K1, 2)
    t0 = time.perf_counter()
    for _ in range(1000):
        PM.sddmm_prefers_dense(4096, D, D, K1, 2)
    assert (time.perf_counter() - t0) / 1000 < 50e-6  # cached: arithmetic only, no file read


# ----------------------------------------------------------------------------------------------
# the compile-report lookup
# ----------------------------------------------------------------------------------------------
def _variant(kernel, variant, blocks, warps=4, regs=100, limited="registers"):
    return {"family": "x", "kernel": kernel, "variant": variant, "options": {"num_warps": warps},
            "resources": {"registers": regs, "blocks_per_sm": blocks, "limited_by": limited}}


FAKE_REPORT = {"env": {"triton": "9.9.9"}, "variants": [
    _variant("_k", "bf16/fp32 | BLOCK_E=128 BLOCK_T=64 | aligned16 | w4 s3 fma=on", 3),
    _variant("_k", "bf16/fp32 | BLOCK_E=128 BLOCK_T=64 | odd | w4 s3 fma=on", 2, regs=150),
    _variant("_k", "fp32/fp32 | BLOCK_E=128 BLOCK_T=32 | aligned16 | w4 s3 fma=on", 5),
    _variant("_k", "bf16/fp32 | BLOCK_E=256 BLOCK_T=64 | aligned16 | w8 s3 fma=on", 1, warps=8),
    {"family": "x", "kernel": "_k", "variant": "bf16 | BLOCK_E=64 | x | w4", "resources": None, "error": "boom"},
]}


def test_find_occupancy_matches_kernel_constexprs_dtype_warps():
    occ = PM.find_occupancy(FAKE_REPORT, "_k", {"BLOCK_E": 128, "BLOCK_T": 64}, "bf16", 4)
    assert (occ.blocks_per_sm, occ.registers, occ.source) == (2, 150, "report:triton9.9.9")  # the worst variant
    assert PM.find_occupancy(FAKE_REPORT, "_k", {"BLOCK_T": 32}, "fp32").blocks_per_sm == 5
    assert PM.find_occupancy(FAKE_REPORT, "_k", {"BLOCK_E": 256}, "bf16", 8).blocks_per_sm == 1
    assert PM.find_occupancy(FAKE_REPORT, "_k", {"BLOCK_E": 256}, "bf16", 4) is None       # warps differ
    assert PM.find_occupancy(FAKE_REPORT, "_k", {"BLOCK_E": 64}, "bf16") is None           # no resources
    assert PM.find_occupancy(FAKE_REPORT, "_other", {}, None) is None
    assert PM.find_occupancy(None, "_k", {}, None) is None


def test_report_occupancy_reads_the_default_report_once_and_falls_back(monkeypatch):
    calls = []
    monkeypatch.setattr(PM, "_default_report", lambda: calls.append(1) or FAKE_REPORT)
    PM.report_occupancy.cache_clear()
    try:
        hit = PM.report_occupancy("_k", (("BLOCK_E", 128), ("BLOCK_T", 64)), "bf16", 4, 7)
        assert hit.blocks_per_sm == 2 and hit.source.startswith("report:")
        PM.report_occupancy("_k", (("BLOCK_E", 128), ("BLOCK_T", 64)), "bf16", 4, 7)
        assert len(calls) == 1  # cached
        miss = PM.report_occupancy("_none", (), None, None, 7)
        assert (miss.blocks_per_sm, miss.source) == (7, "assumed")
        # an explicit occupancy wins over the report
        est = PM.sddmm_sparse(4096, D, D, K1, 2, occupancy=PM.Occupancy(9, source="given"))
        assert est.launches[1].occupancy.blocks_per_sm == 9
    finally:
        PM.report_occupancy.cache_clear()


def test_committed_reports_parse():
    report = PM._default_report()
    if report is None:
        pytest.skip("no static report under bench/results/")
    occ = PM.find_occupancy(report, "_gather_add_kernel", {"BLOCK_R": 1, "BLOCK_D": 1024}, "bf16", 4)
    assert occ is not None and 1 <= occ.blocks_per_sm <= 32


# ----------------------------------------------------------------------------------------------
# the bench: --predict on CPU, the model columns of a GPU table
# ----------------------------------------------------------------------------------------------
def test_predict_prints_every_case(capsys):
    cases = H.load_cases(torch.device("cpu"), False)
    assert bench_cli.main(["--predict"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for c in cases:
        assert any(ln.startswith(c.name + " ") and c.shape in ln for ln in lines), (c.name, c.shape)
    assert "floor H100 us" in lines[0] and "predicted H200 us" in lines[0]
    sddmm = [c for c in cases if c.name.startswith("sift.sddmm.")]
    methods = {c.shape.rsplit("method=", 1)[-1] for c in sddmm if "method=" in c.shape}
    assert methods == {"auto", "sparse", "dense"} and len([c for c in sddmm if "method=" in c.shape]) == 24
    assert all(H.case_model(c) is not None for c in cases if c.bytes or c.flops)


def test_predict_markdown_rewrites_only_the_generated_section(tmp_path, capsys):
    doc = tmp_path / "m.md"
    doc.write_text(f"intro\n{bench_cli.MD_BEGIN}\nold\n{bench_cli.MD_END}\noutro\n")
    assert bench_cli.main(["--predict", "--only", "sift.scatter", "--markdown", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n" + bench_cli.MD_BEGIN) and text.endswith(bench_cli.MD_END + "\noutro\n")
    assert "old\n" not in text and "| sift.scatter |" in text and "### SDDMM dispatch crossover" in text
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    assert bench_cli.main(["--predict", "--only", "sift.scatter", "--markdown", str(bare)]) == 2
    assert bare.read_text() == "no markers\n"
    capsys.readouterr()


def test_gpu_table_shows_model_next_to_measured(monkeypatch):
    case = next(c for c in H.load_cases(torch.device("cpu"), False, ["sift"]) if c.name == "sift.scatter")
    model = H.case_model_dict(case)
    pred = model["h100"]["predicted_us"]
    r = H.Result(case.name, case.shape, {"reference": 10.0, "peftops": 2 * pred}, {}, case.bytes, None, None,
                 device_type="cuda", model=model)
    assert H.measured_over_model(r, "h100") == pytest.approx(2.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    table = H.format_table([r], {"copy_bytes_per_s": 3e12, "gemm_flops_per_s": 8e14})
    head, _, row = table.splitlines()[:3]
    assert "model H100 us" in head and "meas/model" in head and " 2.00 " in row
    js = H.to_json([r], {"copy_bytes_per_s": 3e12, "gemm_flops_per_s": 8e14}, {})["results"][0]
    assert js["model"]["h200"]["predicted_us"] > 0 and js["measured_over_model"] == pytest.approx(2.0)
    cpu = H.Result(case.name, case.shape, {"peftops": 1.0}, {}, None, None, None, model=model)
    assert H.measured_over_model(cpu) is None  # CPU times are not kernel figures
