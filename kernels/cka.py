"""Linear CKA (centred kernel alignment) of two token representations, as fused Triton kernels.

For X [T, dx] and Y [T, dy] (tokens are samples, features are columns), with padding rows dropped
by ``mask`` and columns centred over the n valid rows (Xc = X - mean, Yc = Y - mean):

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F * ||Yc^T Yc||_F)
              = <Kx, Ky>_F / (||Kx||_F * ||Ky||_F),   Kx = Xc Xc^T, Ky = Yc Yc^T   (T x T form)

Two equivalent forms; the cheaper one runs (MACs, counting Gram symmetry):
    "features": tiles of Xc^T Xc, Yc^T Yc (upper triangle only) and Yc^T Xc, accumulated over T
                -> T * (dx^2/2 + dy^2/2 + dx*dy)
    "tokens":   tiles of Kx and Ky (upper triangle only), accumulated over dx and dy
                -> T^2/2 * (dx + dy)
so "tokens" wins exactly when T < dx + dy. No Gram matrix is ever written to memory: each program
squares and sums its tile and writes one partial per Frobenius product; a last one-program kernel
reduces the partials and forms the ratio.

Launches per call: column means (x and y in one grid), the Gram kernel, the final reduction (plus
a torch reduction of split partials when T is large). That matters because SAFE measures every
adapter of a model in one training step.

Centring: the means come first (a memory-bound pass) and the Gram kernels subtract them on load.
Folding the centring in afterwards (X^T Y - n mu_x mu_y^T) would skip that pass but cancels
catastrophically in fp32 when |mean| >> std, which transformer activations have (outlier
channels). The subtraction happens in fp32; bf16/fp16 operands are then rounded back to their
dtype for the tensor cores (the rounding is unbiased, ~2^-9 relative per centred entry). fp32
operands use tf32x3 (~fp32-accurate products); mixed dtypes are promoted. Accumulation is fp32;
Gram tiles are scaled by 1/n before squaring (the scale cancels in the ratio) so fp32 stays far
from overflow; the final ratio is taken in fp64.

Scaling: CKA(aX, bY) = CKA(X, Y), but the fourth powers in ||Xc^T Xc||^2 overflow fp32 for
|x| ~ 1e10 and underflow for |x| ~ 1e-10. Each input is multiplied on load by s = 2^k with
max |x over valid rows| * s in [2^7, 2^8) (pow2_scales: a device-side scalar, no host sync; a
power of two scales exactly, so CKA(2^a X, 2^b Y) equals CKA(X, Y) bit for bit). The reference
scales the same way.

CKA is a measurement: no autograd, the result never requires grad. Undefined cases: fewer than 2
valid rows after masking gives NaN (detecting it needs no host sync, so SAFE's hot path stays
asynchronous); fewer than 2 rows in the input shape is a ValueError. A zero-variance
representation is 0/0 = NaN in exact arithmetic; in floating point its centred residue may be tiny
but nonzero, so treat constant inputs as undefined. fp64 inputs run the PyTorch reference (no
fp64 tensor-core path).
"""
from __future__ import annotations

import math

import torch

from ._checks import FLOAT_DTYPES, check_count, check_same_device, check_tensor
from ._common import acc_dtype, sm_count
from ._dispatch import HAS_TRITON, autotune, interpreting, use_triton

__all__ = ["linear_cka", "linear_cka_reference", "cka_form"]

