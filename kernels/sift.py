"""SIFT kernels (docs/design.md#sift): score accumulation, exact top-k selection, the sparse weight gradient
(SDDMM at the selected indices), the merged-weight write and the fused sparse AdamW step.

Shapes. A targeted weight W is [d_out, d_in]; the index set I holds k flat indices into W.flatten()
(ascending), rows = I // d_in, cols = I % d_in. The layer keeps fp32 copies of W0[I] and delta [k].

Public ops (validate, then Triton when ``use_triton(t)`` else the PyTorch reference):
  abs_accumulate_(acc, grad)                acc += |grad|                     (fp32 acc, in place)
  topk_abs_select(scores, k)                ascending flat indices of the k largest |scores|
  sddmm_at_indices(dy, x, rows, cols)       out[m] = sum_t dy[t, rows[m]] * x[t, cols[m]]
  scatter_merged_(weight, idx, w0, delta)   weight.view(-1)[idx] = round(w0 + delta)
  sparse_adamw_step_(...)                   torch.optim.AdamW on delta, then the write above

Top-k (exact, deterministic, one pass over the scores). Nonnegative floats order like their bit
patterns read as integers, so |s| is the key ``bits & 0x7FF..F`` (sign bit dropped: |-0| = +0,
subnormals and all widths alike; fp64 uses 63-bit int64 keys). Pipeline, all on the device with
one host sync at the end:
  1. sample (1 program): zero the control block; read S keys at golden-ratio positions and take
     the r-th largest as a lower bound L, r chosen so that count(|s| >= L) >= k holds with a
     ~4.5 sigma margin (L = 0, i.e. every entry a candidate, for small inputs or large k);
  2. compact (the only pass over the scores): per block of BLOCK entries, candidates |s| >= L are
     written in index order to a segment of a candidate buffer (slot from an atomic counter), with
     the block's (start, count); NaN/Inf are counted here too;
  3. radix passes over the candidates only: 11-bit digits from the top; each program builds its
     2048-bin histogram as one-hot(high 6 bits)^T @ one-hot(low 5 bits) on the tensor cores, adds
     it into a global histogram with masked atomics; the last program to finish (atomic ticket)
     picks the digit holding the k-th largest key and stores (prefix, rank left) for the next
     pass. After the last pass the prefix is the exact threshold key T and ``need_eq`` the number
     of keys == T to keep (the lowest-index ones);
  4. count: per block, #(key > T) and #(key == T); the last program scans them in block order;
  5. write: per block, keep key > T and the ties whose global tie rank < need_eq, at
     out[base_b + in-block rank]: ascending flat indices, no sort anywhere.
The host then reads (candidates, NaN/Inf) once: NaN/Inf raise; if the sample bound was unlucky
(fewer than k candidates) or too loose (buffer overflow) the pipeline reruns with L = 0 / a buffer
of the exact size. Results never depend on timing: same input, same output.

SDDMM (docs/design.md#sddmm-at-low-density, docs/perf-model.md). A random 1% mask touches every
dense tile, so the win over dY^T X comes from doing 1% of the FLOPs (on CUDA cores) while reading
each operand line few times. Gathers along T from row-major [T, d] tensors are strided (one 32-byte
sector per element), so dY and X are first transposed once ([d, T], T contiguous, row stride padded
to a multiple of 16: every entry reads whole aligned lines). The plan (cached per index tensor)
orders the entries tile-major over R x C tiles of W holding about one chunk each. Program (c, s)
owns chunk c (N_SUB x BLOCK_E consecutive entries: work cut by entry count, never by row) and
token slice s; its sub-blocks sweep the same R + C operand lines of the slice (L1 hits after the
first), each summing into a register tile that is reduced and stored once per (slice, entry): no
read-modify-write, no barrier, no atomic. One more kernel adds the slices in order (deterministic;
the configuration is fixed per dtype, never autotuned, so no timing changes a summation order).
Where the performance model predicts the dense dY^T X + gather to be faster (high density, few
tokens), ``method="auto"`` takes it instead.
"""
from __future__ import annotations

import math
import numbers

import torch

from ._checks import (FLOAT_DTYPES, INDEX_DTYPES, check_count, check_finite, check_flag, check_index_range,
                      check_real, check_same_device, check_tensor)
from ._common import acc_dtype, acc_fp64, sm_count
from ._dispatch import HAS_TRITON, interpreting, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import bf16_rne

__all__ = [
    "abs_accumulate_", "abs_accumulate_reference_",
    "topk_abs_select", "topk_abs_select_reference",
    "sddmm_at_indices", "sddmm_at_indices_reference",
    "scatter_merged_", "scatter_merged_reference_",
    "sparse_adamw_step_", "sparse_adamw_step_reference_",
]

