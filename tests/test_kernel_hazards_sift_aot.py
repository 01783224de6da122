"""GPU-only hazards of the SIFT and AoT kernels, pinned down without a GPU.

* _sddmm_chunk_kernel: the T loop carries its partial sums in registers only: no store, load of
  partial or barrier inside it, the entry indices loaded before it, one store after it (compile
  test, sm_90 TTGIR); bitwise reproducible and the same for any T-slice boundaries' programs.
* _topk_compact_kernel: blocks without candidates must not touch the shared candidate counter
  (compile test: the atomic is masked) and still write a defined, empty segment (interpreter).
* bf16 round-to-nearest-even by bit trick: NaN stays NaN, everything else equals torch's cast,
  over every exponent/sign/high mantissa and the low halves that decide the rounding.
* FP contraction: every launch states enable_fp_fusion, with the value its kernel's claim needs.
* Autotuned kernels: every config gives bitwise the same result (two processes may pick
  different configs), the segment sum equals the sequential fp32 sum in plan order, chunk by chunk.

Compile tests run in a subprocess with TRITON_INTERPRET=0 (this process runs the interpreter).
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import poisoned
from peftops.kernels import HAS_TRITON, force_backend, interpreting
from peftops.kernels import aot as A
from peftops.kernels import sift as S

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
needs_interpreter = pytest.mark.skipif(not (HAS_TRITON and interpreting()),
                                       reason="runs the kernels in triton's CPU interpreter")


# ----------------------------------------------------------------------------------------------
# compile helpers: sm_90 TTGIR of a kernel, in a TRITON_INTERPRET=0 subprocess
# ----------------------------------------------------------------------------------------------
_COMPILE_PRELUDE = textwrap.dedent("""
    import json, sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    from peftops.kernels import aot as A, sift as S

    def compile_ttgir(kernel, signature, constexprs, num_warps):
        while not isinstance(kernel, JITFunction):  # autotune wrappers keep the JIT function in .fn
            kernel = kernel.fn
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 3})
        return k.asm["ttgir"]

    out = {}
