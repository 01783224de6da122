"""SIFT: sparse increment fine-tuning (docs/design.md#sift), above the kernels of ``peftops.kernels.sift``.

Per targeted weight W [d_out, d_in] a fixed set I of k flat indices (ascending) and a trainable
vector δ ∈ R^k give the effective weight W_eff = W0 + scatter(I, δ). The base weight stays in its
own dtype and holds W_eff merged in place: W[I] = round(W0[I] + δ), with fp32 copies of W0[I] and δ
(fp64 when W is fp64), so bf16 rounding never swallows small updates.

    y   = x W_effᵀ + b                                      (one dense GEMM on the merged weight)
    dx  = dy W_eff
    dδ_m = Σ_t dy[t, i_m] · x[t, j_m]   for (i_m, j_m) = divmod(I[m], d_in)     (SDDMM, fp32 [k])

The dense ∇W is never formed in a training step; it exists only during calibration, one target
at a time (selection happens in a post-accumulate-grad hook that frees the gradient at once).

Contents, in order: index selection; custom ops (torch.library) with fake kernels and autograd;
the functional API ``sift_linear``; the ``SIFTLinear`` module; the ``SparseAdamW`` optimizer;
calibration (``sift_calibrate``, ``SIFTCalibrationCallback``); the model-level ``SIFTConfig`` /
``SIFTMethod`` registered with ``peftops.model``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import warnings
import weakref
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from . import model as _model
from .kernels import sift as _k
from .kernels._checks import FLOAT_DTYPES, INDEX_DTYPES, check_index_range, check_same_device, check_tensor

__all__ = [
    "sift_k", "sift_select", "sift_linear", "SIFTLinear", "SparseAdamW", "sift_calibrate", "SIFTConfig",
    "SIFTMethod", "sift_layers", "LLAMA_TARGETS", "BERT_TARGETS",
]  # plus SIFTCalibrationCallback, built on first access (importing transformers' Trainer takes seconds)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "attention.output.dense"]


def _acc_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the kept W0[I] and δ: fp32, or fp64 for an fp64 weight."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------
def _check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not (0.0 < float(density) <= 1.0):
        raise ValueError(f"density: expected a number in (0, 1], got {density!r}")
    return float(density)


def sift_k(numel: int, density: float) -> int:
    """Entries kept per tensor: k = min(int(density · numel) + 1, numel) (the authors' formula);
    ``numel`` an int >= 0 (0 gives k = 0)."""
    if isinstance(numel, bool) or not isinstance(numel, numbers.Integral):
        raise TypeError(f"numel: expected an int, got {type(numel).__name__}")
    if numel < 0:
        raise ValueError(f"numel: expected an int >= 0, got {numel}")
    density = _check_density(density)
    return min(int(density * int(numel)) + 1, int(numel))


def sift_select(grads_or_scores, density: float):
    """Top-k |score| flat indices per tensor, ascending (LongTensor [k]), lower index wins ties.

    ``grads_or_scores``: a non-empty finite float tensor or a dict name -> tensor (returns a dict
    with the same keys; nothing is selected unless every entry checks out)."""
    density = _check_density(density)
    if isinstance(grads_or_scores, Mapping):
        items = list(grads_or_scores.items())
        for name, t in items:
            _check_scores(f"grads_or_scores: entry {name!r}", t)
        return {name: _select(f"grads_or_scores: entry {name!r}", t, density) for name, t in items}
    _check_scores("grads_or_scores", grads_or_scores)
    return _select("grads_or_scores", grads_or_scores, density)


def _check_scores(label: str, t) -> None:
    check_tensor(label, t, dtypes=FLOAT_DTYPES)
    if t.numel() == 0:
        raise ValueError(f"{label}: expected a non-empty tensor, got shape {list(t.shape)}")


def _select(label: str, t: torch.Tensor, density: float) -> torch.Tensor:
    # NaN/Inf are found by the selection's own pass over the scores (no extra pass here)
    return _k.topk_abs_select(t.detach(), sift_k(t.numel(), density), name=label)


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
_INDICES_CHECKED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # index tensor -> signature it passed with


def _check_flat_indices(indices: torch.Tensor, numel: int, name: str = "indices") -> None:
    """0 <= I[m] < numel and no flat index twice (any order), else IndexError / ValueError naming
    ``name``. A duplicate would make the merged write keep one copy's value while the SDDMM gives
    every copy the full gradient. Skipped for a tensor that already passed unchanged (same data
    pointer, version counter, size, bound), so a training loop over one index set checks it once."""
    try:
        sig = (indices.data_ptr(), indices._version, indices.numel(), indices.dtype, indices.device, int(numel))
    except RuntimeError:  # no storage (fake/meta): nothing to remember
        sig = None
    if sig is not None and _INDICES_CHECKED.get(indices) == sig:
        return
    check_index_range(name, indices, numel, what="entries")
    if indices.numel() > 1:
        srt = torch.sort(indices.detach().reshape(-1)).values
        dup = srt[1:] == srt[:-1]
        n_dup = int(dup.sum())
        if n_dup:
            raise ValueError(f"{name}: entries must be unique (expected unique flat indices), found {n_dup} "
                             f"duplicate{'s' if n_dup > 1 else ''}, e.g. {int(srt[1:][dup][0])}")
    if sig is not None:
        _INDICES_CHECKED[indices] = sig


def _merged_copy(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A fresh W_eff = W with W_eff[I] = round(W[I] + values) (accumulated in fp32/fp64)."""
    acc = _acc_dtype(weight.dtype)
    w_eff = weight.detach().contiguous().clone()
    w0_sel = w_eff.view(-1)[indices].to(acc)
    _k.scatter_merged_(w_eff, indices, w0_sel, values.detach().to(acc).contiguous())
    return w_eff


def _split_rows_cols(flat_idx: torch.Tensor, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of each flat index of a row-major [*, d_in] weight; int32 (rows, cols < 2^31)."""
    return (flat_idx // d_in).to(torch.int32), (flat_idx % d_in).to(torch.int32)


# Backward formulas are traced by AOTAutograd under torch.compile, so every kernel they call is a
# custom op of its own (opaque to the tracer, with a fake kernel for shapes).
@torch.library.custom_op("peftops::sift_sddmm", mutates_args=())
def _sddmm_op(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return _k.sddmm_at_indices(dy, x, rows, cols)


@_sddmm_op.register_fake
def _(dy, x, rows, cols):
    return dy.new_empty(rows.shape, dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32)


_ROWS_COLS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # flat index tensor -> (signature, (rows, cols))


def _cached_rows_cols(indices: torch.Tensor, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """_split_rows_cols, cached per index tensor (same data pointer, version, size, d_in): the
    SDDMM's plan and range checks are cached per rows tensor, so a training loop through the
    functional ``sift_linear`` splits, sorts and checks its index set once, not every step."""
    try:
        sig = (indices.data_ptr(), indices._version, indices.numel(), indices.dtype, indices.device, int(d_in))
    except RuntimeError:  # no storage (fake/meta): nothing to remember
        return _split_rows_cols(indices, d_in)
    hit = _ROWS_COLS.get(indices)
    if hit is not None and hit[0] == sig:
        return hit[1]
    rows_cols = _split_rows_cols(indices, d_in)
    _ROWS_COLS[indices] = (sig, rows_cols)
    return rows_cols


# The flat-index form is one op (not a split then the SDDMM) so that under torch.compile the split
# still runs on the real index tensor, where its cache applies.
@torch.library.custom_op("peftops::sift_sddmm_flat", mutates_args=())
def _sddmm_flat_op(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    rows, cols = _cached_rows_cols(indices, x.shape[1])
    return _k.sddmm_at_indices(dy, x, rows, cols)


@_sddmm_flat_op.register_fake
def _(dy, x, indices):
    return dy.new_empty(indices.shape, dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32)


@torch.library.custom_op("peftops::sift_merged_weight", mutates_args=())
def _merged_weight_op(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return _merged_copy(weight, indices, values)


@_merged_weight_op.register_fake
def _(weight, indices, values):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


# --- functional: y = x (W + scatter(I, values))ᵀ + b, weight frozen --------------------------
@torch.library.custom_op("peftops::sift_linear", mutates_args=())
def _sift_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], indices: torch.Tensor,
                    values: torch.Tensor) -> torch.Tensor:
    # checked here, on the real tensors, so that it also runs inside torch.compile(fullgraph=True)
    _check_flat_indices(indices, weight.numel())
    return F.linear(x, _merged_copy(weight, indices, values), bias)


@_sift_linear_op.register_fake
def _(x, weight, bias, indices, values):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _sift_linear_setup(ctx, inputs, output):
    x, weight, bias, indices, values = inputs
    need_x, need_b, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[4]
    # x only feeds dvalues; weight and values only feed dx (W_eff is rebuilt, never saved).
    ctx.save_for_backward(x if need_v else None, weight if need_x else None,
                          indices if (need_x or need_v) else None, values if need_x else None)
    ctx.need = (need_x, bool(need_b and bias is not None), need_v)
    ctx.x_shape, ctx.d_in, ctx.values_dtype = x.shape, weight.shape[1], values.dtype


def _sift_linear_backward(ctx, dy):
    x, weight, indices, values = ctx.saved_tensors
    need_x, need_b, need_v = ctx.need
    d_out = dy.shape[-1]
    n_tok = math.prod(ctx.x_shape[:-1])  # not reshape(-1, d): ambiguous when d = 0
    dy2 = dy.reshape(n_tok, d_out).contiguous()
    dx = db = dvalues = None
    if need_x:
        # One transient W_eff (the functional has no merged weight to reuse; SIFTLinear has).
        dx = (dy2 @ _merged_weight_op(weight, indices, values.detach())).reshape(ctx.x_shape)
    if need_b:
        db = dy2.sum(0)
    if need_v:
        x2 = x.reshape(n_tok, ctx.d_in).contiguous()
        dvalues = _sddmm_flat_op(dy2.to(x2.dtype), x2, indices).to(ctx.values_dtype)
    return dx, None, db, None, dvalues


_sift_linear_op.register_autograd(_sift_linear_backward, setup_context=_sift_linear_setup)


# --- module: y = x Wᵀ + b with W already holding W0 + δ; gradient routed to δ -------------------
@torch.library.custom_op("peftops::sift_linear_merged", mutates_args=())
def _sift_linear_merged_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], delta: torch.Tensor,
                           rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    # delta is an input only so that autograd routes dδ to it; W already holds W0[I] + δ.
    return F.linear(x, weight, bias)


@_sift_linear_merged_op.register_fake
def _(x, weight, bias, delta, rows, cols):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _merged_setup(ctx, inputs, output):
    x, weight, bias, delta, rows, cols = inputs
    need_x, need_b, need_d = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    ctx.save_for_backward(x if need_d else None, weight if need_x else None,
                          rows if need_d else None, cols if need_d else None)
    ctx.need = (need_x, bool(need_b and bias is not None), need_d)
    ctx.x_shape, ctx.d_in, ctx.delta_dtype = x.shape, weight.shape[1], delta.dtype


def _merged_backward(ctx, dy):
    x, weight, rows, cols = ctx.saved_tensors
    need_x, need_b, need_d = ctx.need
    n_tok = math.prod(ctx.x_shape[:-1])
    dy2 = dy.reshape(n_tok, dy.shape[-1]).contiguous()
    dx = db = ddelta = None
    if need_x:
        dx = (dy2.to(weight.dtype) @ weight).reshape(ctx.x_shape)
    if need_b:
        db = dy2.sum(0)
    if need_d:
        x2 = x.reshape(n_tok, ctx.d_in).contiguous()
        ddelta = _sddmm_op(dy2.to(x2.dtype), x2, rows, cols).to(ctx.delta_dtype)
    return dx, None, db, ddelta, None, None


_sift_linear_merged_op.register_autograd(_merged_backward, setup_context=_merged_setup)


# --- resync W[I] = round(W0[I] + δ), in place ---------------------------------------------------
@torch.library.custom_op("peftops::sift_scatter_merged_", mutates_args=("weight",))
def _scatter_merged_op(weight: torch.Tensor, flat_idx: torch.Tensor, w0_sel: torch.Tensor, delta: torch.Tensor) -> None:
    _k.scatter_merged_(weight, flat_idx, w0_sel, delta)


@_scatter_merged_op.register_fake
def _(weight, flat_idx, w0_sel, delta):
    return None


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def sift_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, indices: torch.Tensor,
                values: torch.Tensor) -> torch.Tensor:
    """y = x (W + scatter(I, values))ᵀ + b for x [..., d_in], W [d_out, d_in], I flat indices [k]
    (unique, in [0, d_out·d_in); any order), values [k] of any float dtype. W_eff[I] = round(W[I] +
    values) in fp32 (fp64 for fp64 W). x, W and b share one dtype; dvalues comes in values' dtype.

    Gradients flow to x, values (SDDMM, never a dense ∇W) and bias when they require grad;
    ``weight`` is treated as frozen and gets no gradient. Works under torch.compile(fullgraph=True).
    This form rebuilds W_eff transiently in forward (and in backward when dx is needed); the
    ``SIFTLinear`` module keeps the weight merged in place and needs no copy."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    if x.dtype != weight.dtype:
        raise TypeError(f"x: expected dtype {weight.dtype} (the weight's), got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected last dim {weight.shape[1]} (weight is {list(weight.shape)}), got shape {list(x.shape)}")
    check_tensor("indices", indices, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor("values", values, shape=[indices.shape[0]], dtypes=FLOAT_DTYPES)
    if bias is not None:
        check_tensor("bias", bias, shape=[weight.shape[0]], dtypes=(weight.dtype,))
    check_same_device(x=x, weight=weight, bias=bias, indices=indices, values=values)
    return _sift_linear_op(x, weight, bias, indices, values)


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------
# δ Parameter -> weakref(SIFTLinear): lets SparseAdamW given bare parameters find the layer, and
# lets the optimizer hook below find the layers whose δ another optimizer just stepped.
_DELTA_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_HOOK_HANDLE = None


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    """Global optimizer post-step hook: mark the layers of every δ the optimizer owns as stale.
    Needed because fused optimizers (torch AdamW(fused=True), the HF Trainer default) and updates
    through ``p.data`` do not bump δ's version counter."""
    if len(_DELTA_OWNERS) == 0 or isinstance(optimizer, SparseAdamW):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            ref = _DELTA_OWNERS.get(p)
            layer = ref() if ref is not None else None
            if layer is not None:
                layer._synced_version = -1


def _install_optimizer_hook() -> None:
    global _HOOK_HANDLE
    if _HOOK_HANDLE is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK_HANDLE = register_optimizer_step_post_hook(_after_optimizer_step)


def _check_new_indices(indices, weight: torch.Tensor) -> None:
    """An index set for ``weight``: 1-D int32/int64, 1..numel entries, in range, unique (any order)."""
    check_tensor("indices", indices, ndim=1, dtypes=INDEX_DTYPES)
    numel = weight.numel()
    if not 1 <= indices.numel() <= numel:
        raise ValueError(f"indices: expected 1..{numel} entries for a {list(weight.shape)} weight, got {indices.numel()}")
    _check_flat_indices(indices, numel)


def check_loaded_indices(label: str, idx, weight: torch.Tensor) -> None:
    """A checkpoint's index set, before anything is loaded: what set_indices keeps (1-D int, at most
    numel entries, in range, strictly ascending), or none (an unselected layer)."""
    check_tensor(label, idx, ndim=1, dtypes=INDEX_DTYPES)
    numel = weight.numel()
    if idx.numel() > numel:
        raise ValueError(f"{label}: expected at most {numel} entries for a {list(weight.shape)} weight, got "
                         f"{idx.numel()}")
    if idx.is_meta:  # no values to check
        return
    check_index_range(label, idx, numel, what="entries")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"{label}: expected strictly ascending flat indices (sorted, unique)")


class SIFTLinear(nn.Module):
    """nn.Linear with a sparse trainable increment: y = x (W0 + scatter(I, δ))ᵀ + b.

    ``weight`` (frozen, its own dtype) holds W0 + δ merged in place; buffers ``indices`` (int64 [k],
    ascending flat indices), ``w0_sel`` (W0[I], fp32), non-persistent ``rows``/``cols`` (int32);
    Parameter ``delta`` (fp32 [k], init 0). Before an index set exists (k = 0, "unselected") the
    layer is the plain linear under ``torch.no_grad`` and during calibration; a forward that would
    train raises, asking for ``sift_calibrate``. If δ may have changed since W was last written, the
    next forward first rewrites W[I] = round(W0[I] + δ) (k entries). "May have changed": δ's version
    counter moved (in-place edits, non-fused optimizers, ``load_state_dict``) or any torch optimizer
    holding δ stepped (fused kernels leave the version counter alone). SparseAdamW writes W in its
    own fused step. After writing δ through ``.data`` by hand, call ``resync_()``."""

    peftops_adapter = True  # SAFE's cross-method protocol: X = forward input, Y = output
    sift_calibration_target = True
    _disabled = False  # peftops.disable_adapters: W holds W0 and the layer is the plain linear

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.delta]

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, density: float | None = None,
                 device=None, dtype=None):
        super().__init__()
        for name, n in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(n, bool) or not isinstance(n, numbers.Integral):
                raise TypeError(f"{name}: expected an int, got {type(n).__name__} {n!r}")
            if n < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {n}")
        if density is not None:
            _check_density(density)
        base = nn.Linear(int(in_features), int(out_features), bias=bias, device=device, dtype=dtype)
        self._init_from(base.weight, base.bias, density)

    @classmethod
    def from_linear(cls, linear: nn.Linear, indices: torch.Tensor | None = None, *,
                    density: float | None = None) -> "SIFTLinear":
        """Wrap ``linear`` (sharing its weight/bias Parameters; the weight is frozen) with an optional
        index set (flat indices into weight, e.g. from ``sift_select``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        if indices is not None:  # before the linear's weight is frozen and wrapped
            _check_new_indices(indices, linear.weight)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init_from(linear.weight, linear.bias, density)
        if indices is not None:
            self.set_indices(indices)
        return self

    def _init_from(self, weight: nn.Parameter, bias: nn.Parameter | None, density: float | None) -> None:
        if density is not None:
            density = _check_density(density)
        if not weight.is_contiguous():
            raise ValueError("linear: SIFTLinear merges into the weight in place and needs a contiguous weight "
                             f"(got strides {weight.stride()}); pass a linear whose weight is contiguous")
        self.out_features, self.in_features = weight.shape
        weight.requires_grad_(False)
        self.weight = weight
        self.bias = bias
        self.density = density
        acc = _acc_dtype(weight.dtype)
        self.delta = nn.Parameter(torch.zeros(0, dtype=acc, device=weight.device))
        self.register_buffer("indices", torch.zeros(0, dtype=torch.int64, device=weight.device))
        self.register_buffer("w0_sel", torch.zeros(0, dtype=acc, device=weight.device))
        self.register_buffer("rows", torch.zeros(0, dtype=torch.int32, device=weight.device), persistent=False)
        self.register_buffer("cols", torch.zeros(0, dtype=torch.int32, device=weight.device), persistent=False)
        self._synced_version = -1
        self._selection_id = 0
        self._calibrating = False
        _DELTA_OWNERS[self.delta] = weakref.ref(self)
        _install_optimizer_hook()
        self._own_params = (self.weight, self.delta)  # see _check_params_not_swapped

    # -- state ---------------------------------------------------------------------------------
    @property
    def selected(self) -> bool:
        return self.indices.numel() > 0

    @property
    def k(self) -> int:
        return self.indices.numel()

    def set_indices(self, indices: torch.Tensor) -> None:
        """Install the index set I (flat indices into weight; sorted here; must be unique).
        W is first restored to W0 if a previous selection was merged; δ restarts at 0, so optimizer
        state for this layer is invalid afterwards (SparseAdamW refuses to reuse it)."""
        _check_new_indices(indices, self.weight)
        idx = torch.sort(indices.detach().to(device=self.weight.device, dtype=torch.int64)).values
        self._protect_for_rollback(idx)
        self._resize_selection(idx.numel())  # restores W0 at the old index set first
        with torch.no_grad():
            self.indices.copy_(idx)
            self.w0_sel.copy_(self.weight.detach().view(-1)[idx].to(self.w0_sel.dtype))
            rows, cols = _split_rows_cols(idx, self.in_features)
            self.rows.copy_(rows)
            self.cols.copy_(cols)
            self.delta.zero_()
        self._synced_version = self.delta._version  # W[I] == round(W0[I] + 0) == W0[I]

    def _check_loaded_indices(self, idx, key: str) -> None:
        check_loaded_indices(f"state_dict: {key}", idx, self.weight)

    def _resize_selection(self, k: int) -> None:
        """Give indices / w0_sel / rows / cols / δ room for k entries (δ keeps its Parameter identity,
        so an optimizer built before calibration still owns it). Restores W to W0 first."""
        if self.selected:
            self.restore_base_()
        dev, acc = self.weight.device, _acc_dtype(self.weight.dtype)
        self.indices = torch.zeros(k, dtype=torch.int64, device=dev)
        self.w0_sel = torch.zeros(k, dtype=acc, device=dev)
        self.rows = torch.zeros(k, dtype=torch.int32, device=dev)
        self.cols = torch.zeros(k, dtype=torch.int32, device=dev)
        self.delta.data = torch.zeros(k, dtype=acc, device=dev)
        self.delta.grad = None
        self._selection_id += 1
        self._synced_version = -1
        _DELTA_OWNERS[self.delta] = weakref.ref(self)

    def _protect_for_rollback(self, new_indices: torch.Tensor | None = None) -> None:
        """Inside an all-or-nothing model-level call: keep what the next write changes (the weight at
        the old and new index sets, the k-sized buffers, δ) so an error can put it back."""
        snap = _model.transaction()
        if snap is not None:
            idx = self.indices if new_indices is None else torch.cat([self.indices, new_indices.to(self.indices)])
            snap.protect_entries(self.weight, idx)
            snap.protect(self.indices, self.w0_sel, self.rows, self.cols, self.delta)

    @torch.no_grad()
    def restore_base_(self) -> None:
        """Write W0[I] back into W (bit-exact: W0[I] is kept as an exact upcast). The next forward
        merges δ again, so outputs stay adapted; call this to read the base weights back."""
        if self.selected:
            self._protect_for_rollback()
            self.weight.view(-1)[self.indices] = self.w0_sel.to(self.weight.dtype)
            self._synced_version = -1

    def resync_(self) -> None:
        """W[I] = round(W0[I] + δ), in place (one k-sized scatter)."""
        if self.selected:
            self._protect_for_rollback()
            with torch.no_grad():
                _scatter_merged_op(self.weight, self.indices, self.w0_sel, self.delta.detach())
            self._synced_version = self.delta._version

    def _mark_synced(self) -> None:
        """Called by SparseAdamW after its fused step has written W[I]."""
        self._synced_version = self.delta._version

    def _apply(self, fn, recurse=True):
        # .to(dtype) must not round the fp32 masters: convert them from the originals, following
        # the weight's new device/dtype (W0[I] is re-rounded to the new weight dtype, like W0 is).
        delta, w0_sel, grad = self.delta.data, self.w0_sel, self.delta.grad
        out = super()._apply(fn, recurse)
        dev, wdt = self.weight.device, self.weight.dtype
        acc = _acc_dtype(wdt)
        if delta.is_meta and not self.delta.is_meta:  # to_empty(): nothing to carry over
            delta, w0_sel, grad = self.delta.data, self.w0_sel, None
        self.w0_sel = w0_sel.to(wdt).to(device=dev, dtype=acc)
        self.delta.data = delta.to(device=dev, dtype=acc)
        if grad is not None:
            self.delta.grad = grad.to(device=dev, dtype=acc)
        _DELTA_OWNERS[self.delta] = weakref.ref(self)
        self._synced_version = -1
        self._own_params = (self.weight, self.delta)
        return out

    def __setstate__(self, state):
        # deepcopy / unpickling: register the new δ and merge it at the next forward.
        super().__setstate__(state)
        _DELTA_OWNERS[self.delta] = weakref.ref(self)
        _install_optimizer_hook()
        self._synced_version = -1

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint of a selected layer loads into an unselected one: size the selection first.
        idx = state_dict.get(prefix + "indices")
        if idx is not None:
            self._check_loaded_indices(idx, prefix + "indices")
            if idx.numel() != self.k:
                self._resize_selection(idx.numel())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.selected:
            rows, cols = _split_rows_cols(self.indices, self.in_features)
            self.rows.copy_(rows)
            self.cols.copy_(cols)
        self._synced_version = -1
        self._own_params = (self.weight, self.delta)  # load_state_dict(assign=True) swaps them legitimately

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # a fused optimizer step leaves W[I] one step behind δ until the next forward: the saved
        # weight is the one that forward would use (a checkpoint loaded into a plain base is current)
        if self.selected and self.delta._version != self._synced_version:
            self.resync_()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _check_params_not_swapped(self) -> None:
        """FSDP2's fully_shard swaps a module's Parameters for sharded DTensors (and, in forward, for
        all-gathered copies). SIFT's merged-in-place weight cannot survive that: the weight is re-gathered
        from shards that never saw δ, and δ is gathered without moving its version counter, so training
        would silently run on W0. Fail loudly instead (docs/distributed.md)."""
        weight, delta = self._own_params
        if self._parameters["weight"] is not weight or self._parameters["delta"] is not delta:
            raise RuntimeError(
                "SIFTLinear: its weight/delta Parameters were replaced by other objects, as FSDP2's fully_shard "
                "does. SIFT keeps W0 + δ merged in the weight in place, which sharded parameters re-gathered every "
                "forward/backward lose (training would silently use W0). Keep every SIFT layer's weight and delta "
                "out of the FSDP groups (fully_shard(..., ignored_params=...)) and all-reduce δ's gradient, or use "
                "DDP (docs/distributed.md)")

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, dtypes=FLOAT_DTYPES, device=self.weight.device)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dim {self.in_features}, got shape {list(x.shape)}")
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x: expected dtype {self.weight.dtype} (the weight's), got {x.dtype}")
        if self._disabled:
            return F.linear(x, self.weight, self.bias)
        if not self.selected:
            if self._calibrating or not (torch.is_grad_enabled() and self.delta.requires_grad):
                return F.linear(x, self.weight, self.bias)
            raise RuntimeError(
                "SIFTLinear has no index set yet: run peftops.sift_calibrate(model, batches) (or load an adapter) "
                "before training; evaluate under torch.no_grad() to use the base weights"
            )
        if torch.compiler.is_compiling():
            # δ's version counter cannot be read in a graph; the k-sized rewrite is cheap and idempotent.
            with torch.no_grad():
                _scatter_merged_op(self.weight, self.indices, self.w0_sel, self.delta.detach())
        else:
            self._check_params_not_swapped()
            if self.delta._version != self._synced_version:
                self.resync_()
        if self._calibrating or not (torch.is_grad_enabled() and (self.delta.requires_grad or x.requires_grad)):
            return F.linear(x, self.weight, self.bias)  # no δ gradient to route: the plain GEMM
        return _sift_linear_merged_op(x, self.weight, self.bias, self.delta, self.rows, self.cols)

    def extra_repr(self) -> str:
        sel = f"k={self.k}" if self.selected else "unselected"
        dens = f", density={self.density}" if self.density is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {sel}{dens}"


def sift_layers(model: nn.Module) -> list[tuple[str, SIFTLinear]]:
    """(name, layer) of every SIFTLinear in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SIFTLinear)]


