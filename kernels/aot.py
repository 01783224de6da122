"""AoT P-Tuning kernels: the fused gather-add ``h + P[task, ids]`` and its table backward.

Shapes. ``hidden`` [..., d] with ``ids`` [...] (= hidden.shape[:-1]); ``table`` [V, d] or stacked
[T, V, d]; ``task_ids`` [B] (B = hidden.shape[0]), one task per sample, so token n of the flattened
batch reads table row ``task_ids[n // tokens_per_sample] * V + ids[n]``.

Forward: one pass, ``out[n, :] = h[n, :] + P[row(n), :]`` accumulated in fp32 (fp64 when either
operand is fp64) and rounded once to hidden's dtype, for every dtype pair (fp64 -> fp16/bf16
through fp32 rounded to odd, which makes the second rounding the exact one; see round_once);
``out`` may be ``hidden`` (in place). Work is cut by tokens (BLOCK_R per program), so skewed ids
only make table rows repeat (L2 hits), never a longer program. Rows whose id or task id is out of
range read nothing (bias 0, the reference too): a bad id can never cause an out-of-bounds read,
and the dispatching functions raise a clear error before any launch.

Backward into the table: ``dP[r] = sum_{n: row(n) = r} dY[n]``. The flat table rows of the tokens
are sorted once (stable) into a *segment plan*; segment s holds the tokens reading row
``seg_row[s]``, cut into chunks of K = segment_chunk() consecutive tokens (256 on a GPU, 16 under
the interpreter). One program per (chunk, column block) adds the chunk's gradient rows one after
the other in plan order in fp32 (fp64 for fp64 grad); a segment of one chunk is stored directly
(rounded once), the chunks of a longer one store their sums in a scratch buffer and a second
kernel adds them in chunk order and rounds once. Summation order, hence the bits, is fixed by the
plan and K alone (not by the autotune config): ``((c_0 + c_1) + ...) + c_m`` with c_i the
token-by-token sum of chunk i, both from +0 (segment_sums_kernel_order computes it in torch).
Deterministic, no atomics, only the rows that occur are written (never a row outside the output:
the rows of unvalidated bad ids are masked), and no program loops over more than K tokens: a pad
id holding half the batch is N / (2K) programs, not one serial loop.

Plan layout (int64, one tensor so it travels through custom ops), N tokens, U segments, with the
host bounds C = N // K + U chunk slots and R = N // (K + 1) reduce slots (plan_sizes):
``[perm (N) | seg_row (U) | seg_count (U) | chunk_start, chunk_count, chunk_seg, chunk_row,
chunk_part (C each) | red_first, red_n, red_seg, red_row (R each)]``. ``perm`` sorts the tokens by
row. Segments are laid out longest first (ties in segment order): chunk slot c reduces
``perm[chunk_start[c] : chunk_start[c] + chunk_count[c]]`` of segment ``chunk_seg[c]`` (table row
``chunk_row[c]``), into the output when ``chunk_part[c]`` is 0, else into scratch row c (the
multi-chunk segments come first, so their chunks are slots 0, 1, ...). Reduce slot j adds scratch
rows ``red_first[j] ... + red_n[j] - 1`` into segment ``red_seg[j]`` / row ``red_row[j]``. Slots past
the real counts hold seg -1 / n 0 and write nothing, so every size is known on the host while the
contents are computed on the device (pack_plan: no host sync). A segment may be empty (count 0,
one chunk that writes a zero row): AoT's training step sizes its per-batch table by a bound.
"""
from __future__ import annotations

import math
import numbers

import torch

from ._checks import (FLOAT_DTYPES, INDEX_DTYPES, check_count, check_flag, check_index_range, check_same_device,
                      check_tensor)