""")


def _compile_in_subprocess(body: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    code = _COMPILE_PRELUDE + textwrap.dedent(body) + "\nprint('@@JSON@@' + json.dumps(out))\n"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return json.loads(r.stdout.split("@@JSON@@", 1)[1])


_TRAILING_LOC = re.compile(r"\s+loc\(.*\)\s*$")


def _ops_with_regions(ttgir: str) -> list[tuple[int, str, tuple]]:
    """[(line number, op text, enclosing region ops)] of a TTGIR module, the enclosing ops as
    (line number, op name) from the outermost in."""
    out, stack = [], []
    for i, raw in enumerate(ttgir.splitlines()):
        line = _TRAILING_LOC.sub("", raw).strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("}"):
            stack.pop()
            if line.endswith("{"):  # } else {
                stack.append((i, "else"))
            continue
        name = line.split(" = ", 1)[1] if re.match(r"^%[\w.#:, %]+ = ", line) else line
        name = re.sub(r'["(].*', "", name.split()[0].lstrip('"'))
        out.append((i, line, tuple(stack)))
        if line.endswith("{"):
            stack.append((i, name))
    return out


def _region_end(ops, opener_line: int) -> int:
    """First line after the region opened at opener_line (the first op not nested in it)."""
    inside = [i for i, _, encl in ops if any(j == opener_line for j, _ in encl)]
    return max(inside) + 1


_SDDMM_SIG = {"dyt_ptr": "*{dt}", "xt_ptr": "*{dt}", "e_row_ptr": "*i32", "e_col_ptr": "*i32",
              "partial_ptr": "*{acc}", "T": "i32", "k": "i32", "ld": "i32",
              "ACC_FP64": "constexpr", "BLOCK_E": "constexpr", "BLOCK_T": "constexpr", "N_SUB": "constexpr",
              "T_SLICE": "constexpr"}


@pytest.fixture(scope="module")
def sddmm_ttgir():
    """TTGIR of _sddmm_chunk_kernel in the GPU configuration of fp32 / bf16 / fp64 inputs."""
    body = f"""
    SIG = {_SDDMM_SIG!r}
    for dt, acc, torch_dt in [("fp32", "fp32", "float32"), ("bf16", "fp32", "bfloat16"), ("fp64", "fp64", "float64")]:
        import torch
        from peftops.kernels import _dispatch
        block_e, block_t, n_sub, warps, t_slice = S._sddmm_params(getattr(torch, torch_dt))
        sig = {{a: t.format(dt=dt, acc=acc) for a, t in SIG.items()}}
        consts = {{"ACC_FP64": acc == "fp64", "BLOCK_E": block_e, "BLOCK_T": block_t, "N_SUB": n_sub,
                  "T_SLICE": t_slice}}
        out[f"{{dt}}|{{block_e}}|{{warps}}|{{t_slice // block_t}}"] = compile_ttgir(S._sddmm_chunk_kernel, sig, consts,
                                                                                  warps)
    """
    return _compile_in_subprocess(body)


@needs_triton
def test_sddmm_chunk_loop_carries_partial_sums_in_registers_only(sddmm_ttgir):
    """The design's point (docs/design.md#sddmm-at-low-density): per sub-block the (row, col) loads,
    the operand gathers of every token tile of the slice (unrolled: all in flight together), the
    FMAs into a register tile and one store of the reduced sums. Nothing is read back from partial,
    and there is no barrier or atomic: each (slice, entry) is written by exactly one store."""
    assert len(sddmm_ttgir) == 3
    for key, ttgir in sddmm_ttgir.items():
        n_tiles = int(key.split("|")[3])
        ops = _ops_with_regions(ttgir)
        loops = [i for i, line, encl in ops if re.match(r"^(%[\w.#:, %]+ = )?scf\.for\b", line)]
        assert len(loops) == 1, key  # the sub-blocks; the token tiles are unrolled
        (loop,) = loops
        in_loop = [line for i, line, encl in ops if any(j == loop for j, _ in encl)]
        tiles = [line for line in in_loop if "tt.load" in line and re.search(r"tensor<\d+x\d+x", line)]
        vectors = [line for line in in_loop if "tt.load" in line and not re.search(r"tensor<\d+x\d+x", line)]
        assert len(tiles) == 2 * n_tiles, (key, len(tiles))  # dy^T and x^T per token tile
        assert len(vectors) == 2, (key, vectors)  # e_row, e_col: nothing else is read (no partial)
        assert not any("barrier" in line or "atomic" in line for line in ttgir.splitlines()), key
        stores = [i for i, line, _ in ops if line.startswith("tt.store")]
        assert len(stores) == 1 and stores[0] in [i for i, _, encl in ops if any(j == loop for j, _ in encl)], key


def _reduce_layouts(ttgir: str) -> list[dict]:
    """The blocked layout (sizePerThread, threadsPerWarp, warpsPerCTA, order) of every tt.reduce's operand."""
    layouts = dict(re.findall(r"^(#\w+) = #ttg\.blocked<\{(.*)\}>", ttgir, flags=re.M))
    out = []
    for m in re.finditer(r'"tt\.reduce"\(%[\w.]+\) <\{axis = (\d+) : i32\}>.*?\}\) : \(tensor<[\dx]+\w+, (#\w+)>\)',
                         ttgir, flags=re.S):
        fields = {k: [int(v) for v in vals.split(",")] for k, vals in
                  re.findall(r"(\w+) = \[([\d, ]+)\]", layouts[m.group(2)])}
        out.append({"axis": int(m.group(1)), **fields})
    return out