# top-k control block (int64 words at the start of the workspace), then 6 rows of per-block stats
_CTRL_NCAND = 0          # candidates found by the compaction pass (all of them, even past capacity)
_CTRL_NONFINITE = 1      # NaN/Inf entries seen
_CTRL_LOWER = 2          # the sampled lower bound L on the keys
_CTRL_COUNT_TICKET = 3   # programs of the count kernel that finished
_CTRL_PASS_TICKET = 8    # + pass: programs of radix pass `pass` that finished (8 passes at most)
_CTRL_STATE = 16         # + 2*pass: (key prefix, rank left) before radix pass `pass`; after the last = (T, need_eq)
_CTRL_HIST = 40          # + pass*2048: histogram of radix pass `pass`
_STAT_SEG_START, _STAT_SEG_COUNT, _STAT_GT, _STAT_EQ, _STAT_BASE, _STAT_EQ_BEFORE = range(6)
_DIGIT_BITS = 11         # radix digit = 6 high bits x 5 low bits (one-hot MMA 64 x 32)
_NBINS_HI, _NBINS_LO = 64, 32
_NBINS = _NBINS_HI * _NBINS_LO


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    # module constants used inside kernels must be constexpr globals
    C_NCAND = tl.constexpr(_CTRL_NCAND)
    C_NONFINITE = tl.constexpr(_CTRL_NONFINITE)
    C_LOWER = tl.constexpr(_CTRL_LOWER)
    C_COUNT_TICKET = tl.constexpr(_CTRL_COUNT_TICKET)
    C_PASS_TICKET = tl.constexpr(_CTRL_PASS_TICKET)
    C_STATE = tl.constexpr(_CTRL_STATE)
    C_HIST = tl.constexpr(_CTRL_HIST)
    S_SEG_START = tl.constexpr(_STAT_SEG_START)
    S_SEG_COUNT = tl.constexpr(_STAT_SEG_COUNT)
    S_GT = tl.constexpr(_STAT_GT)
    S_EQ = tl.constexpr(_STAT_EQ)
    S_BASE = tl.constexpr(_STAT_BASE)
    S_EQ_BEFORE = tl.constexpr(_STAT_EQ_BEFORE)
    NBINS_HI = tl.constexpr(_NBINS_HI)
    NBINS_LO = tl.constexpr(_NBINS_LO)
    NBINS = tl.constexpr(_NBINS)

    # ---------------------------------------------------------------- abs_accumulate_
    @triton.jit
    def _abs_accumulate_kernel(acc_ptr, grad_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        acc = tl.load(acc_ptr + offs, mask=m)
        g = tl.load(grad_ptr + offs, mask=m).to(acc.dtype)
        tl.store(acc_ptr + offs, acc + tl.abs(g), mask=m)

    # ---------------------------------------------------------------- top-k select
    @triton.jit
    def _abs_key(bits, KEY_BITS: tl.constexpr):
        """|x| as a nonnegative integer that orders like |x| (int32; int64 for fp64)."""
        if KEY_BITS == 63:
            return bits & 0x7FFFFFFFFFFFFFFF
        else:
            return bits.to(tl.int32) & ((1 << KEY_BITS) - 1)

    @triton.jit
    def _topk_sample_kernel(bits_ptr, ws_ptr, n, k, rank, ctrl_len,
                            KEY_BITS: tl.constexpr, SAMPLE: tl.constexpr, ZERO_BLOCK: tl.constexpr):
        """One program: zero the control block, set the pass-0 state (prefix 0, rank k) and the
        lower bound L = the rank-th largest of SAMPLE sampled keys (L = 0 when rank == 0)."""
        for z0 in range(0, ctrl_len, ZERO_BLOCK):
            zo = z0 + tl.arange(0, ZERO_BLOCK)
            tl.store(ws_ptr + zo, tl.zeros([ZERO_BLOCK], tl.int64), mask=zo < ctrl_len)
        tl.debug_barrier()  # the zeroing stores above and the stores below touch the same words
        tl.store(ws_ptr + C_STATE + 1, tl.zeros([], tl.int64) + k)  # k may arrive as constexpr 1
        if rank > 0:
            i = tl.arange(0, SAMPLE).to(tl.int64)
            frac24 = ((i * 2654435769) & 0xFFFFFFFF) >> 8  # golden-ratio sequence: rows and columns alike
            idx = (frac24 * n) >> 24
            key = _abs_key(tl.load(bits_ptr + idx), KEY_BITS)
            # largest v with #(key >= v) >= rank, built bit by bit from the top
            lower = tl.zeros([], key.dtype)
            one = tl.full([], 1, key.dtype)
            for b in range(KEY_BITS - 1, -1, -1):
                trial = lower | (one << b)
                hits = tl.sum((key >= trial).to(tl.int32), axis=0)
                lower = tl.where(hits >= rank, trial, lower)
            tl.store(ws_ptr + C_LOWER, lower.to(tl.int64))

    @triton.jit
    def _topk_compact_kernel(bits_ptr, ws_ptr, cand_key_ptr, cand_off_ptr, n, cap, nblocks, ctrl_len,
                             KEY_BITS: tl.constexpr, INF_KEY: tl.constexpr, BLOCK: tl.constexpr):
        """The one pass over the scores: write the block's candidates (key >= L) in index order
        to its segment of the candidate buffer; count NaN/Inf."""
        pid = tl.program_id(0)
        local = tl.arange(0, BLOCK)
        offs = pid.to(tl.int64) * BLOCK + local
        m = offs < n
        key = _abs_key(tl.load(bits_ptr + offs, mask=m, other=0), KEY_BITS)
        nonfinite = tl.sum((m & (key >= INF_KEY)).to(tl.int32), axis=0)
        tl.atomic_add(ws_ptr + C_NONFINITE, nonfinite.to(tl.int64), mask=nonfinite > 0, sem="relaxed")
        lower = tl.load(ws_ptr + C_LOWER).to(key.dtype)
        cand = (m & (key >= lower)).to(tl.int32)
        count = tl.sum(cand, axis=0).to(tl.int64)
        # blocks without candidates leave the shared counter alone (no contention on that word);
        # a masked atomic returns no defined value, so such a block's (empty) segment starts at 0
        base = tl.atomic_add(ws_ptr + C_NCAND, count, mask=count > 0, sem="relaxed")
        base = tl.where(count > 0, base, 0)
        rank = tl.cumsum(cand, axis=0) - cand  # int32 offsets off one 64-bit base: cheap addresses
        keep = (cand != 0) & (rank < cap - base)
        tl.store(cand_key_ptr + base + rank, key, mask=keep)
        tl.store(cand_off_ptr + base + rank, local, mask=keep)
        stat = ws_ptr + ctrl_len
        tl.store(stat + S_SEG_START * nblocks + pid, base)
        tl.store(stat + S_SEG_COUNT * nblocks + pid, tl.minimum(tl.maximum(cap - base, 0), count))

    @triton.jit
    def _topk_radix_pass_kernel(cand_key_ptr, ws_ptr, cap, chunk, pass_idx, shift, width, TILE: tl.constexpr):
        """Histogram of the digit (key >> shift) & (2^width - 1) over the candidates whose higher
        bits equal the current prefix; the last program picks the digit of the wanted rank."""
        pid = tl.program_id(0)
        n_cand = tl.minimum(tl.load(ws_ptr + C_NCAND), cap)
        prefix = tl.load(ws_ptr + C_STATE + 2 * pass_idx)
        hi_ids = tl.arange(0, NBINS_HI)
        lo_ids = tl.arange(0, NBINS_LO)
        counts = tl.zeros([NBINS_HI, NBINS_LO], tl.float32)  # exact: a program sees < 2^24 keys
        start = pid.to(tl.int64) * chunk
        end = tl.minimum(start + chunk, n_cand)
        for i0 in range(start, end, TILE):
            i = i0 + tl.arange(0, TILE)
            valid = i < end
            key = tl.load(cand_key_ptr + i, mask=valid, other=0).to(tl.int64)
            match = valid & ((key >> (shift + width)) == prefix)
            digit = ((key >> shift) & ((1 << width) - 1)).to(tl.int32)
            onehot_hi = ((hi_ids[:, None] == (digit >> 5)[None, :]) & match[None, :]).to(tl.float16)
            onehot_lo = ((digit & (NBINS_LO - 1))[:, None] == lo_ids[None, :]).to(tl.float16)
            counts = tl.dot(onehot_hi, onehot_lo, counts)
        hist = counts.to(tl.int64)
        hist_ptr = ws_ptr + C_HIST + pass_idx * NBINS
        tl.atomic_add(hist_ptr + hi_ids[:, None] * NBINS_LO + lo_ids[None, :], hist, mask=hist != 0, sem="relaxed")
        tl.debug_barrier()  # every thread's histogram atomics precede the release below
        ticket = tl.atomic_add(ws_ptr + C_PASS_TICKET + pass_idx, 1, sem="acq_rel")
        if ticket == tl.num_programs(0) - 1:
            need = tl.load(ws_ptr + C_STATE + 2 * pass_idx + 1)
            ids = tl.arange(0, NBINS)
            h = tl.load(hist_ptr + ids, cache_modifier=".cg")
            at_or_above = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h  # #keys with digit >= d
            chosen = tl.max(tl.where(at_or_above >= need, ids, -1), axis=0)
            above = tl.sum(tl.where(ids > chosen, h, 0), axis=0)
            tl.store(ws_ptr + C_STATE + 2 * pass_idx + 2, (prefix << width) | chosen.to(tl.int64))
            tl.store(ws_ptr + C_STATE + 2 * pass_idx + 3, need - above)

    @triton.jit
    def _topk_block_state(ws_ptr, pid, nblocks, ctrl_len, n_passes):
        """(block stats base, threshold key T, ties to keep need_eq, the block's candidate segment
        [seg_start, seg_end)) after the last radix pass."""
        stat = ws_ptr + ctrl_len
        threshold = tl.load(ws_ptr + C_STATE + 2 * n_passes)
        need_eq = tl.load(ws_ptr + C_STATE + 2 * n_passes + 1)
        seg_start = tl.load(stat + S_SEG_START * nblocks + pid)
        seg_end = seg_start + tl.load(stat + S_SEG_COUNT * nblocks + pid)
        return stat, threshold, need_eq, seg_start, seg_end

    @triton.jit
    def _topk_count_kernel(cand_key_ptr, ws_ptr, nblocks, ctrl_len, n_passes, TILE: tl.constexpr, SCAN: tl.constexpr):
        """Per block: #(key > T), #(key == T); the last program scans them in block order into the
        block's output base and the ties that precede it."""
        pid = tl.program_id(0)
        stat, threshold, need_eq, seg_start, seg_end = _topk_block_state(ws_ptr, pid, nblocks, ctrl_len, n_passes)
        n_gt = tl.zeros([], tl.int64)
        n_eq = tl.zeros([], tl.int64)
        for i0 in range(seg_start, seg_end, TILE):
            i = i0 + tl.arange(0, TILE)
            valid = i < seg_end
            key = tl.load(cand_key_ptr + i, mask=valid, other=0).to(tl.int64)
            n_gt += tl.sum((valid & (key > threshold)).to(tl.int64), axis=0)
            n_eq += tl.sum((valid & (key == threshold)).to(tl.int64), axis=0)
        tl.store(stat + S_GT * nblocks + pid, n_gt)
        tl.store(stat + S_EQ * nblocks + pid, n_eq)
        tl.debug_barrier()
        ticket = tl.atomic_add(ws_ptr + C_COUNT_TICKET, 1, sem="acq_rel")
        if ticket == nblocks - 1:
            gt_carry = tl.zeros([], tl.int64)
            eq_carry = tl.zeros([], tl.int64)
            for b0 in range(0, nblocks, SCAN):
                b = b0 + tl.arange(0, SCAN)
                bm = b < nblocks
                g = tl.load(stat + S_GT * nblocks + b, mask=bm, other=0, cache_modifier=".cg")
                e = tl.load(stat + S_EQ * nblocks + b, mask=bm, other=0, cache_modifier=".cg")
                eq_before = eq_carry + tl.cumsum(e, axis=0) - e
                gt_before = gt_carry + tl.cumsum(g, axis=0) - g
                tl.store(stat + S_BASE * nblocks + b, gt_before + tl.minimum(eq_before, need_eq), mask=bm)
                tl.store(stat + S_EQ_BEFORE * nblocks + b, eq_before, mask=bm)
                gt_carry += tl.sum(g, axis=0)
                eq_carry += tl.sum(e, axis=0)

    @triton.jit
    def _topk_write_kernel(cand_key_ptr, cand_off_ptr, ws_ptr, out_ptr, k, nblocks, ctrl_len, n_passes,
                           BLOCK: tl.constexpr, TILE: tl.constexpr):
        """Per block: the selected entries (key > T, or key == T with global tie rank < need_eq)
        go to out[base + rank within the block], i.e. ascending flat index."""
        pid = tl.program_id(0)
        stat, threshold, need_eq, seg_start, seg_end = _topk_block_state(ws_ptr, pid, nblocks, ctrl_len, n_passes)
        base = tl.load(stat + S_BASE * nblocks + pid)
        eq_rank0 = tl.load(stat + S_EQ_BEFORE * nblocks + pid)
        block_start = pid.to(tl.int64) * BLOCK
        for i0 in range(seg_start, seg_end, TILE):
            i = i0 + tl.arange(0, TILE)
            valid = i < seg_end
            key = tl.load(cand_key_ptr + i, mask=valid, other=0).to(tl.int64)
            off = tl.load(cand_off_ptr + i, mask=valid, other=0)
            tie = (valid & (key == threshold)).to(tl.int64)
            tie_rank = eq_rank0 + tl.cumsum(tie, axis=0) - tie
            sel = (valid & (key > threshold)) | ((tie != 0) & (tie_rank < need_eq))
            sel64 = sel.to(tl.int64)
            pos = base + tl.cumsum(sel64, axis=0) - sel64
            tl.store(out_ptr + pos, block_start + off, mask=sel & (pos < k))
            base += tl.sum(sel64, axis=0)
            eq_rank0 += tl.sum(tie, axis=0)

    # ---------------------------------------------------------------- SDDMM at indices
    # token counts only bound masks: not specialized, so a new batch shape never recompiles (the
    # transposed operands' row stride is padded to a multiple of 16 instead: aligned loads always)
    @triton.jit(do_not_specialize=["T"])
    def _sddmm_chunk_kernel(dyt_ptr, xt_ptr, e_row_ptr, e_col_ptr, partial_ptr, T, k, ld,
                            ACC_FP64: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
                            N_SUB: tl.constexpr, T_SLICE: tl.constexpr):
        """partial[s, e] = sum over tokens [s T_SLICE, (s + 1) T_SLICE) of dy^T[row_e, t] * x^T[col_e, t],
        for the N_SUB * BLOCK_E consecutive entries e of chunk program_id(0), s = program_id(1).

        Work is cut by entry count, never by row: a chunk costs the same wherever its entries sit.
        A chunk's entries lie in one R x C tile of W (the plan's order), so its sub-blocks, one after
        the other, gather from the same R + C operand lines of the slice: the first touch of a line
        comes from L2, the repeats hit L1 (the slice is short enough for R + C lines to fit). Each
        sub-block's dot products build up in a register tile over the slice's (unrolled) token
        tiles and are reduced and stored once: every (s, e) is written by one store, nothing is
        read back, no barrier or atomic anywhere."""
        chunk = tl.program_id(0)
        split = tl.program_id(1)
        acc_t = tl.float64 if ACC_FP64 else tl.float32
        t_begin = split.to(tl.int64) * T_SLICE
        out_row = partial_ptr + split.to(tl.int64) * k
        for j in range(N_SUB):
            e = chunk.to(tl.int64) * (N_SUB * BLOCK_E) + j * BLOCK_E + tl.arange(0, BLOCK_E)
            e_ok = e < k
            # entries past k read row 0 / col 0: in bounds, and never stored
            r = tl.load(e_row_ptr + e, mask=e_ok, other=0).to(tl.int64)
            c = tl.load(e_col_ptr + e, mask=e_ok, other=0).to(tl.int64)
            dy_rows = dyt_ptr + r[:, None] * ld
            x_rows = xt_ptr + c[:, None] * ld
            acc = tl.zeros([BLOCK_E, BLOCK_T], acc_t)
            for tile in tl.static_range(T_SLICE // BLOCK_T):  # independent gathers, all in flight
                t = t_begin + tile * BLOCK_T + tl.arange(0, BLOCK_T)
                t_ok = (t < T)[None, :]
                dy = tl.load(dy_rows + t[None, :], mask=t_ok, other=0.0)
                xv = tl.load(x_rows + t[None, :], mask=t_ok, other=0.0)
                acc += dy.to(acc_t) * xv.to(acc_t)
            tl.store(out_row + e, tl.sum(acc, axis=1), mask=e_ok)

    # token counts only bound masks / pick autotune buckets: not specialized, so a new batch
    # shape never recompiles (see docs/gpu-verification.md)
    @triton.jit(do_not_specialize=["n_split"])
    def _sddmm_reduce_kernel(partial_ptr, e_pos_ptr, out_ptr, k, n_split, BLOCK: tl.constexpr):
        """out[pos_e] = sum_s partial[s, e], summed in split order (deterministic)."""
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = e < k
        row = partial_ptr + e
        acc = tl.load(row, mask=m, other=0.0)
        for _ in range(1, n_split):
            row += k
            acc += tl.load(row, mask=m, other=0.0)
        pos = tl.load(e_pos_ptr + e, mask=m, other=0)
        tl.store(out_ptr + pos, acc, mask=m)

    # ---------------------------------------------------------------- merged write / AdamW
    @triton.jit
    def _round_to(x, DT: tl.constexpr):
        """x rounded to nearest-even in DT. fp32 -> bf16 is done on the bits (bf16_rne): the same on
        the GPU and in triton's CPU interpreter (which truncates a plain fp32 -> bf16 cast)."""
        if DT == tl.bfloat16:
            return bf16_rne(x)
        else:
            return x.to(DT)

    @triton.jit
    def _scatter_merged_kernel(weight_ptr, idx_ptr, w0_ptr, delta_ptr, k, BLOCK: tl.constexpr):
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = e < k
        idx = tl.load(idx_ptr + e, mask=m, other=0).to(tl.int64)
        merged = tl.load(w0_ptr + e, mask=m, other=0.0) + tl.load(delta_ptr + e, mask=m, other=0.0)
        tl.store(weight_ptr + idx, _round_to(merged, weight_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _sqrt_ieee(x):
        if x.dtype == tl.float64:
            return tl.sqrt(x)  # sqrt.rn.f64
        else:
            return tl.sqrt_rn(x)

    @triton.jit
    def _div_ieee(x, y):
        if x.dtype == tl.float64:
            return x / y  # div.rn.f64
        else:
            return tl.div_rn(x, y)

    @triton.jit
    def _sparse_adamw_kernel(weight_ptr, idx_ptr, w0_ptr, delta_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr,
                             hyper_ptr, k, decay, one_minus_beta1, beta2, one_minus_beta2, step_size,
                             bias_correction2_sqrt, eps,
                             MAXIMIZE: tl.constexpr, HYPER_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
        """torch.optim.AdamW (single-tensor math) on delta, then weight[idx] = round(w0 + delta).
        fp64 state reads its hyperparameters from hyper_ptr (kernel float arguments are fp32)."""
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = e < k
        if HYPER_FROM_PTR:
            decay = tl.load(hyper_ptr + 0)
            one_minus_beta1 = tl.load(hyper_ptr + 1)
            beta2 = tl.load(hyper_ptr + 2)
            one_minus_beta2 = tl.load(hyper_ptr + 3)
            step_size = tl.load(hyper_ptr + 4)
            bias_correction2_sqrt = tl.load(hyper_ptr + 5)
            eps = tl.load(hyper_ptr + 6)
        g = tl.load(grad_ptr + e, mask=m, other=0.0)
        if MAXIMIZE:
            g = -g
        delta = tl.load(delta_ptr + e, mask=m, other=0.0) * decay
        m1 = tl.load(exp_avg_ptr + e, mask=m, other=0.0)
        m1 = m1 + one_minus_beta1 * (g - m1)  # lerp, as torch's exp_avg.lerp_(g, 1 - beta1)
        m2 = tl.load(exp_avg_sq_ptr + e, mask=m, other=0.0) * beta2 + one_minus_beta2 * g * g
        denom = _div_ieee(_sqrt_ieee(m2), bias_correction2_sqrt) + eps
        delta = delta - step_size * _div_ieee(m1, denom)
        tl.store(exp_avg_ptr + e, m1, mask=m)
        tl.store(exp_avg_sq_ptr + e, m2, mask=m)
        tl.store(delta_ptr + e, delta, mask=m)
        idx = tl.load(idx_ptr + e, mask=m, other=0).to(tl.int64)
        merged = tl.load(w0_ptr + e, mask=m, other=0.0) + delta
        tl.store(weight_ptr + idx, _round_to(merged, weight_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# launch functions
# ----------------------------------------------------------------------------------------------
# SMs assumed off a GPU (interpreter, the compile check's capture): sizes the radix and SDDMM grids
_SMS_OFF_GPU = 4


# FP contraction (a*b + c -> one fma), explicit per launch: unset, triton's default is on up to 3.9
# and off from 3.10, and it changes the last bits of any kernel that multiplies and adds.
#   _FP_FUSION_EXACT (off): kernels whose results are claimed bit-equal to separately rounded torch
#     ops (the AdamW step == torch.optim.AdamW on delta, the merged write, the |grad| accumulation);
#   _FP_FUSION_ACCURATE (on): reductions (SDDMM), where an fma only drops a rounding and no bitwise
#     claim against torch is made (their order is fixed, so they stay deterministic either way).
# The top-k kernels do integer work only (and one-hot MMA counts, exact in any case): off.
_FP_FUSION_EXACT = False
_FP_FUSION_ACCURATE = True


def _elementwise_block() -> tuple[int, int]:
    """(BLOCK, num_warps) of the elementwise kernels; small blocks under the interpreter so tests
    cover several programs."""
    return (64, 4) if interpreting() else (2048, 8)


def _abs_accumulate_triton(acc: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    n = acc.numel()
    block, warps = _elementwise_block()
    _abs_accumulate_kernel[(triton.cdiv(n, block),)](acc, grad, n, BLOCK=block, num_warps=warps,
                                                      enable_fp_fusion=_FP_FUSION_EXACT)  # acc + |g|: torch's add_
    return acc


# ---- top-k ----------------------------------------------------------------------------------
# (int view of the float bits, key bits, key of +inf)
_KEY_FORMAT = {
    torch.float16: (torch.int16, 15, 0x7C00),
    torch.bfloat16: (torch.int16, 15, 0x7F80),
    torch.float32: (torch.int32, 31, 0x7F800000),
    torch.float64: (torch.int64, 63, 0x7FF0000000000000),
}


def _topk_params() -> dict:
    if interpreting():
        return dict(block=128, block_warps=4, sample=256, tile=64, scan=32, seg_tile=64, small_warps=4)
    return dict(block=4096, block_warps=8, sample=4096, tile=128, scan=1024, seg_tile=128, small_warps=4)


def _radix_digits(key_bits: int) -> list[tuple[int, int]]:
    """(shift, width) of each radix pass, most significant digit first."""
    digits, hi = [], key_bits
    while hi > 0:
        w = min(_DIGIT_BITS, hi)
        digits.append((hi - w, w))
        hi -= w
    return digits


def _sample_plan(n: int, k: int, sample: int) -> tuple[int, int]:
    """(rank, capacity): the sampled lower bound is the rank-th largest of ``sample`` keys; the
    candidate buffer holds ``capacity`` entries. rank 0 = no sampling (every entry a candidate)."""
    p = k / n
    # #samples among the true top k ~ Binomial(sample, p): rank 4.5 sigma above its mean keeps
    # count(key >= L) >= k but with probability ~1e-5 (then one rerun with L = 0)
    rank = math.ceil(p * sample + 4.5 * math.sqrt(sample * p * (1.0 - p)) + 3.0)
    if n < 8 * sample or rank > sample // 2:
        return 0, n
    # count(key >= L) / n ~ Beta(rank, sample - rank + 1): mean rank / sample, sd ~ mean / sqrt(rank)
    expect = n * rank / sample
    return rank, min(n, math.ceil(expect * (1.0 + 5.0 / math.sqrt(rank))) + 1024)


def _topk_pipeline(scores: torch.Tensor, k: int, rank: int, cap: int, sample: int, out: torch.Tensor | None = None):
    """One run of the top-k pipeline (module docstring) with sampled-bound rank ``rank`` (0: every
    entry a candidate) and a candidate buffer of ``cap`` entries. Returns (indices, candidates
    found, NaN/Inf count); the indices are exact iff k <= candidates <= cap and no NaN/Inf."""
    prm = _topk_params()
    n = scores.numel()
    int_dtype, key_bits, inf_key = _KEY_FORMAT[scores.dtype]
    bits = scores.reshape(-1).view(int_dtype)
    digits = _radix_digits(key_bits)
    n_passes = len(digits)
    block = prm["block"]
    nblocks = triton.cdiv(n, block)
    ctrl_len = _CTRL_HIST + n_passes * _NBINS
    dev = scores.device

    ws = torch.empty(ctrl_len + 6 * nblocks, dtype=torch.int64, device=dev)  # control block + block stats
    cand_key = torch.empty(cap, dtype=torch.int64 if key_bits == 63 else torch.int32, device=dev)
    cand_off = torch.empty(cap, dtype=torch.int32, device=dev)
    if out is None:
        out = torch.empty(k, dtype=torch.int64, device=dev)

    _topk_sample_kernel[(1,)](bits, ws, n, k, rank, ctrl_len, KEY_BITS=key_bits, SAMPLE=sample,
                              ZERO_BLOCK=1024, num_warps=8, enable_fp_fusion=_FP_FUSION_EXACT)  # integer only
    _topk_compact_kernel[(nblocks,)](bits, ws, cand_key, cand_off, n, cap, nblocks, ctrl_len, KEY_BITS=key_bits,
                                     INF_KEY=inf_key, BLOCK=block, num_warps=prm["block_warps"],
                                     enable_fp_fusion=_FP_FUSION_EXACT)  # integer only
    tile = prm["tile"]
    n_prog = max(1, min(2 * sm_count(dev, off_gpu=_SMS_OFF_GPU), triton.cdiv(cap, 8 * tile)))
    chunk = triton.cdiv(triton.cdiv(cap, n_prog), tile) * tile
    n_prog = triton.cdiv(cap, chunk)
    assert chunk < 2**24  # per-program histogram counts are exact in fp32
    for p, (shift, width) in enumerate(digits):
        _topk_radix_pass_kernel[(n_prog,)](cand_key, ws, cap, chunk, p, shift, width, TILE=tile,
                                           num_warps=prm["small_warps"],
                                           enable_fp_fusion=_FP_FUSION_EXACT)  # exact one-hot counts
    _topk_count_kernel[(nblocks,)](cand_key, ws, nblocks, ctrl_len, n_passes, TILE=prm["seg_tile"],
                                   SCAN=prm["scan"], num_warps=prm["small_warps"],
                                   enable_fp_fusion=_FP_FUSION_EXACT)  # integer only
    _topk_write_kernel[(nblocks,)](cand_key, cand_off, ws, out, k, nblocks, ctrl_len, n_passes, BLOCK=block,
                                   TILE=prm["seg_tile"], num_warps=prm["small_warps"],
                                   enable_fp_fusion=_FP_FUSION_EXACT)  # integer only
    n_cand, n_nonfinite = ws[:2].tolist()  # the one host sync
    return out, n_cand, n_nonfinite


def _topk_abs_select_triton(scores: torch.Tensor, k: int, *, sample: int | None = None,
                            out: torch.Tensor | None = None, name: str = "scores") -> torch.Tensor:
    """``sample`` (sample size) and ``out`` (a preallocated int64 [k]) exist for tests."""
    n = scores.numel()
    sample = sample or _topk_params()["sample"]
    rank, cap = _sample_plan(n, k, sample)
    out, n_cand, n_nonfinite = _topk_pipeline(scores, k, rank, cap, sample, out)
    if n_nonfinite:
        raise ValueError(f"{name}: expected finite values, found {n_nonfinite} NaN/Inf entries")
    if n_cand < k:  # the sampled bound lay above the k-th largest key: every entry a candidate
        out, n_cand, _ = _topk_pipeline(scores, k, 0, n, sample, out)
    elif n_cand > cap:  # the buffer was too small (heavy ties at the bound): rerun at the exact size
        out, n_cand, _ = _topk_pipeline(scores, k, rank, n_cand, sample, out)
    return out


# ---- SDDMM ----------------------------------------------------------------------------------
_SDDMM_PLANS = None  # WeakIdKeyDictionary: rows tensor -> (signature, plan)
# the dense path forms dY^T X in fp32 row blocks of at most this many bytes, and of at most half the
# weight's own bytes: a SIFT step's transient memory stays well below a copy of the weight
_DENSE_BLOCK_BYTES = 1 << 28
_DENSE_BLOCK_FRACTION = 2
SDDMM_METHODS = ("auto", "sparse", "dense")


def _sddmm_params(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_E, BLOCK_T, N_SUB, num_warps, T_SLICE) of the chunk kernel: chunks of N_SUB * BLOCK_E
    entries, token slices of T_SLICE. BLOCK_T x element size = 128 bytes (one whole line per entry
    and operand per tile); T_SLICE x element size = 256 bytes, so that a chunk's R + C operand
    lines of one slice (~640 x 256 B at 1 %) stay in L1 while its sub-blocks sweep them. Fixed per
    dtype, not autotuned: an entry's summation order never depends on a timing, so results are
    bitwise reproducible across runs and processes."""
    if interpreting():
        return 16, 8, 2, 4, 16
    if dtype == torch.float64:
        return 64, 16, 16, 4, 32
    if dtype == torch.float32:
        return 128, 32, 8, 8, 64
    return 128, 64, 8, 16, 128


def sddmm_tile(k: int, d_out: int, d_in: int, chunk: int) -> tuple[int, int]:
    """(R, C): the W tile holding ~``chunk`` entries at this density (sides multiples of 16, square
    where the weight allows). A chunk then gathers R + C operand lines per T tile for ~chunk entries."""
    density = k / (d_out * d_in)
    side = math.sqrt(chunk / density)
    tile_r = min(d_out, max(16, 16 * math.ceil(side / 16)))
    tile_c = min(d_in, max(16, 16 * math.ceil(chunk / (density * tile_r) / 16)))
    return tile_r, tile_c


class _SDDMMPlan:
    """The entries of one index set in kernel order: tile-major over (R x C) tiles of W
    (``sddmm_tile``), row-major inside a tile, so a chunk's consecutive entries lie in one tile.
    Built once per index set (one argsort, no host sync)."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int, chunk: int):
        r = rows.long()
        c = cols.long()
        tile_r, tile_c = sddmm_tile(rows.numel(), d_out, d_in, chunk)
        n_tc = -(-d_in // tile_c)
        key = ((r // tile_r) * n_tc + c // tile_c) * (tile_r * tile_c) + (r % tile_r) * tile_c + c % tile_c
        order = torch.argsort(key, stable=True)
        self.e_row = r[order].to(torch.int32)
        self.e_col = c[order].to(torch.int32)
        self.e_pos = order
        self.tile_r, self.tile_c, self.d_out, self.d_in = tile_r, tile_c, d_out, d_in
        self._dense = None  # (rows per block, positions, flat indices, [(r0, r1, e0, e1)]), on first use

    def dense_blocks(self, rows_per_block: int):
        """The dense path's view of the entries: (positions, flat indices r*d_in + c) ordered by row,
        and its row blocks [r0, r1) with their entry ranges [e0, e1). One host read of the block
        boundaries when the weight needs several blocks; cached with the plan."""
        if self._dense is None or self._dense[0] != rows_per_block:
            r = self.e_row.long()
            order = torch.argsort(r, stable=True)
            pos, flat = self.e_pos[order], r[order] * self.d_in + self.e_col.long()[order]
            starts = list(range(0, self.d_out, rows_per_block))
            if len(starts) == 1:
                blocks = [(0, self.d_out, 0, flat.numel())]
            else:
                edges = torch.searchsorted(r[order], torch.tensor(starts + [self.d_out], device=r.device)).tolist()
                blocks = [(r0, min(r0 + rows_per_block, self.d_out), edges[i], edges[i + 1])
                          for i, r0 in enumerate(starts) if edges[i + 1] > edges[i]]
            self._dense = (rows_per_block, pos, flat, blocks)
        return self._dense[1], self._dense[2], self._dense[3]


def _sddmm_plan(rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int, chunk: int) -> _SDDMMPlan:
    """The plan of (rows, cols), cached per rows tensor (keyed on identity, version, data pointers
    and shapes): a training loop over one index set sorts once."""
    global _SDDMM_PLANS
    if _SDDMM_PLANS is None:
        from torch.utils.weak import WeakIdKeyDictionary

        _SDDMM_PLANS = WeakIdKeyDictionary()
    try:
        signature = (rows.data_ptr(), rows._version, cols.data_ptr(), cols._version, id(cols), rows.numel(), d_out,
                     d_in, chunk, rows.dtype, cols.dtype)
    except RuntimeError:  # no storage (fake/meta): nothing to remember
        return _SDDMMPlan(rows, cols, d_out, d_in, chunk)
    hit = _SDDMM_PLANS.get(rows)
    if hit is not None and hit[0] == signature:
        return hit[1]
    plan = _SDDMMPlan(rows, cols, d_out, d_in, chunk)
    _SDDMM_PLANS[rows] = (signature, plan)
    return plan


def _transposed_padded(t: torch.Tensor, ld: int) -> torch.Tensor:
    """t^T [d, T] with row stride ld >= T (a multiple of 16): every entry's T-run starts aligned."""
    n_tok, d = t.shape
    out = torch.empty(d, ld, dtype=t.dtype, device=t.device)
    out[:, :n_tok].copy_(t.t())
    return out


def sddmm_grid(T: int, k: int, block_e: int, n_sub: int, t_slice: int) -> tuple[int, int]:
    """(n_chunks, n_slices) of the chunk kernel's grid."""
    return -(-k // (n_sub * block_e)), -(-T // t_slice)


def _sddmm_sparse_triton(dy: torch.Tensor, x: torch.Tensor, plan: _SDDMMPlan,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """The chunk kernel, then the fixed-order sum over T-slices (module docstring)."""
    T = dy.shape[0]
    k = plan.e_row.numel()
    acc = acc_dtype(dy.dtype)
    block_e, block_t, n_sub, warps, t_slice = _sddmm_params(dy.dtype)
    ld = triton.cdiv(T, 16) * 16
    dyt = _transposed_padded(dy, ld)
    xt = _transposed_padded(x, ld)
    n_chunks, n_split = sddmm_grid(T, k, block_e, n_sub, t_slice)
    partial = torch.empty(n_split, k, dtype=acc, device=dy.device)
    _sddmm_chunk_kernel[(n_chunks, n_split)](
        dyt, xt, plan.e_row, plan.e_col, partial, T, k, ld,
        ACC_FP64=acc_fp64(dy.dtype), BLOCK_E=block_e, BLOCK_T=block_t, N_SUB=n_sub, T_SLICE=t_slice,
        num_warps=warps, enable_fp_fusion=_FP_FUSION_ACCURATE)  # dot products: fma = one rounding less per term
    if out is None:
        out = torch.empty(k, dtype=acc, device=dy.device)
    block, warps = _elementwise_block()
    _sddmm_reduce_kernel[(triton.cdiv(k, block),)](partial, plan.e_pos, out, k, n_split, BLOCK=block, num_warps=warps,
                                                    enable_fp_fusion=_FP_FUSION_ACCURATE)  # adds only: a reduction
    return out


def _matmul_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b accumulated and returned in ``acc`` (fp32/fp64). 16-bit operands on CUDA stay 16-bit
    on the tensor cores with an fp32 output (torch.mm's out_dtype); elsewhere they are upcast."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and acc == torch.float32:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without mm(..., out_dtype)
            pass
    return torch.mm(a.to(acc), b.to(acc))


def _sddmm_dense(dy: torch.Tensor, x: torch.Tensor, plan: _SDDMMPlan,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """out[m] = (dY^T X)[rows[m], cols[m]]: dense GEMMs over row blocks of W (``sddmm_dense_rows``),
    each gathered at its entries. Wins at high density / few tokens."""
    d_in = x.shape[1]
    acc = acc_dtype(dy.dtype)
    k = plan.e_row.numel()
    pos, flat, blocks = plan.dense_blocks(sddmm_dense_rows(plan.d_out, d_in, dy.element_size()))
    if out is None:
        out = torch.empty(k, dtype=acc, device=dy.device)
    for r0, r1, e0, e1 in blocks:
        block = _matmul_acc(dy[:, r0:r1].t(), x, acc)
        out[pos[e0:e1]] = block.view(-1)[flat[e0:e1] - r0 * d_in]
    return out


def sddmm_dense_rows(d_out: int, d_in: int, elem_bytes: int) -> int:
    """Rows of W per dense block: the fp32 (fp64) blocks within min(_DENSE_BLOCK_BYTES, weight bytes /
    2), in equal blocks rounded up to 128 rows (a GEMM tile) so that no block under-fills the GPU."""
    acc = 8 if elem_bytes == 8 else 4
    budget = max(1, min(_DENSE_BLOCK_BYTES, d_out * d_in * elem_bytes // _DENSE_BLOCK_FRACTION))
    n_blocks = (d_out * d_in * acc + budget - 1) // budget
    per_block = (d_out + n_blocks - 1) // n_blocks
    return min(d_out, (per_block + 127) // 128 * 128)


def _device_kind(device: torch.device) -> str:
    if device.type == "cuda" and "H200" in torch.cuda.get_device_name(device):
        return "h200"
    return "h100"


def sddmm_method(T: int, d_out: int, d_in: int, k: int, dtype: torch.dtype, device: torch.device) -> str:
    """"dense" where the performance model (kernels/_perf_model.py, docs/perf-model.md) predicts
    dY^T X + gather to be faster than the sparse kernel, else "sparse"."""
    from . import _perf_model

    elem = torch.finfo(dtype).bits // 8
    return "dense" if _perf_model.sddmm_prefers_dense(T, d_out, d_in, k, elem, device=_device_kind(device)) else "sparse"


def _sddmm_triton(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  out: torch.Tensor | None = None, method: str = "auto") -> torch.Tensor:
    """``out`` (a preallocated [k] of the accumulation dtype) exists for tests."""
    T, d_out = dy.shape
    d_in = x.shape[1]
    block_e, _, n_sub, _, _ = _sddmm_params(dy.dtype)
    plan = _sddmm_plan(rows, cols, d_out, d_in, block_e * n_sub)
    if method == "auto":
        method = sddmm_method(T, d_out, d_in, rows.numel(), dy.dtype, dy.device)
    if method == "dense":
        return _sddmm_dense(dy, x, plan, out)
    return _sddmm_sparse_triton(dy, x, plan, out)


# ---- merged write / AdamW -------------------------------------------------------------------
def _scatter_merged_triton(weight, flat_idx, w0_sel, delta):
    k = flat_idx.numel()
    block, warps = _elementwise_block()
    _scatter_merged_kernel[(triton.cdiv(k, block),)](weight, flat_idx, w0_sel, delta, k, BLOCK=block, num_warps=warps,
                                                      enable_fp_fusion=_FP_FUSION_EXACT)  # == (w0 + delta).to(dtype)
    return weight


def _sparse_adamw_step_triton(weight, flat_idx, w0_sel, delta, grad, exp_avg, exp_avg_sq, *, step, lr, beta1,
                              beta2, eps, weight_decay, maximize):
    k = flat_idx.numel()
    hyper = (1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, lr / (1.0 - beta1 ** step),
             math.sqrt(1.0 - beta2 ** step), eps)
    fp64 = delta.dtype == torch.float64
    hyper_t = torch.tensor(hyper, dtype=torch.float64, device=delta.device) if fp64 else delta
    block, warps = _elementwise_block()
    _sparse_adamw_kernel[(triton.cdiv(k, block),)](
        weight, flat_idx, w0_sel, delta, grad, exp_avg, exp_avg_sq, hyper_t, k, *hyper,
        MAXIMIZE=maximize, HYPER_FROM_PTR=fp64, BLOCK=block, num_warps=warps,
        enable_fp_fusion=_FP_FUSION_EXACT)  # torch.optim.AdamW's separately rounded mul/add/lerp


# ----------------------------------------------------------------------------------------------
# PyTorch references (tensors in, tensors out, no autograd): the CPU path and the test oracle
# ----------------------------------------------------------------------------------------------
def abs_accumulate_reference_(acc: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """acc.view(-1) += |grad.view(-1)| (accumulated in acc's dtype)."""
    acc.view(-1).add_(grad.reshape(-1).abs().to(acc.dtype))
    return acc


def topk_abs_select_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending flat indices of the k largest |scores|; among equal values the lower index wins.

    Exact threshold select: T = k-th largest |s|; keep every |s| > T and the lowest-index entries
    with |s| == T until k are kept. O(numel), no full sort."""
    a = scores.detach().reshape(-1).abs()
    threshold = torch.topk(a, k, sorted=False).values.min()
    above = a > threshold
    n_above = int(above.sum())
    ties = torch.nonzero(a == threshold).flatten()[: k - n_above]
    keep = above
    keep[ties] = True
    return torch.nonzero(keep).flatten()


def sddmm_at_indices_reference(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,
                               cols: torch.Tensor) -> torch.Tensor:
    """out[m] = sum_t dy[t, rows[m]] * x[t, cols[m]] in fp32 (fp64 for fp64 inputs), chunked over
    the entries so the dense dy.T @ x is never materialised."""
    acc = acc_dtype(dy.dtype)
    k = rows.numel()
    out = torch.empty(k, dtype=acc, device=dy.device)
    rows = rows.long()
    cols = cols.long()
    # [d, T] copies make every gathered operand a contiguous row (column gathers of [T, d] are strided)
    dy_t = dy.t().contiguous()
    x_t = x.t().contiguous()
    chunk = max(1, (1 << 24) // max(1, dy.shape[0]))  # bound the gathered [chunk, T] operands
    for s in range(0, k, chunk):
        r, c = rows[s:s + chunk], cols[s:s + chunk]
        out[s:s + chunk] = (dy_t.index_select(0, r).to(acc) * x_t.index_select(0, c).to(acc)).sum(1)
    return out


def scatter_merged_reference_(weight: torch.Tensor, flat_idx: torch.Tensor, w0_sel: torch.Tensor,
                              delta: torch.Tensor) -> torch.Tensor:
    """weight.view(-1)[flat_idx] = (w0_sel + delta) rounded once to weight.dtype."""
    weight.view(-1)[flat_idx.long()] = (w0_sel + delta).to(weight.dtype)
    return weight


def sparse_adamw_step_reference_(weight, flat_idx, w0_sel, delta, grad, exp_avg, exp_avg_sq, *, step, lr,
                                 beta1, beta2, eps, weight_decay, maximize=False) -> None:
    """torch.optim.AdamW's math on the k-vector delta (single-tensor form), then the weight write.

    delta *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    delta -= (lr / (1 - b1^step)) * m / (sqrt(v) / sqrt(1 - b2^step) + eps)."""
    g = -grad if maximize else grad
    delta.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    delta.addcdiv_(exp_avg, denom, value=-step_size)
    scatter_merged_reference_(weight, flat_idx, w0_sel, delta)


# ----------------------------------------------------------------------------------------------
# public dispatching functions
# ----------------------------------------------------------------------------------------------
_RANGE_CHECKED = None  # WeakIdKeyDictionary: index tensor -> signature of its last passed range check


def _check_index_range_once(name: str, idx: torch.Tensor, upper: int, what: str) -> None:
    """check_index_range (two host syncs on CUDA), skipped when this very tensor already passed it
    unchanged: same data pointer, version counter (bumped by every in-place write), size, bound.
    The index sets of a SIFT layer are fixed, so a training loop checks them once."""
    global _RANGE_CHECKED
    if _RANGE_CHECKED is None:
        from torch.utils.weak import WeakIdKeyDictionary

        _RANGE_CHECKED = WeakIdKeyDictionary()
    try:
        signature = (idx.data_ptr(), idx._version, idx.numel(), idx.dtype, idx.device, int(upper))
    except RuntimeError:  # a tensor without storage (fake/meta): nothing to remember
        check_index_range(name, idx, upper, what=what)
        return
    if _RANGE_CHECKED.get(idx) == signature:
        return
    check_index_range(name, idx, upper, what=what)
    _RANGE_CHECKED[idx] = signature


def abs_accumulate_(acc: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """acc (fp32 or fp64, contiguous, any shape) += |grad| elementwise, in place; grad any float
    dtype with acc.numel() elements (any shape, flattened row-major)."""
    check_tensor("acc", acc, dtypes=(torch.float32, torch.float64), contiguous=True)
    check_tensor("grad", grad, dtypes=FLOAT_DTYPES)
    check_same_device(acc=acc, grad=grad)
    if grad.numel() != acc.numel():
        raise ValueError(f"grad: expected {acc.numel()} elements (acc.numel()), got {grad.numel()} "
                         f"(shape {list(grad.shape)})")
    if acc.numel() == 0:
        return acc
    if use_triton(acc):
        return _abs_accumulate_triton(acc, grad.contiguous())
    return abs_accumulate_reference_(acc, grad)


def _check_k(k, numel: int) -> int:
    k = check_count("k", k, minimum=None)
    if not 1 <= k <= numel:
        raise ValueError(f"k: expected 1 <= k <= numel = {numel}, got {k}")
    return k


def topk_abs_select(scores: torch.Tensor, k: int, *, name: str = "scores") -> torch.Tensor:
    """Flat indices (into scores.flatten(), row-major) of the k entries with the largest |score|,
    ties to the lower index, returned ascending as int64 [k]. ValueError naming ``scores`` (or
    ``name``: a caller's own argument) on NaN/Inf and naming ``k`` unless 1 <= k <= numel."""
    check_tensor(name, scores, dtypes=FLOAT_DTYPES)
    k = _check_k(k, scores.numel())
    if use_triton(scores):
        return _topk_abs_select_triton(scores.detach().contiguous(), k, name=name)
    check_finite(name, scores)
    return topk_abs_select_reference(scores, k)


def _check_sddmm_args(dy, x, rows, cols):
    check_tensor("dy", dy, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("x", x, ndim=2, dtypes=(dy.dtype,))
    if x.shape[0] != dy.shape[0]:
        raise ValueError(f"x: expected {dy.shape[0]} rows (tokens, = dy.shape[0]), got shape {list(x.shape)}")
    check_tensor("rows", rows, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor("cols", cols, ndim=1, dtypes=INDEX_DTYPES, shape=(rows.numel(),))
    check_same_device(dy=dy, x=x, rows=rows, cols=cols)
    _check_index_range_once("rows", rows, dy.shape[1], what="row indices (dy.shape[1])")
    _check_index_range_once("cols", cols, x.shape[1], what="column indices (x.shape[1])")


def sddmm_at_indices(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, *,
                     method: str = "auto") -> torch.Tensor:
    """The sparse weight gradient: out[m] = sum_t dy[t, rows[m]] * x[t, cols[m]].

    dy [T, d_out], x [T, d_in] of one float dtype; rows, cols int32/int64 [k] (any order).
    Accumulates in fp32 and returns fp32 [k] (fp64 for fp64 inputs). ``method`` (Triton path):
    "sparse" (the chunk kernel; dy.T @ x is never formed), "dense" (dy.T @ x in row blocks, then a
    gather) or "auto": the one the performance model predicts faster (``sddmm_method``)."""
    if method not in SDDMM_METHODS:
        raise ValueError(f"method: expected one of {SDDMM_METHODS}, got {method!r}")
    _check_sddmm_args(dy, x, rows, cols)
    if rows.numel() == 0 or dy.shape[0] == 0:
        return torch.zeros(rows.numel(), dtype=acc_dtype(dy.dtype), device=dy.device)
    if use_triton(dy):
        return _sddmm_triton(dy, x, rows, cols, method=method)
    return sddmm_at_indices_reference(dy, x, rows, cols)


def _check_scatter_args(weight, flat_idx, w0_sel, delta):
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("flat_idx", flat_idx, ndim=1, dtypes=INDEX_DTYPES)
    k = flat_idx.numel()
    state_dtypes = (torch.float32, torch.float64) if weight.dtype == torch.float64 else (torch.float32,)
    check_tensor("w0_sel", w0_sel, dtypes=state_dtypes, shape=(k,), contiguous=True)
    check_tensor("delta", delta, dtypes=(w0_sel.dtype,), shape=(k,), contiguous=True)
    check_same_device(weight=weight, flat_idx=flat_idx, w0_sel=w0_sel, delta=delta)
    _check_index_range_once("flat_idx", flat_idx, weight.numel(), what="flat indices (weight.numel())")


def scatter_merged_(weight: torch.Tensor, flat_idx: torch.Tensor, w0_sel: torch.Tensor,
                    delta: torch.Tensor) -> torch.Tensor:
    """weight.view(-1)[flat_idx] = (w0_sel + delta) rounded to weight.dtype, in place.

    weight contiguous, any float dtype; flat_idx int32/int64 [k]; w0_sel, delta fp32 [k] (fp64
    allowed when weight is fp64)."""
    _check_scatter_args(weight, flat_idx, w0_sel, delta)
    if flat_idx.numel() == 0:
        return weight
    if use_triton(weight):
        return _scatter_merged_triton(weight, flat_idx.contiguous(), w0_sel, delta)
    return scatter_merged_reference_(weight, flat_idx, w0_sel, delta)


def sparse_adamw_step_(weight, flat_idx, w0_sel, delta, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2,
                       eps, weight_decay, maximize=False) -> None:
    """One fused AdamW step on delta (torch.optim.AdamW's math, decoupled decay on delta, i.e.
    decay toward W0), then weight.view(-1)[flat_idx] = round(w0_sel + delta); all in place.

    grad, exp_avg, exp_avg_sq, delta, w0_sel: fp32 [k] (fp64 allowed, all alike, when weight is
    fp64); step: the 1-based step count after its increment."""
    _check_scatter_args(weight, flat_idx, w0_sel, delta)
    k = flat_idx.numel()
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_tensor(name, t, dtypes=(delta.dtype,), shape=(k,), contiguous=True)
    check_same_device(weight=weight, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    if isinstance(step, bool) or not isinstance(step, numbers.Real):
        raise TypeError(f"step: expected a positive int (1-based step count), got {type(step).__name__} {step!r}")
    if not isinstance(step, numbers.Integral) and not (isinstance(step, float) and step.is_integer()):
        raise ValueError(f"step: expected a positive int (1-based step count), got {step!r}")
    step = int(step)
    if step < 1:
        raise ValueError(f"step: expected a positive int (1-based step count), got {step}")
    lr = check_real("lr", lr, lo=0.0)
    beta1 = check_real("beta1", beta1, lo=0.0, hi=1.0, hi_open=True)
    beta2 = check_real("beta2", beta2, lo=0.0, hi=1.0, hi_open=True)
    eps = check_real("eps", eps, lo=0.0)
    weight_decay = check_real("weight_decay", weight_decay, lo=0.0)
    check_flag("maximize", maximize)
    if k == 0:
        return None
    if use_triton(weight):
        _sparse_adamw_step_triton(weight, flat_idx.contiguous(), w0_sel, delta, grad, exp_avg, exp_avg_sq, step=step,
                                  lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                                  maximize=bool(maximize))
        return None
    sparse_adamw_step_reference_(weight, flat_idx, w0_sel, delta, grad, exp_avg, exp_avg_sq, step=step, lr=lr,
                                 beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=bool(maximize))
    return None
