"""What runs on a GPU, as the compile check sees it: one driver per kernel family.

A driver calls the family's public ops exactly as users and the peftops layer do, over every dtype
(and dtype mix) the ops accept and over three shape classes, on CPU tensors. The compile check
(kernels/_compile_check.py) runs the drivers with launches captured instead of executed, so every
launch a launcher would make on a GPU is recorded with its real arguments, block sizes, warps and
autotune configs, and triton's own binder turns it into the variant the JIT would compile.

Shape classes (they select different JIT specializations and host-side paths):
  aligned  sizes and strides that are multiples of 16 (d = 4096-like: 16-divisible pointers and
           integers, vectorised loads, pipelined dot loops);
  odd      primes: nothing divisible by 16;
  unit     a size of 1 where one really occurs (one token: a decode step; k = 1; rank 1): the JIT
           turns an integer equal to 1 into a constexpr, a variant of its own.
Some ops also get a "large" call where a host-side path changes with the size (the sampled top-k
bound, the split CKA means, WeGeFT's merged path); no kernel executes, so only allocation costs.

A combination an op refuses (TypeError/ValueError from its validation) is not a variant that runs
and is skipped; the check reports how many were refused.

``ACCEPTED_RESOURCE_EXCEPTIONS`` lists variants that may exceed the resource gate, each with its reason.
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX = (torch.int32, torch.int64)

# (kernel name, substring of the variant label or "") -> why the spill / shared memory is acceptable.
# Measured with ptxas 13.x (triton 3.9) and 12.8 (triton 3.6) on sm_90a; none of these is fixed yet, each
# is a local-memory round trip per tile in a kernel that is not the bf16 training hot path. Remove a line
# when the kernel is reworked (the WeGeFT thin/generate kernels are on the throughput issue's list).
ACCEPTED_RESOURCE_EXCEPTIONS: dict[tuple[str, str], str] = {
    # "fp32 | BM=32 BK=64": fp32 weights only ("fp32 |" alone also matched the 16-bit split pass, "bf16/fp32 |")
    ("_generate_kernel", "fp32 | BM=32 BK=64"): "fp32 weights, one-kernel sweep: B = s*W*Phi^T and W + B*Psi tiles in "
                                                "fp32 sit at 255 registers; halving BK/BN cut the spill from <=384 B "
                                                "to <=200 B (ptxas 13; <=180 B with 12.8); fp32 WeGeFT on a GPU is "
                                                "the uncommon case (the finish kernel does not spill; the split pass: "
                                                "ACCEPTED_ON_TRITON)",
    ("_generate_kernel", "DROPOUT=True"): "16-bit with dropout: 4 B (the hashed keep-mask of a 32x128 tile)",
    ("_thin_reduce_kernel", "fp32"): "fp32 operands (and fp16 x fp32 column sums, 164 B): split-K tile + dropout hash "
                                     "in fp32; BN 128 -> 64 cut the worst case from 4.6 KB to 1.7 KB",
    ("_thin_right_kernel", "fp32 |"): "fp32 x, r = 16: 24-40 B after halving BK",
    ("_cka_means_kernel", "fp16/fp32"): "fp16 x with fp32 y column sums: 48 B; one pass over x and y per SAFE "
                                        "measuring step, not per training step",
}
# Spills that only the older ptxas bundled with a triton version shows (the newest is clean there):
# "major.minor" -> {(kernel, substring): reason}.
ACCEPTED_ON_TRITON: dict[str, dict[tuple[str, str], str]] = {
    "3.6": {
        ("_kcat_matmul_kernel", "EVEN_K1=False"): "ptxas 12.8 only (ptxas 13 clean): 16-bit few-token tile with a partial "
                                                  "K chunk, up to 648 B; only widths that are not multiples of 64",
        ("_kcat_matmul_kernel", "fp32 |"): "ptxas 12.8 only (ptxas 13 clean): fp32 K-concat tiles, 8-32 B",
        ("_gather_add_kernel", ""): "ptxas 12.8 only (ptxas 13 clean): 4 B in one fp32/int64 variant",
        ("_generate_kernel", "RP=64 STORE_B=False MERGE=False SPLIT=True DROPOUT=False"):
            "ptxas 12.8 only (ptxas 13 clean): the WeGeFT split-K pass at RP = 64, 8 B (16-bit) / 16 B (fp32) at "
            "72-96 registers; the forms of its partial store that 12.8 keeps clean spill 4-12 B on ptxas 13",
    },
}


class Refusals:
    """Counts the argument combinations an op refused (not variants that run)."""

    def __init__(self):
        self.count = 0

    def call(self, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (TypeError, ValueError, IndexError):
            self.count += 1
            return None


def _rand(shape, dtype):
    return torch.randn(shape, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------- SIFT
def drive_sift(ref: Refusals) -> None:
    from . import sift as K

    # (d_out, d_in, T): aligned, odd, unit; the 256 x 256 weight also takes the sampled top-k bound
    shapes = {"aligned": (256, 256, 64), "odd": (37, 23, 29), "unit": (64, 48, 1)}
    for cls, (d_out, d_in, T) in shapes.items():
        n = d_out * d_in
        k = 1 if cls == "unit" else max(1, n // 100)
        for acc_dt, g_dt in itertools.product((torch.float32, torch.float64), FLOATS):
            ref.call(K.abs_accumulate_, torch.zeros(d_out, d_in, dtype=acc_dt), _rand((d_out, d_in), g_dt))
        for dt in FLOATS:
            ref.call(K.topk_abs_select, _rand((d_out, d_in), dt), k)
            ref.call(K.topk_abs_select, _rand((d_out, d_in), dt), n)  # k = numel: every entry a candidate
        for dt, idx_dt in itertools.product(FLOATS, INDEX):
            flat = torch.randperm(n)[:k].sort().values.to(idx_dt)
            rows, cols = flat // d_in, flat % d_in
            # the sparse kernel at every shape class (auto would take the dense GEMM at some of them)
            ref.call(K.sddmm_at_indices, _rand((T, d_out), dt), _rand((T, d_in), dt), rows, cols, method="sparse")
        for w_dt, st_dt, idx_dt in itertools.product(FLOATS, (torch.float32, torch.float64), INDEX):
            flat = torch.randperm(n)[:k].sort().values.to(idx_dt)
            w = _rand((d_out, d_in), w_dt)
            w0, delta = _rand(k, st_dt), _rand(k, st_dt)
            ref.call(K.scatter_merged_, w, flat, w0, delta)
            for maximize in (False, True):
                ref.call(K.sparse_adamw_step_, w, flat, w0, delta, _rand(k, st_dt), torch.zeros(k, dtype=st_dt),
                         torch.zeros(k, dtype=st_dt), step=3, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                         weight_decay=0.01, maximize=maximize)


# ---------------------------------------------------------------------------------------------- AoT
# (hidden, table) dtypes: a table in the model's dtype (serving, compiled tables) or fp32 rows under a
# 16-bit model (training); gather_add accepts any pair, these are the ones the AoT layer produces
# (grad, table-gradient) dtypes: the gradient comes back in the table's dtype (the AoT layer passes
# it), i.e. the model's, or fp32 for fp32 tables under a 16-bit model
AOT_GRAD_DTYPES = [(g, g) for g in FLOATS] + [(g, torch.float32) for g in FLOATS if g.itemsize < 4]
AOT_DTYPE_PAIRS = [(h, t) for h in FLOATS for t in FLOATS if t == h or (t == torch.float32 and h.itemsize < 4)]

def drive_aot(ref: Refusals) -> None:
    from . import aot as K

    # (batch, seq, d, vocab, tasks); the skewed classes give id 0 more tokens than one chunk of the
    # table backward (aot.segment_chunk() = 256 on a GPU): chunk partials and the reduce pass
    shapes = {"aligned": (2, 32, 64, 48, 3), "odd": (3, 7, 37, 29, 2), "unit": (1, 1, 64, 48, 2),
              "skewed": (2, 320, 64, 48, 3), "skewed_odd": (3, 211, 37, 29, 2)}

    def token_ids(skewed, B, S, V, idx_dt):
        ids = torch.randint(0, V, (B, S), dtype=idx_dt)
        return torch.where(torch.rand(B, S) < 0.7, 0, ids) if skewed else ids

    for cls, (B, S, d, V, n_tasks) in shapes.items():
        skewed = cls.startswith("skewed")
        # the gather-add has no path that depends on the ids' distribution: not repeated for skew
        for (h_dt, t_dt), idx_dt in itertools.product([] if skewed else AOT_DTYPE_PAIRS, INDEX):
            ids = torch.randint(0, V, (B, S), dtype=idx_dt)
            h = _rand((B, S, d), h_dt)
            ref.call(K.gather_add, h, ids, _rand((V, d), t_dt))
            ref.call(K.gather_add, h, ids, _rand((V, d), t_dt), out=h)  # in place
            tasks = torch.randint(0, n_tasks, (B,), dtype=idx_dt)
            ref.call(K.gather_add, h, ids, _rand((n_tasks, V, d), t_dt), tasks)
        for (g_dt, out_dt), idx_dt in itertools.product(AOT_GRAD_DTYPES, INDEX):
            ids = token_ids(skewed, B, S, V, idx_dt)
            g = _rand((B, S, d), g_dt)
            ref.call(K.table_grad_rows, g, ids, V, dtype=out_dt)
            ref.call(K.table_grad_dense, g, ids, (V, d), dtype=out_dt)
            tasks = torch.randint(0, n_tasks, (B,), dtype=idx_dt)
            ref.call(K.table_grad_dense, g, ids, (n_tasks, V, d), tasks, dtype=out_dt)
        # a hidden state that is a strided view (rows not contiguous), as a sliced activation is
        h = _rand((B, S, 2 * d), torch.bfloat16)[..., :d]
        ref.call(K.gather_add, h, torch.randint(0, V, (B, S)), _rand((V, d), torch.bfloat16))


# ---------------------------------------------------------------------------------------------- WeGeFT
def drive_wegeft(ref: Refusals) -> None:
    from . import wegeft as K

    # (T, d_out, d_in, r): T <= d_out / 2 takes the fused path under "auto"; both paths forced below.
    # The split* shapes have few row blocks for the off-GPU SM count (wegeft._OFF_GPU_SMS) and a d_in
    # of several K steps, so their generate calls take the split-K pass + finish kernel (a GQA k/v
    # projection on an H100); the others run the one-kernel sweep.
    shapes = {"aligned": (32, 96, 64, 16), "odd": (7, 37, 29, 3), "unit": (1, 96, 64, 16), "rank64": (48, 128, 80, 64),
              "split": (16, 64, 512, 16), "split_odd": (7, 37, 389, 5), "split_unit": (1, 1, 300, 1),
              "split_rank64": (16, 64, 512, 64)}
    for _cls, (T, d_out, d_in, r) in shapes.items():
        for dt in FLOATS:
            x, w, b = _rand((T, d_in), dt), _rand((d_out, d_in), dt), _rand(d_out, dt)
            phi, psi = _rand((r, d_in), dt), _rand((r, d_in), dt)
            for p in (0.0, 0.1):
                ref.call(K.generate_b, w, phi, 2.0, dropout_p=p, seed=1)
            ref.call(K.wegeft_merge, w, phi, psi, 2.0)
            ref.call(K.wegeft_merge, w.clone(), phi, psi, 2.0, out=None)
            w_in_place = w.clone()
            ref.call(K.wegeft_merge, w_in_place, phi, psi, 2.0, out=w_in_place)
            for path, bias, p in itertools.product(("fused", "merged"), (b, None), (0.0, 0.1)):
                res = ref.call(K.wegeft_forward, x, w, bias, phi, psi, 2.0, dropout_p=p, seed=3, path=path)
                u = res[1] if res is not None else _rand((T, r), dt)
                for need_dbias in (False, True):
                    ref.call(K.wegeft_backward, _rand((T, d_out), dt), x, u, w, phi, psi, 2.0, dropout_p=p, seed=3,
                             path=path, need_dbias=need_dbias)
                ref.call(K.wegeft_backward, _rand((T, d_out), dt), None, None, w, phi, psi, 2.0, dropout_p=p,
                         seed=3, path=path, need_dphi=False, need_dpsi=False)  # frozen generators: dx only


# ---------------------------------------------------------------------------------------------- CKA
def drive_cka(ref: Refusals) -> None:
    from . import cka as K

    # (T, dx, dy): the cheaper Gram form depends on T vs dx + dy; both forced below as well
    shapes = {"aligned": (64, 32, 48), "odd": (29, 37, 23), "long": (8209, 16, 16)}
    for cls, (T, dx, dy) in shapes.items():
        for x_dt, y_dt in itertools.product(FLOATS, FLOATS):
            x, y = _rand((T, dx), x_dt), _rand((T, dy), y_dt)
            for mask in (None, torch.rand(T) > 0.2, (torch.rand(T) > 0.2).float()):
                for form in (None, "features", "tokens"):
                    if cls == "long" and form == "tokens":
                        continue  # a T x T Gram of 8k tokens: the features form is what runs there
                    ref.call(K.linear_cka, x, y, mask, form=form)
        # a representation that is a column slice of a wider activation (row stride != width)
        wide = _rand((T, 2 * dx), torch.bfloat16)
        ref.call(K.linear_cka, wide[:, :dx], _rand((T, dy), torch.bfloat16))


DRIVERS: dict[str, Callable[[Refusals], None]] = {
    "sift": drive_sift,
    "aot": drive_aot,
    "wegeft": drive_wegeft,
    "cka": drive_cka,
}