@needs_triton
def test_topk_compact_candidate_atomic_is_masked():
    """The candidate counter is one word that every block of the compaction pass would hit:
    blocks without candidates must not issue the atomic (its mask is not the constant true)."""
    body = """
    for dt, key_bits, inf_key in [("i16", 15, 0x7F80), ("i32", 31, 0x7F800000), ("i64", 63, 0x7FF0000000000000)]:
        sig = {"bits_ptr": "*" + dt, "ws_ptr": "*i64", "cand_key_ptr": "*i64" if key_bits == 63 else "*i32",
               "cand_off_ptr": "*i32", "n": "i64", "cap": "i64", "nblocks": "i32", "ctrl_len": "i32",
               "KEY_BITS": "constexpr", "INF_KEY": "constexpr", "BLOCK": "constexpr"}
        consts = {"KEY_BITS": key_bits, "INF_KEY": inf_key, "BLOCK": 4096}
        out[dt] = compile_ttgir(S._topk_compact_kernel, sig, consts, 8)
    """
    for dt, ttgir in _compile_in_subprocess(body).items():
        true_values = set(re.findall(r"(%[\w.]+) = arith\.constant true\b", ttgir))
        atomics = re.findall(r"tt\.atomic_rmw (\w+), \w+, \w+, ([^:]*?) :", ttgir)
        assert len(atomics) == 2, (dt, atomics)  # NaN/Inf count, candidate count
        for op, operands in atomics:
            args = [a.strip() for a in operands.split(",")]
            assert op == "add" and len(args) == 3, (dt, op, args)
            assert args[2] not in true_values, f"{dt}: unmasked atomic on {args[0]}"


@needs_interpreter
def test_topk_blocks_without_candidates_write_empty_segments(monkeypatch):
    """Sampled bound, scores concentrated in a few blocks: most blocks have no candidate (their
    atomic is masked off); their segment is (0, 0) and the selection stays exact."""
    gen = torch.Generator().manual_seed(11)
    n, k, block = 4096, 10, S._topk_params()["block"]
    scores = torch.randn(n, generator=gen) * 1e-3
    hot = torch.zeros(n, dtype=torch.bool)
    hot_blocks = (2, 7, 12, 19, 25, 30)
    for b in hot_blocks:
        hot[b * block:(b + 1) * block] = True
    scores[hot] = torch.randn(int(hot.sum()), generator=gen) * 10
    rank, cap = S._sample_plan(n, k, 64)
    assert rank > 0
    workspaces = []
    compact_run = S._topk_compact_kernel.run

    def run(*args, **kwargs):
        workspaces.append(args[1])  # ws = [control block | 6 rows of per-block stats]
        return compact_run(*args, **kwargs)

    monkeypatch.setattr(S._topk_compact_kernel, "run", run)
    out, n_cand, n_nonfinite = S._topk_pipeline(scores, k, rank, cap, 64)
    assert n_nonfinite == 0 and k <= n_cand <= cap and len(workspaces) == 1
    order = torch.sort(scores.double().abs(), descending=True, stable=True).indices
    assert torch.equal(out, order[:k].sort().values)
    nblocks = n // block
    ws = workspaces[0]
    stat = ws[ws.numel() - 6 * nblocks:].view(6, nblocks)
    count = stat[S._STAT_SEG_COUNT]
    empty = count == 0
    assert int(empty.sum()) == nblocks - len(hot_blocks)
    assert torch.equal(stat[S._STAT_SEG_START][empty], torch.zeros(int(empty.sum()), dtype=torch.int64))
    assert int(count.sum()) == n_cand


# ----------------------------------------------------------------------------------------------
# bf16 round-to-nearest-even through the merged write and the AdamW step
# ----------------------------------------------------------------------------------------------
# NaNs the old bias add turned into +-0 / -Inf (low mantissa bits carried into the exponent)
_BROKEN_NANS = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FFF8000, 0xFFFF8000, 0x7FFFFFFE, 0xFFFF7FFF + 1, 0x7FFF8001]


