"""AoT P-Tuning: an input-dependent bias added ahead of every transformer layer (docs/design.md#aot-p-tuning).

For task τ and layer l a table P^τ_l ∈ R^{V×d}; before layer l, ``h_l[b, s] += P^{τ_b}_l[x_{b,s}]``
(h_0 = the embedding output, every position, padding included; nothing after the last layer).

Training uses a reparameterisation that yields a row of length L·d per token id (layer-major),
computed only for the unique ids of the batch:

- ``kron``:   row(v) = kron(W_L[v // b], W_M[v % b]) · W_R,   W_L [a, r], W_M [b, r], W_R [r², L·d]
- ``fc``:     row(v) = act(E[v] · W1 + b1) · W2 + b2,          E the frozen word embeddings
- ``direct``: row(v) = P[:, v, :]                                (a trainable [L, V, d]; tiny models)

Ahead of time, each task's full [L, V, d] table is materialised once and the reparameterisation's
parameters are dropped (a copy of their values is kept for saving); serving is one fused gather-add
per layer (in place when autograd is off). Several tasks' tables stack into [T, L, V, d] and one
batch may mix tasks (a task id per sample).

The bias depends on the input ids, so it cannot fold into any weight: ``peftops.merge`` for AoT
serves from materialised tables (same outputs) and keeps the parameters aside, so ``unmerge`` goes
back to training; after compile_aot_tables ``unmerge`` is not possible.

On disk (docs/aot-on-disk.md): ``peftops.save_adapter`` stores the trained reparameterisation (the
small factors), also after compile_aot_tables or peftops.merge; loading a folder saved in serving
mode materialises its tables again (in the saved table_dtype, bit for bit the tables the saved model
served). Compiled tables are stored only when asked, with ``save_aot_tables`` (in the serving dtype).
Folders holding tables (save_aot_tables, or earlier peftops versions) load as before.

    cfg = AoTConfig(reparam="kron", rank=16)
    model = peftops.apply(model, cfg)            # hooks the embedding and every layer
    ...train...
    compile_aot_tables(model, dtype=torch.bfloat16)
    peftops.save_adapter(model, "task_a/")       # the factors (MiB); tables are materialised on load
    save_aot_tables(model, "task_a_tables/")     # only if asked: the [1, L, V, d] bf16 tables
    serve = load_task_tables(base, ["task_a/", "task_b/"])   # factor and table folders, mixed
    serve(input_ids, aot_task_ids=torch.tensor([0, 1, 1, 0]))
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
from typing import ClassVar, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import aot as K
from .kernels._checks import INDEX_DTYPES, check_index_range, check_tensor
from .model import AdapterConfig, Method, applied_configs, atomic, load_checked_state, register_method

__all__ = [
    "aot_bias_add", "aot_table_grad", "aot_segment_plan", "AoTConfig", "AoTMethod", "AoTBias", "AoTLayerBias",
    "compile_aot_tables", "materialize_aot_tables", "stack_task_tables", "set_aot_tables", "load_task_tables",
    "save_aot_tables", "aot_tasks", "aot_disabled", "get_aot",
]


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("peftops::aot_bias_add", mutates_args=())
def _bias_add_op(hidden: Tensor, input_ids: Tensor, table: Tensor, task_ids: Optional[Tensor],
                 plan: Optional[Tensor], validate: bool, sparse_grad: bool) -> Tensor:
    if validate:  # ids first, then whether the plan is theirs (one host sync each)
        K.check_gather_add_args(hidden, input_ids, table, task_ids, values=True)
        if plan is not None:
            K.check_plan(plan, input_ids, task_ids, table.shape[-2], values=True)
    out = K.gather_add(hidden, input_ids, table, task_ids, validate=False)
    return out.contiguous()


@_bias_add_op.register_fake
def _(hidden, input_ids, table, task_ids, plan, validate, sparse_grad):
    return hidden.new_empty(hidden.shape)


@torch.library.custom_op("peftops::aot_bias_add_", mutates_args=("hidden",))
def _bias_add_inplace_op(hidden: Tensor, input_ids: Tensor, table: Tensor, task_ids: Optional[Tensor],
                         validate: bool) -> None:
    K.gather_add(hidden, input_ids, table, task_ids, out=hidden, validate=validate)


@_bias_add_inplace_op.register_fake
def _(hidden, input_ids, table, task_ids, validate):
    return None


@torch.library.custom_op("peftops::aot_table_grad", mutates_args=())
def _table_grad_op(grad: Tensor, input_ids: Tensor, task_ids: Optional[Tensor], plan: Optional[Tensor],
                   table_shape: list[int], dtype: torch.dtype) -> Tensor:
    return K.table_grad_dense(grad, input_ids, table_shape, task_ids, dtype=dtype, plan=plan, validate=False)


@_table_grad_op.register_fake
def _(grad, input_ids, task_ids, plan, table_shape, dtype):
    return grad.new_empty(table_shape, dtype=dtype)


@torch.library.custom_op("peftops::aot_table_grad_rows", mutates_args=())
def _table_grad_rows_op(grad: Tensor, input_ids: Tensor, task_ids: Optional[Tensor], plan: Optional[Tensor],
                        vocab: int, n_tasks: int, dtype: torch.dtype, validate: bool) -> tuple[Tensor, Tensor]:
    rows, sums = K.table_grad_rows(grad, input_ids, vocab, task_ids, n_tasks=n_tasks, dtype=dtype, plan=plan,
                                   validate=validate)
    return rows.clone(), sums  # rows may be a slice of the plan: outputs must not alias inputs


@_table_grad_rows_op.register_fake
def _(grad, input_ids, task_ids, plan, vocab, n_tasks, dtype, validate):
    u = torch.library.get_ctx().new_dynamic_size()
    return grad.new_empty(u, dtype=torch.long), grad.new_empty(u, grad.shape[-1], dtype=dtype)


def _bias_add_setup(ctx, inputs, output):
    hidden, input_ids, table, task_ids, plan, validate, sparse_grad = inputs
    ctx.table_shape = list(table.shape)
    ctx.table_dtype = table.dtype
    ctx.sparse_grad = sparse_grad
    ctx.validated = validate
    if ctx.needs_input_grad[2]:
        ctx.save_for_backward(input_ids, task_ids, plan)


def _drop_unread_tokens(grad, input_ids, task_ids, vocab, n_tasks):
    """Unvalidated ids: tokens whose id or task id is out of range read no row (no bias), so they
    send no gradient: their gradient rows become 0 and their ids 0 (a valid row, + 0)."""
    ok = (input_ids >= 0) & (input_ids < vocab)
    if task_ids is not None:
        ok_task = (task_ids >= 0) & (task_ids < n_tasks)
        ok = ok & ok_task.view(-1, *([1] * (input_ids.dim() - 1)))
        task_ids = torch.where(ok_task, task_ids, 0)
    return torch.where(ok[..., None], grad, 0), torch.where(ok, input_ids, 0), task_ids


def _bias_add_backward(ctx, grad):
    grad_hidden = grad if ctx.needs_input_grad[0] else None
    grad_table = None
    if ctx.needs_input_grad[2]:
        input_ids, task_ids, plan = ctx.saved_tensors
        shape = ctx.table_shape
        if not ctx.validated and plan is None:  # never write (or return) a row outside the table
            grad, input_ids, task_ids = _drop_unread_tokens(grad, input_ids, task_ids, shape[-2],
                                                            shape[0] if len(shape) == 3 else 1)
        if ctx.sparse_grad:
            vocab, n_tasks = shape[-2], (shape[0] if len(shape) == 3 else 1)
            rows, sums = _table_grad_rows_op(grad, input_ids, task_ids, plan, vocab, n_tasks, ctx.table_dtype, False)
            index = rows[None] if len(shape) == 2 else torch.stack([rows // vocab, rows % vocab])
            grad_table = torch.sparse_coo_tensor(index, sums, shape, check_invariants=False, is_coalesced=True)
        else:
            grad_table = _table_grad_op(grad, input_ids, task_ids, plan, shape, ctx.table_dtype)
    return grad_hidden, None, grad_table, None, None, None, None


_bias_add_op.register_autograd(_bias_add_backward, setup_context=_bias_add_setup)


# ----------------------------------------------------------------------------------------------
# functional API
# ----------------------------------------------------------------------------------------------
def aot_bias_add(hidden: Tensor, input_ids: Tensor, table: Tensor, task_ids: Tensor | int | None = None, *,
                 inplace: bool | None = False, sparse_grad: bool = False, validate: bool = True,
                 plan: Tensor | None = None) -> Tensor:
    """``hidden + table[task_ids[b], input_ids[b, s]]``, one fused pass.

    hidden [..., S, d] (any float dtype); input_ids [..., S] (int32/int64); table [V, d] or
    stacked [n_tasks, V, d] (any float dtype: the sum is taken in fp32, fp64 if an operand is
    fp64, and rounded once to hidden's dtype, on both paths); task_ids [B] = one task per sample
    (B = hidden.shape[0]), or an int for the whole batch; required iff n_tasks > 1.

    Gradients flow to hidden (identity) and to the table: by default a table-shaped gradient
    (written row by row, zero-filled only where rows do not occur), with ``sparse_grad=True`` a
    sparse COO gradient holding only the rows that occur (eager mode; for SparseAdam/SGD).

    ``inplace``: False returns a new tensor; True writes into hidden (only when autograd does not
    record this op, and hidden's elements do not share memory); None = in place exactly when that
    is possible.
    ``validate`` checks the id and task id ranges first (a host sync), and a given plan's contents;
    with ``validate=False`` out-of-range ids get no bias (and send no gradient) instead of an
    out-of-bounds read, and a plan is checked for its shape only (it must then be right).
    ``plan``: aot_segment_plan of these ids (and task ids; of the ids alone with an int task id),
    to share the backward's sort across several calls with the same ids (e.g. all layers).
    """
    K.check_flag("inplace", inplace, allow_none=True)
    K.check_flag("sparse_grad", sparse_grad)
    K.check_flag("validate", validate)
    if task_ids is not None and not isinstance(task_ids, Tensor):
        if isinstance(task_ids, bool) or not isinstance(task_ids, numbers.Integral):
            raise TypeError(f"task_ids: expected a tensor of task ids [B], an int or None, "
                            f"got {type(task_ids).__name__} {task_ids!r}")
        check_tensor("table", table, ndim=3)
        task = int(task_ids)
        if not 0 <= task < table.shape[0]:
            raise IndexError(f"task_ids: task {task} out of range for {table.shape[0]} stacked tasks")
        if sparse_grad and table.requires_grad and torch.is_grad_enabled():
            # a sparse gradient cannot flow back through table[task] (no sparse select_backward):
            # the whole stacked table with task ``task`` for every sample, the plan's rows moved to it
            check_tensor("input_ids", input_ids, dtypes=INDEX_DTYPES)
            if input_ids.dim() == 0:
                return aot_bias_add(hidden.unsqueeze(0), input_ids.unsqueeze(0), table, task, sparse_grad=True,
                                    validate=validate, plan=plan, inplace=inplace).squeeze(0)
            if plan is not None:
                K.check_plan(plan, input_ids, None, table.shape[1], values=False)
                plan = K.plan_shift_rows(plan, input_ids.numel(), task * table.shape[1])
            task_ids = torch.full((input_ids.shape[0],), task, dtype=torch.long, device=table.device)
        else:
            table, task_ids = table[task], None
    # shapes here (traceable); the value checks (a host sync) run inside the ops
    K.check_gather_add_args(hidden, input_ids, table, task_ids, values=False)
    if plan is not None and not torch.compiler.is_compiling():  # a traced plan's length is data dependent:
        K.check_plan(plan, input_ids, task_ids, table.shape[-2], values=False)  # the ops check it then
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or table.requires_grad)
    overlapping = K.internal_overlap(hidden)
    if inplace is None:
        inplace = not needs_grad and not overlapping
    if inplace:
        if needs_grad:
            raise ValueError("inplace: True, but autograd records this op (hidden or table requires grad); "
                             "use inplace=False (or None to choose automatically)")
        if overlapping:
            raise ValueError(f"inplace: True, but hidden's elements share memory (strides {hidden.stride()}, "
                             "an expand()?); use inplace=False")
        torch.ops.peftops.aot_bias_add_(hidden, input_ids, table, task_ids, validate)
        return hidden
    return _bias_add_op(hidden, input_ids, table, task_ids, plan, validate, sparse_grad)


def aot_table_grad(grad_output: Tensor, input_ids: Tensor, vocab_size: int, task_ids: Tensor | None = None, *,
                   n_tasks: int = 1, dtype: torch.dtype = torch.float32, plan: Tensor | None = None,
                   validate: bool = True) -> tuple[Tensor, Tensor]:
    """Table gradient of aot_bias_add as ``(rows [U] int64, grads [U, d])`` for an optimizer.

    rows are the distinct rows of the flattened [n_tasks·V, d] table the tokens read (task·V + id),
    ascending; grads[i] sums grad_output over those tokens in fp32 (fp64 for an fp64 grad_output)
    in a fixed order (bitwise deterministic), rounded once to ``dtype`` (a floating dtype). No V×d
    tensor is allocated. ``validate=False`` skips the id range check and the check of a plan's
    contents (ids already checked by the forward; plan from aot_segment_plan of these ids)."""
    K.check_count("vocab_size", vocab_size)
    K.check_count("n_tasks", n_tasks)
    K.check_float_dtype("dtype", dtype)
    K.check_flag("validate", validate)
    # shapes here (traceable); the value checks (a host sync) run inside the op
    K.check_grad_args(grad_output, input_ids, n_tasks, vocab_size, task_ids, False, dtype,
                       None if torch.compiler.is_compiling() else plan)  # the op checks a traced plan
    return _table_grad_rows_op(grad_output, input_ids, task_ids, plan, int(vocab_size), int(n_tasks), dtype, validate)


def aot_segment_plan(input_ids: Tensor, vocab_size: int, task_ids: Tensor | None = None, *,
                     n_tasks: int | None = None) -> Tensor:
    """Sort plan of the table rows ``input_ids`` read (one sort; host syncs for the range checks and
    the number of distinct rows), reusable by every aot_bias_add / aot_table_grad call with the same
    ids and task ids. Ids must lie in [0, vocab_size), task ids in [0, n_tasks) (>= 0 if n_tasks
    is None)."""
    check_tensor("input_ids", input_ids, dtypes=INDEX_DTYPES)
    vocab_size = K.check_count("vocab_size", vocab_size)
    if n_tasks is not None:
        n_tasks = K.check_count("n_tasks", n_tasks)
    if task_ids is not None:
        if not isinstance(task_ids, Tensor):
            raise TypeError(f"task_ids: expected a tensor of task ids [B] or None, got {type(task_ids).__name__} "
                            f"{task_ids!r} (with an int task id, build the plan of the ids alone)")
        K.check_task_tensor(task_ids, input_ids)
        K.check_same_device(input_ids=input_ids, task_ids=task_ids)
        check_index_range("task_ids", task_ids, n_tasks if n_tasks is not None else 2 ** 62,
                          what="task ids" + (f" (the table stacks {n_tasks} tasks)" if n_tasks else ""))
    elif n_tasks is not None and n_tasks != 1:
        raise ValueError(f"task_ids: required for a stacked table of {n_tasks} tasks")
    check_index_range("input_ids", input_ids, vocab_size, what=f"token ids (vocabulary V = {vocab_size})")
    return K.segment_plan(K.flat_table_rows(input_ids, task_ids, vocab_size))


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
_REPARAMS = ("kron", "fc", "direct")
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu, "identity": lambda x: x}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_DEFAULT_RANK = {"kron": 16, "fc": 64, "direct": None}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass
class AoTConfig(AdapterConfig):
    """AoT P-Tuning settings.

    reparam: "kron" | "fc" | "direct". rank: kron r (default 16; W_R has r² rows) or fc width r
    (default 64). kron_factors: [a, b] with a·b ≥ V (default ceil(sqrt V) each). activation: fc's
    act (relu, gelu, tanh, silu, identity). sparse_grad: direct tables get sparse gradients.
    inplace: serve in place when autograd is off (hidden_states requested with
    output_hidden_states are then not touched either: in place is skipped for those calls).
    target_modules: dotted name of the transformer-layer ModuleList (default: found automatically).
    compiled / n_tasks / table_dtype: set by compile_aot_tables / set_aot_tables / merge (the model
    then serves [n_tasks, L, V, d] tables of table_dtype). In a saved folder they say how the loaded
    model serves: compiled folders materialise their tables on load in table_dtype when they hold
    the reparameterisation (what save_adapter stores), and load the tables as they are when they
    hold ``tables`` (what save_aot_tables stores, and what earlier peftops versions stored)."""

    method: ClassVar[str] = "aot"
    reparam: str = "kron"
    rank: int | None = None
    kron_factors: list[int] | None = None
    activation: str = "relu"
    sparse_grad: bool = False
    inplace: bool = True
    compiled: bool = False
    n_tasks: int = 1
    table_dtype: str | None = None

    def validate(self) -> None:
        super().validate()

        def choice(name, value, options, none_ok=False):
            if value is None and none_ok:
                return
            if not isinstance(value, str):
                raise TypeError(f"{name}: expected one of {sorted(options)}{' or None' if none_ok else ''}, "
                                f"got {type(value).__name__} {value!r}")
            if value not in options:
                raise ValueError(f"{name}: expected one of {sorted(options)}{' or None' if none_ok else ''}, "
                                 f"got {value!r}")

        choice("reparam", self.reparam, _REPARAMS)
        if self.rank is not None:
            K.check_count("rank", self.rank)
        if self.kron_factors is not None:
            if not isinstance(self.kron_factors, (list, tuple)):
                raise TypeError(f"kron_factors: expected [a, b] (two positive ints) or None, "
                                f"got {type(self.kron_factors).__name__} {self.kron_factors!r}")
            kf = list(self.kron_factors)
            if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in kf):
                raise TypeError(f"kron_factors: expected [a, b] with positive ints, got {self.kron_factors!r}")
            if len(kf) != 2 or min(kf) < 1:
                raise ValueError(f"kron_factors: expected [a, b] with positive ints, got {self.kron_factors!r}")
            self.kron_factors = [int(x) for x in kf]
        choice("activation", self.activation, _ACTIVATIONS)
        for name in ("sparse_grad", "inplace", "compiled"):
            K.check_flag(name, getattr(self, name))
        K.check_count("n_tasks", self.n_tasks)
        choice("table_dtype", self.table_dtype, _DTYPES, none_ok=True)
        if self.target_modules is not None and len(self.target_modules) != 1:
            raise ValueError("target_modules: AoT takes one name, that of the layer ModuleList, "
                             f"got {self.target_modules!r}")

    def to_dict(self):
        # save_aot_tables stores the compiled tables: the saved config then says so (compiled, the
        # number of tasks, the dtype stored), whatever mode the model itself is in
        return {**super().to_dict(), **(self.__dict__.get("_store_tables") or {})}

    @property
    def resolved_rank(self) -> int | None:
        return self.rank if self.rank is not None else _DEFAULT_RANK[self.reparam]


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------
class _Runtime:
    """Per-forward state shared by the hooks (plain object: never a parameter or submodule)."""

    def __init__(self):
        self.ids: Tensor | None = None
        self.uniq: Tensor | None = None
        self.inv: Tensor | None = None
        self.plan: Tensor | None = None
        self.features: Tensor | None = None
        self.call_task_ids: Tensor | int | None = None
        self.inplace_ok = True

    def reset(self):
        self.__init__()


_NEEDS_IDS = ("AoT P-Tuning needs the input_ids of every forward (its bias is indexed by token id), but the "
              "layers ran without a preceding embedding lookup of input_ids (an inputs_embeds-only call?). "
              "Pass input_ids instead of inputs_embeds.")


class AoTLayerBias(nn.Module):
    """The bias unit of one transformer layer: ``forward(h, runtime) = h + P_l[ids]``.

    Owns layer l's part of the reparameterisation (kron: W_R's columns l·d:(l+1)·d as ``right``
    [r², d]; fc: W2's and b2's as ``out_weight`` [r, d], ``out_bias`` [d]; direct: ``table``
    [V, d]); nothing once compiled (the tables belong to AoTBias). Its first argument and its
    output are the representations entering and leaving the unit (SAFE's X and Y)."""

    peftops_adapter = True

    def __init__(self, owner: "AoTBias", index: int):
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle)
        self.index = index

    def adapter_parameters(self) -> list[nn.Parameter]:
        """This layer's own part plus the factors shared by all layers (kron's W_L, W_M; fc's W1, b1):
        SAFE freezes a shared factor only when every layer owning it is frozen."""
        return list(self.parameters()) + self._owner[0].shared_parameters()

    def rows(self, features: Tensor | None, ids: Tensor) -> Tensor:
        """This layer's bias rows [len(ids), d] for the given ids (features = owner.features(ids))."""
        kind = self._owner[0].config.reparam
        if kind == "kron":
            return features @ self.right
        if kind == "fc":
            return torch.addmm(self.out_bias, features, self.out_weight)
        return F.embedding(ids, self.table, sparse=self._owner[0].config.sparse_grad)

    def forward(self, hidden: Tensor, runtime: _Runtime) -> Tensor:
        owner = self._owner[0]
        ids = runtime.ids
        if ids is None:
            raise ValueError(_NEEDS_IDS)
        if tuple(ids.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(f"input_ids: the captured ids have shape {list(ids.shape)}, but layer {self.index} "
                             f"received hidden states of shape {list(hidden.shape)}. " + _NEEDS_IDS)
        inplace = None if runtime.inplace_ok else False
        if owner.compiled:
            table, task_ids = owner.layer_table(self.index, runtime, hidden)
            return aot_bias_add(hidden, ids, table, task_ids, inplace=inplace, validate=False)
        table = self.rows(runtime.features, runtime.uniq)
        return aot_bias_add(hidden, runtime.inv, table, inplace=inplace, validate=False, plan=runtime.plan)


class AoTBias(nn.Module):
    """Everything AoT adds to one model (attached as ``model.peftops_aot``).

    Training: the shared reparameterisation parameters (kron: ``kron_left`` [a, r], ``kron_mid``
    [b, r]; fc: ``fc_weight`` [d_emb, r], ``fc_bias`` [r]) and ``layers`` (one AoTLayerBias per
    transformer layer). Serving: the ``tables`` buffer [n_tasks, L, V, d]."""

    def __init__(self, config: AoTConfig, n_layers: int, vocab_size: int, hidden_size: int,
                 embedding: nn.Embedding, *, device=None, dtype=torch.float32, init: bool = True):
        super().__init__()
        self.config = config
        self.n_layers, self.vocab_size, self.hidden_size = n_layers, vocab_size, hidden_size
        self._embedding = [embedding]
        self._rt = _Runtime()
        self._task_ids: Tensor | int | None = None
        self.enabled = True
        self.compiled = bool(config.compiled)
        self.layers = nn.ModuleList(AoTLayerBias(self, i) for i in range(n_layers))
        self.register_buffer("tables", None)
        self._merge_stash = None  # peftops.merge: the parameters set aside for unmerge
        self._kept_reparam: dict[str, Tensor] | None = None  # compiled: the values the tables came from
        if not self.compiled:
            self._build_reparam(device, dtype, init)

    # -- reparameterisation ---------------------------------------------------------------------
    def _build_reparam(self, device, dtype, init=True):
        """The reparameterisation's parameters, initialised (init=False: uninitialised, for a load;
        the random generator is then left alone)."""
        cfg, V, d = self.config, self.vocab_size, self.hidden_size
        r = cfg.resolved_rank
        kw = dict(device=device, dtype=dtype)
        if cfg.reparam == "kron":
            a, b = cfg.kron_factors or [math.isqrt(V - 1) + 1] * 2
            if a * b < V:
                raise ValueError(f"kron_factors: a·b = {a}·{b} = {a * b} must cover the vocabulary V = {V}")
            self.kron_b = b
            # W_R starts at zero (the model starts unchanged); W_L, W_M ~ N(0, 1/r) so kron rows have norm ~1
            self.kron_left = nn.Parameter(torch.randn(a, r, **kw) * r ** -0.5 if init else torch.empty(a, r, **kw))
            self.kron_mid = nn.Parameter(torch.randn(b, r, **kw) * r ** -0.5 if init else torch.empty(b, r, **kw))
            for unit in self.layers:
                unit.right = nn.Parameter(torch.zeros(r * r, d, **kw))
        elif cfg.reparam == "fc":
            emb = self._embedding[0].weight
            d_emb = emb.shape[1]
            bound = d_emb ** -0.5  # nn.Linear's default init for W1, b1; W2, b2 start at zero
            w1, b1 = torch.empty(d_emb, r, **kw), torch.empty(r, **kw)
            if init:
                w1.uniform_(-bound, bound)
                b1.uniform_(-bound, bound)
            self.fc_weight, self.fc_bias = nn.Parameter(w1), nn.Parameter(b1)
            for unit in self.layers:
                unit.out_weight = nn.Parameter(torch.zeros(r, d, **kw))
                unit.out_bias = nn.Parameter(torch.zeros(d, **kw))
        else:
            for unit in self.layers:
                unit.table = nn.Parameter(torch.zeros(V, d, **kw))

    def reparam_state(self) -> dict[str, Tensor] | None:
        """The trained reparameterisation behind this adapter, named as ``named_parameters`` names it
        while training: the live parameters (training); the parameters peftops.merge set aside; the
        values compile_aot_tables, or a load that materialised the tables, kept (detached copies).
        None when the tables came without one (set_aot_tables, a folder of tables, several tasks)."""
        if not self.compiled:
            return dict(self.named_parameters())
        if self._merge_stash is not None:
            shared, per_layer, _ = self._merge_stash
            return {**shared, **{f"layers.{i}.{k}": p for i, params in enumerate(per_layer) for k, p in params.items()}}
        return dict(self._kept_reparam) if self._kept_reparam is not None else None

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters shared by all layers' units (kron's W_L, W_M; fc's W1, b1)."""
        return list(self._parameters.values())

    def features(self, ids: Tensor) -> Tensor | None:
        """Shared per-id features: kron [n, r²] = kron(W_L[v // b], W_M[v % b]); fc [n, r]; direct None."""
        kind = self.config.reparam
        if kind == "kron":
            left = self.kron_left[ids // self.kron_b]
            mid = self.kron_mid[ids % self.kron_b]
            return (left[:, :, None] * mid[:, None, :]).reshape(ids.numel(), -1)
        if kind == "fc":
            e = self._embedding[0].weight[ids].to(self.fc_weight.dtype)
            return _ACTIVATIONS[self.config.activation](torch.addmm(self.fc_bias, e, self.fc_weight))
        return None

    def reparam_rows(self, ids: Tensor) -> Tensor:
        """The reparameterised rows [n, L·d] (layer-major) of token ids [n]."""
        self._require_reparam()
        ids = ids.reshape(-1).long()
        f = self.features(ids)
        return torch.cat([unit.rows(f, ids) for unit in self.layers], dim=1)

    @torch.no_grad()
    def materialize(self, dtype: torch.dtype | None = None, chunk: int = 4096) -> Tensor:
        """This task's full table [L, V, d] from the reparameterisation (V in chunks)."""
        self._require_reparam()
        _check_table_dtype(dtype)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
        dtype = dtype or self._embedding[0].weight.dtype
        ref = next(self.parameters())
        out = torch.empty(self.n_layers, self.vocab_size, self.hidden_size, dtype=dtype, device=ref.device)
        for start in range(0, self.vocab_size, chunk):
            ids = torch.arange(start, min(start + chunk, self.vocab_size), device=ref.device)
            f = self.features(ids)
            for unit in self.layers:
                out[unit.index, start:start + ids.numel()] = unit.rows(f, ids).to(dtype)
        return out

    def _require_reparam(self):
        if self.compiled:
            raise ValueError("model: the AoT tables are compiled; the reparameterisation was dropped")

    # -- compiled tables -------------------------------------------------------------------------
    def set_tables(self, tables: Tensor) -> None:
        """Serve from ``tables`` [L, V, d] or [n_tasks, L, V, d]; drops the reparameterisation."""
        check_tensor("tables", tables, ndim=(3, 4), dtypes=tuple(_DTYPES.values()))
        if tables.dim() == 3:
            tables = tables.unsqueeze(0)
        T, L, V, d = tables.shape
        if L != self.n_layers:
            raise ValueError(f"tables: {L} layers, the model has {self.n_layers} (shape {list(tables.shape)})")
        if V != self.vocab_size:
            raise ValueError(f"tables: vocabulary {V} does not match the model's {self.vocab_size} "
                             f"(shape {list(tables.shape)})")
        if d != self.hidden_size:
            raise ValueError(f"tables: hidden size {d} does not match the model's {self.hidden_size} "
                             f"(shape {list(tables.shape)})")
        device = self._embedding[0].weight.device
        self._merge_stash = None  # explicit tables replace whatever peftops.merge or compile kept aside
        self._kept_reparam = None
        self._drop_reparam()
        self.tables = tables.to(device).contiguous()
        self.compiled = True
        self.config.compiled = True
        self.config.n_tasks = T
        self.config.table_dtype = _dtype_name(tables.dtype)

    def _drop_reparam(self):
        for name in list(self._parameters):
            delattr(self, name)
        for unit in self.layers:
            for name in list(unit._parameters):
                delattr(unit, name)

    def check_task_ids(self, task_ids) -> Tensor | int | None:
        """Validate task ids against the stacked tables (one host sync for a tensor)."""
        if task_ids is None:
            return None
        if not self.compiled:
            raise ValueError("task_ids: multi-task batches need compiled tables (compile_aot_tables / "
                             "load_task_tables); a training-mode AoT model has one task")
        n = self.config.n_tasks
        if isinstance(task_ids, bool):
            raise TypeError(f"task_ids: expected a tensor of task ids [B], a list of ints, an int or None, got bool "
                            f"{task_ids!r}")
        if isinstance(task_ids, numbers.Integral):
            if not 0 <= task_ids < n:
                raise IndexError(f"task_ids: task {task_ids} out of range for {n} stacked tasks")
            return int(task_ids)
        if isinstance(task_ids, (list, tuple)):
            bad = [t for t in task_ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
            if bad or not task_ids:
                raise TypeError(f"task_ids: expected a non-empty list of ints, got {task_ids!r}")
            if not all(0 <= t < n for t in task_ids):
                raise IndexError(f"task_ids: task ids must lie in [0, {n}) (the tables stack {n} tasks), "
                                 f"got {list(task_ids)}")
            task_ids = torch.tensor([int(t) for t in task_ids], dtype=torch.long)
        check_tensor("task_ids", task_ids, ndim=1, dtypes=INDEX_DTYPES)
        check_index_range("task_ids", task_ids, n, what=f"task ids (the tables stack {n} tasks)")
        return task_ids.to(self._embedding[0].weight.device)

    def layer_table(self, index: int, runtime: _Runtime, hidden: Tensor):
        """(table, task_ids) arguments of layer ``index``'s gather-add in compiled mode."""
        if self.tables is None:
            raise ValueError("model: AoT is in compiled mode but no tables are loaded (load_adapter / set_aot_tables)")
        task = runtime.call_task_ids if runtime.call_task_ids is not None else self._task_ids
        if self.tables.shape[0] == 1:
            return self.tables[0, index], None
        if task is None:
            raise ValueError(f"task_ids: the model serves {self.tables.shape[0]} stacked tasks; pass "
                             "aot_task_ids=... to the forward call or use `with aot_tasks(model, task_ids):`")
        if isinstance(task, int):
            return self.tables[task, index], None
        if task.numel() != hidden.shape[0]:
            raise ValueError(f"task_ids: {task.numel()} task ids for a batch of {hidden.shape[0]} samples")
        return self.tables[:, index], task

    # -- per-forward capture ---------------------------------------------------------------------
    def capture(self, ids: Tensor) -> None:
        """Called with the ids the word embedding is about to embed: prepares this forward's bias.

        No host sync (docs/design.md#aot-kernels): the batch's distinct ids come from a stable sort
        and a cumsum, and everything is sized by the bound M = min(N, V) instead of their number U,
        so rows U..M-1 of the per-batch table are computed (from a batch id), read by no token and
        get a zero gradient. No range check either: the word embedding's own lookup of these ids,
        right after this hook, rejects a bad one (as in the plain model); until then AoT indexes
        with ids clamped to [0, V), so it never reads or writes out of bounds first."""
        rt = self._rt
        rt.ids = ids
        if self.compiled:
            return
        flat = ids.reshape(-1).clamp(0, self.vocab_size - 1)
        n = flat.numel()
        m = min(n, self.vocab_size)
        sorted_ids, perm = torch.sort(flat, stable=True)
        first = torch.cat([torch.ones_like(sorted_ids[:1], dtype=torch.bool), sorted_ids[1:] != sorted_ids[:-1]])
        seg = torch.cumsum(first, 0) - 1  # sorted token -> its id's rank among the batch's distinct ids
        rt.inv = torch.empty_like(seg).scatter_(0, perm, seg).view(ids.shape)
        # padding rows: the smallest batch id (a row the batch has anyway: a sparse gradient
        # coalesces them away); duplicate scatter indices all write the same id
        rt.uniq = sorted_ids[:1].expand(m).clone().scatter_(0, seg, sorted_ids)
        rt.features = self.features(rt.uniq)
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            # one sort plan for the backward of every layer (the rows of a per-batch table are 0..M-1);
            # integer scatter-add: exact, so deterministic
            counts = torch.zeros(m, dtype=torch.long, device=ids.device).scatter_add_(0, seg, torch.ones_like(seg))
            rt.plan = K.pack_plan(perm, torch.arange(m, device=ids.device), counts)
        else:
            rt.plan = None


class _CallHook:
    """Forward pre-hook (with kwargs) on the model apply() was given (``outer``) and on its base
    model: rejects inputs_embeds-only calls and forgets the previous call's ids, so only a fresh
    embedding lookup feeds the layers. The outer one also resets the per-call state and pops
    ``aot_task_ids``."""

    def __init__(self, owner: AoTBias, outer: bool):
        self.owner, self.outer = owner, outer

    def __call__(self, module, args, kwargs):
        owner = self.owner
        rt = owner._rt
        if self.outer:
            rt.reset()
            task_ids = kwargs.pop("aot_task_ids", None)
            if owner.enabled:
                rt.call_task_ids = owner.check_task_ids(task_ids)
                cfg = getattr(module, "config", None)
                wants_hidden = kwargs.get("output_hidden_states")
                if wants_hidden is None:
                    wants_hidden = getattr(cfg, "output_hidden_states", False)
                rt.inplace_ok = owner.config.inplace and not wants_hidden
        if not owner.enabled:
            return args, kwargs
        rt.ids = None
        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        if input_ids is None and kwargs.get("inputs_embeds") is not None:
            raise ValueError(_NEEDS_IDS)
        return args, kwargs


class _EmbeddingHook:
    def __init__(self, owner: AoTBias):
        self.owner = owner

    def __call__(self, module, args):
        if self.owner.enabled and args and isinstance(args[0], Tensor):
            self.owner.capture(args[0])


class _LayerHook:
    def __init__(self, owner: AoTBias, index: int):
        self.owner, self.index = owner, index

    def __call__(self, module, args, kwargs):
        owner = self.owner
        if not owner.enabled:
            return None
        unit = owner.layers[self.index]
        if args:
            return (unit(args[0], owner._rt),) + tuple(args[1:]), kwargs
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = unit(kwargs["hidden_states"], owner._rt)
            return args, kwargs
        raise ValueError(f"model: layer {self.index} was called without hidden states (positional or hidden_states=)")


# ----------------------------------------------------------------------------------------------
# model surgery
# ----------------------------------------------------------------------------------------------
ATTR = "peftops_aot"


def _find_layer_list(model: nn.Module, config: AoTConfig) -> tuple[str, nn.ModuleList]:
    if config.target_modules:
        target = config.target_modules[0]
        for name, mod in model.named_modules():
            if (name == target or name.endswith("." + target)) and isinstance(mod, nn.ModuleList):
                return name, mod
        raise ValueError(f"target_modules: no nn.ModuleList named {target!r} in {type(model).__name__}")
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n) \
                and all(type(m) is type(mod[0]) for m in mod):
            return name, mod
    raise ValueError(f"model: could not find the transformer layer list of {type(model).__name__} "
                     "(an nn.ModuleList of config.num_hidden_layers layers); "
                     "name it with target_modules=['model.layers']")


def _input_embedding(model: nn.Module) -> nn.Embedding:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        embs = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        emb = embs[0] if embs else None
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"model: AoT needs the word embedding (an nn.Embedding) of {type(model).__name__}, "
                         f"found {type(emb).__name__}")
    return emb


def _check_table_dtype(dtype) -> None:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in _DTYPES.values()):
        raise TypeError(f"dtype: expected None or a float dtype {[f'torch.{k}' for k in _DTYPES]}, got {dtype!r}")


def get_aot(model: nn.Module) -> AoTBias:
    """The AoTBias attached to ``model`` by peftops.apply(model, AoTConfig(...))."""
    owner = getattr(model, ATTR, None)
    if not isinstance(owner, AoTBias):
        raise ValueError(f"model: no AoT adapter applied to {type(model).__name__} "
                         "(call peftops.apply(model, AoTConfig()))")
    return owner


def _aot_config(model: nn.Module) -> AoTConfig:
    for c in applied_configs(model):
        if c.method == "aot":
            return c
    return get_aot(model).config


@register_method
class AoTMethod(Method):
    """AoT P-Tuning in the model-level API: adapter = the reparameterisation weights, in every mode
    (compiled tables [n_tasks, L, V, d] only through save_aot_tables, or for a folder that holds
    them); merge = compile (the bias is input dependent and cannot fold into a weight), kept
    reversible by unmerge until compile_aot_tables."""

    name = "aot"
    config_class = AoTConfig

    def apply(self, model: nn.Module, config: AoTConfig) -> None:
        if hasattr(model, ATTR):
            raise ValueError(f"model: already has a {ATTR!r} attribute")
        emb = _input_embedding(model)
        _, layers = _find_layer_list(model, config)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None) or emb.embedding_dim
        dtype = torch.float64 if emb.weight.dtype == torch.float64 else torch.float32
        owner = AoTBias(config, len(layers), emb.num_embeddings, hidden, emb, device=emb.weight.device, dtype=dtype)
        model.add_module(ATTR, owner)
        handles = [model.register_forward_pre_hook(_CallHook(owner, outer=True), with_kwargs=True)]
        base = getattr(model, "base_model", model)
        if isinstance(base, nn.Module) and base is not model:
            handles.append(base.register_forward_pre_hook(_CallHook(owner, outer=False), with_kwargs=True))
        owner._handles = handles + [emb.register_forward_pre_hook(_EmbeddingHook(owner))] + [
            layer.register_forward_pre_hook(_LayerHook(owner, i), with_kwargs=True) for i, layer in enumerate(layers)]

    def adapter_state_dict(self, model: nn.Module, config: AoTConfig) -> dict[str, Tensor]:
        """The trained reparameterisation, in every mode (training, merged, compiled); the compiled
        tables only under save_aot_tables (the explicit option). A model serving tables that came
        without a reparameterisation has nothing small to store: that is a named error."""
        owner = get_aot(model)
        store = config.__dict__.get("_store_tables")
        if store is not None:
            return {"tables": _tables_to_store(owner, _DTYPES[store["table_dtype"]])}
        if owner.compiled and owner.tables is None:
            raise ValueError("model: AoT is in compiled mode but holds no tables")
        state = owner.reparam_state()
        if state is None:
            raise ValueError(
                f"model: the AoT adapter serves compiled tables {list(owner.tables.shape)} [n_tasks, L, V, d] "
                "without the reparameterisation they came from (set_aot_tables, load_task_tables, or a folder "
                "of tables), and save_adapter stores reparameterisations only; store the tables explicitly "
                "with peftops.save_aot_tables(model, directory, dtype)")
        return state

    def load_adapter_state_dict(self, model: nn.Module, config: AoTConfig, state: dict[str, Tensor]) -> None:
        owner = get_aot(model)
        if "tables" in state:  # tables stored explicitly (save_aot_tables, or any earlier peftops)
            if set(state) != {"tables"}:
                raise ValueError(f"state: compiled AoT tables are stored alone (exactly 'tables'), got {sorted(state)}")
            tables = state["tables"]
            if tables.dim() != 4:
                raise ValueError(f"state: 'tables' has shape {list(tables.shape)}, expected [n_tasks, L, V, d]")
            owner.set_tables(tables)
            return
        if not owner.compiled:
            _load_reparam(owner, state)
            return
        # a serving model and a stored reparameterisation: materialise the tables now, in table_dtype
        if owner.tables is None and config.n_tasks != 1:
            raise ValueError(f"state: a stored AoT reparameterisation is one task, but the config says "
                             f"n_tasks={config.n_tasks}")
        tmp = _bias_from_state(_geometry(owner), config, state)
        tables = tmp.materialize(_DTYPES[config.table_dtype] if config.table_dtype else None)
        owner.set_tables(tables)
        owner._kept_reparam = {k: p.detach() for k, p in tmp.named_parameters()}

    def disabled(self, model: nn.Module, config: AoTConfig):
        return aot_disabled(model)

    def is_merged(self, model: nn.Module, config: AoTConfig) -> bool:
        return getattr(getattr(model, ATTR, None), "_merge_stash", None) is not None

    def merge(self, model: nn.Module, config: AoTConfig) -> None:
        """Serve from the compiled tables; the reparameterisation is kept aside (same Parameter
        objects) so ``unmerge`` can go back to training (``compile_aot_tables`` drops it for good)."""
        owner = get_aot(model)
        if not owner.compiled:
            dtype = _DTYPES[config.table_dtype] if config.table_dtype else None
            tables = owner.materialize(dtype)
            stash = (dict(owner._parameters), [dict(unit._parameters) for unit in owner.layers],
                     (config.n_tasks, config.table_dtype))
            owner.set_tables(tables)
            owner._merge_stash = stash

    def unmerge(self, model: nn.Module, config: AoTConfig) -> None:
        owner = get_aot(model)
        stash = getattr(owner, "_merge_stash", None)
        if stash is None:
            if not owner.compiled:
                return
            raise ValueError("model: AoT cannot be unmerged: its tables were compiled (compile_aot_tables) or loaded "
                             "compiled, without a reparameterisation to go back to; reload a reparameterised adapter "
                             "to train again")
        shared, per_layer, (n_tasks, table_dtype) = stash
        owner.tables = None
        for name, p in shared.items():
            owner.register_parameter(name, p)
        for unit, params in zip(owner.layers, per_layer):
            for name, p in params.items():
                unit.register_parameter(name, p)
        owner.compiled = owner.config.compiled = False
        owner.config.n_tasks, owner.config.table_dtype = n_tasks, table_dtype
        owner._merge_stash = None


