"""Hazards of kernels/wegeft.py and kernels/cka.py that the accuracy tests cannot see.

- fp64 tl.dot: triton 3.6/3.7 default ``out_dtype`` to fp32 and reject an fp64 accumulator; run here
  against an emulation of that default so the newest triton catches it too.
- bf16 rounding emulation under the interpreter (round to nearest even, NaN stays NaN), pinned bit
  for bit against torch and against exact results rounded once.
- every launch states its FP contraction (``enable_fp_fusion``), recorded at run time.
- results independent of the autotune config: each kernel run once per config of its list (the
  autotuner bypassed; ``_dispatch.autotune`` keeps one config under the interpreter), bitwise equal.
"""
import contextlib
import functools

import pytest
import torch

from helpers import poisoned
from peftops.kernels import HAS_TRITON, force_backend, triton_runs_on

pytestmark = pytest.mark.skipif(not (HAS_TRITON and triton_runs_on(torch.device("cpu"))),
                                reason="needs triton's CPU interpreter (TRITON_INTERPRET=1)")

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language import semantic as _semantic

    from peftops.kernels import cka as C
    from peftops.kernels import wegeft as K


def _bits16(t):
    return t.view(torch.int16).to(torch.int32) & 0xFFFF


def _int_tensor(g, shape, lo, hi, dtype):
    return torch.randint(lo, hi + 1, shape, generator=g).to(dtype)


# ----------------------------------------------------------------------------------------------
# 1. fp64 dots on triton 3.6/3.7
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _triton36_dot_default():
    """tl.dot as triton 3.6/3.7 see it: an out_dtype not given is fp32 (3.8+ infer it from acc)."""
    cls = _semantic.TritonSemantic
    orig = cls.dot

    @functools.wraps(orig)
    def dot(self, lhs, rhs, acc, input_precision, max_num_imprecise_acc, out_dtype):
        return orig(self, lhs, rhs, acc, input_precision, max_num_imprecise_acc,
                    tl.float32 if out_dtype is None else out_dtype)

    cls.dot = dot
    try:
        yield
    finally:
        cls.dot = orig