def _bit_patterns() -> torch.Tensor:
    """Every sign/exponent/high-mantissa half with the low halves that decide the rounding (0, 1,
    just below/at/above the tie, odd and even high halves alike, all ones), the NaN payloads that
    broke the bit trick, +-Inf, +-0, the extreme subnormals and finite values, random words."""
    hi = torch.arange(1 << 16, dtype=torch.int64) << 16
    lo = torch.tensor([0x0000, 0x0001, 0x4000, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF], dtype=torch.int64)
    special = torch.tensor(_BROKEN_NANS + [0x7F800000, 0xFF800000, 0x00000000, 0x80000000, 0x00000001, 0x80000001,
                                           0x007FFFFF, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000,
                                           0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF],
                           dtype=torch.int64)
    rand = torch.randint(0, 1 << 32, (1 << 16,), generator=torch.Generator().manual_seed(5), dtype=torch.int64)
    words = torch.cat([(hi[:, None] | lo[None, :]).reshape(-1), special, rand])
    return (words - ((words >= 1 << 31).long() << 32)).to(torch.int32).view(torch.float32)


def _assert_torch_cast(got: torch.Tensor, x: torch.Tensor):
    """got (bf16) == x.to(bf16) bit for bit where that is a number; NaN exactly where it is NaN."""
    want = x.to(torch.bfloat16)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN in must give NaN out, and only NaN"
    bits = lambda t: t.view(torch.int16)  # noqa: E731
    bad = (bits(got) != bits(want)) & ~nan
    assert not bool(bad.any()), (f"{int(bad.sum())} mismatches, e.g. input bits "
                                 f"{[hex(v & 0xFFFFFFFF) for v in x.view(torch.int32)[bad][:5].tolist()]}")


@pytest.fixture
def big_elementwise_blocks(monkeypatch):
    """One interpreter program per 64 Ki entries (the launchers' interpreter default is 64)."""
    monkeypatch.setattr(S, "_elementwise_block", lambda: (1 << 16, 4))


@needs_interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on NaN inputs
def test_scatter_merged_bf16_rounding_matches_torch_cast_bit_for_bit(big_elementwise_blocks):
    x = _bit_patterns()
    n = x.numel()
    weight = torch.zeros(n, dtype=torch.bfloat16)
    delta = torch.full((n,), -0.0)  # x + (-0) == x for every x (NaN stays NaN): round(x) is what lands
    with force_backend("triton"):
        S.scatter_merged_(weight, torch.arange(n), x, delta)
    _assert_torch_cast(weight, x)
    with force_backend("reference"):
        ref = torch.zeros(n, dtype=torch.bfloat16)
        S.scatter_merged_(ref, torch.arange(n), x, delta)
    _assert_torch_cast(ref, x)
    for w in _BROKEN_NANS:
        i = (x.view(torch.int32) == torch.tensor(w - (1 << 32) if w >= 1 << 31 else w, dtype=torch.int32))
        assert bool(torch.isnan(weight[i]).all()), hex(w)