def _load_reparam(owner: AoTBias, state: dict[str, Tensor]) -> None:
    load_checked_state(dict(owner.named_parameters()), state, f"AoT {owner.config.reparam} reparameterisation",
                       f"vocabulary {owner.vocab_size}, hidden {owner.hidden_size}, {owner.n_layers} layers")


def _geometry(owner: AoTBias) -> tuple[nn.Embedding, int, int, int]:
    return owner._embedding[0], owner.n_layers, owner.vocab_size, owner.hidden_size


def _model_geometry(model: nn.Module) -> tuple[nn.Embedding, int, int, int]:
    """(word embedding, L, V, d) of a model AoT is (or could be) applied to."""
    if hasattr(model, ATTR):
        return _geometry(get_aot(model))
    emb = _input_embedding(model)
    _, layers = _find_layer_list(model, AoTConfig())
    hidden = getattr(getattr(model, "config", None), "hidden_size", None) or emb.embedding_dim
    return emb, len(layers), emb.num_embeddings, hidden


def _bias_from_state(geometry, config: AoTConfig, state: dict[str, Tensor]) -> AoTBias:
    """A stand-alone AoTBias (hooked into no model) of ``config``'s reparameterisation holding
    ``state``: the stored tensors, checked against the model's shapes, in the dtype they were
    stored in (the trained model's parameter dtype), so that its ``materialize(dtype)`` is bit for bit
    the saved model's."""
    emb, n_layers, vocab, hidden = geometry
    dtypes = {v.dtype for v in state.values()}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
    if dtype not in _DTYPES.values():  # mixed or not floating: the dtype apply() would give them
        dtype = torch.float64 if emb.weight.dtype == torch.float64 else torch.float32
    cfg = dataclasses.replace(config, compiled=False, n_tasks=1, table_dtype=None)
    tmp = AoTBias(cfg, n_layers, vocab, hidden, emb, device=emb.weight.device, dtype=dtype, init=False)
    _load_reparam(tmp, state)
    return tmp


