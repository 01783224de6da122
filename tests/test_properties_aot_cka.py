"""Property-based tests (hypothesis) of the AoT functional ops and of linear CKA.

Every public entry point on both backends: generated shapes (1, primes, non-powers of two, 0
where meaningful), dtypes and dtype mixes, strided views, NaN/Inf, id ranges with duplicates,
config values. Valid input must give the float64 reference's result within the per-dtype
tolerance (gradients included); bad input must raise a peftops error whose message starts with
the argument's name and a colon, leaving every input bitwise unchanged.
"""
import math
import warnings

import pytest

pytest.importorskip("hypothesis")

import torch  # noqa: E402
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import TOL, assert_close, device_backend_params, force_backend  # noqa: E402
from peftops import AoTConfig, aot_bias_add, aot_segment_plan, aot_table_grad, cka_form, linear_cka  # noqa: E402
from peftops.kernels import aot as K  # noqa: E402
from peftops.kernels.cka import linear_cka_reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN/Inf
BOTH = pytest.mark.parametrize("device,backend", device_backend_params())

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SIZES = [1, 2, 3, 5, 7, 13]          # 1, primes, non-powers of two
WIDTHS = [1, 2, 3, 7, 16, 33, 67]    # hidden sizes: < and > the interpreter's 64-column block
# magnitudes that keep every dtype's sums finite (fp16 tops out at 65504)
SPREAD = {torch.float16: 8.0, torch.bfloat16: 1e3, torch.float32: 1e3, torch.float64: 1e3}


def _coarsest(*dtypes):
    """The dtype whose tolerance bounds a result computed from these (rounding) steps."""
    return max(dtypes, key=lambda dt: TOL[dt][0])


def _acc(*dtypes):
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _snapshot(*ts):
    return [None if t is None else (t.detach().clone(), t.stride()) for t in ts]


def _bits(t):
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    flat = torch.empty(t.numel(), dtype=t.dtype, device=t.device).copy_(t.detach().reshape(-1))
    return flat.view(torch.uint8)


def _unchanged(ts, snaps):
    """Bitwise (NaN-safe) equality of every tensor with its snapshot, strides included."""
    for t, s in zip(ts, snaps):
        if t is None:
            continue
        ref, stride = s
        assert t.dtype == ref.dtype and t.shape == ref.shape and t.stride() == stride
        assert torch.equal(_bits(t), _bits(ref)), "an input changed"


