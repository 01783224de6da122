"""WeGeFT kernels: weight-generative fine-tuning of a frozen linear layer (docs/design.md#wegeft).

For a frozen W [d_out, d_in], bias b [d_out], generators Φ, Ψ [r, d_in] and scale s = α / r:

    B  = s · W Φᵀ                      [d_out, r]   (the generated "LoRA B")
    W' = W + B Ψ = W + s (W Φᵀ) Ψ       [d_out, d_in]
    y  = x W'ᵀ + b = x Wᵀ + b + u Bᵀ,   u = x Ψᵀ  [T, r]

and with G = dy, v = G B [T, r], ū = uᵀ G [r, d_out]:

    dx = G W' = G W + v Ψ,   dΨ = vᵀ x,   dΦ = s · ū W,   db = Σ_t G[t].

Dropout (the authors' semantics): the generated branch sees a dropped-out copy of W, i.e. B = s/(1-p) ·
(W ∘ M) Φᵀ with a fresh Bernoulli(1-p) keep-mask M over the d_out × d_in entries per call; the frozen
x Wᵀ term never sees dropout, and dΦ = s/(1-p) · ū (W ∘ M). M is a counter-based hash of
(seed, flat index) so the backward regenerates it instead of storing it, and the PyTorch reference
computes the same mask bit for bit.

Two execution paths, chosen by the token count T (``choose_path``):

- ``merged`` (large T): one kernel builds W' (and, in the backward, B) in a single sweep over W's
  rows; the dense product is a cuBLAS GEMM against W' into a contiguous output (y = x W'ᵀ + b,
  dx = G W', nn.Linear's layout), and the thin side products u = x Ψᵀ, v = G B come from the thin
  Triton GEMM (one extra read of x or G: cheaper than copying a [T, d + r] buffer's column slice
  out, which an N-concatenated [W' ; Ψ] GEMM would need for a contiguous y).
- ``fused`` (small T): a Triton GEMM over the K-concatenation [x | u] · [W | B]ᵀ (forward) and
  [G | v] · [W ; Ψ] (backward), so W' is never materialised; u and v come from thin Triton GEMMs.

Generating B (and W') is one program per BM = 32 rows of W, each sweeping d_in twice (W Φᵀ, then
W + B Ψ), when that keeps more than a third of the SMs busy (d_out = 4096: 128 programs on 132
SMs). A smaller d_out (a GQA k/v projection, d_out = 1024: 32 programs) splits d_in
(``generate_splits``): a split-K pass writes fp32 partials of W Φᵀ, and a finish kernel over (row
block, d_in range) sums them in split order, then stores B and merges its own range of W's columns
(1024 x 4096: 128 programs of 32 x 1024 each; the gain is estimated from the programs per SM, not
measured on a GPU yet).

The reductions over tokens (ū with db fused, dΨ) and the r × d_in product dΦ are split-K Triton
kernels with a deterministic fp32 reduction of the splits. Every kernel accumulates in fp32 (fp64 for
fp64 inputs, used by CPU gradcheck under the interpreter).

Layout: @triton.jit kernels, launchers, PyTorch references, public dispatching functions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES, check_real, check_same_device, check_tensor
from ._common import acc_dtype, acc_fp64, sm_count
from ._dispatch import HAS_TRITON, autotune, gpu_like, interpreting, next_pow2, use_triton

__all__ = [
    "wegeft_forward", "wegeft_backward", "wegeft_merge", "generate_b", "choose_path", "resolve_path",
    "triton_ok", "dropout_keep_mask",
    "wegeft_forward_reference", "wegeft_backward_reference", "wegeft_merge_reference", "generate_b_reference",
    "PATHS", "MAX_TRITON_RANK",
]

PATHS = ("auto", "fused", "merged")
MAX_TRITON_RANK = 256  # larger r runs the composite PyTorch path (register tiles are [*, next_pow2(r)])
_MASK32 = 0xFFFFFFFF
_HASH_C1 = 0x7FEB352D  # both < 2^31: products with 32-bit values stay below 2^63 in the int64 reference
_HASH_C2 = 0x1B873593

# Tests flip this to fill every fresh kernel output with NaN, so an unwritten element shows up.
_POISON_OUTPUTS = False


def _new(shape, dtype, device):
    if _POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ==============================================================================================
# Triton kernels
# ==============================================================================================
if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import bf16_rne

    @triton.jit
    def _hash32(h):
        h = h ^ (h >> 16)
        h = h * 0x7FEB352D
        h = h ^ (h >> 15)
        h = h * 0x1B873593
        h = h ^ (h >> 16)
        return h

    @triton.jit
    def _keep(rows, cols, n_cols, seed, thresh):
        """Dropout keep bit of W[rows, cols] (broadcast [R, 1] x [1, C]); same bits as dropout_keep_mask."""
        # tl.cast, not .to: an int argument equal to 1 arrives as a constexpr
        idx = rows.to(tl.uint32) * tl.cast(n_cols, tl.uint32) + cols.to(tl.uint32)  # flat index mod 2^32
        s = tl.cast(seed, tl.uint32)
        h = _hash32(idx ^ _hash32(s))
        h = _hash32(h + s)
        return (h >> 8).to(tl.int32) >= thresh

    # INTERP_BF16 (set only under TRITON_INTERPRET=1 with bf16 data): triton 3.9's interpreter computes
    # bf16 tl.dot on the raw uint16 bits and truncates fp32 -> bf16 casts, so there the dot runs on
    # exactly-upcast fp32 operands (the tensor-core numerics: exact products, fp32 sums) and downcasts
    # round to nearest even by bit arithmetic (what .to(tl.bfloat16) does on the GPU).
    @triton.jit
    def _cvt(x, DST: tl.constexpr, INTERP_BF16: tl.constexpr):
        if INTERP_BF16 and DST == tl.bfloat16:
            return bf16_rne(x.to(tl.float32))  # round to nearest even, as .to(tl.bfloat16) on the GPU
        else:
            return x.to(DST)

    @triton.jit
    def _mma(a, b, acc, ACC_FP64: tl.constexpr, INTERP_BF16: tl.constexpr):
        """acc + a @ b with fp32 (fp64) accumulation."""
        if INTERP_BF16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if ACC_FP64:
            # out_dtype explicit: triton 3.6/3.7 default it to fp32 and then reject an fp64 accumulator
            # (3.8+ infer it from acc); every version accepts it spelled out
            return tl.dot(a, b, acc, out_dtype=tl.float64)
        elif a.dtype == tl.float32:  # fp32 models get fp32 products, as torch's default matmul does
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _merge_rows(
        w_ptr, psi_ptr, w_out_ptr, bq, rows64, rmask, rr, rrmask, n_start, n_end,
        stride_w0, stride_w1, stride_psi0, stride_psi1, stride_o0, stride_o1,
        BN: tl.constexpr, ACC_FP64: tl.constexpr, INTERP_BF16: tl.constexpr,
    ):
        """w_out[rows, n_start:n_end] = W + bq Ψ for one block of rows; bq [BM, RP] already in W's dtype."""
        for n0 in range(n_start, n_end, BN):
            ns = n0 + tl.arange(0, BN)
            nmask = ns < n_end
            m2 = rmask[:, None] & nmask[None, :]
            w = tl.load(w_ptr + rows64[:, None] * stride_w0 + ns[None, :] * stride_w1, mask=m2, other=0.0)
            psi = tl.load(psi_ptr + rr[:, None] * stride_psi0 + ns[None, :] * stride_psi1,
                          mask=rrmask[:, None] & nmask[None, :], other=0.0)  # [RP, BN]
            out = _mma(bq, psi, w.to(tl.float64 if ACC_FP64 else tl.float32), ACC_FP64, INTERP_BF16)
            tl.store(w_out_ptr + rows64[:, None] * stride_o0 + ns[None, :] * stride_o1,
                     _cvt(out, w_out_ptr.dtype.element_ty, INTERP_BF16), mask=m2)

    @triton.jit
    def _generate_kernel(
        w_ptr, phi_ptr, psi_ptr, b_out_ptr, w_out_ptr, ws_ptr,
        d_out, d_in, r, k_per_split,
        stride_w0, stride_w1, stride_phi0, stride_phi1, stride_psi0, stride_psi1,
        stride_b0, stride_b1, stride_o0, stride_o1,
        scaling, seed, thresh,
        BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr,
        STORE_B: tl.constexpr, MERGE: tl.constexpr, SPLIT: tl.constexpr, DROPOUT: tl.constexpr,
        ACC_FP64: tl.constexpr, INTERP_BF16: tl.constexpr,
    ):
        """One block of BM rows of W: B = scaling · (W∘M) Φᵀ (pass 1, over d_in) into b_out, then
        optionally W + B Ψ (pass 2, over d_in) into w_out (which may be W itself: a program only
        rewrites its own rows, after it has finished reading them in pass 1).

        SPLIT (grid [row blocks, splits]): program (m, s) runs pass 1 over columns
        [s·k_per_split, (s+1)·k_per_split) only and stores the unscaled fp32 (fp64) partial
        (W∘M)[rows, cols] Φ[:, cols]ᵀ into ws[s, rows, :]; _generate_finish_kernel does the rest."""
        pid = tl.program_id(0)
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < d_out
        rows64 = rows.to(tl.int64)
        rr = tl.arange(0, RP)
        rrmask = rr < r
        if SPLIT:
            k_start = tl.program_id(1) * k_per_split
            k_len = tl.minimum(k_per_split, d_in - k_start)
        else:
            k_start = 0
            k_len = d_in
        acc = tl.zeros([BM, RP], dtype=tl.float64 if ACC_FP64 else tl.float32)
        for k0 in range(0, k_len, BK):
            ks = k_start + k0 + tl.arange(0, BK)
            kmask = ks < d_in
            w = tl.load(w_ptr + rows64[:, None] * stride_w0 + ks[None, :] * stride_w1,
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            if DROPOUT:
                w = tl.where(_keep(rows[:, None], ks[None, :], d_in, seed, thresh), w, tl.zeros_like(w))
            phit = tl.load(phi_ptr + rr[None, :] * stride_phi0 + ks[:, None] * stride_phi1,
                           mask=rrmask[None, :] & kmask[:, None], other=0.0)  # Φᵀ tile [BK, RP]
            acc = _mma(w, phit, acc, ACC_FP64, INTERP_BF16)
        if SPLIT:
            # every entry of ws[s, :d_out, :RP] is written (columns r.. RP hold exact zeros)
            ws = ws_ptr + (tl.program_id(1).to(tl.int64) * d_out + rows64[:, None]) * RP + rr[None, :]
            tl.store(ws, acc, mask=rmask[:, None])
        else:
            b = acc * scaling
            if STORE_B:
                tl.store(b_out_ptr + rows64[:, None] * stride_b0 + rr[None, :] * stride_b1,
                         _cvt(b, b_out_ptr.dtype.element_ty, INTERP_BF16), mask=rmask[:, None] & rrmask[None, :])
            if MERGE:
                bq = _cvt(b, w_ptr.dtype.element_ty, INTERP_BF16)  # exact for fp32/fp64; one rounding of B for half types
                _merge_rows(w_ptr, psi_ptr, w_out_ptr, bq, rows64, rmask, rr, rrmask, 0, d_in,
                            stride_w0, stride_w1, stride_psi0, stride_psi1, stride_o0, stride_o1,
                            BN, ACC_FP64, INTERP_BF16)

    @triton.jit
    def _generate_finish_kernel(
        ws_ptr, w_ptr, psi_ptr, b_out_ptr, w_out_ptr,
        d_out, d_in, r, splits, n_per_split,
        stride_w0, stride_w1, stride_psi0, stride_psi1, stride_b0, stride_b1, stride_o0, stride_o1,
        scaling,
        BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, STORE_B: tl.constexpr, MERGE: tl.constexpr,
        ACC_FP64: tl.constexpr, INTERP_BF16: tl.constexpr,
    ):
        """Program (m, c) after the SPLIT pass: B[rows] = scaling · (ws[0] + ws[1] + ... + ws[splits-1])[rows],
        summed in that order (every program of row block m gets the same bits), stored by c = 0; then
        W + B Ψ over columns [c·n_per_split, (c+1)·n_per_split) into w_out (W itself allowed: the
        program reads each W tile before it writes it, and the SPLIT pass has finished reading W)."""
        pid = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < d_out
        rows64 = rows.to(tl.int64)
        rr = tl.arange(0, RP)
        rrmask = rr < r
        m_b = rmask[:, None] & rrmask[None, :]
        acc = tl.zeros([BM, RP], dtype=tl.float64 if ACC_FP64 else tl.float32)
        ws = ws_ptr + rows[:, None] * RP + rr[None, :]  # int32 offsets: ws has < 2^31 entries (launcher)
        for _ in range(0, splits):
            acc += tl.load(ws, mask=m_b, other=0.0)
            ws += d_out * RP  # the next split's [d_out, RP] slab
        b = acc * scaling
        if STORE_B:
            if pid_c == 0:
                tl.store(b_out_ptr + rows64[:, None] * stride_b0 + rr[None, :] * stride_b1,
                         _cvt(b, b_out_ptr.dtype.element_ty, INTERP_BF16), mask=m_b)
        if MERGE:
            bq = _cvt(b, w_ptr.dtype.element_ty, INTERP_BF16)  # as in _generate_kernel
            n_start = pid_c * n_per_split
            _merge_rows(w_ptr, psi_ptr, w_out_ptr, bq, rows64, rmask, rr, rrmask,
                        n_start, tl.minimum(n_start + n_per_split, d_in),
                        stride_w0, stride_w1, stride_psi0, stride_psi1, stride_o0, stride_o1,
                        BN, ACC_FP64, INTERP_BF16)

    # token counts only bound masks / pick autotune buckets: not specialized, so a new batch
    # shape never recompiles (see docs/gpu-verification.md)
    @triton.jit(do_not_specialize=["T"])
    def _thin_right_kernel(
        m_ptr, r_ptr, out_ptr, T, K, r,
        stride_m0, stride_m1, stride_r0, stride_r1, stride_o0, stride_o1,
        BT: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, ACC_FP64: tl.constexpr, INTERP_BF16: tl.constexpr,
    ):
        """out[T, r] = M[T, K] @ R[K, r] (u = x Ψᵀ with R = Ψᵀ; v = G B with R = B). One program per
        BT rows; memory-bound on M."""
        pid = tl.program_id(0)
        rows = pid * BT + tl.arange(0, BT)
        rmask = rows < T
        rows64 = rows.to(tl.int64)
        rr = tl.arange(0, RP)
        rrmask = rr < r
        acc = tl.zeros([BT, RP], dtype=tl.float64 if ACC_FP64 else tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < K
            m = tl.load(m_ptr + rows64[:, None] * stride_m0 + ks[None, :] * stride_m1,
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            rt = tl.load(r_ptr + ks[:, None] * stride_r0 + rr[None, :] * stride_r1,
                         mask=kmask[:, None] & rrmask[None, :], other=0.0)
            acc = _mma(m, rt.to(m.dtype), acc, ACC_FP64, INTERP_BF16)
        tl.store(out_ptr + rows64[:, None] * stride_o0 + rr[None, :] * stride_o1,
                 _cvt(acc, out_ptr.dtype.element_ty, INTERP_BF16), mask=rmask[:, None] & rrmask[None, :])

    @triton.jit
    def _thin_reduce_kernel(
        a_ptr, m_ptr, ws_ptr, colsum_ptr, K, N, r, k_per_split,
        stride_a0, stride_a1, stride_m0, stride_m1,
        seed, thresh,
        BK: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr,
        DROPOUT: tl.constexpr, HAS_COLSUM: tl.constexpr, ACC_FP64: tl.constexpr, INTERP_BF16: tl.constexpr,
    ):
        """Split-K partial of OUT[r, N] = A[K, r]ᵀ @ (M∘mask)[K, N]: program (n, s) reduces rows
        [s·k_per_split, (s+1)·k_per_split) of K into ws[s, :, n-block] (and the column sums of M into
        colsum[s, n-block]). ū = uᵀG (+ db), dΨ = vᵀx, dΦ-partial = ūᵀᵀ (W∘M)."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        cols = pid_n * BN + tl.arange(0, BN)
        cmask = cols < N
        rr = tl.arange(0, RP)
        rrmask = rr < r
        acc_t = tl.float64 if ACC_FP64 else tl.float32
        acc = tl.zeros([RP, BN], dtype=acc_t)
        csum = tl.zeros([BN], dtype=acc_t)
        k_start = pid_s * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        for k0 in range(k_start, k_end, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < k_end
            ks64 = ks.to(tl.int64)
            m = tl.load(m_ptr + ks64[:, None] * stride_m0 + cols[None, :] * stride_m1,
                        mask=kmask[:, None] & cmask[None, :], other=0.0)
            if DROPOUT:
                m = tl.where(_keep(ks[:, None], cols[None, :], N, seed, thresh), m, tl.zeros_like(m))
            at = tl.load(a_ptr + ks64[None, :] * stride_a0 + rr[:, None] * stride_a1,
                         mask=kmask[None, :] & rrmask[:, None], other=0.0)  # Aᵀ tile [RP, BK]
            acc = _mma(_cvt(at, m.dtype, INTERP_BF16), m, acc, ACC_FP64, INTERP_BF16)
            if HAS_COLSUM:
                csum += tl.sum(m.to(csum.dtype), axis=0)
        ws_base = ws_ptr + pid_s.to(tl.int64) * RP * N
        tl.store(ws_base + rr[:, None] * N + cols[None, :], acc, mask=rrmask[:, None] & cmask[None, :])
        if HAS_COLSUM:
            tl.store(colsum_ptr + pid_s.to(tl.int64) * N + cols, csum, mask=cmask)

    # The K-concat GEMM's BK splits its K loop: it fixes the summation order of every output, so it
    # is one value per operand class and the autotuner picks only the tile (BM, BN), GROUP_M, warps and
    # stages, which leave each output's sum in the same order (results do not depend on which config
    # wins, in one process or across processes that tuned differently).
    _KCAT_BK = {"16bit": 64,   # bf16/fp16 operands on tensor cores
                "fp32": 32}    # fp32 (fp64) operands: ieee dots on CUDA cores (BK = 64 spilled at 128 x 64)

    def _kcat_configs():
        c = triton.Config
        bk, bk32 = _KCAT_BK["16bit"], _KCAT_BK["fp32"]
        return [
            c({"BM": 128, "BN": 256, "BK": bk, "GROUP_M": 8}, num_warps=8, num_stages=3),
            c({"BM": 128, "BN": 128, "BK": bk, "GROUP_M": 8}, num_warps=8, num_stages=4),
            c({"BM": 128, "BN": 128, "BK": bk, "GROUP_M": 8}, num_warps=4, num_stages=4),
            c({"BM": 64, "BN": 128, "BK": bk, "GROUP_M": 8}, num_warps=4, num_stages=4),
            c({"BM": 128, "BN": 64, "BK": bk, "GROUP_M": 8}, num_warps=4, num_stages=4),
            c({"BM": 64, "BN": 64, "BK": bk, "GROUP_M": 8}, num_warps=4, num_stages=3),
            c({"BM": 16, "BN": 128, "BK": bk, "GROUP_M": 1}, num_warps=4, num_stages=4),  # few tokens
            # fp32 operands: tiles whose fp32 operands fit the registers (no spills on sm_90 in the
            # aligned and the odd-shape variants; 128 x 64 and 64 x 64 with 4 warps spill)
            c({"BM": 64, "BN": 64, "BK": bk32, "GROUP_M": 8}, num_warps=8, num_stages=3),
            c({"BM": 32, "BN": 64, "BK": bk32, "GROUP_M": 8}, num_warps=4, num_stages=3),
            c({"BM": 16, "BN": 128, "BK": bk32, "GROUP_M": 1}, num_warps=4, num_stages=4),  # few tokens
        ]

    def _prune_kcat(configs, named_args, **kwargs):
        """The configs of the operand class: its BK (one K order) and, for fp32/fp64, its tiles. 16-bit
        operands with K1 not a multiple of BK take the few-token tile only: every larger tile spills
        there (ptxas, sm_90a: up to ~5 KB at 128 x 128); model widths are multiples of 64."""
        cls = "fp32" if named_args["a1_ptr"].dtype in (torch.float32, torch.float64) else "16bit"
        keep = [c for c in configs if c.kwargs["BK"] == _KCAT_BK[cls]]
        if cls == "16bit" and named_args["K1"] % _KCAT_BK[cls]:
            keep = [c for c in keep if c.kwargs["BM"] == 16]
        return keep or configs  # or: the interpreter's one

    @autotune(
        _kcat_configs(),
        key=["M_BUCKET", "N", "K1", "K2", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune_kcat},
        interpret_config=triton.Config({"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 2}, num_warps=4, num_stages=1),
    )
    @triton.heuristics({"EVEN_K1": lambda a: a["K1"] % a["BK"] == 0})
    # token counts only bound masks / pick autotune buckets: not specialized, so a new batch
    # shape never recompiles (see docs/gpu-verification.md)
    @triton.jit(do_not_specialize=["M", "M_BUCKET"])
    def _kcat_matmul_kernel(
        a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, c_ptr,
        M, N, K1, K2, M_BUCKET,
        stride_a1m, stride_a1k, stride_b1k, stride_b1n,
        stride_a2m, stride_a2k, stride_b2k, stride_b2n,
        stride_cm, stride_cn,
        HAS_BIAS: tl.constexpr, ACC_FP64: tl.constexpr, INTERP_BF16: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K1: tl.constexpr,
    ):
        """C[M, N] = A1[M, K1] @ B1[K1, N] + A2[M, K2] @ B2[K2, N] (+ bias[N]): one GEMM whose K loop
        runs over the d columns of the dense operands and then the r columns of the low-rank ones.
        Forward: A1 = x, B1 = Wᵀ, A2 = u, B2 = Bᵀ. Backward: A1 = G, B1 = W, A2 = v, B2 = Ψ."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        group = GROUP_M * num_n  # grouped order: consecutive programs share A1 rows in L2
        gid = pid // group
        first_m = gid * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % gsize
        pid_n = (pid % group) // gsize
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        mmask = rm < M
        nmask = rn < N
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)
        acc = tl.zeros([BM, BN], dtype=tl.float64 if ACC_FP64 else tl.float32)
        rk = tl.arange(0, BK)
        a_ptrs = a1_ptr + rm64[:, None] * stride_a1m + rk[None, :] * stride_a1k
        b_ptrs = b1_ptr + rk[:, None] * stride_b1k + rn64[None, :] * stride_b1n
        for k0 in range(0, K1, BK):
            if EVEN_K1:
                a = tl.load(a_ptrs, mask=mmask[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=nmask[None, :], other=0.0)
            else:
                kmask = (k0 + rk) < K1
                a = tl.load(a_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = _mma(a, b, acc, ACC_FP64, INTERP_BF16)
            a_ptrs += BK * stride_a1k
            b_ptrs += BK * stride_b1k
        a_ptrs = a2_ptr + rm64[:, None] * stride_a2m + rk[None, :] * stride_a2k
        b_ptrs = b2_ptr + rk[:, None] * stride_b2k + rn64[None, :] * stride_b2n
        for k0 in range(0, K2, BK):
            kmask = (k0 + rk) < K2
            a = tl.load(a_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = _mma(a, b.to(a.dtype), acc, ACC_FP64, INTERP_BF16)
            a_ptrs += BK * stride_a2k
            b_ptrs += BK * stride_b2k
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rn, mask=nmask, other=0.0)
            acc += bias.to(acc.dtype)[None, :]
        tl.store(c_ptr + rm64[:, None] * stride_cm + rn64[None, :] * stride_cn,
                 _cvt(acc, c_ptr.dtype.element_ty, INTERP_BF16), mask=mmask[:, None] & nmask[None, :])


# ==============================================================================================
# Launchers (tensors already validated; shapes 2-D)
# ==============================================================================================
def _upcast(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16 and interpreting()


def _rank_pad(r: int) -> int:
    return max(16, next_pow2(r))


def _thin_blocks(rp: int, itemsize: int):
    """(rows per program, K chunk) of the memory-bound thin kernels; small under the interpreter.
    fp32 operands take half the K chunk: the 16-bit tiles spill at 255 registers in fp32 (ptxas)."""
    if interpreting():
        return 16, 32
    bt, bk = (64, 128) if rp <= 64 else (32, 64)
    return bt, (bk if itemsize <= 2 else bk // 2)


# SM count the generate split assumes off a GPU (interpreter, compile-check capture): small, so that
# the small test and driver shapes (at most 2 row blocks) split and the larger ones do not; tests
# change it to force either.
_OFF_GPU_SMS = 8


def _generate_blocks(rp: int, itemsize: int):
    """(BM, BK, BN, warps) of the generate kernels; small under the interpreter."""
    if interpreting():
        return 16, 32, 32, 4
    bm, bk, bn = (32, 128, 128) if rp <= 64 else (16, 64, 64)
    if itemsize > 2:  # fp32 tiles of the 16-bit size spill at 255 registers (ptxas)
        bk, bn = bk // 2, bn // 2
    return bm, bk, bn, 4


def generate_splits(d_out: int, d_in: int, rp: int, bm: int, bk: int, sms: int) -> int:
    """How many d_in ranges the W Φᵀ product of a generate call is split into (1: one kernel, no split).

    One program per BM rows streams its rows' W and all of Φ, Ψ through one SM; its K steps run one
    after another, so with few programs the sweep is bound by that chain, not by HBM. Above a third
    of the SMs (d_out = 2048 at BM = 32: 64 programs) the programs already pull W at about the HBM
    rate (each step moves BM·BK W entries plus BK·RP of Φ at ≤ 64 B/cycle per SM), and a split would
    add a launch and a second read of W for the merge: estimated, not measured on a GPU yet. Below
    it (a GQA k/v projection, d_out = 1024: 32 programs on 132 SMs) d_in is split so that row blocks
    × splits ≤ SMs (1024: 4 splits, 128 programs), capped by the K steps and by splits² ≤ d_in / RP
    (a finish program reduces splits · BM · RP partials: at most the BM · d_in / splits entries of W
    it merges)."""
    row_blocks = -(-d_out // bm)
    if row_blocks == 0 or 3 * row_blocks > sms:
        return 1
    return max(1, min(-(-d_in // bk), sms // row_blocks, math.isqrt(d_in // rp)))


def _launch_generate(weight, phi, psi, eff_scale, *, b_out=None, w_out=None, seed=0, thresh=0):
    """B = eff_scale · (W∘M) Φᵀ into b_out and/or W + B Ψ into w_out (docs: module docstring).

    Large d_out: one _generate_kernel sweep over W's rows. Small d_out (``generate_splits`` > 1): a
    split-K pass writes fp32 partials [splits, d_out, RP], then _generate_finish_kernel over (row
    block, d_in range) sums them in split order, stores B and merges its range: deterministic (the
    split count depends only on the shape and the SM count), no atomics."""
    d_out, d_in = weight.shape
    r = phi.shape[0]
    rp = _rank_pad(r)
    bm, bk, bn, warps = _generate_blocks(rp, weight.element_size())
    splits = generate_splits(d_out, d_in, rp, bm, bk, sm_count(weight.device, off_gpu=_OFF_GPU_SMS))
    k_per_split = triton.cdiv(triton.cdiv(d_in, bk), splits) * bk
    splits = triton.cdiv(d_in, k_per_split) if splits > 1 else 1  # no empty trailing split
    dummy = weight
    bo = b_out if b_out is not None else dummy
    wo = w_out if w_out is not None else dummy
    row_blocks = triton.cdiv(d_out, bm)
    ws = _new((splits, d_out, rp), acc_dtype(weight.dtype), weight.device) if splits > 1 else dummy
    # splits · row blocks ≤ SMs bounds ws by SMs · BM · RP entries: int32 offsets in the finish kernel
    assert splits == 1 or ws.numel() < 2**31, ws.shape
    meta = dict(BM=bm, RP=rp, ACC_FP64=acc_fp64(weight.dtype), INTERP_BF16=_upcast(weight), num_warps=warps)
    # fp32 at RP = 64: the finish's 32 x 64 merge tiles sit at 255 registers and spill 200 B (ptxas,
    # sm_90a); 32 x 32 ones take 64 registers and none
    bn_finish = bn // 2 if weight.element_size() > 2 and rp == 64 and not interpreting() else bn
    _generate_kernel[(row_blocks, splits)](
        weight, phi, psi, bo, wo, ws, d_out, d_in, r, k_per_split,
        weight.stride(0), weight.stride(1), phi.stride(0), phi.stride(1), psi.stride(0), psi.stride(1),
        bo.stride(0), bo.stride(1), wo.stride(0), wo.stride(1),
        float(eff_scale), int(seed), int(thresh),
        BK=bk, BN=bn, STORE_B=splits == 1 and b_out is not None, MERGE=splits == 1 and w_out is not None, SPLIT=splits > 1,
        DROPOUT=thresh > 0, **meta,
        enable_fp_fusion=True,  # GEMM (B = s·WΦᵀ, then W + BΨ): FMA only adds accuracy; no bitwise claim
    )
    if splits > 1:
        _generate_finish_kernel[(row_blocks, splits if w_out is not None else 1)](
            ws, weight, psi, bo, wo, d_out, d_in, r, splits, k_per_split,
            weight.stride(0), weight.stride(1), psi.stride(0), psi.stride(1),
            bo.stride(0), bo.stride(1), wo.stride(0), wo.stride(1), float(eff_scale),
            BN=bn_finish, STORE_B=b_out is not None, MERGE=w_out is not None, **meta,
            enable_fp_fusion=True,  # split sum, then W + BΨ: FMA only adds accuracy; no bitwise claim
        )


def _launch_thin_right(m, rmat, out):
    """out[T, r] = m[T, K] @ rmat[K, r]."""
    t, k = m.shape
    r = rmat.shape[1]
    if t == 0:
        return out
    rp = _rank_pad(r)
    bt, bk = _thin_blocks(rp, m.element_size())
    _thin_right_kernel[(triton.cdiv(t, bt),)](
        m, rmat, out, t, k, r, m.stride(0), m.stride(1), rmat.stride(0), rmat.stride(1),
        out.stride(0), out.stride(1), BT=bt, BK=bk, RP=rp, ACC_FP64=acc_fp64(m.dtype), INTERP_BF16=_upcast(m), num_warps=4,
        enable_fp_fusion=True,  # thin GEMM: FMA only adds accuracy
    )
    return out


def _launch_thin_reduce(a, m, *, colsum=False, seed=0, thresh=0):
    """(a[K, r]ᵀ @ (m∘mask)[K, N]) in the accumulation dtype, and m's column sums if asked."""
    k, n = m.shape
    r = a.shape[1]
    acc = acc_dtype(m.dtype)
    if n == 0:  # d_out = 0 (ū, db) or d_in = 0 (dΦ, dΨ): empty results, and no tiles to split over
        return torch.zeros((r, 0), dtype=acc, device=m.device), (
            torch.zeros(0, dtype=acc, device=m.device) if colsum else None)
    rp = _rank_pad(r)
    if interpreting():
        bk, bn, target = 16, 32, 4
    else:
        bk, bn = 64, (128 if rp <= 64 and m.element_size() <= 2 else 64)  # fp32 at 128 spills (ptxas)
        target = 2 * sm_count(m.device, off_gpu=4)
    n_tiles = triton.cdiv(n, bn)
    k_steps = max(1, triton.cdiv(k, bk))
    splits = max(1, min(k_steps, triton.cdiv(target, n_tiles)))
    k_per_split = triton.cdiv(k_steps, splits) * bk
    splits = max(1, triton.cdiv(k, k_per_split))
    ws = _new((splits, rp, n), acc, m.device)
    cs = _new((splits, n), acc, m.device) if colsum else ws
    _thin_reduce_kernel[(n_tiles, splits)](
        a, m, ws, cs, k, n, r, k_per_split,
        a.stride(0), a.stride(1), m.stride(0), m.stride(1), int(seed), int(thresh),
        BK=bk, BN=bn, RP=rp, DROPOUT=thresh > 0, HAS_COLSUM=colsum, ACC_FP64=acc_fp64(m.dtype), INTERP_BF16=_upcast(m), num_warps=4,
        enable_fp_fusion=True,  # split-K GEMM + column sums: FMA only adds accuracy
    )
    out = ws[:, :r].sum(0) if splits > 1 else ws[0, :r]
    return out, (cs.sum(0) if colsum else None)


def _launch_kcat(a1, b1, a2, b2, bias, out):
    """out = a1 @ b1 + a2 @ b2 (+ bias) with one K loop over both products."""
    m, k1 = a1.shape
    n = b1.shape[1]
    k2 = a2.shape[1]
    if m == 0:
        return out

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias_ptr + n (a strided bias would be read as garbage)

    _kcat_matmul_kernel[grid](
        a1, b1, a2, b2, bias if bias is not None else out, out,
        m, n, k1, k2, min(next_pow2(m), 8192),
        a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1),
        a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, ACC_FP64=acc_fp64(a1.dtype), INTERP_BF16=_upcast(a1),
        enable_fp_fusion=True,  # GEMM: FMA only adds accuracy (passed through the autotuner to the JIT)
    )
    return out


# ==============================================================================================
# Path choice and dropout bits
# ==============================================================================================
def choose_path(tokens: int, d_out: int, d_in: int) -> str:
    """``fused`` when T ≤ d_out / 2, else ``merged``.

    Byte count: merging writes (and the GEMM re-reads) d_out·d_in extra elements, while the fused
    path reads x once more for u (T·d_in) and runs a Triton GEMM instead of cuBLAS. Assuming a ~10% GEMM
    efficiency gap, the break-even is estimated near T ≈ 0.4·d_out (d = 4096: T ≈ 1.6–2k): an estimate
    from this byte count, not measured on a GPU yet (bench case ``wegeft.path_fused_vs_merged`` will).
    ``d_in`` does not enter the rule; callers pass the layer's whole shape."""
    return "fused" if 2 * tokens <= d_out else "merged"


def resolve_path(path: str, tokens: int, d_out: int, d_in: int) -> str:
    """The path a call runs: ``choose_path`` for "auto", else ``path`` itself."""
    return choose_path(tokens, d_out, d_in) if path == "auto" else path


def dropout_threshold(p: float) -> int:
    """24-bit threshold: an entry is dropped when its 24 hash bits are below it (P = threshold / 2^24)."""
    return int(round(float(p) * (1 << 24)))


def dropout_keep_scale(p: float) -> float:
    """1 / P(keep) for the quantised drop probability, so E[(W∘M)·scale] = W exactly."""
    t = dropout_threshold(p)
    return (1 << 24) / ((1 << 24) - t) if t else 1.0


def _hash32_torch(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * _HASH_C1) & _MASK32
    h = h ^ (h >> 15)
    h = (h * _HASH_C2) & _MASK32
    return h ^ (h >> 16)


def dropout_keep_mask(seed: int, d_out: int, d_in: int, p: float, device=None) -> torch.Tensor:
    """Bool [d_out, d_in]: the keep-mask M the kernels apply to W for (seed, p) (reference bits)."""
    thresh = dropout_threshold(p)
    idx = (torch.arange(d_out, device=device, dtype=torch.int64)[:, None] * d_in
           + torch.arange(d_in, device=device, dtype=torch.int64)[None, :]) & _MASK32
    s = int(seed) & _MASK32
    s_mix = int(_hash32_torch(torch.tensor(s, dtype=torch.int64)))
    h = _hash32_torch(idx ^ s_mix)
    h = _hash32_torch((h + s) & _MASK32)
    return (h >> 8) >= thresh


# ==============================================================================================
# PyTorch references (tensors in, tensors out, no autograd): the CPU path and the test oracle
# ==============================================================================================
def _dropped(weight, dropout_p, seed):
    if dropout_threshold(dropout_p) == 0:
        return weight, 1.0
    keep = dropout_keep_mask(seed, weight.shape[0], weight.shape[1], dropout_p, weight.device)
    return weight * keep, dropout_keep_scale(dropout_p)


def generate_b_reference(weight, phi, scaling, dropout_p=0.0, seed=0):
    """B = scaling/(1-p) · (W∘M) Φᵀ in the weight dtype."""
    wd, ks = _dropped(weight, dropout_p, seed)
    return (wd @ phi.t()) * (scaling * ks)


def wegeft_forward_reference(x, weight, bias, phi, psi, scaling, dropout_p=0.0, seed=0):
    """(y, u) with u = x Ψᵀ and y = x Wᵀ + b + u Bᵀ; x [T, d_in]."""
    u = x @ psi.t()
    b_gen = generate_b_reference(weight, phi, scaling, dropout_p, seed)
    y = F.linear(x, weight, bias) + u @ b_gen.t()
    return y, u


def wegeft_backward_reference(grad, x, u, weight, phi, psi, scaling, dropout_p=0.0, seed=0,
                              need_dx=True, need_dphi=True, need_dpsi=True, need_dbias=False):
    """(dx, dΦ, dΨ, db), None where not needed (docs/design.md#wegeft-forward-and-gradients, B generated
    as in the forward)."""
    wd, ks = _dropped(weight, dropout_p, seed)
    dx = dphi = dpsi = db = None
    if need_dx or need_dpsi:
        v = grad @ ((wd @ phi.t()) * (scaling * ks))
        if need_dx:
            dx = grad @ weight + v @ psi
        if need_dpsi:
            dpsi = v.t() @ x
    if need_dphi:
        dphi = (u.t() @ grad) @ wd * (scaling * ks)
    if need_dbias:
        db = grad.sum(0)
    return dx, dphi, dpsi, db


def wegeft_merge_reference(weight, phi, psi, scaling):
    """W + scaling · (W Φᵀ) Ψ, accumulated in fp32 (fp64 for fp64), rounded once to W's dtype."""
    acc = acc_dtype(weight.dtype)
    w = weight.to(acc)
    return (w + (w @ phi.to(acc).t()) @ psi.to(acc) * scaling).to(weight.dtype)


# ==============================================================================================
# Validation and public dispatching functions
# ==============================================================================================
def _check_scalar(name, value, lo=None, hi=None, hi_open=False):
    """check_real (kernels/_checks.py), except that WeGeFT's ops take only ints and floats and raise
    TypeError, not ValueError, for NaN/Inf: tests/test_wegeft_kernels.py::test_validation and
    tests/test_properties_sift_wegeft.py (scaling, dropout_p) pin that."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise TypeError(f"{name}: expected a finite real number, got {value!r}")
    check_real(name, value, lo, hi, hi_open=hi_open)


def check_generators(weight, phi, psi):
    """Φ, Ψ must be [r, d_in] with the same r, matching W [d_out, d_in]. Returns r."""
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    d_in = weight.shape[1]
    check_tensor("phi", phi, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("psi", psi, ndim=2, dtypes=FLOAT_DTYPES)
    if phi.shape[1] != d_in:
        raise ValueError(f"phi: expected shape [r, {d_in}] (d_in of weight {list(weight.shape)}), got {list(phi.shape)}")
    if psi.shape[1] != d_in:
        raise ValueError(f"psi: expected shape [r, {d_in}] (d_in of weight {list(weight.shape)}), got {list(psi.shape)}")
    if psi.shape[0] != phi.shape[0]:
        raise ValueError(f"psi: rank mismatch: psi has r = {psi.shape[0]} rows, phi has r = {phi.shape[0]}")
    if phi.shape[0] < 1:
        raise ValueError(f"phi: rank r must be >= 1, got shape {list(phi.shape)}")
    for name, t in (("phi", phi), ("psi", psi)):
        if t.dtype != weight.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} does not match weight dtype {weight.dtype} "
                            "(cast the generators to the weight dtype)")
    check_same_device(weight=weight, phi=phi, psi=psi)
    return phi.shape[0]


def check_linear_inputs(x, weight, bias, phi, psi, scaling, dropout_p=0.0, path="auto", *, x_ndim=None):
    """Validate wegeft_linear's arguments; every failure names the argument."""
    check_tensor("x", x, ndim=x_ndim, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dim [..., d_in], got shape {list(x.shape)}")
    check_generators(weight, phi, psi)
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x: last dim {x.shape[-1]} does not match weight in_features {d_in} (weight {list(weight.shape)})")
    if x.dtype != weight.dtype:
        raise TypeError(f"x: dtype {x.dtype} does not match weight dtype {weight.dtype}")
    if bias is not None:
        check_tensor("bias", bias, shape=[d_out], dtypes=FLOAT_DTYPES)
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias: dtype {bias.dtype} does not match weight dtype {weight.dtype}")
    check_same_device(weight=weight, x=x, bias=bias)  # a stray x or bias is named, not the weight
    _check_scalar("scaling", scaling)
    _check_scalar("dropout_p", dropout_p, 0.0, 1.0, hi_open=True)
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")


def triton_ok(t: torch.Tensor, r: int) -> bool:
    """Triton for this call: the dispatch rule, except fp64 on CUDA and r > MAX_TRITON_RANK (composite)."""
    if not use_triton(t):
        return False
    return r <= MAX_TRITON_RANK and not (gpu_like(t) and t.dtype == torch.float64)


def generate_b(weight, phi, scaling, *, dropout_p=0.0, seed=0, out_dtype=None):
    """B = scaling/(1-p) · (W∘M) Φᵀ  [d_out, r] (``out_dtype`` default: weight dtype)."""
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_generators(weight, phi, phi)
    _check_scalar("scaling", scaling)
    _check_scalar("dropout_p", dropout_p, 0.0, 1.0, hi_open=True)
    out_dtype = out_dtype or weight.dtype
    if not triton_ok(weight, phi.shape[0]):
        return generate_b_reference(weight, phi, scaling, dropout_p, seed).to(out_dtype)
    out = _new((weight.shape[0], phi.shape[0]), out_dtype, weight.device)
    _launch_generate(weight, phi, phi, scaling * dropout_keep_scale(dropout_p), b_out=out,
                     seed=seed, thresh=dropout_threshold(dropout_p))
    return out


def wegeft_merge(weight, phi, psi, scaling, *, out=None):
    """W' = W + scaling · (W Φᵀ) Ψ, fp32-accumulated, one rounding. ``out=weight`` merges in place
    (one sweep over W's rows: B for a row block, then that block rewritten)."""
    check_generators(weight, phi, psi)
    _check_scalar("scaling", scaling)
    if out is not None:
        check_tensor("out", out, shape=list(weight.shape), dtypes=[weight.dtype], device=weight.device)
    if not triton_ok(weight, phi.shape[0]):
        res = wegeft_merge_reference(weight, phi, psi, scaling)
        return res if out is None else out.copy_(res)
    if out is None:
        out = _new(tuple(weight.shape), weight.dtype, weight.device)
    if weight.numel():
        _launch_generate(weight, phi, psi, scaling, w_out=out)
    return out


def wegeft_forward(x, weight, bias, phi, psi, scaling, *, dropout_p=0.0, seed=0, path="auto"):
    """(y [T, d_out], u = x Ψᵀ [T, r]) for x [T, d_in]. See the module docstring for the paths."""
    check_linear_inputs(x, weight, bias, phi, psi, scaling, dropout_p, path, x_ndim=2)
    t, d_in = x.shape
    d_out = weight.shape[0]
    r = phi.shape[0]
    if not triton_ok(x, r):
        return wegeft_forward_reference(x, weight, bias, phi, psi, scaling, dropout_p, seed)
    path = resolve_path(path, t, d_out, d_in)
    eff = float(scaling) * dropout_keep_scale(dropout_p)
    thresh = dropout_threshold(dropout_p)
    if path == "merged":
        # y into its own contiguous [T, d_out] (nn.Linear's layout; a GEMM widened by Ψ's r rows would
        # return a column slice), u by the thin kernel: one extra read of x, no copy of y.
        w_merged = _new((d_out, d_in), weight.dtype, weight.device)
        if d_out:
            _launch_generate(weight, phi, psi, eff, w_out=w_merged, seed=seed, thresh=thresh)
        y = torch.addmm(bias, x, w_merged.t()) if bias is not None else torch.mm(x, w_merged.t())
        u = _launch_thin_right(x, psi.t(), _new((t, r), x.dtype, x.device))
        return y, u
    u = _launch_thin_right(x, psi.t(), _new((t, r), x.dtype, x.device))
    b_gen = _new((d_out, r), weight.dtype, weight.device)
    if d_out:
        _launch_generate(weight, phi, psi, eff, b_out=b_gen, seed=seed, thresh=thresh)
    y = _new((t, d_out), x.dtype, x.device)
    if d_out:
        _launch_kcat(x, weight.t(), u, b_gen.t(), bias, y)
    return y, u


def wegeft_backward(grad, x, u, weight, phi, psi, scaling, *, dropout_p=0.0, seed=0, path="auto",
                    need_dx=True, need_dphi=True, need_dpsi=True, need_dbias=False):
    """(dx, dΦ, dΨ, db) of y = wegeft_forward(...) for dy = ``grad`` [T, d_out]; None where not needed.
    ``x`` may be None when dΨ is not needed, ``u`` when dΦ is not needed. dΦ, dΨ come back in the
    generators' dtype, db in the weight dtype."""
    check_generators(weight, phi, psi)
    d_out, d_in = weight.shape
    r = phi.shape[0]
    check_tensor("grad", grad, ndim=2, dtypes=[weight.dtype])
    t = grad.shape[0]
    if grad.shape[1] != d_out:
        raise ValueError(f"grad: expected shape [T, {d_out}], got {list(grad.shape)}")
    if need_dpsi:
        check_tensor("x", x, shape=[t, d_in], dtypes=[weight.dtype])
    if need_dphi:
        check_tensor("u", u, shape=[t, r], dtypes=[weight.dtype])
    check_same_device(grad=grad, weight=weight, x=x if need_dpsi else None, u=u if need_dphi else None)
    _check_scalar("scaling", scaling)
    _check_scalar("dropout_p", dropout_p, 0.0, 1.0, hi_open=True)
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    if not triton_ok(grad, r):
        return wegeft_backward_reference(grad, x, u, weight, phi, psi, scaling, dropout_p, seed,
                                         need_dx, need_dphi, need_dpsi, need_dbias)
    path = resolve_path(path, t, d_out, d_in)
    eff = float(scaling) * dropout_keep_scale(dropout_p)
    thresh = dropout_threshold(dropout_p)
    dx = dphi = dpsi = db = None

    if need_dphi:
        ubar, colsum = _launch_thin_reduce(u, grad, colsum=need_dbias)          # ū = uᵀG [r, d_out]
        part, _ = _launch_thin_reduce(ubar.t(), weight, seed=seed, thresh=thresh)  # ū (W∘M) [r, d_in]
        dphi = (part * eff).to(phi.dtype)
        if need_dbias:
            db = colsum.to(weight.dtype)
    if need_dbias and db is None:
        db = grad.sum(0, dtype=acc_dtype(grad.dtype)).to(weight.dtype)

    v = None
    if need_dx and path == "merged":
        if need_dpsi:  # W' and B from one sweep; dx = G W' contiguous, v = G B by the thin kernel
            w_merged = _new((d_out, d_in), weight.dtype, weight.device)
            b_gen = _new((d_out, r), weight.dtype, weight.device)
            if d_out:
                _launch_generate(weight, phi, psi, eff, b_out=b_gen, w_out=w_merged, seed=seed, thresh=thresh)
            dx = torch.mm(grad, w_merged)
            v = _launch_thin_right(grad, b_gen, _new((t, r), grad.dtype, grad.device))
        else:
            w_merged = _new((d_out, d_in), weight.dtype, weight.device)
            if d_out:
                _launch_generate(weight, phi, psi, eff, w_out=w_merged, seed=seed, thresh=thresh)
            dx = torch.mm(grad, w_merged)
    elif need_dx or need_dpsi:
        b_gen = _new((d_out, r), weight.dtype, weight.device)
        if d_out:
            _launch_generate(weight, phi, psi, eff, b_out=b_gen, seed=seed, thresh=thresh)
        v = _launch_thin_right(grad, b_gen, _new((t, r), grad.dtype, grad.device))  # v = G B
        if need_dx:
            dx = _new((t, d_in), grad.dtype, grad.device)
            _launch_kcat(grad, weight, v, psi, None, dx)
    if need_dpsi:
        dpsi = _launch_thin_reduce(v, x)[0].to(psi.dtype)                        # dΨ = vᵀ x
    return dx, dphi, dpsi, db