def calibration_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every layer ``sift_calibrate`` selects for: native SIFTLinear and the PEFT
    tuner's layers (``peftops.tuners.sift``; their active adapter). The protocol: ``weight``,
    ``density``, ``selected``, ``set_indices``, ``_calibrating``."""
    return [(n, m) for n, m in model.named_modules() if getattr(type(m), "sift_calibration_target", False)]


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------
def _adamw_update_(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                   lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """torch.optim.AdamW's math on one tensor (decoupled decay, bias-corrected moments)."""
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def _check_real(name: str, value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}{where}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name}: expected a finite number, got {value!r}{where}")
    return float(value)


def _check_adamw_hparams(group: Mapping, where: str = "") -> tuple:
    """(lr, betas, eps, weight_decay, maximize) of a param group, checked: lr, eps, weight_decay
    finite >= 0, betas two finite numbers in [0, 1), maximize a bool (TypeError / ValueError naming
    the field; ``where`` says which group)."""
    out = {}
    for name in ("lr", "eps", "weight_decay"):
        v = _check_real(name, group[name], where)
        if v < 0:
            raise ValueError(f"{name}: expected a finite number >= 0, got {group[name]!r}{where}")
        out[name] = v
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)):
        raise TypeError(f"betas: expected a pair (beta1, beta2), got {type(betas).__name__} {betas!r}{where}")
    if len(betas) != 2:
        raise ValueError(f"betas: expected two numbers in [0, 1), got {len(betas)}: {tuple(betas)!r}{where}")
    b = tuple(_check_real("betas", v, where) for v in betas)
    if not all(0.0 <= v < 1.0 for v in b):
        raise ValueError(f"betas: expected two numbers in [0, 1), got {tuple(betas)!r}{where}")
    if not isinstance(group["maximize"], bool):
        raise TypeError(f"maximize: expected a bool, got {type(group['maximize']).__name__} {group['maximize']!r}{where}")
    return out["lr"], b, out["eps"], out["weight_decay"], group["maximize"]