def _tables_to_store(owner: AoTBias, dtype: torch.dtype) -> Tensor:
    """The tables [n_tasks, L, V, d] save_aot_tables stores, in ``dtype``: materialised from the
    reparameterisation where there is one (rounded once), else the served tables converted."""
    if not owner.compiled:
        return owner.materialize(dtype).unsqueeze(0)
    if owner.tables is None:
        raise ValueError("model: AoT is in compiled mode but holds no tables")
    if owner.tables.dtype == dtype:
        return owner.tables
    state = owner.reparam_state()
    if state is None:
        return owner.tables.to(dtype)
    return _bias_from_state(_geometry(owner), owner.config, state).materialize(dtype).unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# ahead-of-time compilation and multi-task serving
# ----------------------------------------------------------------------------------------------
def materialize_aot_tables(model: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """The trained task's full table [L, V, d] (dtype default: the model's embedding dtype)."""
    return get_aot(model).materialize(dtype)


@atomic
def compile_aot_tables(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Materialise the table [1, L, V, d] in ``dtype`` (default: the embedding's dtype), drop the
    reparameterisation's parameters (nothing trains, unmerge is not possible), serve with the
    gather-add only. Outputs are unchanged up to rounding the table to ``dtype``.

    A detached copy of the reparameterisation's values stays with the adapter (not a parameter or
    buffer: it does not train and is not in the state_dict), so save_adapter still stores the small
    factors, and loading them gives these tables back bit for bit (save_aot_tables stores the tables)."""
    owner = get_aot(model)
    kept = {k: p.detach().clone() for k, p in owner.named_parameters()}
    owner.set_tables(owner.materialize(dtype))
    owner._kept_reparam = kept
    return model


def save_aot_tables(model: nn.Module, directory, dtype: torch.dtype | None = None, *,
                    overwrite: bool = False) -> None:
    """``peftops.save_adapter``, with AoT stored as its compiled tables [n_tasks, L, V, d] in ``dtype``
    (the serving dtype) instead of its reparameterisation: the explicit option for the large form
    (all-MiniLM-L6-v2: 134 MiB in bf16, 268 MiB in fp32, against 0.58 MiB of kron r=8 factors;
    docs/aot-on-disk.md).

    ``dtype`` default: the dtype the model serves its tables in (compiled or merged), else the
    config's table_dtype, else the embedding's dtype (what compile_aot_tables would pick). Tables are
    materialised from the reparameterisation in ``dtype`` where the model has one (bit for bit
    compile_aot_tables(model, dtype)'s), else the served tables are converted. The folder says
    compiled=True, n_tasks, table_dtype; load_adapter / load_task_tables load it as it is. The model
    is not changed. Other applied methods and modules_to_save are saved as save_adapter saves them."""
    from .model import save_adapter

    _check_table_dtype(dtype)
    owner = get_aot(model)
    config = _aot_config(model)
    if owner.compiled:
        if owner.tables is None:
            raise ValueError("model: AoT is in compiled mode but holds no tables")
        dtype, n_tasks = dtype or owner.tables.dtype, owner.tables.shape[0]
    else:
        default = _DTYPES[config.table_dtype] if config.table_dtype else owner._embedding[0].weight.dtype
        dtype, n_tasks = dtype or default, 1
    config._store_tables = {"compiled": True, "n_tasks": int(n_tasks), "table_dtype": _dtype_name(dtype)}
    try:
        save_adapter(model, directory, overwrite=overwrite)
    finally:
        del config._store_tables


def stack_task_tables(tables: Sequence[Tensor]) -> Tensor:
    """Stack per-task tables ([L, V, d] or [n, L, V, d] each) into [n_tasks, L, V, d]."""
    if not tables:
        raise ValueError("tables: expected at least one table")
    parts = []
    for i, t in enumerate(tables):
        check_tensor(f"tables[{i}]", t, ndim=(3, 4))
        parts.append(t if t.dim() == 4 else t.unsqueeze(0))
    first = parts[0]
    for i, t in enumerate(parts[1:], 1):
        if t.shape[1:] != first.shape[1:]:
            raise ValueError(f"tables[{i}]: shape [L, V, d] = {list(t.shape[1:])} differs from "
                             f"tables[0]'s {list(first.shape[1:])}")
        if t.dtype != first.dtype:
            raise ValueError(f"tables[{i}]: dtype {t.dtype} differs from tables[0]'s {first.dtype}")
    return torch.cat(parts, 0)


@atomic
def set_aot_tables(model: nn.Module, tables: Tensor | Sequence[Tensor]) -> nn.Module:
    """Serve ``model`` from these tables ([L, V, d], [n_tasks, L, V, d] or a list of per-task tables);
    applies AoT in compiled mode first if the model has none."""
    if not isinstance(tables, Tensor):
        tables = stack_task_tables(tables)
    if not hasattr(model, ATTR):
        from .model import apply

        n = tables.shape[0] if tables.dim() == 4 else 1
        apply(model, AoTConfig(compiled=True, n_tasks=n, table_dtype=_dtype_name(tables.dtype)))
    get_aot(model).set_tables(tables)
    return model


@atomic
def load_task_tables(model: nn.Module, directories: Sequence[str], dtype: torch.dtype | None = None) -> nn.Module:
    """Multi-task serving: load several saved AoT adapters as stacked tables [n_tasks, L, V, d].

    Task i of the result is directories[i] (a directory with n compiled tasks contributes n). Each
    folder may hold a reparameterisation (save_adapter, in any mode: its table is materialised here)
    or tables (save_aot_tables, or earlier peftops versions), in any mixture.

    ``dtype``: the stacked tables' dtype (a reparameterisation is materialised in it directly, stored
    tables are converted). None: each task in its own serving dtype (a compiled folder's table_dtype;
    for a folder saved while training, the embedding's dtype), stacked in the narrowest dtype that holds
    them all exactly (torch.promote_types; bf16 with fp16 gives fp32), so every task serves exactly as
    load_adapter of its folder alone. All folders are read and checked before the model changes."""
    import os

    from .model import _check_base_class, _read_adapter

    if isinstance(directories, (str, bytes, os.PathLike)) or not isinstance(directories, Sequence):
        raise TypeError(f"directories: expected a list of adapter directories (one per task), got "
                        f"{type(directories).__name__} {directories!r:.60}; for one task pass [directory]")
    if len(directories) == 0:
        raise ValueError("directories: expected at least one adapter directory")
    _check_table_dtype(dtype)
    geometry = _model_geometry(model)
    emb = geometry[0]
    parts = []
    for i, directory in enumerate(directories):
        meta, state = _read_adapter(directory)
        _check_base_class(model, meta, directory)
        entries = [e for e in meta["adapters"] if e.get("method") == "aot"]
        if not entries:
            raise ValueError(f"directories: {directory!s} holds no AoT adapter")
        cfg = AoTConfig.from_dict(entries[0])
        sub = {k[len("aot::"):]: v for k, v in state.items() if k.startswith("aot::")}
        try:
            if "tables" in sub:
                if set(sub) != {"tables"}:
                    raise ValueError(f"state: compiled AoT tables are stored alone (exactly 'tables'), "
                                     f"got {sorted(sub)}")
                holder = AoTBias(dataclasses.replace(cfg, compiled=True), *geometry[1:], emb, device=emb.weight.device)
                holder.set_tables(sub["tables"])  # checks the shape against this model
                t = holder.tables
            else:
                if cfg.compiled and cfg.n_tasks != 1:
                    raise ValueError(f"state: a stored AoT reparameterisation is one task, but the config says "
                                     f"n_tasks={cfg.n_tasks}")
                serve = dtype or (_DTYPES[cfg.table_dtype] if cfg.compiled and cfg.table_dtype else None)
                t = _bias_from_state(geometry, cfg, sub).materialize(serve).unsqueeze(0)
        except (ValueError, TypeError) as e:
            raise type(e)(f"directories[{i}]: {directory!s}: {e}") from None
        parts.append(t)
    target = dtype or functools.reduce(torch.promote_types, [t.dtype for t in parts])
    return set_aot_tables(model, stack_task_tables([t.to(target) for t in parts]))


@contextlib.contextmanager
def aot_tasks(model: nn.Module, task_ids: Tensor | Sequence[int] | int) -> Iterator[nn.Module]:
    """Every forward in the block (generate() included) uses these task ids: one per sample, or one int."""
    owner = get_aot(model)
    previous = owner._task_ids
    owner._task_ids = owner.check_task_ids(task_ids)
    try:
        yield model
    finally:
        owner._task_ids = previous


@contextlib.contextmanager
def aot_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the plain model: no AoT bias inside the block."""
    owner = get_aot(model)
    previous = owner.enabled
    owner.enabled = False
    try:
        yield model
    finally:
        owner.enabled = previous