@needs_interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_sparse_adamw_bf16_write_matches_torch_cast_bit_for_bit(big_elementwise_blocks):
    x = _bit_patterns()
    n = x.numel()
    weight = torch.zeros(n, dtype=torch.bfloat16)
    delta = torch.full((n,), -0.0)
    zeros = [torch.zeros(n) for _ in range(3)]
    # lr = 0: delta stays -0 (decay 1, step 0), so the write is round(w0 + (-0)) = round(w0)
    with force_backend("triton"):
        S.sparse_adamw_step_(weight, torch.arange(n, dtype=torch.int32), x, delta, *zeros, step=1, lr=0.0,
                             beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    assert torch.equal(delta.view(torch.int32), torch.full((n,), -0.0).view(torch.int32))
    _assert_torch_cast(weight, x)


# ----------------------------------------------------------------------------------------------
# explicit FP contraction on every launch
# ----------------------------------------------------------------------------------------------
# off where results are claimed bit-equal to separately rounded torch ops (or nothing to fuse)
_EXPECTED_FUSION = {
    "_abs_accumulate_kernel": False, "_topk_sample_kernel": False, "_topk_compact_kernel": False,
    "_topk_radix_pass_kernel": False, "_topk_count_kernel": False, "_topk_write_kernel": False,
    "_sddmm_chunk_kernel": True, "_sddmm_reduce_kernel": True,
    "_scatter_merged_kernel": False, "_sparse_adamw_kernel": False,
    "_gather_add_kernel": False, "_segment_sum_kernel": False,
}


@needs_interpreter
def test_every_launch_sets_fp_fusion_explicitly(monkeypatch):
    seen = {}
    for mod in (S, A):
        for name in _EXPECTED_FUSION:
            obj = getattr(mod, name, None)
            if obj is None:
                continue
            original = obj.run

            def run(*args, _name=name, _original=original, **kwargs):
                seen.setdefault(_name, []).append(kwargs.get("enable_fp_fusion", "unset"))
                return _original(*args, **kwargs)

            monkeypatch.setattr(obj, "run", run)
    gen = torch.Generator().manual_seed(0)
    with force_backend("triton"):
        acc = torch.zeros(50)
        S.abs_accumulate_(acc, torch.randn(50, generator=gen))
        S.topk_abs_select(torch.randn(300, generator=gen), 7)
        rows, cols = torch.tensor([0, 2, 3]), torch.tensor([1, 0, 4])
        S.sddmm_at_indices(torch.randn(9, 4, generator=gen), torch.randn(9, 5, generator=gen), rows, cols,
                           method="sparse")
        w = torch.zeros(4, 5, dtype=torch.bfloat16)
        idx = torch.tensor([1, 7, 19])
        S.scatter_merged_(w, idx, torch.ones(3), torch.zeros(3))
        S.sparse_adamw_step_(w, idx, torch.ones(3), torch.zeros(3), torch.ones(3), torch.zeros(3), torch.zeros(3),
                             step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
        h, ids = torch.randn(2, 3, 8, generator=gen), torch.tensor([[0, 2, 2], [1, 0, 0]])
        A.gather_add(h, ids, torch.randn(3, 8, generator=gen))
        A.table_grad_rows(h, ids, 3)
    assert set(seen) == set(_EXPECTED_FUSION), set(_EXPECTED_FUSION) ^ set(seen)
    for name, values in seen.items():
        assert set(values) == {_EXPECTED_FUSION[name]}, (name, values)


# ----------------------------------------------------------------------------------------------
# results independent of the autotuner's pick
# ----------------------------------------------------------------------------------------------
def _long_segment_inputs(dtype, seed=0):
    """Tokens whose rows form a few long segments (hundreds of tokens) and some short ones;
    gradient magnitudes spread over decades so any change of summation order shows in the bits."""
    g = torch.Generator().manual_seed(seed)
    n, d = 700, 37
    ids = torch.where(torch.rand(n, generator=g) < 0.8, torch.randint(0, 3, (n,), generator=g),
                      torch.randint(3, 40, (n,), generator=g))
    grad = (torch.randn(n, d, generator=g) * torch.exp(4 * torch.randn(n, 1, generator=g))).to(dtype)
    plan = A.segment_plan(ids)
    return grad, ids, plan, A.plan_num_segments(plan, n)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_segment_sum_is_bitwise_the_same_for_every_autotune_config(dtype):
    grad, ids, plan, n_seg = _long_segment_inputs(dtype)
    n, d = grad.shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    results = []
    reduce_cfgs = A._SEGMENT_REDUCE_CONFIGS
    for i, cfg in enumerate(A._SEGMENT_SUM_CONFIGS):  # both passes' configs (chunk sums, chunk partials)
        out = poisoned((n_seg, d), acc)
        A._launch_segment_sum(grad, plan, n_seg, out, False, configs=(cfg, reduce_cfgs[i % len(reduce_cfgs)]))
        results.append(out)
    for cfg, out in zip(A._SEGMENT_SUM_CONFIGS, results):
        assert torch.equal(out, results[0]), f"config {cfg.kwargs} / {cfg.num_warps} warps changes the sums"
    # the order is the plan's, cut into chunks of segment_chunk() tokens: each chunk token by token,
    # then the chunks' sums in chunk order, in the accumulation dtype
    perm, seg_count = plan[:n], plan[n + n_seg:n + 2 * n_seg]
    k = A.segment_chunk()
    start = 0
    for s, c in enumerate(seg_count.tolist()):
        want = torch.zeros(d, dtype=acc)
        for lo in range(start, start + c, k):
            part = torch.zeros(d, dtype=acc)
            for t in perm[lo:min(lo + k, start + c)].tolist():
                part = part + grad[t].to(acc)
            want = want + part
        start += c
        assert torch.equal(results[0][s], want), s
    # and the public op (the autotuner's own single interpreter config) agrees
    with force_backend("triton"):
        _, sums = A.table_grad_rows(grad, ids, 40, dtype=acc, plan=plan)
    assert torch.equal(sums, results[0])


@needs_interpreter
def test_gather_add_is_bitwise_the_same_for_every_autotune_config():
    g = torch.Generator().manual_seed(1)
    n, d, V = 77, 45, 9
    h = torch.randn(n, d, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, V, (n,), generator=g)
    table = torch.randn(2, V, d, generator=g)
    tasks = torch.randint(0, 2, (7,), generator=g)
    results = []
    for cfg in A._GATHER_ADD_CONFIGS:
        out = poisoned(h.shape, h.dtype)
        grid = (-(-n // cfg.kwargs["BLOCK_R"]) * -(-d // cfg.kwargs["BLOCK_D"]),)
        A._gather_add_kernel.fn[grid](h, out, ids, table, tasks, n, d, V, 2, 11, h.stride(0), out.stride(0),
                                      table.stride(0), table.stride(1), 128, HAS_TASK=True, ACC_FP64=False,
                                      **cfg.kwargs)
        results.append(out)
    for out in results:
        assert torch.equal(out.view(torch.int16), results[0].view(torch.int16))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sddmm_chunk_kernel_is_bitwise_reproducible_on_skewed_entries(dtype):
    """Run to run the bits are equal (fixed config, fixed order, one store per (slice, entry)), and
    skewed index sets (all entries in two rows, all in one column) are summed as exactly as a
    uniform one: per-slice partials add up to the float64 sum within fp32 rounding."""
    g = torch.Generator().manual_seed(2)
    T, d_out, d_in = 53, 9, 300
    dy = (torch.randn(T, d_out, generator=g) * torch.exp(3 * torch.randn(T, 1, generator=g))).to(dtype)
    x = torch.randn(T, d_in, generator=g).to(dtype)
    uniform = torch.randperm(d_out * d_in, generator=g)[:700].sort().values
    two_rows = torch.cat([torch.arange(d_in) + 3 * d_in, torch.arange(d_in) + 8 * d_in])
    one_col = torch.arange(d_out) * d_in + 17
    block_e, block_t, n_sub, warps, t_slice = S._sddmm_params(dtype)
    ld = -(-T // 16) * 16
    dyt, xt = S._transposed_padded(dy, ld), S._transposed_padded(x, ld)
    for flat in (uniform, two_rows, one_col):
        rows, cols = flat // d_in, flat % d_in
        k = rows.numel()
        plan = S._sddmm_plan(rows, cols, d_out, d_in, block_e * n_sub)
        n_chunks, n_split = S.sddmm_grid(T, k, block_e, n_sub, t_slice)
        assert n_split > 1
        full = (dy.double().T @ x.double())[rows, cols]
        magnitude = (dy.double().abs().T @ x.double().abs())[rows, cols]  # fp32 error bound scale
        runs = []
        for _ in range(2):
            partial = poisoned((n_split, k), torch.float32)
            S._sddmm_chunk_kernel[(n_chunks, n_split)](
                dyt, xt, plan.e_row, plan.e_col, partial, T, k, ld,
                ACC_FP64=False, BLOCK_E=block_e, BLOCK_T=block_t, N_SUB=n_sub, T_SLICE=t_slice, num_warps=warps)
            runs.append(partial)
        assert torch.equal(runs[0], runs[1])
        got = torch.empty(k, dtype=torch.float64)
        got[plan.e_pos] = runs[0].double().sum(0)
        assert bool(((got - full).abs() <= 1e-5 * magnitude + 1e-30).all()), k