class SparseAdamW(torch.optim.Optimizer):
    """AdamW whose SIFT δ parameters step with one fused kernel (m, v, δ and W[I] = round(W0[I] + δ));
    every other parameter (e.g. a classifier head) gets the standard AdamW math.

    ``params_or_model``: an nn.Module (its parameters that require grad), an iterable of parameters,
    or param groups. State is fp32 and k-sized for δ. ``weight_decay`` on δ decays it toward 0, i.e.
    the effective weight toward W0 (default 0). Matches torch.optim.AdamW on the same parameters."""

    def __init__(self, params_or_model, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, maximize: bool = False):
        lr, betas, eps, weight_decay, maximize = _check_adamw_hparams(
            dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize))
        self._owners: dict[int, weakref.ref] = {}
        if isinstance(params_or_model, nn.Module):
            for _, layer in sift_layers(params_or_model):
                self._owners[id(layer.delta)] = weakref.ref(layer)
            params = [p for p in params_or_model.parameters() if p.requires_grad]
            if not params:
                raise ValueError("params_or_model: the model has no parameter that requires grad")
        else:
            params = params_or_model
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults)
        # id(δ) -> the layer's selection generation its moments belong to (process-local, not saved).
        self._selection_seen: dict[int, int] = {}

    def add_param_group(self, param_group: dict) -> None:
        # a group's own lr/betas/... (constructor groups come through here too) are checked before it joins
        if isinstance(param_group, Mapping):
            _check_adamw_hparams({**self.defaults, **param_group}, f" (param group {len(self.param_groups)})")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._selection_seen.clear()

    def _layer_of(self, p: torch.Tensor) -> SIFTLinear | None:
        ref = self._owners.get(id(p)) or _DELTA_OWNERS.get(p)
        layer = ref() if ref is not None else None
        return layer if layer is not None and layer.delta is p and layer.selected else None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # schedulers and users rewrite param_groups: every group is checked before any state moves
        for i, group in enumerate(self.param_groups):
            _check_adamw_hparams(group, f" (param_groups[{i}])")
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("SparseAdamW: sparse-layout gradients are not supported (SIFT grads are dense [k])")
                layer = self._layer_of(p)
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self._selection_seen.pop(id(p), None)
                if layer is not None and self._selection_seen.setdefault(id(p), layer._selection_id) != layer._selection_id:
                    raise RuntimeError(
                        "SparseAdamW: a SIFT layer's index set changed after its optimizer state was created "
                        "(recalibrated or reloaded); create a new optimizer"
                    )
                if state["exp_avg"].shape != p.shape:
                    raise RuntimeError(f"SparseAdamW: state of shape {list(state['exp_avg'].shape)} for a parameter "
                                       f"of shape {list(p.shape)}; create a new optimizer")
                state["step"] += 1
                step = int(state["step"].item())
                if layer is not None:
                    _k.sparse_adamw_step_(layer.weight, layer.indices, layer.w0_sel, p, grad, state["exp_avg"],
                                          state["exp_avg_sq"], step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                          weight_decay=wd, maximize=group["maximize"])
                    layer._mark_synced()
                else:
                    _adamw_update_(p, -grad if group["maximize"] else grad, state["exp_avg"], state["exp_avg_sq"],
                                   step, lr, beta1, beta2, eps, wd)
        return loss


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------
def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _default_loss(model: nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (list, tuple)):
        out = model(*batch)
    else:
        out = model(batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None and isinstance(out, torch.Tensor):
        loss = out
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("batches: the model output has no scalar loss (does the batch carry labels?); pass loss_fn=")
    return loss


def _configured(model: nn.Module, field: str, default):
    for cfg in _model.applied_configs(model):
        if isinstance(cfg, SIFTConfig):
            return getattr(cfg, field)
    return default


class _GradientScores:
    """Post-accumulate hooks that turn each target weight's gradient into its selection: at once for
    one batch, else |grad| summed in fp32; the dense gradient is freed as soon as it is read."""

    def __init__(self, n_batches: int, density: dict[str, float]):
        self.n_batches, self.density = n_batches, density
        self.selected: dict[str, torch.Tensor] = {}
        self.scores: dict[str, torch.Tensor] = {}
        self.seen: set[str] = set()

    def hook(self, name: str):
        def on_grad(w: torch.Tensor) -> None:
            grad, w.grad = w.grad, None
            self.seen.add(name)
            if self.n_batches == 1:
                self.selected[name] = sift_select(grad, self.density[name])
                return
            if name not in self.scores:
                self.scores[name] = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            _k.abs_accumulate_(self.scores[name], grad)
        return on_grad

    def indices(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name not in self.selected:
            score = self.scores.pop(name, None)
            if score is None:  # no gradient reached the layer: zero scores (the first k entries)
                score = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            self.selected[name] = sift_select(score, self.density[name])
        return self.selected[name]


def _calibration_plan(model: nn.Module, calib_batches, density) -> tuple[list, int, dict[str, float]]:
    """(layers, number of batches, density per layer), every argument checked."""
    layers = calibration_targets(model)
    if not layers:
        raise ValueError("model: no SIFTLinear module (apply a peftops.SIFTConfig first)")
    n_batches = calib_batches if calib_batches is not None else _configured(model, "calib_batches", 1)
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"calib_batches: expected an int >= 1, got {n_batches!r}")
    if density is not None:
        _check_density(density)
    dens = {}
    for name, layer in layers:
        d = density if density is not None else layer.density
        if d is None:
            raise ValueError(f"density: layer {name!r} has no density; pass density= to sift_calibrate")
        dens[name] = d
    return layers, n_batches, dens


def _backward_batches(model: nn.Module, batches: Iterable, n_batches: int, loss_fn, progress: bool) -> None:
    device = next(model.parameters()).device
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_batches, desc="SIFT calibration", leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    try:
        it = iter(batches)
        for i in range(n_batches):
            try:
                batch = next(it)
            except StopIteration:
                raise ValueError(f"batches: calib_batches={n_batches} but only {i} batches were given") from None
            batch = _to_device(batch, device)
            loss = loss_fn(model, batch) if loss_fn is not None else _default_loss(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ValueError("loss_fn: expected a scalar loss tensor that depends on the target weights")
            loss.backward()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


@_model.atomic
def sift_calibrate(model: nn.Module, batches: Iterable, *, loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                   calib_batches: int | None = None, density: float | None = None,
                   progress: bool = True) -> dict[str, torch.Tensor]:
    """Select each SIFTLinear's index set from |∇W L| summed over ``calib_batches`` batches.

    ``batches``: any iterable (a DataLoader); each batch goes through ``loss_fn(model, batch)`` or, by
    default, ``model(**batch).loss`` (dict batches, HF style), ``model(*batch)`` (tuples), ``model(batch)``.
    ``calib_batches`` defaults to the applied SIFTConfig's (else 1); ``density`` to each layer's.
    Only the target weights get gradients, and each is freed in a post-accumulate hook as soon as it
    is ready (selected at once for one batch, |grad| accumulated in fp32 for several), so at most
    one dense weight gradient lives at a time (plus the fp32 scores when calib_batches > 1).
    Every requires_grad flag is restored. Returns {layer name: indices}."""
    layers, n_batches, dens = _calibration_plan(model, calib_batches, density)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    saved_grads = {name: layer.weight.grad for name, layer in layers}
    scores = _GradientScores(n_batches, dens)
    handles = []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for name, layer in layers:
            layer.weight.grad = None
            layer.weight.requires_grad_(True)
            layer._calibrating = True
            handles.append(layer.weight.register_post_accumulate_grad_hook(scores.hook(name)))
        _backward_batches(model, batches, n_batches, loss_fn, progress)
    finally:
        for h in handles:
            h.remove()
        for name, layer in layers:
            layer._calibrating = False
            layer.weight.grad = saved_grads[name]
        for p, flag in flags:
            p.requires_grad_(flag)
    missing = [name for name, _ in layers if name not in scores.seen]
    if missing:
        warnings.warn(f"sift_calibrate: no gradient reached {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                      "their index sets are chosen from zero scores (the first k entries)", stacklevel=2)
    selected = {}
    for name, layer in layers:
        selected[name] = scores.indices(name, layer.weight)
        layer.set_indices(selected[name])
    return selected


def _make_callback_class():
    from transformers import TrainerCallback

    class SIFTCalibrationCallback(TrainerCallback):
        """Calibrates every unselected SIFTLinear at train begin from the Trainer's train dataloader
        (``model(**batch).loss``), so a Trainer loop needs no change:
        ``Trainer(..., callbacks=[SIFTCalibrationCallback()])``. Layers that already have an index
        set (loaded adapter, resumed checkpoint) are left alone unless ``recalibrate=True``.
        Single process only: the Trainer wraps the model for DDP before train begin, when δ still
        has size 0, so with several processes call ``sift_calibrate`` before creating the Trainer."""

        def __init__(self, calib_batches: int | None = None, loss_fn=None, recalibrate: bool = False,
                     progress: bool = True):
            self.calib_batches, self.loss_fn, self.recalibrate, self.progress = calib_batches, loss_fn, recalibrate, progress

        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            if model is None or train_dataloader is None:
                raise RuntimeError("SIFTCalibrationCallback: the Trainer passed no model / train_dataloader")
            layers = calibration_targets(model)
            if not layers or (all(layer.selected for _, layer in layers) and not self.recalibrate):
                return control
            if torch.distributed.is_available() and torch.distributed.is_initialized() \
                    and torch.distributed.get_world_size() > 1:
                raise RuntimeError("SIFTCalibrationCallback: with several processes the Trainer has already wrapped "
                                   "the model (DDP buckets sized for k = 0); call peftops.sift_calibrate(model, batches) "
                                   "before creating the Trainer")
            sift_calibrate(model, train_dataloader, loss_fn=self.loss_fn, calib_batches=self.calib_batches,
                           progress=self.progress)
            return control

    SIFTCalibrationCallback.__module__ = __name__
    return SIFTCalibrationCallback


# transformers' trainer stack takes seconds to import: the callback class is built on first use
__getattr__ = _model.lazy_attributes(__name__, {"SIFTCalibrationCallback": _make_callback_class})


# ----------------------------------------------------------------------------------------------
# Model-level method
# ----------------------------------------------------------------------------------------------
INIT_INDICES = ("calibrate", "random")


@dataclasses.dataclass
class SIFTConfig(_model.PeftMethodConfig):
    """SIFT on every nn.Linear the target fields select (PEFT's rules, ``PeftMethodConfig``;
    ``target_modules=None``: the Llama projections q/k/v/o/gate/up/down if the model has them, else
    BERT's query/key/value/attention.output.dense), for ``peftops.apply`` and ``peft.get_peft_model``."""

    method: ClassVar[str] = "sift"
    density: float = _model._help("Fraction of each weight's entries trained: k = int(density·numel) + 1.", 0.01)
    calib_batches: int = _model._help("Batches whose |∇W| are summed to select the index sets.", 1)
    init_indices: str = _model._help(
        "'calibrate': index sets come from peftops.sift_calibrate(model, batches) (or a loaded adapter) before "
        "training; 'random': uniformly random index sets at creation (ablations, tests).", "calibrate")

    def validate(self) -> None:
        super().validate()
        _check_density(self.density)
        if isinstance(self.calib_batches, bool) or not isinstance(self.calib_batches, int) or self.calib_batches < 1:
            raise ValueError(f"calib_batches: expected an int >= 1, got {self.calib_batches!r}")
        if self.init_indices not in INIT_INDICES:
            raise ValueError(f"init_indices: expected one of {INIT_INDICES}, got {self.init_indices!r}")


def random_indices(weight: torch.Tensor, density: float) -> torch.Tensor:
    """k = sift_k(numel, density) distinct flat indices into ``weight``, uniformly at random (sorted)."""
    k = sift_k(weight.numel(), density)
    return torch.sort(torch.randperm(weight.numel(), device=weight.device)[:k]).values


def _default_targets(model: nn.Module) -> list[str]:
    # any module type: the projections may already be wrapped (another adapter, PEFT's add_adapter)
    return LLAMA_TARGETS if _model.find_target_modules(model, LLAMA_TARGETS, types=(nn.Module,)) else BERT_TARGETS


_MERGED_KEY = "_peftops_sift_layer"  # on a merged nn.Linear: the SIFTLinear it came from (for unmerge)


def _all_sift(model: nn.Module) -> list[tuple[str, SIFTLinear]]:
    """SIFT layers, live or merged into a plain nn.Linear."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, SIFTLinear):
            out.append((name, m))
        elif isinstance(m, nn.Linear) and _MERGED_KEY in m.__dict__:
            out.append((name, m.__dict__[_MERGED_KEY]))
    return out


@_model.register_method
class SIFTMethod(_model.Method):
    name = "sift"
    config_class = SIFTConfig

    def apply(self, model: nn.Module, config: SIFTConfig) -> None:
        if config.target_modules is None:
            config.target_modules = list(_default_targets(model))
        _model.refuse_adapted_targets(model, config, "SIFT")
        found = _model.select_targets(model, config)
        if not found:
            raise ValueError(f"target_modules: no nn.Linear in {type(model).__name__} matches {config.target_modules}")
        for name, linear in found:
            layer = SIFTLinear.from_linear(linear, density=config.density)
            if config.init_indices == "random":
                layer.set_indices(random_indices(layer.weight, config.density))
                if not config.init_weights:
                    with torch.no_grad():
                        layer.delta.normal_(0.0, 0.02)
            _model.replace_module(model, name, layer)

    def adapter_state_dict(self, model: nn.Module, config: SIFTConfig) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in _all_sift(model):
            if not layer.selected:
                raise ValueError(f"model: SIFT layer {name!r} has no index set yet; run sift_calibrate before saving")
            out[f"{name}.indices"] = layer.indices
            out[f"{name}.delta"] = layer.delta.detach()
            out[f"{name}.weight_shape"] = torch.tensor(list(layer.weight.shape), dtype=torch.int64)
        return out

    def load_adapter_state_dict(self, model: nn.Module, config: SIFTConfig, state: dict[str, torch.Tensor]) -> None:
        layers = dict(sift_layers(model))
        if self.is_merged(model, config):
            raise ValueError("model: SIFT is merged; peftops.unmerge(model) before loading an adapter")
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        shapes: dict[str, torch.Tensor] = {}  # '<module>.weight_shape' (optional: older adapters lack it)
        for key, t in state.items():
            mod, _, field = key.rpartition(".")
            if field not in ("indices", "delta", "weight_shape") or not mod:
                raise ValueError(f"state: unexpected SIFT tensor {key!r} (expected '<module>.indices' / '<module>.delta')")
            if field == "weight_shape":
                shapes[mod] = t
            else:
                by_module.setdefault(mod, {})[field] = t
        unknown = sorted((set(by_module) | set(shapes)) - set(layers))
        if unknown:
            raise ValueError(f"state: the adapter has tensors for modules this model has no SIFT layer for: {unknown[:5]} "
                             f"(different base model or target_modules?)")
        missing = sorted(set(layers) - set(by_module))
        if missing:
            raise ValueError(f"state: the adapter has no tensors for the model's SIFT layers {missing[:5]}")
        checked = {}
        for mod, fields in by_module.items():
            layer = layers[mod]
            for f in ("indices", "delta"):
                if f not in fields:
                    raise ValueError(f"state: {mod}.{f} is missing")
            idx, delta = fields["indices"], fields["delta"]
            if idx.dim() != 1 or idx.dtype not in INDEX_DTYPES:
                raise ValueError(f"state: {mod}.indices must be a 1-D int64 tensor, got {list(idx.shape)} {idx.dtype}")
            if delta.dim() != 1 or not delta.is_floating_point():
                raise ValueError(f"state: {mod}.delta must be a 1-D float tensor, got {list(delta.shape)} {delta.dtype}")
            if idx.numel() != delta.numel():
                raise ValueError(f"state: {mod}.indices has {idx.numel()} entries but {mod}.delta has {delta.numel()}")
            numel = layer.weight.numel()
            if not 1 <= idx.numel() <= numel:
                raise ValueError(f"state: {mod}.indices has {idx.numel()} entries; the weight "
                                 f"{list(layer.weight.shape)} allows 1..{numel}")
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= numel:
                raise ValueError(f"state: {mod}.indices holds values in [{lo}, {hi}], outside [0, {numel}) for the "
                                 f"weight {list(layer.weight.shape)}")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise ValueError(f"state: {mod}.indices must be strictly ascending (sorted, unique)")
            checked[mod] = (idx, delta)
        for mod, shape in shapes.items():  # indices that fit another weight's range may still be wrong
            want = list(layers[mod].weight.shape)
            if shape.tolist() != want:
                raise ValueError(f"state: the adapter's {mod} was trained on a weight of shape {shape.tolist()}, this "
                                 f"model's is {want} (a different base model?)")
        for mod, (idx, delta) in checked.items():  # nothing is touched until every tensor checked out
            layer = layers[mod]
            layer.set_indices(idx)
            with torch.no_grad():
                layer.delta.copy_(delta.to(device=layer.delta.device, dtype=layer.delta.dtype))
            layer.resync_()

    @contextlib.contextmanager
    def disabled(self, model: nn.Module, config: SIFTConfig):
        # W0 back into W (k entries each); the next forward after the block merges δ again
        with _model.unmerged_for_block(self, model, config), \
                _model.disabled_layers((m for _, m in sift_layers(model)), prepare=SIFTLinear.restore_base_):
            yield

    def is_merged(self, model: nn.Module, config: SIFTConfig) -> bool:
        return any(isinstance(m, nn.Linear) and _MERGED_KEY in m.__dict__ for m in model.modules())

    def merge(self, model: nn.Module, config: SIFTConfig) -> None:
        """Replace each SIFTLinear by a plain nn.Linear sharing the (merged) weight W0 + δ."""
        for name, layer in sift_layers(model):
            if layer.delta._version != layer._synced_version:
                layer.resync_()
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            linear.weight = layer.weight
            linear.bias = layer.bias
            linear.__dict__[_MERGED_KEY] = layer
            _model.replace_module(model, name, linear)

    def unmerge(self, model: nn.Module, config: SIFTConfig) -> None:
        """Put the SIFTLinear layers back and write W0[I] into the weights, bit-exactly. δ is kept:
        the next forward merges it again (outputs stay adapted, as with PEFT's unmerge)."""
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.Linear) and _MERGED_KEY in m.__dict__:
                _model.replace_module(model, name, m.__dict__.pop(_MERGED_KEY))
        for _, layer in sift_layers(model):
            layer.restore_base_()