FORMS = ("features", "tokens")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import TL_DTYPES

    # ------------------------------------------------------------------------------------------
    # Column means
    # ------------------------------------------------------------------------------------------
    @triton.jit
    def _scales(scale_ptr):
        """(s_x, s_y): the inputs' power-of-two scales (1, 1 without scale_ptr)."""
        if scale_ptr is not None:
            return tl.load(scale_ptr), tl.load(scale_ptr + 1)
        else:
            return 1.0, 1.0

    @triton.jit
    def _masked_colsum(ptr, m_ptr, scale, t_begin, t_end, D, stride_t, stride_d, d_block,
                       HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """(fp32 sums of scale * x[t_begin:t_end, cols] over valid rows, number of valid rows)."""
        cols = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        cnt = tl.zeros([BLOCK_T], dtype=tl.float32)
        for t0 in range(t_begin, t_end, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            ok = rows < t_end
            if HAS_MASK:
                ok = ok & (tl.load(m_ptr + rows, mask=ok, other=0) != 0)
            ptrs = ptr + rows.to(tl.int64)[:, None] * stride_t + cols.to(tl.int64)[None, :] * stride_d
            acc += tl.load(ptrs, mask=ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32) * scale
            cnt += ok.to(tl.float32)
        return tl.sum(acc, axis=0), tl.sum(cnt, axis=0), cols, col_ok

    # token counts only bound masks / pick autotune buckets: not specialized, so a new batch
    # shape never recompiles (see docs/gpu-verification.md)
    @triton.jit(do_not_specialize=["T", "rows_per_split"])
    def _cka_means_kernel(
        x_ptr, y_ptr, m_ptr, sums_ptr, cnt_ptr,
        T, Dx, Dy, sx_t, sx_d, sy_t, sy_d, rows_per_split,
        HAS_MASK: tl.constexpr, DIVIDE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        scale_ptr=None,
    ):
        """Grid (column blocks of x then of y, row splits). Writes sums[split, 0:Dx] (s_x x) and
        sums[split, Dx:Dx+Dy] (s_y y), and cnt[split] = valid rows of the split. With DIVIDE (one
        split) it writes the means sums / n directly. scale_ptr: [s_x, s_y] (default 1, 1)."""
        pid_d = tl.program_id(0)
        pid_s = tl.program_id(1)
        nbx = tl.cdiv(Dx, BLOCK_D)
        t_begin = pid_s * rows_per_split
        t_end = tl.minimum(t_begin + rows_per_split, T)
        row_base = sums_ptr + pid_s.to(tl.int64) * (Dx + Dy)
        scale_x, scale_y = _scales(scale_ptr)
        if pid_d < nbx:
            s, cnt, cols, col_ok = _masked_colsum(x_ptr, m_ptr, scale_x, t_begin, t_end, Dx, sx_t, sx_d, pid_d,
                                                  HAS_MASK, BLOCK_T, BLOCK_D)
            out_ptrs = row_base + cols
        else:
            s, cnt, cols, col_ok = _masked_colsum(y_ptr, m_ptr, scale_y, t_begin, t_end, Dy, sy_t, sy_d, pid_d - nbx,
                                                  HAS_MASK, BLOCK_T, BLOCK_D)
            out_ptrs = row_base + Dx + cols
        if DIVIDE:
            s = s / cnt
        tl.store(out_ptrs, s, mask=col_ok)
        if pid_d == 0:
            tl.store(cnt_ptr + pid_s, cnt)

    # ------------------------------------------------------------------------------------------
    # Gram Frobenius products
    # ------------------------------------------------------------------------------------------
    @triton.jit
    def _row_flags(m_ptr, rows, T, HAS_MASK: tl.constexpr):
        """(rows < T, rows < T and not padding)."""
        in_range = rows < T
        keep = in_range
        if HAS_MASK:
            keep = keep & (tl.load(m_ptr + rows, mask=in_range, other=0) != 0)
        return in_range, keep

    @triton.jit
    def _centred_tile(ptr, mu_ptr, scale, rows, in_range, keep, cols, D, stride_t, stride_d,
                      EVEN_D: tl.constexpr, DOT_DTYPE: tl.constexpr):
        """scale * x[rows, cols] - mu[cols] as DOT_DTYPE (mu: the scaled mean); zero in padding rows
        and out-of-range entries. scale is a power of two: the product is exact.

        Loads are predicated only on rows < T (and cols < D unless EVEN_D): a predicate that varies
        along the contiguous dim, or that comes from another in-loop load, stops triton from
        turning the 16-bit loads into pipelined async copies (checked on the sm_90 TTGIR).
        Padding rows are dropped by the select after the load instead."""
        ptrs = ptr + rows.to(tl.int64)[:, None] * stride_t + cols.to(tl.int64)[None, :] * stride_d
        if EVEN_D:
            mu = tl.load(mu_ptr + cols)
            v = tl.load(ptrs, mask=in_range[:, None], other=0.0).to(tl.float32)
            v = tl.where(keep[:, None], v * scale - mu[None, :], 0.0)
        else:
            col_ok = cols < D
            mu = tl.load(mu_ptr + cols, mask=col_ok, other=0.0)
            v = tl.load(ptrs, mask=in_range[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            v = tl.where(keep[:, None] & col_ok[None, :], v * scale - mu[None, :], 0.0)
        return v.to(DOT_DTYPE)

    @triton.jit
    def _feature_gram_sq(
        a_ptr, b_ptr, mu_a_ptr, mu_b_ptr, scale_a, scale_b, m_ptr, T, Da, Db,
        sa_t, sa_d, sb_t, sb_d, bi, bj, inv_n,
        HAS_MASK: tl.constexpr, EVEN_A: tl.constexpr, EVEN_B: tl.constexpr, DOT_DTYPE: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Sum of squares of the (bi, bj) tile of (Ac^T Bc) / n, accumulated over all T rows."""
        ci = bi * BLOCK_D + tl.arange(0, BLOCK_D)
        cj = bj * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            in_range, keep = _row_flags(m_ptr, rows, T, HAS_MASK)
            a = _centred_tile(a_ptr, mu_a_ptr, scale_a, rows, in_range, keep, ci, Da, sa_t, sa_d, EVEN_A, DOT_DTYPE)
            b = _centred_tile(b_ptr, mu_b_ptr, scale_b, rows, in_range, keep, cj, Db, sb_t, sb_d, EVEN_B, DOT_DTYPE)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
        acc = acc * inv_n
        return tl.sum(tl.sum(acc * acc, axis=1), axis=0)

    # token counts only bound masks / pick autotune buckets: not specialized, so a new batch
    # shape never recompiles (see docs/gpu-verification.md)
    @triton.jit(do_not_specialize=["T", "out_stride", "size_class"])
    def _cka_features_kernel(
        x_ptr, y_ptr, mu_x_ptr, mu_y_ptr, m_ptr, n_ptr, out_ptr,
        T, Dx, Dy, sx_t, sx_d, sy_t, sy_d, out_stride, size_class,
        HAS_MASK: tl.constexpr, EVEN_X: tl.constexpr, EVEN_Y: tl.constexpr, DOT_DTYPE: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        scale_ptr=None,
    ):
        """d x d form, one launch over the tiles of all three Gram matrices (of s_x X, s_y Y, the
        scales at scale_ptr, default 1).

        pid in [0, nx^2): tile of Xc^T Xc -> out[0, .]; then ny^2 tiles of Yc^T Yc -> out[1, .];
        then ny*nx tiles of Yc^T Xc -> out[2, .]. Symmetric Grams skip tiles below the diagonal
        and count off-diagonal tiles twice. EVEN_X / EVEN_Y: BLOCK_D divides Dx / Dy.
        ``size_class`` only keys the autotuner.
        """
        pid = tl.program_id(0)
        nx = tl.cdiv(Dx, BLOCK_D)
        ny = tl.cdiv(Dy, BLOCK_D)
        inv_n = 1.0 / tl.load(n_ptr)
        scale_x, scale_y = _scales(scale_ptr)
        if pid < nx * nx:
            bi = pid // nx
            bj = pid % nx
            if bi <= bj:
                s = _feature_gram_sq(x_ptr, x_ptr, mu_x_ptr, mu_x_ptr, scale_x, scale_x, m_ptr, T, Dx, Dx,
                                     sx_t, sx_d, sx_t, sx_d,
                                     bi, bj, inv_n, HAS_MASK, EVEN_X, EVEN_X, DOT_DTYPE, PRECISION, BLOCK_T, BLOCK_D)
                s = tl.where(bi == bj, s, 2.0 * s)
                tl.store(out_ptr + pid, s)
            else:
                tl.store(out_ptr + pid, 0.0)
        elif pid < nx * nx + ny * ny:
            p = pid - nx * nx
            bi = p // ny
            bj = p % ny
            if bi <= bj:
                s = _feature_gram_sq(y_ptr, y_ptr, mu_y_ptr, mu_y_ptr, scale_y, scale_y, m_ptr, T, Dy, Dy,
                                     sy_t, sy_d, sy_t, sy_d,
                                     bi, bj, inv_n, HAS_MASK, EVEN_Y, EVEN_Y, DOT_DTYPE, PRECISION, BLOCK_T, BLOCK_D)
                s = tl.where(bi == bj, s, 2.0 * s)
                tl.store(out_ptr + out_stride + p, s)
            else:
                tl.store(out_ptr + out_stride + p, 0.0)
        else:
            p = pid - nx * nx - ny * ny
            bi = p // nx
            bj = p % nx
            s = _feature_gram_sq(y_ptr, x_ptr, mu_y_ptr, mu_x_ptr, scale_y, scale_x, m_ptr, T, Dy, Dx,
                                 sy_t, sy_d, sx_t, sx_d,
                                 bi, bj, inv_n, HAS_MASK, EVEN_Y, EVEN_X, DOT_DTYPE, PRECISION, BLOCK_T, BLOCK_D)
            tl.store(out_ptr + 2 * out_stride + p, s)

    @triton.jit
    def _token_gram_tile(ptr, mu_ptr, scale, rows_i, in_i, keep_i, rows_j, in_j, keep_j, D, stride_t, stride_d,
                         EVEN_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
        """(rows_i, rows_j) tile of Xc Xc^T, accumulated over the D features."""
        acc = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            a = _centred_tile(ptr, mu_ptr, scale, rows_i, in_i, keep_i, cols, D, stride_t, stride_d, EVEN_D, DOT_DTYPE)
            b = _centred_tile(ptr, mu_ptr, scale, rows_j, in_j, keep_j, cols, D, stride_t, stride_d, EVEN_D, DOT_DTYPE)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        return acc

    # token counts only bound masks / pick autotune buckets: not specialized, so a new batch
    # shape never recompiles (see docs/gpu-verification.md)
    @triton.jit(do_not_specialize=["T", "out_stride", "size_class"])
    def _cka_tokens_kernel(
        x_ptr, y_ptr, mu_x_ptr, mu_y_ptr, m_ptr, n_ptr, out_ptr,
        T, Dx, Dy, sx_t, sx_d, sy_t, sy_d, out_stride, size_class,
        HAS_MASK: tl.constexpr, EVEN_X: tl.constexpr, EVEN_Y: tl.constexpr, DOT_DTYPE: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
        scale_ptr=None,
    ):
        """T x T form (of s_x X, s_y Y, the scales at scale_ptr, default 1): program pid owns token
        tile (bi, bj), bi <= bj, and writes
        out[0] = sum Kx^2, out[1] = sum Ky^2, out[2] = sum Kx * Ky over its tile (x2 off the
        diagonal). EVEN_X / EVEN_Y: BLOCK_K divides Dx / Dy."""
        pid = tl.program_id(0)
        nt = tl.cdiv(T, BLOCK_T)
        bi = pid // nt
        bj = pid % nt
        if bi <= bj:
            inv_n = 1.0 / tl.load(n_ptr)
            scale_x, scale_y = _scales(scale_ptr)
            rows_i = bi * BLOCK_T + tl.arange(0, BLOCK_T)
            rows_j = bj * BLOCK_T + tl.arange(0, BLOCK_T)
            in_i, keep_i = _row_flags(m_ptr, rows_i, T, HAS_MASK)
            in_j, keep_j = _row_flags(m_ptr, rows_j, T, HAS_MASK)
            kx = _token_gram_tile(x_ptr, mu_x_ptr, scale_x, rows_i, in_i, keep_i, rows_j, in_j, keep_j, Dx, sx_t, sx_d,
                                  EVEN_X, DOT_DTYPE, PRECISION, BLOCK_T, BLOCK_K) * inv_n
            ky = _token_gram_tile(y_ptr, mu_y_ptr, scale_y, rows_i, in_i, keep_i, rows_j, in_j, keep_j, Dy, sy_t, sy_d,
                                  EVEN_Y, DOT_DTYPE, PRECISION, BLOCK_T, BLOCK_K) * inv_n
            w = tl.where(bi == bj, 1.0, 2.0)
            tl.store(out_ptr + pid, w * tl.sum(tl.sum(kx * kx, axis=1), axis=0))
            tl.store(out_ptr + out_stride + pid, w * tl.sum(tl.sum(ky * ky, axis=1), axis=0))
            tl.store(out_ptr + 2 * out_stride + pid, w * tl.sum(tl.sum(kx * ky, axis=1), axis=0))
        else:
            tl.store(out_ptr + pid, 0.0)
            tl.store(out_ptr + out_stride + pid, 0.0)
            tl.store(out_ptr + 2 * out_stride + pid, 0.0)

    # token counts only bound masks / pick autotune buckets: not specialized, so a new batch
    # shape never recompiles (see docs/gpu-verification.md)
    @triton.jit(do_not_specialize=["out_stride", "n0", "n1", "n2"])
    def _cka_finalize_kernel(out_ptr, out_stride, n0, n1, n2, n_ptr, res_ptr, BLOCK: tl.constexpr):
        """res = sum(out[2, :n2]) / sqrt(sum(out[0, :n0]) * sum(out[1, :n1])), NaN unless n >= 2
        (one program). The partials are sums of squares (or of Gram products), so fp32 sums are
        well conditioned; the ratio is formed in fp64."""
        kxx = tl.zeros([BLOCK], dtype=tl.float32)
        kyy = tl.zeros([BLOCK], dtype=tl.float32)
        hsic = tl.zeros([BLOCK], dtype=tl.float32)
        for i0 in range(0, tl.maximum(tl.maximum(n0, n1), n2), BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            kxx += tl.load(out_ptr + offs, mask=offs < n0, other=0.0)
            kyy += tl.load(out_ptr + out_stride + offs, mask=offs < n1, other=0.0)
            hsic += tl.load(out_ptr + 2 * out_stride + offs, mask=offs < n2, other=0.0)
        sxx = tl.sum(kxx, axis=0).to(tl.float64)
        syy = tl.sum(kyy, axis=0).to(tl.float64)
        sxy = tl.sum(hsic, axis=0).to(tl.float64)
        cka = sxy / tl.sqrt(sxx * syy)
        n = tl.load(n_ptr)
        cka = tl.where(n >= 2.0, cka, float("nan"))
        tl.store(res_ptr, cka.to(tl.float32))

    # ------------------------------------------------------------------------------------------
    # Autotuned entry points: one config space for 16-bit operands, a smaller-tile one for fp32
    # operands (tf32x3 keeps fp32 tiles in shared memory). A single config under the interpreter.
    # All configs fit sm_90 shared memory (98 KiB at most, compiled with their warps/stages).
    #
    # The result must not depend on which config wins the benchmark (two processes, or two runs,
    # that tune differently must agree bit for bit: SAFE's freeze decisions compare these scores).
    # Every tile size here fixes a summation order: the reduced block (BLOCK_T of the features
    # form, BLOCK_K of the tokens form) splits the dot's K loop, and the other tile partitions the
    # Frobenius sums (each program sums its own tile, the finalize kernel sums the partials).
    # num_warps fixes the accumulator layout and with it the order of the in-tile tl.sum on the
    # GPU. So per (form, dtype class) the tile and the warps are one value and only num_stages
    # (software pipelining, no arithmetic change) is tuned. Tiles chosen spill-free on sm_90 for
    # every JIT variant (EVEN or not, with/without mask; ptxas -v); the fp32 token tile used to be
    # 128 x 128 / 8 warps (a 256-register kernel that spilled) and is 64 x 64 now.
    # ------------------------------------------------------------------------------------------
    def _stages(tile: dict, warps: int, stages) -> list:
        return [triton.Config(dict(tile), num_warps=warps, num_stages=s) for s in stages]

    # One pipelining depth each: CKA runs once per SAFE measuring step, not per training step, so tuning
    # the depth is not worth a compile and a benchmark of every extra config on a user's first call.
    _FEATURE_CONFIGS = {
        16: _stages({"BLOCK_T": 64, "BLOCK_D": 128}, 8, (3,)),
        32: _stages({"BLOCK_T": 32, "BLOCK_D": 128}, 8, (2,)),
    }
    _TOKEN_CONFIGS = {
        16: _stages({"BLOCK_T": 64, "BLOCK_K": 64}, 8, (3,)),
        32: _stages({"BLOCK_T": 64, "BLOCK_K": 32}, 4, (2,)),  # s4 spilled 52 B with ptxas 12.8 (triton 3.6)
    }

    def _even(block: str) -> dict:
        return {"EVEN_X": lambda a: a["Dx"] % a[block] == 0, "EVEN_Y": lambda a: a["Dy"] % a[block] == 0}

    _features_tuned = {
        bits: autotune(cfgs, key=["Dx", "Dy", "size_class"],
                       interpret_config=triton.Config({"BLOCK_T": 32, "BLOCK_D": 32}))(
            triton.heuristics(_even("BLOCK_D"))(_cka_features_kernel))
        for bits, cfgs in _FEATURE_CONFIGS.items()
    }
    _tokens_tuned = {
        bits: autotune(cfgs, key=["Dx", "Dy", "size_class"],
                       interpret_config=triton.Config({"BLOCK_T": 32, "BLOCK_K": 32}))(
            triton.heuristics(_even("BLOCK_K"))(_cka_tokens_kernel))
        for bits, cfgs in _TOKEN_CONFIGS.items()
    }

    _TL_DTYPES = TL_DTYPES  # the former name (tests/test_kernel_hazards_wegeft_cka.py reads it)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
_MIN_BLOCK = 32      # smallest BLOCK_D / BLOCK_T of any config: sizes the partial-sum buffer
_ONE_SPLIT_ROWS = 8192  # up to this many rows the means kernel runs unsplit and divides in place


def _launch_means(x2, y2, m8, scales=None):
    """(mean of s_x x2's columns ++ mean of s_y y2's columns [dx + dy] fp32, n valid rows [] fp32);
    scales: [s_x, s_y] fp32 (None: 1, 1)."""
    T, dx = x2.shape
    dy = y2.shape[1]
    block_t, block_d = (32, 32) if interpreting() else (32, 128)
    n_dblocks = triton.cdiv(dx, block_d) + triton.cdiv(dy, block_d)
    splits = 1
    if T > _ONE_SPLIT_ROWS:  # long inputs: split T to fill the GPU when the width alone cannot
        sms = sm_count(x2.device, off_gpu=1)
        splits = min(max(2, (4 * sms) // n_dblocks), triton.cdiv(T, 8 * block_t))
    rows_per_split = triton.cdiv(triton.cdiv(T, splits), block_t) * block_t
    splits = triton.cdiv(T, rows_per_split)
    sums = torch.empty((splits, dx + dy), dtype=torch.float32, device=x2.device)
    cnt = torch.empty((splits,), dtype=torch.float32, device=x2.device)
    _cka_means_kernel[(n_dblocks, splits)](
        x2, y2, m8 if m8 is not None else cnt, sums, cnt, T, dx, dy,
        x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1), rows_per_split,
        HAS_MASK=m8 is not None, DIVIDE=splits == 1, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
        enable_fp_fusion=True,  # column sums and one division: nothing to contract, no bitwise claim
        scale_ptr=scales,
    )
    if splits == 1:
        return sums[0], cnt[0]
    n = cnt.sum()
    return sums.sum(0) / n, n


def _size_class(*dims: int) -> int:
    """Coarse autotune key: the sizes' bit lengths (T changes from batch to batch; re-tuning for
    every exact T would stall training)."""
    return sum(max(int(d), 1).bit_length() << (6 * i) for i, d in enumerate(dims))


def _linear_cka_triton(x2: torch.Tensor, y2: torch.Tensor, m8: torch.Tensor | None, form: str,
                       scales: torch.Tensor | None = None) -> torch.Tensor:
    """scales: [s_x, s_y] fp32 powers of two (pow2_scales) applied on load; None: 1, 1."""
    T, dx = x2.shape
    dy = y2.shape[1]
    dot_dtype = torch.promote_types(x2.dtype, y2.dtype)
    bits = 32 if dot_dtype == torch.float32 else 16
    dot_tl = TL_DTYPES[dot_dtype]
    if interpreting() and dot_dtype == torch.bfloat16:
        dot_tl = tl.float32  # triton 3.9's interpreter returns garbage for bf16 x bf16 tl.dot
    # fp32 operands: tf32x3 (three tf32 products) is ~fp32-accurate on tensor cores; the
    # interpreter computes in fp32 anyway. Ignored for 16-bit operands.
    precision = "tf32x3" if bits == 32 and not interpreting() else "ieee"
    mu, n = _launch_means(x2, y2, m8, scales)
    args = (x2, y2, mu, mu[dx:], m8 if m8 is not None else n, n)
    strides = (x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1))
    meta = dict(HAS_MASK=m8 is not None, DOT_DTYPE=dot_tl, PRECISION=precision)
    launched = []  # the grid of the launch that ran (the autotuner calls grid for the chosen config last)
    if form == "features":
        nbx, nby = triton.cdiv(dx, _MIN_BLOCK), triton.cdiv(dy, _MIN_BLOCK)
        width = max(nbx * nbx, nby * nby, nbx * nby)
        kernel = _features_tuned[bits]

        def grid(cfg):
            bx, by = triton.cdiv(dx, cfg["BLOCK_D"]), triton.cdiv(dy, cfg["BLOCK_D"])
            launched[:] = [bx * bx, by * by, by * bx]
            return (bx * bx + by * by + by * bx,)
    else:
        width = triton.cdiv(T, _MIN_BLOCK) ** 2
        kernel = _tokens_tuned[bits]

        def grid(cfg):
            nt = triton.cdiv(T, cfg["BLOCK_T"]) ** 2
            launched[:] = [nt, nt, nt]
            return (nt,)
    # one partial per program and Frobenius product (programs below a symmetric Gram's diagonal
    # write 0); rows: ||Kx||^2, ||Ky||^2, <Kx, Ky> in both forms
    out = torch.empty((3, width), dtype=torch.float32, device=x2.device)
    # Gram GEMMs and sums of squares: FMA only adds accuracy (passed through the autotuner to the JIT)
    kernel[grid](*args, out, T, dx, dy, *strides, width, _size_class(T, dx, dy), **meta, enable_fp_fusion=True,
                 scale_ptr=scales)
    res = torch.empty((), dtype=torch.float32, device=x2.device)
    _cka_finalize_kernel[(1,)](out, width, *launched, n, res, BLOCK=64 if interpreting() else 256, num_warps=4,
                               enable_fp_fusion=True)  # sums and one ratio: no bitwise claim
    return res


# ----------------------------------------------------------------------------------------------
# PyTorch reference (tensors in, tensors out, no autograd)
# ----------------------------------------------------------------------------------------------
_SCALE_TOP = 8  # pow2_scales maps max |x| into [2^7, 2^8)


def pow2_scales(x2: torch.Tensor, y2: torch.Tensor, keep: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor:
    """[s_x, s_y] in ``acc``: s = 2^k with max |x[valid rows]| · s in [2^7, 2^8) (k clamped to the
    normal range). CKA is scale-invariant and a power of two scales exactly, so the Gram products
    neither overflow (inputs ~1e30) nor underflow (~1e-30); the headroom above 1 keeps small centred
    fp16 entries normal. Device-side (no host sync); padding rows (keep False) do not count."""
    rowmax = torch.stack([torch.linalg.vector_norm(t, ord=math.inf, dim=1) for t in (x2, y2)])  # [2, T]
    if keep is not None:
        rowmax = torch.where(keep, rowmax, 0)
    _, e = torch.frexp(rowmax.amax(dim=1).to(acc))  # max = f · 2^e, f in [0.5, 1); 0, NaN, Inf: e = 0
    if acc == torch.float64:
        k = (_SCALE_TOP - e.long()).clamp(-1022, 1023)
        return ((k + 1023) << 52).view(torch.float64)
    k = (_SCALE_TOP - e).clamp(-126, 127)
    return ((k + 127) << 23).to(torch.int32).view(torch.float32)


def linear_cka_reference(x2: torch.Tensor, y2: torch.Tensor, mask: torch.Tensor | None = None,
                         form: str = "features") -> torch.Tensor:
    """Linear CKA of x2 [T, dx] and y2 [T, dy] over the rows where mask [T] != 0, computed in fp32
    (fp64 when an input is fp64) through the Gram products of ``form``, each input first scaled by
    its pow2_scales power of two. Returns a 0-dim tensor."""
    acc = acc_dtype(x2.dtype, y2.dtype)
    keep1 = None if mask is None else mask != 0
    s = pow2_scales(x2, y2, keep1, acc)
    xf, yf = x2.to(acc) * s[0], y2.to(acc) * s[1]
    if mask is not None:  # select, not multiply: padding rows may hold anything (Inf, NaN)
        keep = keep1[:, None]
        xf, yf = torch.where(keep, xf, 0.0), torch.where(keep, yf, 0.0)
        n = keep.sum().to(acc)
    else:
        keep = None
        n = torch.tensor(float(xf.shape[0]), dtype=acc, device=xf.device)
    xc, yc = xf - xf.sum(0) / n, yf - yf.sum(0) / n
    if keep is not None:
        xc, yc = torch.where(keep, xc, 0.0), torch.where(keep, yc, 0.0)
    if form == "features":
        gxx, gyy, gyx = xc.T @ xc / n, yc.T @ yc / n, yc.T @ xc / n
        kxx, kyy, hsic = gxx.square().sum(), gyy.square().sum(), gyx.square().sum()
    else:
        kx, ky = xc @ xc.T / n, yc @ yc.T / n
        kxx, kyy, hsic = kx.square().sum(), ky.square().sum(), (kx * ky).sum()
    cka = hsic.double() / torch.sqrt(kxx.double() * kyy.double())
    return torch.where(n >= 2, cka, torch.full_like(cka, float("nan"))).to(acc)


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------
def cka_form(tokens: int, dx: int, dy: int) -> str:
    """The cheaper form: "tokens" (T x T Grams, T^2/2 (dx+dy) MACs) when T < dx + dy, else
    "features" (d x d Grams, T (dx^2/2 + dy^2/2 + dx dy) MACs). Sizes: ints >= 1."""
    tokens, dx, dy = check_count("tokens", tokens), check_count("dx", dx), check_count("dy", dy)
    return "tokens" if tokens < dx + dy else "features"


@torch.no_grad()
def linear_cka(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None, *,
               form: str | None = None) -> torch.Tensor:
    """Linear CKA of two representations of the same tokens; a measurement (no autograd).

    x [..., T, dx], y [..., T, dy] (leading dims are flattened with T; dx may differ from dy; any
    float dtypes, mixed dtypes are promoted), mask [..., T] (bool / integer / float, nonzero =
    valid token) or None. Returns a 0-dim tensor on x's device: fp32 (fp64 if an input is fp64),
    in [0, 1] up to rounding; NaN if fewer than 2 rows are valid after masking. ``form``
    ("features" | "tokens") forces the Gram form; default: the cheaper one (``cka_form``).
    Scale invariant over the whole range of each dtype (inputs are rescaled by powers of two, see
    the module docstring); padding rows may hold anything (NaN, Inf).
    fp16/bf16/fp32 run the Triton kernels where ``use_triton`` says so; fp64 runs the reference.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("y", y, dtypes=FLOAT_DTYPES)
    if x.dim() < 2:
        raise ValueError(f"x: expected shape [..., T, d] (at least 2 dims), got {list(x.shape)}")
    if y.dim() < 2:
        raise ValueError(f"y: expected shape [..., T, d] (at least 2 dims), got {list(y.shape)}")
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"y: leading dims {list(y.shape[:-1])} must equal x's {list(x.shape[:-1])} "
                         f"(the same tokens in both representations)")
    if mask is not None:
        check_tensor("mask", mask)
    check_same_device(x=x, y=y, mask=mask)
    if mask is not None:
        check_tensor("mask", mask, shape=list(x.shape[:-1]))
        if mask.is_complex() or mask.is_quantized:
            raise TypeError(f"mask: expected a bool, integer or float tensor, got {mask.dtype}")
    if form is not None and form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS} or None, got {form!r}")
    dx, dy = x.shape[-1], y.shape[-1]
    T = math.prod(x.shape[:-1])
    if dx < 1:
        raise ValueError(f"x: need at least one feature column, got shape {list(x.shape)}")
    if dy < 1:
        raise ValueError(f"y: need at least one feature column, got shape {list(y.shape)}")
    if T < 2:
        raise ValueError(f"x: CKA needs at least 2 tokens (a centred single row is zero), got shape {list(x.shape)}")
    x2, y2 = x.detach().reshape(T, dx), y.detach().reshape(T, dy)
    m = None if mask is None else mask.detach().reshape(T)
    form = form or cka_form(T, dx, dy)
    if x2.dtype in TRITON_DTYPES and y2.dtype in TRITON_DTYPES and use_triton(x2):
        keep = None if m is None else (m if m.dtype == torch.bool else m != 0)
        scales = pow2_scales(x2, y2, keep, torch.float32)
        m8 = None if keep is None else keep.contiguous().view(torch.int8)
        return _linear_cka_triton(x2, y2, m8, form, scales)
    return linear_cka_reference(x2, y2, m, form)