def _close(actual, expected, dtype, scale=1.0):
    """assert_close for finite entries; NaN and ±Inf must sit at the same places."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape
    assert torch.equal(torch.isnan(a), torch.isnan(e)), "NaN positions differ"
    inf = torch.isinf(e)
    assert torch.equal(a[inf], e[inf]), "Inf entries differ"
    fin = torch.isfinite(e)
    assert_close(a[fin], e[fin], dtype=dtype, scale=scale)


def _raises(backend, exc, name, fn, *inputs):
    """fn() raises exc with a message starting with "name:" and leaves ``inputs`` bitwise unchanged."""
    snaps = _snapshot(*inputs)
    with force_backend(backend), pytest.raises(exc, match=rf"^{name}:"):
        fn()
    _unchanged(inputs, snaps)


# ----------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------
def _values(draw, shape, dtype, gen, nonfinite=True):
    """Normal values times a spread; sometimes a NaN / ±Inf planted."""
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * SPREAD[dtype]
    if nonfinite and t.numel() and draw(st.booleans()):
        i = draw(st.integers(0, t.numel() - 1))
        t.view(-1)[i] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    return t.to(dtype)


def _strided(draw, t):
    """t itself, or the same values in a non-contiguous layout (last dim strided or rows padded)."""
    kind = draw(st.sampled_from(["contiguous", "padded", "reversed"])) if t.dim() else "contiguous"
    if kind == "padded":  # rows of a wider buffer: row stride > width
        big = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
        big[..., :t.shape[-1]] = t
        return big[..., :t.shape[-1]]
    if kind == "reversed":  # column-major storage of the last two dims (or a strided 1-D view)
        if t.dim() >= 2:
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)
        big = torch.zeros(2 * t.shape[0], dtype=t.dtype)
        big[::2] = t
        return big[::2]
    return t


@st.composite
def gather_case(draw, allow_empty=True):
    """(hidden, input_ids, table, task_ids, n_tasks) of a valid aot_bias_add call, on the CPU."""
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    B = draw(st.sampled_from(([0] if allow_empty else []) + [1, 2, 3]))
    S = draw(st.sampled_from(([0] if allow_empty else []) + [1, 2, 5, 7]))
    d = draw(st.sampled_from(WIDTHS))
    V = draw(st.sampled_from(SIZES))
    mode = draw(st.sampled_from(["single", "stacked", "int"]))
    n_tasks = 1 if mode == "single" else draw(st.sampled_from([1, 2, 3]))
    h_dt, t_dt = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(FLOATS))
    hidden = _strided(draw, _values(draw, (B, S, d), h_dt, gen))
    shape = (V, d) if mode == "single" else (n_tasks, V, d)
    table = _strided(draw, _values(draw, shape, t_dt, gen))
    ids = torch.randint(0, V, (B, S), generator=gen).to(draw(st.sampled_from(K.INDEX_DTYPES)))
    if B * S > 1 and draw(st.booleans()):  # a heavy duplicate: one id for half the tokens
        ids.view(-1)[: B * S // 2] = ids.view(-1)[0]
    ids = _strided(draw, ids)
    if mode == "single":
        tasks = None
    elif mode == "int":
        tasks = draw(st.integers(0, n_tasks - 1))
    else:
        tasks = _strided(draw, torch.randint(0, n_tasks, (B,), generator=gen).to(draw(st.sampled_from(K.INDEX_DTYPES))))
    return hidden, ids, table, tasks, n_tasks


def _expected_gather(hidden, ids, table, tasks):
    """float64 hidden + table[task, id], token by token."""
    out = hidden.double().clone()
    t3 = table.double() if table.dim() == 3 else table.double()[None]
    for b in range(hidden.shape[0]):
        t = 0 if tasks is None else (tasks if isinstance(tasks, int) else int(tasks[b]))
        for s in range(hidden.shape[1]):
            out[b, s] += t3[t, int(ids[b, s])]
    return out


def _flat_rows(ids, tasks, V):
    flat = ids.long().cpu()
    if tasks is not None and not isinstance(tasks, int):
        flat = flat + tasks.long().cpu()[:, None] * V
    return flat.reshape(-1)


def _to(device, *ts):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in ts]


# ----------------------------------------------------------------------------------------------
# aot_bias_add: forward, in place, gradients
# ----------------------------------------------------------------------------------------------
@BOTH
@given(case=gather_case(), inplace=st.sampled_from([False, True, None]))
def test_bias_add_matches_float64(device, backend, case, inplace):
    hidden, ids, table, tasks, _ = _to(device, *case)
    want = _expected_gather(hidden, ids, table, tasks)
    snaps = _snapshot(hidden, ids, table, tasks if isinstance(tasks, torch.Tensor) else None)
    target = hidden.clone() if inplace is not False else hidden
    with force_backend(backend), torch.no_grad():
        out = aot_bias_add(target, ids, table, tasks, inplace=inplace)
    assert out.shape == hidden.shape and out.dtype == hidden.dtype
    _unchanged([ids, table] + ([hidden] if inplace is False else []), snaps[1:3] + snaps[:1])
    if inplace is False:
        assert out is not hidden
    else:
        assert out is target  # no grad, rows do not overlap: written in place
    _close(out, want, hidden.dtype)  # the sum is exact in fp32/fp64 up to its one rounding to hidden's dtype


@BOTH
@given(case=gather_case(), sparse=st.booleans(), with_plan=st.booleans(), grad_hidden=st.booleans())
@settings(max_examples=15)
def test_bias_add_gradients_match_float64(device, backend, case, sparse, with_plan, grad_hidden):
    hidden, ids, table, tasks, n_tasks = _to(device, *case)
    hidden = hidden.nan_to_num(0.0, 1.0, -1.0)
    h = hidden.detach().clone().requires_grad_(grad_hidden)
    t = table.detach().clone().nan_to_num(0.0, 1.0, -1.0).requires_grad_()
    V = table.shape[-2]
    plan = None
    if with_plan:
        plan_tasks = tasks if isinstance(tasks, torch.Tensor) else None
        plan = aot_segment_plan(ids, V, plan_tasks)
    gen = torch.Generator().manual_seed(ids.numel())
    w = torch.randn(hidden.shape, generator=gen).to(hidden.dtype).to(device)
    with force_backend(backend):
        (aot_bias_add(h, ids, t, tasks, sparse_grad=sparse, plan=plan) * w).sum().backward()
    if grad_hidden:
        assert torch.equal(h.grad, w)  # identity gradient
    g = t.grad.to_dense() if sparse else t.grad
    assert t.grad.is_sparse == sparse and g.dtype == table.dtype and g.shape == table.shape
    d = table.shape[-1]
    want = torch.zeros(math.prod(table.shape[:-1]), d, dtype=torch.float64)
    flat = _flat_rows(ids, tasks, V)
    want.index_add_(0, flat, w.double().cpu().reshape(-1, d))
    offset = tasks * V if isinstance(tasks, int) else 0
    want = want.roll(offset, 0).view(table.shape)
    # the sums run in fp32 (fp64 for an fp64 hidden) and are rounded to the table's dtype
    tol_dt = _coarsest(table.dtype, _acc(hidden.dtype))
    _close(g, want, tol_dt, scale=max(1.0, ids.numel()) ** 0.5)


# ----------------------------------------------------------------------------------------------
# aot_table_grad / aot_segment_plan
# ----------------------------------------------------------------------------------------------
@BOTH
@given(case=gather_case(), out_dtype=st.sampled_from(FLOATS), with_plan=st.booleans())
@settings(max_examples=20)
def test_table_grad_matches_float64(device, backend, case, out_dtype, with_plan):
    grad, ids, table, tasks, n_tasks = _to(device, *case)
    if isinstance(tasks, int):
        tasks = torch.full((grad.shape[0],), tasks, dtype=torch.long, device=device)
    if table.dim() == 2:
        tasks, n_tasks = None, 1
    V, d = table.shape[-2], grad.shape[-1]
    plan = aot_segment_plan(ids, V, tasks, n_tasks=n_tasks) if with_plan else None
    snaps = _snapshot(grad, ids, tasks, plan)
    with force_backend(backend):
        rows, sums = aot_table_grad(grad, ids, V, tasks, n_tasks=n_tasks, dtype=out_dtype, plan=plan)
        rows2, sums2 = aot_table_grad(grad, ids, V, tasks, n_tasks=n_tasks, dtype=out_dtype)
    _unchanged([grad, ids, tasks, plan], snaps)
    flat = _flat_rows(ids, tasks, V)
    assert torch.equal(rows.cpu(), torch.unique(flat)) and rows.dtype == torch.int64
    assert sums.dtype == out_dtype and sums.shape == (rows.numel(), d)
    want = torch.zeros(n_tasks * V, d, dtype=torch.float64).index_add_(0, flat, grad.double().cpu().reshape(-1, d))
    _close(sums, want[rows.cpu()], _coarsest(out_dtype, _acc(grad.dtype)), scale=max(1.0, ids.numel()) ** 0.5)
    assert torch.equal(_bits(sums), _bits(sums2)) and torch.equal(rows, rows2)  # the plan changes no bit


@BOTH
@given(case=gather_case(allow_empty=False), with_tasks=st.booleans(), data=st.data())
@settings(max_examples=20)
def test_segment_plan_is_the_stable_sort_and_any_change_is_refused(device, backend, case, with_tasks, data):
    grad, ids, table, _, _ = _to(device, *case)
    V, d, B = table.shape[-2], grad.shape[-1], grad.shape[0]
    n_tasks = data.draw(st.sampled_from([1, 2, 3])) if with_tasks else 1
    tasks = torch.randint(0, n_tasks, (B,), generator=torch.Generator().manual_seed(B)).to(device) \
        if with_tasks else None
    with force_backend(backend):
        plan = aot_segment_plan(ids, V, tasks, n_tasks=n_tasks if with_tasks else None)
    flat = _flat_rows(ids, tasks, V)
    perm = torch.sort(flat, stable=True)[1]
    seg_row, counts = torch.unique_consecutive(flat[perm], return_counts=True)
    # the stable sort and its segments, then their chunk table (pinned in tests/test_aot_kernels.py)
    n_seg = seg_row.numel()
    assert plan.dtype == torch.int64 and torch.equal(plan.cpu()[:flat.numel() + 2 * n_seg], torch.cat([perm, seg_row, counts]))
    assert torch.equal(plan.cpu(), K.pack_plan(perm, seg_row, counts))
    # any single changed entry makes it another ids' plan: refused with validate=True
    i = data.draw(st.integers(0, plan.numel() - 1))
    delta = data.draw(st.sampled_from([-2, -1, 1, 2, plan.numel()]))
    bad = plan.clone()
    bad[i] += delta
    _raises(backend, ValueError, "plan",
            lambda: aot_table_grad(grad, ids, V, tasks, n_tasks=n_tasks, plan=bad), grad, ids, tasks, bad)
    stacked = torch.zeros((n_tasks, V, d) if with_tasks else (V, d), device=device)
    _raises(backend, ValueError, "plan",
            lambda: aot_bias_add(grad, ids, stacked, tasks, plan=bad), grad, ids, stacked, tasks, bad)


# ----------------------------------------------------------------------------------------------
# bad input: named errors, inputs unchanged
# ----------------------------------------------------------------------------------------------
BIAS_ADD_BAD = [
    "id >= V", "negative id", "task id >= n_tasks", "negative task id", "float ids", "bool ids", "int hidden",
    "float task ids", "bool task ids", "bool task id", "int task out of range", "hidden size", "ids shape",
    "task ids length", "inplace not bool", "sparse_grad not bool", "validate not bool", "plan dtype", "plan length",
    "plan of other ids", "table rank", "hidden 0-dim", "d = 0",
]


@BOTH
@given(case=gather_case(allow_empty=False), kind=st.sampled_from(BIAS_ADD_BAD), data=st.data())
def test_bias_add_bad_input_is_named(device, backend, case, kind, data):
    hidden, ids, table, tasks, n_tasks = _to(device, *case)
    V = table.shape[-2]
    if table.dim() == 2:
        table = table.unsqueeze(0).expand(2, *table.shape).clone()
        n_tasks = 2
    tasks = torch.randint(0, n_tasks, (hidden.shape[0],), generator=torch.Generator().manual_seed(1)).to(device)
    kw = {}
    exc, name = ValueError, None
    ids2 = ids.clone(memory_format=torch.contiguous_format)
    if kind == "id >= V":
        ids2.view(-1)[data.draw(st.integers(0, ids.numel() - 1))] = V + data.draw(st.integers(0, 10 ** 6))
        exc, name = IndexError, "input_ids"
    elif kind == "negative id":
        ids2.view(-1)[data.draw(st.integers(0, ids.numel() - 1))] = -data.draw(st.integers(1, 10 ** 6))
        exc, name = IndexError, "input_ids"
    elif kind == "task id >= n_tasks":
        tasks = tasks.clone()
        tasks[-1] = n_tasks
        exc, name = IndexError, "task_ids"
    elif kind == "negative task id":
        tasks = tasks.clone()
        tasks[0] = -1
        exc, name = IndexError, "task_ids"
    elif kind == "float ids":
        ids2, exc, name = ids.double(), TypeError, "input_ids"
    elif kind == "bool ids":
        ids2, exc, name = ids != 0, TypeError, "input_ids"
    elif kind == "int hidden":
        hidden, exc, name = hidden.nan_to_num(0, 0, 0).to(torch.int32), TypeError, "hidden"
    elif kind == "float task ids":
        tasks, exc, name = tasks.float(), TypeError, "task_ids"
    elif kind == "bool task ids":
        tasks, exc, name = tasks != 0, TypeError, "task_ids"
    elif kind == "bool task id":
        tasks, exc, name = data.draw(st.booleans()), TypeError, "task_ids"
    elif kind == "int task out of range":
        tasks, exc, name = data.draw(st.sampled_from([-1, n_tasks, n_tasks + 7])), IndexError, "task_ids"
    elif kind == "hidden size":
        table, name = table[..., :-1] if table.shape[-1] > 1 else table.repeat(1, 1, 2), "table"
    elif kind == "ids shape":
        ids2, name = ids[..., :-1] if ids.shape[-1] > 1 else ids.repeat(1, 2), "input_ids"
    elif kind == "task ids length":
        tasks, name = torch.cat([tasks, tasks[:1]]), "task_ids"
    elif kind == "inplace not bool":
        kw["inplace"], exc, name = data.draw(st.sampled_from(["yes", 1, 0, 1.0])), TypeError, "inplace"
    elif kind == "sparse_grad not bool":
        kw["sparse_grad"], exc, name = data.draw(st.sampled_from(["no", 1, None])), TypeError, "sparse_grad"
    elif kind == "validate not bool":
        kw["validate"], exc, name = data.draw(st.sampled_from(["no", 0, None])), TypeError, "validate"
    elif kind == "plan dtype":
        plan = aot_segment_plan(ids, V, tasks)
        kw["plan"], exc, name = plan.to(data.draw(st.sampled_from([torch.int32, torch.float32]))), TypeError, "plan"
    elif kind == "plan length":
        plan = aot_segment_plan(ids, V, tasks)
        kw["plan"], name = plan[:-data.draw(st.integers(1, 5))], "plan"
        kw["validate"] = data.draw(st.booleans())  # the shape is checked without validation too
    elif kind == "plan of other ids":
        other = (ids + 1) % V
        assume(not torch.equal(K.flat_table_rows(other, tasks, V), K.flat_table_rows(ids, tasks, V)))
        kw["plan"], name = aot_segment_plan(other, V, tasks), "plan"
    elif kind == "table rank":
        table, name = table[0, 0], "table"
    elif kind == "hidden 0-dim":
        hidden, ids2, name = hidden.reshape(-1)[0], ids.reshape(-1)[0], "hidden"
    elif kind == "d = 0":
        hidden, table, name = hidden[..., :0], table[..., :0], "hidden"
    _raises(backend, exc, name, lambda: aot_bias_add(hidden, ids2, table, tasks, **kw),
            hidden, ids2, table, tasks if isinstance(tasks, torch.Tensor) else None, kw.get("plan"))


TABLE_GRAD_BAD = [
    "vocab bool", "vocab float", "vocab 0", "vocab negative", "n_tasks bool", "n_tasks 0", "dtype int", "dtype bool",
    "dtype str", "id >= V", "task ids missing", "task id >= n_tasks", "int grad", "d = 0", "validate not bool",
    "plan of other ids", "plan dtype", "ids shape",
]


@BOTH
@given(case=gather_case(allow_empty=False), kind=st.sampled_from(TABLE_GRAD_BAD), data=st.data())
def test_table_grad_bad_input_is_named(device, backend, case, kind, data):
    grad, ids, table, _, _ = _to(device, *case)
    V = table.shape[-2]
    kw = dict(n_tasks=1)
    args = [grad, ids, V, None]
    exc, name = ValueError, None
    if kind == "vocab bool":
        args[2], exc, name = True, TypeError, "vocab_size"
    elif kind == "vocab float":
        args[2], exc, name = float(V), TypeError, "vocab_size"
    elif kind in ("vocab 0", "vocab negative"):
        args[2], name = (0 if kind == "vocab 0" else -V), "vocab_size"
    elif kind == "n_tasks bool":
        kw["n_tasks"], exc, name = True, TypeError, "n_tasks"
    elif kind == "n_tasks 0":
        kw["n_tasks"], name = 0, "n_tasks"
    elif kind in ("dtype int", "dtype bool", "dtype str"):
        kw["dtype"] = {"dtype int": data.draw(st.sampled_from([torch.int32, torch.int64, torch.uint8])),
                       "dtype bool": torch.bool, "dtype str": "float32"}[kind]
        exc, name = TypeError, "dtype"
    elif kind == "id >= V":
        ids = ids.clone(memory_format=torch.contiguous_format)
        ids.view(-1)[-1] = V
        exc, name = IndexError, "input_ids"
    elif kind == "task ids missing":
        kw["n_tasks"], name = 2, "task_ids"
    elif kind == "task id >= n_tasks":
        args[3] = torch.full((grad.shape[0],), 2, dtype=torch.long, device=device)
        kw["n_tasks"], exc, name = 2, IndexError, "task_ids"
    elif kind == "int grad":
        args[0], exc, name = grad.nan_to_num(0, 0, 0).long(), TypeError, "grad"
    elif kind == "d = 0":
        args[0], name = grad[..., :0], "grad"
    elif kind == "validate not bool":
        kw["validate"], exc, name = data.draw(st.sampled_from([1, "yes", None])), TypeError, "validate"
    elif kind == "plan of other ids":
        other = (ids + 1) % V
        assume(not torch.equal(other, ids))
        kw["plan"], name = aot_segment_plan(other, V), "plan"
    elif kind == "plan dtype":
        kw["plan"], exc, name = aot_segment_plan(ids, V).int(), TypeError, "plan"
    elif kind == "ids shape":
        ids, name = ids.reshape(-1), "input_ids"
        assume(ids.shape != grad.shape[:-1])
    args[1] = ids
    _raises(backend, exc, name, lambda: aot_table_grad(*args, **kw), args[0], ids, args[3], kw.get("plan"))


SEGMENT_PLAN_BAD = ["vocab bool", "vocab 0", "vocab float", "id >= V", "negative id", "float task ids",
                    "negative task id", "task id >= n_tasks", "task ids length", "int task id", "float ids",
                    "n_tasks bool"]


@BOTH
@given(case=gather_case(allow_empty=False), kind=st.sampled_from(SEGMENT_PLAN_BAD))
@settings(max_examples=15)
def test_segment_plan_bad_input_is_named(device, backend, case, kind):
    _, ids, table, _, _ = _to(device, *case)
    V, B = table.shape[-2], ids.shape[0]
    tasks = torch.zeros(B, dtype=torch.long, device=device)
    kw = {}
    args = [ids, V, tasks]
    exc, name = ValueError, None
    if kind == "vocab bool":
        args[1], exc, name = True, TypeError, "vocab_size"
    elif kind == "vocab 0":
        args[1], name = 0, "vocab_size"
    elif kind == "vocab float":
        args[1], exc, name = float(V), TypeError, "vocab_size"
    elif kind in ("id >= V", "negative id"):
        args[0] = ids.clone(memory_format=torch.contiguous_format)
        args[0].view(-1)[0] = V if kind == "id >= V" else -1
        exc, name = IndexError, "input_ids"
    elif kind == "float task ids":
        args[2], exc, name = tasks.float(), TypeError, "task_ids"
    elif kind == "negative task id":
        args[2] = tasks.clone()
        args[2][-1] = -1
        exc, name = IndexError, "task_ids"
    elif kind == "task id >= n_tasks":
        args[2], kw["n_tasks"], exc, name = tasks + 2, 2, IndexError, "task_ids"
    elif kind == "task ids length":
        args[2], name = torch.zeros(B + 1, dtype=torch.long, device=device), "task_ids"
    elif kind == "int task id":
        args[2], exc, name = 0, TypeError, "task_ids"
    elif kind == "float ids":
        args[0], exc, name = ids.float(), TypeError, "input_ids"
    elif kind == "n_tasks bool":
        kw["n_tasks"], exc, name = True, TypeError, "n_tasks"
    _raises(backend, exc, name, lambda: aot_segment_plan(*args, **kw), args[0],
            args[2] if isinstance(args[2], torch.Tensor) else None)


# ----------------------------------------------------------------------------------------------
# AoTConfig
# ----------------------------------------------------------------------------------------------
VALID_FIELDS = {
    "reparam": st.sampled_from(["kron", "fc", "direct"]),
    "rank": st.one_of(st.none(), st.integers(1, 512)),
    "kron_factors": st.one_of(st.none(), st.lists(st.integers(1, 300), min_size=2, max_size=2)),
    "activation": st.sampled_from(["relu", "gelu", "tanh", "silu", "identity"]),
    "sparse_grad": st.booleans(), "inplace": st.booleans(), "compiled": st.booleans(),
    "n_tasks": st.integers(1, 64),
    "table_dtype": st.sampled_from([None, "float32", "bfloat16", "float16", "float64"]),
}
_ODD = [True, False, float("nan"), -1.5, "x", [1], None, 0, -3, 2.0]
INVALID_FIELDS = {  # (value, exception type)
    "reparam": [("lora", ValueError), (None, TypeError), (["kron"], TypeError), (1, TypeError)],
    "rank": [(0, ValueError), (-4, ValueError), (True, TypeError), (float("nan"), TypeError), (2.0, TypeError),
             ("8", TypeError)],
    "kron_factors": [([2], ValueError), ([0, 3], ValueError), ([True, 3], TypeError), ([2.0, 3], TypeError),
                     (4, TypeError), ("ab", TypeError), ([1, 2, 3], ValueError)],
    "activation": [("swish", ValueError), (["relu"], TypeError), (None, TypeError)],
    "sparse_grad": [(v, TypeError) for v in _ODD if not isinstance(v, bool)],
    "inplace": [(v, TypeError) for v in _ODD if not isinstance(v, bool)],
    "compiled": [(v, TypeError) for v in _ODD if not isinstance(v, bool)],
    "n_tasks": [(0, ValueError), (-2, ValueError), (True, TypeError), (float("nan"), TypeError), (1.0, TypeError)],
    "table_dtype": [("int8", ValueError), ("fp32", ValueError), (["float32"], TypeError), (torch.float32, TypeError),
                    (32, TypeError)],
}


@given(fields=st.fixed_dictionaries(VALID_FIELDS), bad=st.one_of(st.none(), st.sampled_from(
    [(k, v, e) for k, vs in INVALID_FIELDS.items() for v, e in vs])))
def test_config_validate(fields, bad):
    if bad is None:
        cfg = AoTConfig(**fields)
        cfg.validate()
        assert cfg.to_dict()["n_tasks"] == fields["n_tasks"]
        return
    name, value, exc = bad
    with pytest.raises(exc, match=rf"^{name}:"):  # where it is written
        AoTConfig(**{**fields, name: value})
    cfg = AoTConfig(**fields)
    setattr(cfg, name, value)  # and at apply, for a field changed after construction
    with pytest.raises(exc, match=rf"^{name}:"):
        cfg.validate()


# ----------------------------------------------------------------------------------------------
# linear_cka / cka_form
# ----------------------------------------------------------------------------------------------
@st.composite
def cka_case(draw):
    """(x, y, mask) of a valid linear_cka call, on the CPU, and the exponents they were scaled by."""
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    T = draw(st.sampled_from([2, 3, 5, 13, 37]))
    dx, dy = draw(st.sampled_from(SIZES + [33])), draw(st.sampled_from(SIZES + [33]))
    x_dt, y_dt = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(FLOATS))
    x = torch.randn(T, dx, generator=gen, dtype=torch.float64) + torch.randn(dx, generator=gen, dtype=torch.float64)
    mix = torch.randn(dx, dy, generator=gen, dtype=torch.float64)
    y = torch.tanh(x @ mix) + 0.5 * torch.randn(T, dy, generator=gen, dtype=torch.float64)

    def scale(dt):  # powers of ten and two far apart, inside what the dtype can hold
        lim = {torch.float16: 3, torch.bfloat16: 30, torch.float32: 30, torch.float64: 200}[dt]
        return 10.0 ** draw(st.integers(-lim, lim))

    x, y = (x * scale(x_dt)).to(x_dt), (y * scale(y_dt)).to(y_dt)
    kind = draw(st.sampled_from([None, "bool", "int", "float"]))
    mask = None
    if kind is not None:
        keep = torch.rand(T, generator=gen) > 0.3
        keep[draw(st.sampled_from([0, T - 2]))] = True
        keep[T - 1] = True  # at least two valid rows
        mask = {"bool": keep, "int": keep.long(), "float": keep.float() * 0.5}[kind]
        pad = ~keep
        garbage = draw(st.sampled_from([float("nan"), float("inf"), 1e4]))
        x[pad] = garbage
        y[pad] = -garbage
    if draw(st.booleans()):  # leading dims [2, T/2]-style when T is even, else a strided view
        x, y = _strided(draw, x), _strided(draw, y)
        if mask is not None:
            mask = _strided(draw, mask)
    return x, y, mask


def _ref64(x, y, mask):
    x2, y2 = x.double().reshape(-1, x.shape[-1]), y.double().reshape(-1, y.shape[-1])
    return linear_cka_reference(x2, y2, None if mask is None else mask.reshape(-1))


def _cka_tol(x, y):
    dt = _coarsest(x.dtype, y.dtype)
    return {torch.float32: TOL[torch.float32][0], torch.float64: TOL[torch.float64][0]}.get(dt, TOL[dt][0])


@BOTH
@given(case=cka_case(), form=st.sampled_from([None, "features", "tokens"]))
@settings(max_examples=30)
def test_linear_cka_matches_float64(device, backend, case, form):
    x, y, mask = _to(device, *case)
    want = float(_ref64(x, y, mask))
    assume(math.isfinite(want))  # a representation constant after rounding is undefined (NaN)
    snaps = _snapshot(x, y, mask)
    with force_backend(backend):
        got = linear_cka(x, y, mask, form=form)
    _unchanged([x, y, mask], snaps)
    assert got.shape == () and got.dtype == _acc(x.dtype, y.dtype) and not got.requires_grad
    assert abs(float(got) - want) <= _cka_tol(x, y), (float(got), want)


@BOTH
@given(case=cka_case(), ex=st.integers(-20, 20), ey=st.integers(-20, 20), data=st.data())
@settings(max_examples=15)
def test_linear_cka_scaling_and_padding_change_no_bit(device, backend, case, ex, ey, data):
    """CKA(2^a X, 2^b Y) = CKA(X, Y) bit for bit; what padding rows hold changes no bit either."""
    x, y, mask = _to(device, *case)
    if mask is not None:
        keep = (mask != 0)[:, None]
        x, y = torch.where(keep, x, 0), torch.where(keep, y, 0)  # finite padding, so scaling is exact
    xs, ys = x * 2.0 ** ex, y * 2.0 ** ey
    assume(torch.equal(xs / 2.0 ** ex, x) and torch.equal(ys / 2.0 ** ey, y))  # exact in the dtype
    for t in (x, y, xs, ys):  # inside the range where the scale exponent is not clamped
        amax = float(t.abs().max())
        assume(2.0 ** -110 < amax < 2.0 ** 110)
    with force_backend(backend):
        base = linear_cka(x, y, mask)
        scaled = linear_cka(xs, ys, mask)
        if mask is not None:
            junk = data.draw(st.sampled_from([float("nan"), float("inf"), 1e4]))
            pad = (mask == 0)[:, None]
            padded = linear_cka(torch.where(pad, junk, x), torch.where(pad, -junk, y), mask)
            assert torch.equal(_bits(padded), _bits(base))
    assert torch.equal(_bits(scaled), _bits(base)), (float(scaled), float(base))


CKA_BAD = ["x int", "y not tensor", "x 1-D", "leading dims", "mask shape", "mask complex", "mask list", "form",
           "one token", "dx 0", "dy 0", "y int"]


@BOTH
@given(case=cka_case(), kind=st.sampled_from(CKA_BAD))
@settings(max_examples=20)
def test_linear_cka_bad_input_is_named(device, backend, case, kind):
    x, y, mask = _to(device, *case)
    kw = {}
    exc, name = ValueError, None
    if kind == "x int":
        x, exc, name = x.nan_to_num(0, 0, 0).to(torch.int32), TypeError, "x"
    elif kind == "y int":
        y, exc, name = y.nan_to_num(0, 0, 0).to(torch.int64), TypeError, "y"
    elif kind == "y not tensor":
        y, exc, name = y.tolist(), TypeError, "y"
    elif kind == "x 1-D":
        x, name = x[:, 0], "x"
    elif kind == "leading dims":
        y, name = y[:-1], "y"
    elif kind == "mask shape":
        mask, name = torch.ones(x.shape[0] + 1, dtype=torch.bool, device=device), "mask"
    elif kind == "mask complex":
        mask, exc, name = torch.ones(x.shape[0], dtype=torch.complex64, device=device), TypeError, "mask"
    elif kind == "mask list":
        mask, exc, name = [1] * x.shape[0], TypeError, "mask"
    elif kind == "form":
        kw["form"], name = "gram", "form"
    elif kind == "one token":
        x, y, mask, name = x[:1], y[:1], None, "x"
    elif kind == "dx 0":
        x, name = x[:, :0], "x"
    elif kind == "dy 0":
        y, name = y[:, :0], "y"
    inputs = [t for t in (x, y, mask) if isinstance(t, torch.Tensor)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _raises(backend, exc, name, lambda: linear_cka(x, y, mask, **kw), *inputs)


@given(sizes=st.tuples(*[st.one_of(st.integers(-3, 10 ** 6), st.booleans(), st.floats(allow_nan=True),
                                   st.just("8"))] * 3))
def test_cka_form(sizes):
    names = ("tokens", "dx", "dy")
    for n, v in zip(names, sizes):
        if isinstance(v, bool) or not isinstance(v, int):
            with pytest.raises(TypeError, match=rf"^{n}:"):
                cka_form(*sizes)
            return
        if v < 1:
            with pytest.raises(ValueError, match=rf"^{n}:"):
                cka_form(*sizes)
            return
    T, dx, dy = sizes
    form = cka_form(T, dx, dy)
    # MACs x 2: tokens T^2 (dx + dy), features T (dx^2 + dy^2 + 2 dx dy); ties go to "features"
    assert form == ("tokens" if T * T * (dx + dy) < T * (dx * dx + dy * dy + 2 * dx * dy) else "features")