@pytest.mark.parametrize("path", ["fused", "merged"])
def test_fp64_ops_run_with_the_triton36_dot_default(path):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 20, generator=g, dtype=torch.float64), torch.randn(14, 20, generator=g, dtype=torch.float64)
    phi, psi = torch.randn(3, 20, generator=g, dtype=torch.float64), torch.randn(3, 20, generator=g, dtype=torch.float64)
    b, grad = torch.randn(14, generator=g, dtype=torch.float64), torch.randn(9, 14, generator=g, dtype=torch.float64)
    with _triton36_dot_default(), force_backend("triton"):
        y, u = K.wegeft_forward(x, w, b, phi, psi, 0.5, path=path)
        back = K.wegeft_backward(grad, x, u, w, phi, psi, 0.5, path=path, need_dbias=True)
        merged = K.wegeft_merge(w, phi, psi, 0.5)
    y_ref, u_ref = K.wegeft_forward_reference(x, w, b, phi, psi, 0.5)
    back_ref = K.wegeft_backward_reference(grad, x, u_ref, w, phi, psi, 0.5, need_dbias=True)
    for got, ref in zip((y, u, *back, merged), (y_ref, u_ref, *back_ref, K.wegeft_merge_reference(w, phi, psi, 0.5))):
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# 2. bf16 round-to-nearest-even emulation
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    @triton.jit
    def _cvt_probe_kernel(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        x = tl.load(X + offs, mask=ok, other=0.0)
        tl.store(Y + offs, K._cvt(x, tl.bfloat16, True), mask=ok)


def _special_fp32_patterns():
    specials = [
        0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x00007FFF, 0x00008000, 0x00008001, 0x00018000,
        0x007FFFFF, 0x807FFFFF, 0x00800000, 0x3F800000, 0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F817FFF,
        0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7E8000, 0x7F800000, 0xFF800000,
        0x7F800001, 0x7F807FFF, 0x7F808000, 0x7F80FFFF, 0x7FBFFFFF, 0x7FC00000, 0x7FC08000, 0x7FFF8000,
        0x7FFFFFFF, 0xFF800001, 0xFF808000, 0xFFC00000, 0xFFFF8000, 0xFFFFFFFF,
    ]
    hi = torch.arange(1 << 16, dtype=torch.int64) << 16   # every sign/exponent/upper-mantissa pattern
    lows = torch.tensor([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int64)
    every = (hi[:, None] | lows[None, :]).flatten()
    pats = torch.cat([torch.tensor(specials, dtype=torch.int64), every])
    return pats.to(torch.int32).view(torch.float32)  # int64 -> int32 keeps the low 32 bits


def test_bf16_rounding_emulation_matches_torch_bit_for_bit():
    x = _special_fp32_patterns()
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _cvt_probe_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096, enable_fp_fusion=True)
    nan_in = torch.isnan(x)
    assert nan_in.sum() > 1000
    assert torch.isnan(y[nan_in]).all(), "a NaN must round to a NaN"
    assert (_bits16(y[nan_in]) == 0x7FFF).all(), "NaN -> the canonical 0x7FFF, as cvt.rn.bf16.f32 gives"
    want, got = _bits16(x[~nan_in].to(torch.bfloat16)), _bits16(y[~nan_in])
    bad = (want != got).nonzero().flatten()
    assert bad.numel() == 0, (f"{bad.numel()} patterns differ from torch, e.g. "
                              + ", ".join(f"{int(x[~nan_in][i].view(torch.int32)) & 0xFFFFFFFF:#010x}: "
                                          f"{int(got[i]):#06x} != {int(want[i]):#06x}" for i in bad[:4]))


def _exact_inputs(seed=0, t=11, d_in=40, d_out=13, r=5):
    """Small integers: every fp32 sum in the kernels is exact (checked below), so each bf16 output is
    one rounding of an exactly known value, and most of them need rounding (> 8 significant bits)."""
    g = torch.Generator().manual_seed(seed)
    bf = torch.bfloat16
    return (_int_tensor(g, (t, d_in), -15, 15, bf), _int_tensor(g, (d_out, d_in), -15, 15, bf),
            _int_tensor(g, (d_out,), -15, 15, bf), _int_tensor(g, (r, d_in), -15, 15, bf),
            _int_tensor(g, (r, d_in), -15, 15, bf))


def _exact_product(a, b):
    """a @ b in fp64 for multiples of 1/2 whose every fp32 partial sum is exact (|terms| < 2^22)."""
    a, b = a.double(), b.double()
    assert float((a.abs() @ b.abs()).max()) < 2 ** 22, "test data: an fp32 partial sum could round"
    return a @ b


def _assert_bitwise(got, exact64, what):
    want = exact64.to(torch.float32).to(torch.bfloat16)  # exact in fp32: one rounding to bf16
    inexact = (want.double() != exact64).float().mean()
    assert inexact > 0.3, f"{what}: test data too easy ({float(inexact):.0%} of entries need rounding)"
    bad = (_bits16(got) != _bits16(want)).sum()
    assert bad == 0, f"{what}: {int(bad)} of {got.numel()} entries are not exact results rounded to nearest even"


def test_bf16_op_outputs_are_exact_results_rounded_once():
    x, w, b, phi, psi = _exact_inputs()
    s = 0.5
    with force_backend("triton"):
        b_gen = K.generate_b(w, phi, s)
        merged = K.wegeft_merge(w, phi, psi, s)
        y, u = K.wegeft_forward(x, w, b, phi, psi, s, path="fused")
    _assert_bitwise(b_gen, s * _exact_product(w, phi.t()), "generate_b")
    bq = b_gen  # the kernels round B once to the weight dtype before using it
    _assert_bitwise(merged, w.double() + _exact_product(bq, psi), "merge")
    _assert_bitwise(u, _exact_product(x, psi.t()), "u = x Psi^T")
    cat_a, cat_b = torch.cat([x, u], 1), torch.cat([w.t(), bq.t()], 0)  # [x | u] [W | B]^T
    _assert_bitwise(y, _exact_product(cat_a, cat_b) + b.double(), "y (K-concat GEMM)")


# ----------------------------------------------------------------------------------------------
# 3. every launch states its FP contraction
# ----------------------------------------------------------------------------------------------
def test_every_launch_passes_enable_fp_fusion(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    seen = []
    orig = InterpretedFunction.run

    def run(self, *args, **kwargs):
        seen.append((self.fn.__name__, kwargs.get("enable_fp_fusion")))
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    g = torch.Generator().manual_seed(1)
    for dt in (torch.float32, torch.bfloat16):
        x, w = torch.randn(6, 24, generator=g).to(dt), torch.randn(20, 24, generator=g).to(dt)
        phi, psi, b = (torch.randn(4, 24, generator=g).to(dt), torch.randn(4, 24, generator=g).to(dt),
                       torch.randn(20, generator=g).to(dt))
        with force_backend("triton"):
            for path in ("fused", "merged"):
                y, u = K.wegeft_forward(x, w, b, phi, psi, 0.5, dropout_p=0.1, seed=3, path=path)
                K.wegeft_backward(torch.ones_like(y), x, u, w, phi, psi, 0.5, dropout_p=0.1, seed=3, path=path,
                                  need_dbias=True)
            K.wegeft_merge(w, phi, psi, 0.5)
            for form in ("features", "tokens"):
                C.linear_cka(x, torch.randn(6, 9, generator=g).to(dt), torch.tensor([1, 1, 0, 1, 1, 1]), form=form)
    names = {n for n, _ in seen}
    assert {"_generate_kernel", "_thin_right_kernel", "_thin_reduce_kernel", "_kcat_matmul_kernel",
            "_cka_means_kernel", "_cka_features_kernel", "_cka_tokens_kernel", "_cka_finalize_kernel"} <= names
    missing = sorted({n for n, f in seen if not isinstance(f, bool)})
    assert not missing, f"launched without enable_fp_fusion=True/False: {missing}"


# ----------------------------------------------------------------------------------------------
# 4. results do not depend on the autotune config
# ----------------------------------------------------------------------------------------------
def _kcat_once(cfg, a1, b1, a2, b2, bias):
    m, n = a1.shape[0], b1.shape[1]
    out = poisoned((m, n), a1.dtype)
    grid = (triton.cdiv(m, cfg.kwargs["BM"]) * triton.cdiv(n, cfg.kwargs["BN"]),)
    K._kcat_matmul_kernel.fn[grid](  # the heuristics (EVEN_K1) and the JIT function, no autotuner
        a1, b1, a2, b2, bias, out, m, n, a1.shape[1], a2.shape[1], min(triton.next_power_of_2(m), 8192),
        a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1), a2.stride(0), a2.stride(1),
        b2.stride(0), b2.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=True, ACC_FP64=a1.dtype == torch.float64, INTERP_BF16=a1.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True, **cfg.kwargs)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kcat_result_is_the_same_for_every_config(dtype):
    g = torch.Generator().manual_seed(2)
    # K1 spans several BK chunks of any config; for fp32 it ends in a partial one. 16-bit operands with
    # a partial last chunk keep only the few-token tile (the larger ones spill), so there K1 = 5 x 64.
    t, k2, n = 37, 12, 45
    k1 = 300 if dtype == torch.float32 else 320
    a1, b1 = torch.randn(t, k1, generator=g).to(dtype), torch.randn(k1, n, generator=g).to(dtype)
    a2, b2 = torch.randn(t, k2, generator=g).to(dtype), torch.randn(k2, n, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    configs = K._prune_kcat(K._kcat_configs(), {"a1_ptr": a1, "K1": k1})
    if dtype != torch.float32:
        partial = K._prune_kcat(K._kcat_configs(), {"a1_ptr": a1, "K1": 300})
        assert partial and all(c.kwargs["BM"] == 16 and c.kwargs["BK"] == configs[0].kwargs["BK"] for c in partial)
    assert len(configs) >= 2
    outs = [_kcat_once(c, a1, b1, a2, b2, bias) for c in configs]
    ref = (a1.double() @ b1.double() + a2.double() @ b2.double() + bias.double()).to(dtype)
    assert not torch.isnan(outs[0]).any()
    torch.testing.assert_close(outs[0].double(), ref.double(), atol=2e-2 if dtype != torch.float32 else 1e-4, rtol=2e-2)
    for c, o in zip(configs[1:], outs[1:]):
        assert torch.equal(_bits16(o) if dtype != torch.float32 else o.view(torch.int32),
                           _bits16(outs[0]) if dtype != torch.float32 else outs[0].view(torch.int32)), \
            f"config {c.kwargs} gives other bits than {configs[0].kwargs}"


def _cka_once(form, cfg, x2, y2):
    """_linear_cka_triton with the Gram kernel launched for one given config (no autotuner)."""
    T, dx = x2.shape
    dy = y2.shape[1]
    dot = torch.promote_types(x2.dtype, y2.dtype)
    bits = 32 if dot == torch.float32 else 16
    dot_tl = tl.float32 if dot == torch.bfloat16 else C._TL_DTYPES[dot]  # as the launcher does here
    mu, n = C._launch_means(x2, y2, None)
    blk = cfg.kwargs
    if form == "features":
        kernel = C._features_tuned[bits].fn
        bx, by = triton.cdiv(dx, blk["BLOCK_D"]), triton.cdiv(dy, blk["BLOCK_D"])
        counts = [bx * bx, by * by, by * bx]
        grid = (sum(counts),)
    else:
        kernel = C._tokens_tuned[bits].fn
        nt = triton.cdiv(T, blk["BLOCK_T"]) ** 2
        counts, grid = [nt] * 3, (nt,)
    width = max(counts)
    out = poisoned((3, width), torch.float32)
    kernel[grid](x2, y2, mu, mu[dx:], n, n, out, T, dx, dy, x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1),
                 width, 0, HAS_MASK=False, DOT_DTYPE=dot_tl, PRECISION="ieee",
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True, **blk)
    res = torch.empty((), dtype=torch.float32)
    C._cka_finalize_kernel[(1,)](out, width, *counts, n, res, BLOCK=64, num_warps=4, enable_fp_fusion=True)
    return res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["features", "tokens"])
def test_cka_result_is_the_same_for_every_config(form, dtype):
    g = torch.Generator().manual_seed(3)
    # tokens: T x T tiles over a feature loop of several blocks; features: d x d tiles over T
    T, dx, dy = (150, 140, 100) if form == "tokens" else (200, 90, 70)
    x = (torch.randn(T, dx, generator=g) + 0.3 * torch.randn(T, 1, generator=g)).to(dtype)
    y = (x[:, :dy].float() + 0.5 * torch.randn(T, dy, generator=g)).to(dtype)
    configs = (C._FEATURE_CONFIGS if form == "features" else C._TOKEN_CONFIGS)[32 if dtype == torch.float32 else 16]
    outs = [_cka_once(form, c, x, y) for c in configs]
    ref = C.linear_cka_reference(x.double(), y.double(), None, form)
    assert abs(float(outs[0]) - float(ref)) < 1e-3
    for c, o in zip(configs[1:], outs[1:]):
        assert o.view(torch.int32) == outs[0].view(torch.int32), \
            f"config {c.kwargs} w{c.num_warps}: {float(o)!r} != {float(outs[0])!r} ({configs[0].kwargs})"