from ._common import acc_dtype, acc_fp64
from ._dispatch import HAS_TRITON, autotune, interpreting, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "gather_add", "gather_add_reference", "table_grad_rows", "table_grad_rows_reference",
    "table_grad_dense", "table_grad_dense_reference", "segment_plan", "pack_plan", "flat_table_rows",
    "plan_num_segments", "plan_shift_rows", "plan_sizes", "segment_chunk", "segment_sums_kernel_order", "round_once",
    "check_gather_add_args", "check_plan", "check_float_dtype", "check_count", "check_flag",
    "check_grad_args", "check_task_tensor", "internal_overlap",
]

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _fp32_round_to_odd(s):
        """fp64 ``s`` -> fp32 rounded to odd (truncate, set the last bit if inexact): the round to 16
        bits after it is then the one rounding of s (round_once; triton's interpreter breaks a direct
        fp64 -> bf16 cast)."""
        f = s.to(tl.float32)
        back = f.to(tl.float64)
        bits = f.to(tl.int32, bitcast=True) - (tl.abs(back) > tl.abs(s)).to(tl.int32)
        return (bits | (back != s).to(tl.int32)).to(tl.float32, bitcast=True)

    # a memory-bound add: one tile shape per width regime is enough (d >= 1024: whole 1024-column rows,
    # 1 or 4 at a time; d ~ 512; narrow d: 16 rows of 128); each extra config is one more compile and
    # benchmark per (d, n_bucket) on a user's first call
    _GATHER_ADD_CONFIGS = [
        triton.Config({"BLOCK_R": r, "BLOCK_D": c}, num_warps=w)
        for r, c, w in [(1, 1024, 4), (4, 1024, 8), (4, 512, 4), (16, 128, 4)]
    ]

    @autotune(
        configs=_GATHER_ADD_CONFIGS,
        key=["d", "n_bucket"],
        interpret_config=triton.Config({"BLOCK_R": 8, "BLOCK_D": 64}),
        restore_value=["out_ptr"],  # in place (out is h): tuning must not add the bias twice
    )
    # token counts only bound masks / pick autotune buckets: not specialized, so a new batch
    # shape never recompiles (see docs/gpu-verification.md)
    @triton.jit(do_not_specialize=["n_rows", "tokens_per_sample", "n_bucket"])
    def _gather_add_kernel(
        h_ptr, out_ptr, ids_ptr, table_ptr, task_ptr,
        n_rows, d, vocab, n_tasks, tokens_per_sample,
        stride_h, stride_o, stride_tt, stride_tv, n_bucket,
        HAS_TASK: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n_col_blocks = tl.cdiv(d, BLOCK_D)
        row_block = pid // n_col_blocks
        col_block = pid % n_col_blocks
        rows = row_block.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = col_block * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = rows < n_rows
        col_ok = cols < d
        ids = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        hit = row_ok & (ids >= 0) & (ids < vocab)
        table_row = ids * stride_tv
        if HAS_TASK:
            task = tl.load(task_ptr + rows // tokens_per_sample, mask=row_ok, other=0).to(tl.int64)
            hit = hit & (task >= 0) & (task < n_tasks)
            table_row += task * stride_tt
        mask = row_ok[:, None] & col_ok[None, :]
        # h streams through once; table rows recur (frequent tokens): keep those in L2 longer
        h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0,
                    eviction_policy="evict_first")
        p = tl.load(table_ptr + table_row[:, None] + cols[None, :], mask=hit[:, None] & col_ok[None, :], other=0.0,
                    eviction_policy="evict_last")
        acc_t = tl.float64 if ACC_FP64 else tl.float32
        s = h.to(acc_t) + p.to(acc_t)
        if ACC_FP64:
            if out_ptr.dtype.element_ty.primitive_bitwidth < 32:  # 16-bit hidden, fp64 table
                s = _fp32_round_to_odd(s)  # then one rounding to 16 bits
        tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], s.to(out_ptr.dtype.element_ty), mask=mask)

    # The segment sum adds gradient rows one by one, in plan order, into a [BLOCK_D] accumulator:
    # every column's summation order is the plan's, whatever config the autotuner picks (two
    # processes may pick different ones), so the result is bitwise the same. A 2-D [BLOCK_R,
    # BLOCK_D] accumulator reduced over its rows at the end would make the order (and the last
    # bits) depend on BLOCK_R and, on the GPU, on the reduction's layout (BLOCK_D, warps). BLOCK_R
    # is the number of rows loaded per step (an unrolled loop: loads in flight), kept at one value
    # anyway; only the column block and the warps are tuned.
    #
    # Skew: one program per chunk of at most segment_chunk() tokens (not per segment), so a pad id
    # holding half the batch is many programs instead of one long serial loop. A segment of one
    # chunk is stored directly; the chunks of a longer one store fp32 (fp64) partials, which
    # _segment_reduce_kernel adds in chunk order and rounds once.
    _SEGMENT_ROWS = 8
    _SEGMENT_SUM_CONFIGS = [
        triton.Config({"BLOCK_R": _SEGMENT_ROWS, "BLOCK_D": c}, num_warps=w)
        for c, w in [(128, 1), (256, 2), (512, 4), (1024, 8), (2048, 16)]  # (1024, 4), (2048, 8) made ptxas spill
    ]

    @autotune(
        configs=_SEGMENT_SUM_CONFIGS,
        key=["d"],
        interpret_config=triton.Config({"BLOCK_R": _SEGMENT_ROWS, "BLOCK_D": 64}),
    )
    # token counts only bound masks / pick autotune buckets: not specialized, so a new batch
    # shape never recompiles (see docs/gpu-verification.md)
    @triton.jit(do_not_specialize=["n_tokens", "n_segments", "n_chunks", "n_out_rows"])
    def _segment_sum_kernel(
        g_ptr, plan_ptr, out_ptr, part_ptr,
        n_tokens, n_segments, n_chunks, n_out_rows, d, stride_g, stride_o, stride_p,
        ROW_FROM_PLAN: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n_col_blocks = tl.cdiv(d, BLOCK_D)
        chunk = (pid // n_col_blocks).to(tl.int64)
        col_block = pid % n_col_blocks
        table = plan_ptr + n_tokens + 2 * n_segments  # chunk_start | chunk_count | chunk_seg | chunk_row | chunk_part
        start = tl.load(table + chunk)
        count = tl.load(table + n_chunks + chunk).to(tl.int32)
        seg = tl.load(table + 2 * n_chunks + chunk)
        if ROW_FROM_PLAN:
            out_row = tl.load(table + 3 * n_chunks + chunk)
        else:
            out_row = seg
        part = tl.load(table + 4 * n_chunks + chunk)  # 1: a partial of a longer segment, 0: the whole segment
        cols = col_block * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        acc = tl.zeros([BLOCK_D], dtype=tl.float64 if ACC_FP64 else tl.float32)
        for k in range(0, count, BLOCK_R):  # an unused slot (seg < 0) has count 0
            for r in tl.static_range(BLOCK_R):  # token order; BLOCK_R row loads in flight
                # past the chunk's end: re-read its last row (count >= 1) and add +0.0 instead,
                # exact since acc starts at +0 and so is never -0; the loads then share col_ok
                # as their mask (per-row masks made ptxas spill predicates)
                src = tl.load(plan_ptr + start + tl.minimum(k + r, count - 1))
                g = tl.load(g_ptr + src * stride_g + cols, mask=col_ok, other=0.0, eviction_policy="evict_first")
                acc += tl.where(k + r < count, g.to(acc.dtype), 0.0)
        # the program's conditions as a column bound (cols < 0 stores nothing): a scalar predicate
        # and-ed into a vector mask breaks triton's interpreter (an int32 mask)
        used = seg >= 0
        part_cols = tl.where(used & (part != 0), d, 0)
        tl.store(part_ptr + chunk * stride_p + cols, acc, mask=cols < part_cols)
        if ACC_FP64:
            if out_ptr.dtype.element_ty.primitive_bitwidth < 32:  # fp64 gradient into a 16-bit table
                acc = _fp32_round_to_odd(acc)  # then one rounding to 16 bits
        out_cols = tl.where(used & (part == 0) & (out_row >= 0) & (out_row < n_out_rows), d, 0)  # no row outside out
        tl.store(out_ptr + out_row * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < out_cols)

    # the second pass reads <= N / chunk partials per segment, contiguous rows: a narrow column
    # block gives the few long segments more programs
    _SEGMENT_REDUCE_CONFIGS = [
        triton.Config({"BLOCK_R": _SEGMENT_ROWS, "BLOCK_D": c}, num_warps=w)
        for c, w in [(128, 1), (256, 2), (512, 4), (1024, 8)]
    ]

    @autotune(
        configs=_SEGMENT_REDUCE_CONFIGS,
        key=["d"],
        interpret_config=triton.Config({"BLOCK_R": 4, "BLOCK_D": 64}),
    )
    @triton.jit(do_not_specialize=["n_tokens", "n_segments", "n_chunks", "n_reduce", "n_out_rows"])
    def _segment_reduce_kernel(
        part_ptr, plan_ptr, out_ptr,
        n_tokens, n_segments, n_chunks, n_reduce, n_out_rows, d, stride_p, stride_o,
        ROW_FROM_PLAN: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n_col_blocks = tl.cdiv(d, BLOCK_D)
        slot = (pid // n_col_blocks).to(tl.int64)
        col_block = pid % n_col_blocks
        table = plan_ptr + n_tokens + 2 * n_segments + 5 * n_chunks  # red_first | red_n | red_seg | red_row
        first = tl.load(table + slot)
        n = tl.load(table + n_reduce + slot).to(tl.int32)
        if ROW_FROM_PLAN:
            out_row = tl.load(table + 3 * n_reduce + slot)
        else:
            out_row = tl.load(table + 2 * n_reduce + slot)
        cols = col_block * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        acc = tl.zeros([BLOCK_D], dtype=tl.float64 if ACC_FP64 else tl.float32)
        for k in range(0, n, BLOCK_R):  # an unused slot has n = 0
            for r in tl.static_range(BLOCK_R):  # chunk order, as in _segment_sum_kernel
                row = first + tl.minimum(k + r, n - 1)
                p = tl.load(part_ptr + row * stride_p + cols, mask=col_ok, other=0.0, eviction_policy="evict_first")
                acc += tl.where(k + r < n, p, 0.0)
        if ACC_FP64:
            if out_ptr.dtype.element_ty.primitive_bitwidth < 32:
                acc = _fp32_round_to_odd(acc)
        out_cols = tl.where((n > 0) & (out_row >= 0) & (out_row < n_out_rows), d, 0)
        tl.store(out_ptr + out_row * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < out_cols)


# ----------------------------------------------------------------------------------------------
# launchers (inputs already validated; 2-D row views with unit column stride)
# ----------------------------------------------------------------------------------------------
# FP contraction, explicit per launch (triton's default flips in 3.10). Neither kernel multiplies
# (there is nothing to contract), so off: the gather-add is claimed equal to the separately
# rounded torch add (hidden.to(acc) + bias.to(acc)), and the segment sum's adds then compile the
# same under any default.
_FP_FUSION_GATHER_ADD = False
_FP_FUSION_SEGMENT_SUM = False


def round_once(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` (an fp32/fp64 sum) rounded once, to nearest even, to ``dtype``.

    torch casts fp64 -> fp16/bf16 through fp32 (two roundings); here the fp32 step rounds to odd
    (truncate, set the last bit when inexact), after which the 16-bit round is the exact one (fp32
    keeps >= 2 more bits than fp16/bf16): what the kernels store, bit for bit."""
    if t.dtype != torch.float64 or dtype not in (torch.float16, torch.bfloat16):
        return t.to(dtype)
    f = t.to(torch.float32)
    back = f.to(torch.float64)
    bits = f.view(torch.int32) - (back.abs() > t.abs()).to(torch.int32)
    bits = bits | (back != t).to(torch.int32)
    return bits.view(torch.float32).to(dtype)


def _table_geometry(table: torch.Tensor) -> tuple[int, int, int, int]:
    """(n_tasks, vocab, stride_task, stride_row) of a [V, d] or [T, V, d] table."""
    if table.dim() == 2:
        return 1, table.shape[0], 0, table.stride(0)
    return table.shape[0], table.shape[1], table.stride(0), table.stride(1)


def _launch_gather_add(h2, ids1, table, task_ids, tokens_per_sample, out2):
    n_rows, d = h2.shape
    if n_rows == 0:
        return out2
    n_tasks, vocab, stride_tt, stride_tv = _table_geometry(table)
    has_task = task_ids is not None

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_R"]) * triton.cdiv(d, meta["BLOCK_D"]),)

    _gather_add_kernel[grid](
        h2, out2, ids1, table, task_ids if has_task else ids1,
        n_rows, d, vocab, n_tasks, max(int(tokens_per_sample), 1),
        h2.stride(0), out2.stride(0), stride_tt, stride_tv, min(next_pow2(n_rows), 1 << 16),
        HAS_TASK=has_task, ACC_FP64=acc_fp64(h2.dtype, table.dtype),
        enable_fp_fusion=_FP_FUSION_GATHER_ADD,  # elementwise add, as the torch reference
    )
    return out2


def segment_chunk() -> int:
    """Tokens per program of the table backward (a fixed size: it fixes the summation order, see
    the module docstring). Small under the interpreter, so that tests cover many chunks."""
    return 16 if interpreting() else 256


def plan_sizes(n_tokens: int, n_segments: int) -> tuple[int, int, int]:
    """(chunk slots C, reduce slots R, scratch rows) of a plan: host bounds, no data needed.

    With K = segment_chunk(): Σ_s max(1, ceil(c_s / K)) <= N // K + U chunks; at most N // (K + 1)
    segments have more than one chunk; their chunks number at most N // K + N // (K + 1)."""
    k = segment_chunk()
    n_reduce = n_tokens // (k + 1)
    return n_tokens // k + n_segments, n_reduce, n_tokens // k + n_reduce


def _launch_segment_sum(g2, plan, n_segments, out2, row_from_plan, configs=None):
    """Both passes of the table backward into out2 [n_out_rows, d]. ``configs``: (sum, reduce)
    triton.Config pair run directly instead of the autotuner's pick (tests)."""
    n_tokens, d = g2.shape
    if n_segments == 0:
        return out2
    n_chunks, n_reduce, n_scratch = plan_sizes(n_tokens, n_segments)
    acc_fp = acc_fp64(g2.dtype)
    scratch = torch.empty(max(n_scratch, 1), d, dtype=torch.float64 if acc_fp else torch.float32, device=g2.device)
    sizes = dict(n_tokens=n_tokens, n_segments=n_segments, n_chunks=n_chunks, n_out_rows=out2.shape[0], d=d)
    flags = dict(ROW_FROM_PLAN=row_from_plan, ACC_FP64=acc_fp,
                 enable_fp_fusion=_FP_FUSION_SEGMENT_SUM)  # adds only

    def grid(rows):
        return lambda meta: (rows * triton.cdiv(d, meta["BLOCK_D"]),)

    def launch(kernel, rows, cfg, *args, **kw):
        if cfg is None:
            kernel[grid(rows)](*args, **kw)
        else:
            kernel.fn[(rows * triton.cdiv(d, cfg.kwargs["BLOCK_D"]),)](*args, **kw, **cfg.kwargs,
                                                                      num_warps=cfg.num_warps)

    sum_cfg, reduce_cfg = configs or (None, None)
    launch(_segment_sum_kernel, n_chunks, sum_cfg, g2, plan, out2, scratch, **sizes,
           stride_g=g2.stride(0), stride_o=out2.stride(0), stride_p=scratch.stride(0), **flags)
    if n_reduce:
        launch(_segment_reduce_kernel, n_reduce, reduce_cfg, scratch, plan, out2, **sizes, n_reduce=n_reduce,
               stride_p=scratch.stride(0), stride_o=out2.stride(0), **flags)
    return out2


# ----------------------------------------------------------------------------------------------
# PyTorch references (tensors in, tensors out, no autograd)
# ----------------------------------------------------------------------------------------------
def _token_tasks(ids: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Task of every token, shaped like ids (task_ids[b] repeated over sample b's tokens)."""
    if task_ids is None:
        return None
    per = ids.numel() // max(task_ids.numel(), 1)
    return task_ids.long().repeat_interleave(per).view(ids.shape)


def flat_table_rows(ids: torch.Tensor, task_ids: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """Row of the flattened [T·V, d] table each token reads: task·V + id, int64 [N]."""
    rows = ids.reshape(-1).long()
    tasks = _token_tasks(ids, task_ids)
    if tasks is not None:
        rows = tasks.reshape(-1) * vocab + rows
    return rows


def gather_add_reference(hidden, ids, table, task_ids=None):
    """hidden + table[task_ids[b], ids[b, s]], summed in fp32 (fp64 if an operand is fp64),
    rounded once to hidden's dtype. An out-of-range id or task id adds nothing (as the kernel)."""
    acc = acc_dtype(hidden.dtype, table.dtype)
    table3 = table if table.dim() == 3 else table.unsqueeze(0)
    n_tasks, vocab = table3.shape[0], table3.shape[1]
    tasks = _token_tasks(ids, task_ids)
    if tasks is None:
        tasks = torch.zeros_like(ids, dtype=torch.long)
    ids = ids.long()
    hit = (ids >= 0) & (ids < vocab) & (tasks >= 0) & (tasks < n_tasks)
    if ids.numel() == 0:
        return hidden.clone()
    bias = table3[tasks.clamp(0, n_tasks - 1), ids.clamp(0, vocab - 1)]
    bias = torch.where(hit[..., None], bias.to(acc), 0.0)
    return round_once(hidden.to(acc) + bias, hidden.dtype)


def _split_plan(plan: torch.Tensor, n_tokens: int):
    """(perm, seg_row, seg_count) views of a plan."""
    u = plan_num_segments(plan, n_tokens)
    return plan[:n_tokens], plan[n_tokens:n_tokens + u], plan[n_tokens + u:n_tokens + 2 * u]


def _chunk_tables(plan: torch.Tensor, n_tokens: int):
    """([5, C] chunk_start, chunk_count, chunk_seg, chunk_row, chunk_part; [4, R] red_first, red_n,
    red_seg, red_row) views of a plan."""
    u = plan_num_segments(plan, n_tokens)
    n_chunks, n_reduce, _ = plan_sizes(n_tokens, u)
    base = n_tokens + 2 * u
    return (plan[base:base + 5 * n_chunks].view(5, n_chunks),
            plan[base + 5 * n_chunks:base + 5 * n_chunks + 4 * n_reduce].view(4, n_reduce))


def segment_sums_kernel_order(grad2: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
    """The table backward's segment sums [U, d] (fp32, fp64 for fp64 grad) added in exactly the
    kernels' order, for bitwise tests: every chunk token by token from +0, then a longer segment's
    chunk partials in chunk order from +0. Vectorised over chunks: one step per token position."""
    n, d = grad2.shape
    acc = acc_dtype(grad2.dtype)
    u = plan_num_segments(plan, n)
    perm = plan[:n]
    (c_start, c_count, c_seg, _, c_part), (r_first, r_n, r_seg, _) = _chunk_tables(plan, n)
    g = grad2.to(acc)
    part = torch.zeros(c_start.numel(), d, dtype=acc, device=grad2.device)
    for j in range(int(c_count.max()) if c_count.numel() else 0):
        rows = g[perm[(c_start + j).clamp(0, max(n - 1, 0))]]
        part += torch.where((j < c_count)[:, None], rows, 0.0)
    out = torch.zeros(u, d, dtype=acc, device=grad2.device)
    direct = (c_seg >= 0) & (c_part == 0)
    out[c_seg[direct]] = part[direct]
    total = torch.zeros(r_first.numel(), d, dtype=acc, device=grad2.device)
    for j in range(int(r_n.max()) if r_n.numel() else 0):
        total += torch.where((j < r_n)[:, None], part[(r_first + j).clamp(0, part.shape[0] - 1)], 0.0)
    out[r_seg[r_n > 0]] = total[r_n > 0]
    return out


def table_grad_rows_reference(grad, ids, vocab, task_ids=None, dtype=torch.float32, plan=None):
    """(rows [U] int64 ascending, sums [U, d] in ``dtype``): the gradient of every table row that
    occurs, rows indexing the flattened [T·V, d] table. Sorted segment sums (deterministic),
    accumulated in fp32 (fp64 for fp64 grad); ``plan`` (segment_plan of these ids) skips the sort."""
    d = grad.shape[-1]
    acc = acc_dtype(grad.dtype)
    g2 = grad.reshape(-1, d)
    if plan is None:
        sorted_rows, perm = torch.sort(flat_table_rows(ids, task_ids, vocab), stable=True)
        rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    else:
        perm, rows, counts = _split_plan(plan, g2.shape[0])
    if rows.numel() == 0:
        return rows, grad.new_zeros(0, d, dtype=dtype)
    sums = torch.segment_reduce(g2[perm].to(acc), "sum", lengths=counts, axis=0)
    return rows, round_once(sums, dtype)


def table_grad_dense_reference(grad, ids, table_shape, task_ids=None, dtype=torch.float32, plan=None):
    """The table-shaped gradient: the rows of table_grad_rows_reference, zeros elsewhere (no
    zero fill when every row occurs)."""
    table_shape = tuple(table_shape)
    vocab, d = table_shape[-2], table_shape[-1]
    rows, sums = table_grad_rows_reference(grad, ids, vocab, task_ids, dtype, plan)
    n_rows = math.prod(table_shape[:-1])
    if rows.numel() == n_rows:
        return sums.view(table_shape)
    out = torch.zeros(table_shape, dtype=dtype, device=grad.device)
    out.view(-1, d).index_copy_(0, rows, sums)
    return out


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def check_float_dtype(name: str, dtype) -> torch.dtype:
    """``dtype`` is a floating torch.dtype (an integer one would silently truncate sums)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name}: expected a floating torch.dtype, got {type(dtype).__name__} {dtype!r}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype ({', '.join(map(str, FLOAT_DTYPES))}), got {dtype}")
    return dtype


def internal_overlap(t: torch.Tensor) -> bool:
    """Several elements share memory (a stride 0 over a dim > 1, e.g. expand()): not writable."""
    return any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))


def check_task_tensor(task_ids, ids) -> None:
    check_tensor("task_ids", task_ids, ndim=1, dtypes=INDEX_DTYPES)
    if ids.dim() < 1 or task_ids.numel() != ids.shape[0]:
        raise ValueError(f"task_ids: expected one task per sample, shape [{ids.shape[0] if ids.dim() else 1}], "
                         f"got {list(task_ids.shape)}")


def check_gather_add_args(hidden, ids, table, task_ids, *, values: bool = True) -> None:
    """Shapes, dtypes, devices (and with ``values`` the id ranges, one host sync) of a gather-add.

    Raises TypeError/ValueError/IndexError naming the offending argument."""
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    check_tensor("input_ids", ids, dtypes=INDEX_DTYPES)
    check_tensor("table", table, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    if task_ids is not None:
        check_tensor("task_ids", task_ids, ndim=1, dtypes=INDEX_DTYPES)
    if hidden.dim() < 1:
        raise ValueError(f"hidden: expected shape [..., d], got {list(hidden.shape)}")
    if tuple(ids.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"input_ids: expected shape {list(hidden.shape[:-1])} (hidden.shape[:-1]), "
                         f"got {list(ids.shape)}")
    d = hidden.shape[-1]
    if table.shape[-1] != d:
        raise ValueError(f"table: hidden size {table.shape[-1]} does not match hidden's {d} "
                         f"(table shape {list(table.shape)})")
    if d == 0:
        raise ValueError("hidden: hidden size must be at least 1")
    check_same_device(hidden=hidden, input_ids=ids, table=table, task_ids=task_ids)
    n_tasks, vocab = (1, table.shape[0]) if table.dim() == 2 else (table.shape[0], table.shape[1])
    if n_tasks * vocab == 0 and ids.numel() > 0:
        raise ValueError(f"table: no rows (shape {list(table.shape)}) for {ids.numel()} token ids")
    if task_ids is not None:
        if table.dim() != 3:
            raise ValueError(f"task_ids: given, but table is a single task's [V, d] table (shape {list(table.shape)}); "
                             "stack tasks into [n_tasks, V, d]")
        check_task_tensor(task_ids, ids)
    elif table.dim() == 3 and n_tasks != 1:
        raise ValueError(f"task_ids: required for a stacked table of {n_tasks} tasks (shape {list(table.shape)})")
    if values:
        check_index_range("input_ids", ids, vocab, what=f"token ids (vocabulary of the table, V = {vocab})")
        if task_ids is not None:
            check_index_range("task_ids", task_ids, n_tasks, what=f"task ids (the table stacks {n_tasks} tasks)")


def _rows_view(t: torch.Tensor, d: int) -> torch.Tensor:
    """t as [N, d] with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, d)
    if t2.stride(-1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < d):
        t2 = t2.contiguous()
    return t2


def _writable_rows(t: torch.Tensor, d: int) -> torch.Tensor | None:
    """A [N, d] view of t (unit column stride, rows not overlapping) to write into, or None."""
    try:
        t2 = t.view(-1, d)
    except RuntimeError:
        return None
    if t2.stride(-1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < d):
        return None
    return t2


def _table_view(table: torch.Tensor) -> torch.Tensor:
    return table if table.stride(-1) == 1 else table.contiguous()


def _tokens_per_sample(ids: torch.Tensor, task_ids: torch.Tensor | None) -> int:
    if task_ids is None or task_ids.numel() == 0:
        return 1
    return ids.numel() // task_ids.numel()


# ----------------------------------------------------------------------------------------------
# public dispatching functions
# ----------------------------------------------------------------------------------------------
def gather_add(hidden, ids, table, task_ids=None, *, out=None, validate: bool = True):
    """``out = hidden + table[task_ids[b], ids]`` in one pass (see module docstring).

    hidden [..., d] float; ids [...] int32/int64; table [V, d] or [T, V, d] float (any float
    dtype, mixed with hidden's allowed); task_ids [B] (required iff T > 1). ``out``: None (new
    tensor of hidden's shape and dtype) or a tensor of that shape and dtype, ``hidden`` itself
    included (in place). ``validate=False`` skips the id range check (no host sync); rows with
    bad ids then get no bias instead of reading out of bounds on the Triton path.
    """
    check_flag("validate", validate)
    check_gather_add_args(hidden, ids, table, task_ids, values=validate)
    if out is not None:
        check_tensor("out", out, dtypes=(hidden.dtype,), shape=list(hidden.shape), device=hidden.device)
        if internal_overlap(out):
            raise ValueError(f"out: elements share memory (strides {out.stride()}, an expand()?): cannot be written; "
                             "pass a tensor of its own (e.g. .clone())")
    d = hidden.shape[-1]
    if not use_triton(hidden):
        res = gather_add_reference(hidden, ids, table, task_ids)
        if out is None:
            return res
        return out.copy_(res)
    h2 = _rows_view(hidden, d)
    if out is None:
        target = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        o2 = target.view(-1, d)
    else:
        target = out
        o2 = _writable_rows(out, d)
    copy_back = o2 is None
    if copy_back:  # out cannot be viewed as rows: write a private buffer (h2 itself when in place)
        o2 = h2 if (out is hidden and h2.data_ptr() != hidden.data_ptr()) else torch.empty_like(h2)
    ids1 = ids.reshape(-1)
    if not ids1.is_contiguous():
        ids1 = ids1.contiguous()
    tasks = task_ids.contiguous() if task_ids is not None else None
    _launch_gather_add(h2, ids1, _table_view(table), tasks, _tokens_per_sample(ids, task_ids), o2)
    if copy_back:
        target.copy_(o2.view(hidden.shape))
    return target


def pack_plan(perm: torch.Tensor, seg_row: torch.Tensor, seg_count: torch.Tensor) -> torch.Tensor:
    """A segment plan (layout in the module docstring) from the token order, the segments' rows
    (ascending) and their token counts: device work only, no host sync. A segment may be empty
    (count 0, the padding of a plan sized by a bound): its one chunk writes a zero row."""
    perm, seg_row, count = perm.long(), seg_row.long(), seg_count.long()
    n, u = perm.numel(), count.numel()
    if u == 0:
        return torch.cat([perm, seg_row, count])
    k = segment_chunk()
    n_chunks, n_reduce, _ = plan_sizes(n, u)
    dev = perm.device
    start = torch.cumsum(count, 0) - count
    # longest first: the chunks of multi-chunk segments take slots 0, 1, ... (their scratch rows)
    # and their programs start first; ties in segment order
    order = torch.argsort(count, descending=True, stable=True)
    n_ch = ((count + (k - 1)) // k).clamp(min=1)[order]
    end = torch.cumsum(n_ch, 0)  # the segment at position p owns chunk slots [end[p] - n_ch[p], end[p])
    slot = torch.arange(n_chunks, device=dev)
    p = torch.searchsorted(end, slot, right=True)
    used = p < u  # slots past the real number of chunks: seg -1, count 0 (their programs write nothing)
    p = p.clamp(max=u - 1)
    seg = order[p]
    j = slot - (end - n_ch)[p]
    chunks = [torch.where(used, start[seg] + j * k, 0), torch.where(used, (count[seg] - j * k).clamp(0, k), 0),
              torch.where(used, seg, -1), torch.where(used, seg_row[seg], -1), (used & (n_ch[p] > 1)).long()]
    q = torch.arange(n_reduce, device=dev)
    multi = (q < u) & (n_ch[q.clamp(max=u - 1)] > 1)  # the first positions: all multi-chunk segments
    q = q.clamp(max=u - 1)
    reduce = [torch.where(multi, end[q] - n_ch[q], 0), torch.where(multi, n_ch[q], 0),
              torch.where(multi, order[q], -1), torch.where(multi, seg_row[order[q]], -1)]
    return torch.cat([perm, seg_row, count, *chunks, *reduce])


def segment_plan(flat_rows: torch.Tensor) -> torch.Tensor:
    """The segment plan (layout in the module docstring) of the table rows tokens read.

    One stable sort of the N rows plus a unique pass (one host sync, for U). Reuse the plan for
    every backward that shares the ids (e.g. all layers of a model in one step). The AoT model's
    training step builds its plan without the sync (peftops/aot.py, AoTBias.capture)."""
    check_tensor("flat_rows", flat_rows, ndim=1, dtypes=INDEX_DTYPES)
    sorted_rows, perm = torch.sort(flat_rows.long(), stable=True)
    seg_row, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    return pack_plan(perm, seg_row, counts)


def plan_shift_rows(plan: torch.Tensor, n_tokens: int, offset: int) -> torch.Tensor:
    """The plan with every segment's row moved by ``offset`` (task·V: the ids' plan as one task's
    part of a stacked table)."""
    perm, seg_row, seg_count = _split_plan(plan, n_tokens)
    return pack_plan(perm, seg_row + offset, seg_count)


def _plan_fixed_size(n: int) -> int:
    k = segment_chunk()
    return n + 5 * (n // k) + 4 * (n // (k + 1))


def plan_num_segments(plan: torch.Tensor, n_tokens: int) -> int:
    """U of a plan built for n_tokens tokens (shape arithmetic only)."""
    extra = plan.numel() - _plan_fixed_size(n_tokens)
    if extra < 0 or extra % 7:
        raise ValueError(f"plan: {plan.numel()} entries do not fit the layout for {n_tokens} tokens")
    return extra // 7


def check_plan(plan, ids, task_ids, vocab: int, *, values: bool = True) -> None:
    """``plan`` is segment_plan(flat_table_rows(ids, task_ids, vocab)), or raise ``plan: ...``.

    Always (shape only, no sync): a 1-D int64 tensor on ids' device of N + 5(N // K) + 4(N // (K+1))
    + 7U entries (K = segment_chunk()), 1 <= U <= N (U = 0 iff N = 0). With ``values`` (ids
    already range-checked) the contents too, in O(N + U) work, no sort, one host sync: perm is a
    permutation of the N tokens (bincount), the rows they read in plan order equal seg_row
    repeated seg_count times, seg_row strictly ascending, perm ascending inside a segment
    (stable), and the chunk and reduce tables are pack_plan's for these segments. Together: the
    plan equals the one built from these ids, entry for entry."""
    check_tensor("plan", plan, ndim=1, dtypes=(torch.int64,))
    if plan.device != ids.device:
        raise ValueError(f"plan: expected a tensor on {ids.device} (input_ids' device), got one on {plan.device}")
    n = ids.numel()
    extra = plan.numel() - _plan_fixed_size(n)
    u = extra // 7
    if extra < 0 or extra % 7 or u > n or (u == 0) != (n == 0):
        raise ValueError(f"plan: {plan.numel()} entries do not fit the layout for the {n} tokens of input_ids "
                         f"(N + 5(N // K) + 4(N // (K + 1)) + 7U with 1 <= U <= N, K = {segment_chunk()}); "
                         "build it with aot_segment_plan from these ids")
    if not values or n == 0:
        return
    perm, seg_row, seg_count = _split_plan(plan, n)
    rows = flat_table_rows(ids, task_ids, vocab)
    checks = {}
    checks["perm is not a permutation of the tokens"] = (
        ((perm >= 0) & (perm < n)).all() & (torch.bincount(perm.clamp(0, n - 1), minlength=n) == 1).all())
    checks["segment counts are not >= 1 or do not sum to N"] = (seg_count >= 1).all() & (seg_count.sum() == n)
    ends = torch.cumsum(seg_count, 0)
    seg_of = torch.searchsorted(ends, torch.arange(n, device=plan.device), right=True).clamp(max=u - 1)
    sorted_rows = rows[perm.clamp(0, n - 1)]
    checks["the rows its tokens read differ from these ids' rows"] = (sorted_rows == seg_row[seg_of]).all()
    checks["segment rows are not strictly ascending"] = (seg_row[1:] > seg_row[:-1]).all()
    checks["tokens inside a segment are not in order (stable sort)"] = (
        (perm[1:] > perm[:-1]) | (seg_of[1:] != seg_of[:-1])).all()
    tail = n + 2 * u
    checks["its chunk table differs from the one its segments give"] = (
        plan[tail:] == pack_plan(perm, seg_row, seg_count)[tail:]).all()
    flags = torch.stack(list(checks.values())).tolist()  # the one host sync
    for what, ok in zip(checks, flags):
        if not ok:
            raise ValueError(f"plan: not the segment plan of these input_ids / task_ids (vocab {vocab}): {what}; "
                             "build it with aot_segment_plan from the same ids")


def check_grad_args(grad, ids, n_tasks, vocab, task_ids, validate, dtype=torch.float32, plan=None):
    """Arguments of a table backward (table_grad_rows / table_grad_dense), ``plan`` included;
    TypeError/ValueError/IndexError naming the argument."""
    check_tensor("grad", grad, dtypes=FLOAT_DTYPES)
    check_tensor("input_ids", ids, dtypes=INDEX_DTYPES)
    if task_ids is not None:
        check_tensor("task_ids", task_ids, ndim=1, dtypes=INDEX_DTYPES)
    check_float_dtype("dtype", dtype)
    check_count("vocab_size", vocab)
    check_count("n_tasks", n_tasks)
    check_flag("validate", validate)
    if grad.dim() < 1 or grad.shape[-1] == 0:
        raise ValueError(f"grad: expected shape [..., d] with d >= 1, got {list(grad.shape)}")
    if tuple(ids.shape) != tuple(grad.shape[:-1]):
        raise ValueError(f"input_ids: expected shape {list(grad.shape[:-1])} (grad.shape[:-1]), got {list(ids.shape)}")
    check_same_device(grad=grad, input_ids=ids, task_ids=task_ids)
    if task_ids is not None:
        check_task_tensor(task_ids, ids)
    elif n_tasks != 1:
        raise ValueError(f"task_ids: required for a stacked table of {n_tasks} tasks")
    if validate:
        check_index_range("input_ids", ids, vocab, what=f"token ids (vocabulary of the table, V = {vocab})")
        if task_ids is not None:
            check_index_range("task_ids", task_ids, n_tasks, what=f"task ids (the table stacks {n_tasks} tasks)")
    if plan is not None:
        check_plan(plan, ids, task_ids, vocab, values=validate)


def _segment_sums(grad, ids, vocab, task_ids, dtype, plan, row_from_plan, out):
    d = grad.shape[-1]
    g2 = _rows_view(grad, d)
    if plan is None:
        plan = segment_plan(flat_table_rows(ids, task_ids, vocab))
    n_segments = plan_num_segments(plan, g2.shape[0])
    if out is None:
        out = torch.empty(n_segments, d, dtype=dtype, device=grad.device)
    _launch_segment_sum(g2, plan.contiguous(), n_segments, out, row_from_plan)
    return plan, n_segments, out


def table_grad_rows(grad, ids, vocab: int, task_ids=None, *, n_tasks: int = 1, dtype=torch.float32,
                    plan=None, validate: bool = True):
    """Gradient of the table rows that occur: ``(rows [U] int64 ascending, sums [U, d])``.

    rows index the flattened [T·V, d] table (task·V + id); sums[i] = Σ grad[n] over tokens n
    reading rows[i], accumulated in fp32 (fp64 for fp64 grad) in a fixed order (bitwise
    deterministic), stored in ``dtype``. ``plan``: a precomputed segment_plan of these ids."""
    check_grad_args(grad, ids, n_tasks, vocab, task_ids, validate, dtype, plan)
    if not use_triton(grad):
        return table_grad_rows_reference(grad, ids, vocab, task_ids, dtype, plan)
    plan, n_segments, sums = _segment_sums(grad, ids, vocab, task_ids, dtype, plan, False, None)
    return plan[ids.numel():ids.numel() + n_segments], sums


def table_grad_dense(grad, ids, table_shape, task_ids=None, *, dtype=torch.float32, plan=None, validate: bool = True):
    """The table-shaped gradient ([V, d] or [T, V, d]) of a gather-add.

    When every row occurs (e.g. a per-batch table of the batch's unique ids) the segment sums
    are written straight into it; otherwise it is zero-filled first (the cost of a dense
    gradient for a full-vocabulary table: use table_grad_rows or sparse gradients to avoid it)."""
    table_shape = tuple(table_shape)
    if len(table_shape) not in (2, 3):
        raise ValueError(f"table_shape: expected [V, d] or [T, V, d], got {list(table_shape)}")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in table_shape):
        raise TypeError(f"table_shape: expected ints, got {list(table_shape)}")
    if min(table_shape) < 1:
        raise ValueError(f"table_shape: expected sizes >= 1, got {list(table_shape)}")
    table_shape = tuple(int(s) for s in table_shape)
    n_tasks, vocab = (1, table_shape[0]) if len(table_shape) == 2 else table_shape[:2]
    check_tensor("grad", grad, dtypes=FLOAT_DTYPES)
    if grad.dim() >= 1 and grad.shape[-1] != table_shape[-1]:
        raise ValueError(f"table_shape: hidden size {table_shape[-1]} does not match grad's {grad.shape[-1]}")
    check_grad_args(grad, ids, n_tasks, vocab, task_ids, validate, dtype, plan)
    if not use_triton(grad):
        return table_grad_dense_reference(grad, ids, table_shape, task_ids, dtype, plan)
    d = table_shape[-1]
    if plan is None:
        plan = segment_plan(flat_table_rows(ids, task_ids, vocab))
    n_segments = plan_num_segments(plan, ids.numel())
    n_rows = n_tasks * vocab
    alloc = torch.empty if n_segments == n_rows else torch.zeros
    out = alloc(table_shape, dtype=dtype, device=grad.device)
    _segment_sums(grad, ids, vocab, task_ids, dtype, plan, True, out.view(n_rows, d))
    return out
