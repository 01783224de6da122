"""kernels/sift.py: every op on the reference and the Triton path (interpreter on CPU, compiled on
CUDA) against float64 oracles, odd shapes, ties, all dtypes, NaN-poisoned outputs, bad input."""
import math
import zlib

import pytest
import torch

from helpers import assert_close, device_backend_params, force_backend, poisoned
from peftops.kernels import sift as K
from peftops.kernels import triton_runs_on

BACKENDS = device_backend_params()
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
TRITON_DEVICES = [d for d in ["cpu", "cuda"]
                  if (d == "cpu" or torch.cuda.is_available()) and triton_runs_on(torch.device(d))]
needs_triton = pytest.mark.skipif(not TRITON_DEVICES, reason="triton does not run here")


def _dtype_id(dt):
    return str(dt).split(".")[-1]


def topk_oracle(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Stable descending sort of |s| in float64 (ties: lower index first), first k, ascending."""
    order = torch.sort(scores.detach().reshape(-1).double().abs().cpu(), descending=True, stable=True).indices
    return order[:k].sort().values


# ----------------------------------------------------------------------------------------------
# abs_accumulate_
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("grad_dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", [(1,), (7, 13), (257,), (3, 5, 11)], ids=str)
def test_abs_accumulate(device, backend, grad_dtype, shape):
    acc_dtype = torch.float64 if grad_dtype == torch.float64 else torch.float32
    acc = torch.rand(shape, dtype=acc_dtype, device=device)
    g1 = torch.randn(shape[::-1], device=device).to(grad_dtype)  # any shape with the same numel
    g2 = torch.randn(math.prod(shape), device=device).to(grad_dtype)
    expected = acc.double() + g1.double().reshape(shape).abs() + g2.double().reshape(shape).abs()
    with force_backend(backend):
        out = K.abs_accumulate_(acc, g1)
        K.abs_accumulate_(acc, g2)
    assert out is acc
    assert_close(acc, expected, dtype=acc_dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_abs_accumulate_bad_input(device, backend):
    acc = torch.zeros(4, 5, device=device)
    with force_backend(backend):
        with pytest.raises(TypeError, match=r"^acc: expected dtype"):
            K.abs_accumulate_(acc.bfloat16(), torch.ones(20, device=device))
        with pytest.raises(ValueError, match=r"^acc: expected a contiguous tensor"):
            K.abs_accumulate_(torch.zeros(5, 4, device=device).t(), torch.ones(20, device=device))
        with pytest.raises(ValueError, match=r"^grad: expected 20 elements"):
            K.abs_accumulate_(acc, torch.ones(21, device=device))
        with pytest.raises(TypeError, match=r"^grad: expected dtype"):
            K.abs_accumulate_(acc, torch.ones(20, dtype=torch.int32, device=device))


# ----------------------------------------------------------------------------------------------
# topk_abs_select
# ----------------------------------------------------------------------------------------------
def _scores(kind: str, shape, dtype, device):
    n = math.prod(shape)
    if kind == "randn":
        x = torch.randn(n)
    elif kind == "ties":  # few distinct magnitudes, both signs: the tie rule decides
        x = torch.randint(-3, 4, (n,)).double()
    elif kind == "zeros":  # +0 and -0 mixed: |-0| = +0, all tied
        x = torch.zeros(n)
        x[::3] = -0.0
    elif kind == "equal":
        x = torch.full((n,), -1.5)
    elif kind == "subnormal":  # the smallest subnormals of the dtype, and zeros
        tiny = torch.finfo(dtype).smallest_normal
        x = torch.randint(0, 5, (n,)).double() * tiny / 8
        x[1::2] *= -1
    else:
        raise ValueError(kind)
    return x.to(dtype).reshape(shape).to(device)


TOPK_CASES = [
    ("randn", (1,), 1), ("randn", (7, 13), 1), ("randn", (7, 13), 91), ("randn", (31, 37), 100),
    ("randn", (257,), 64), ("ties", (29, 31), 45), ("ties", (3, 5, 7), 105), ("zeros", (13, 11), 20),
    ("equal", (300,), 7), ("subnormal", (41, 3), 30),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("kind,shape,k", TOPK_CASES, ids=[f"{c[0]}-{c[1]}-k{c[2]}" for c in TOPK_CASES])
def test_topk_abs_select(device, backend, dtype, kind, shape, k):
    torch.manual_seed(zlib.crc32(repr((kind, shape, k)).encode()))  # stable across processes
    scores = _scores(kind, shape, dtype, device)
    with force_backend(backend):
        idx = K.topk_abs_select(scores, k)
    assert idx.dtype == torch.int64 and idx.shape == (k,) and idx.device == scores.device
    assert torch.equal(idx.cpu(), topk_oracle(scores, k))
    # as a set, the entries torch.topk would pick (same multiset of magnitudes), ascending
    a = scores.reshape(-1).abs().double().cpu()
    assert torch.equal(a[idx.cpu()].sort().values, torch.topk(a, k).values.sort().values)
    assert bool((idx[1:] > idx[:-1]).all())


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("k", [1, 37, 300])
def test_topk_sampled_fast_path(device, dtype, k):
    """A bound sampled from 64 keys: the one-pass path holds (k <= candidates <= capacity) and is exact."""
    torch.manual_seed(k)
    n = 2003
    scores = (torch.randn(n) * torch.rand(n) ** 4).to(dtype).to(device)  # heavy-tailed, some ties in fp16/bf16
    rank, cap = K._sample_plan(n, k, 64)
    assert rank > 0
    out = poisoned((k,), torch.int64, device)  # NaN bits: unwritten slots stay huge
    out, n_cand, n_nonfinite = K._topk_pipeline(scores, k, rank, cap, 64, out)
    assert n_nonfinite == 0 and k <= n_cand <= cap and n_cand < n  # the sampled bound filtered
    assert torch.equal(out.cpu(), topk_oracle(scores, k))


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_topk_reruns_when_the_sampled_bound_fails(device, monkeypatch):
    torch.manual_seed(1)
    n, k = 1501, 200
    scores = torch.randn(n, device=device)
    # bound = the largest sampled key: far fewer candidates than k, the pipeline reruns with L = 0
    monkeypatch.setattr(K, "_sample_plan", lambda n_, k_, s_: (1, n_))
    with force_backend("triton"):
        assert torch.equal(K.topk_abs_select(scores, k).cpu(), topk_oracle(scores, k))
    # a buffer far too small: the pipeline reruns with the exact candidate count
    monkeypatch.setattr(K, "_sample_plan", lambda n_, k_, s_: (100, 50))
    with force_backend("triton"):
        assert torch.equal(K.topk_abs_select(scores, k).cpu(), topk_oracle(scores, k))
    # all keys equal: every entry is a candidate at any bound, overflow then rerun
    monkeypatch.undo()
    equal = torch.full((n,), 0.25, device=device)
    with force_backend("triton"):
        assert torch.equal(K._topk_abs_select_triton(equal, k, sample=64).cpu(), torch.arange(k))


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_topk_writes_every_output(device):
    scores = torch.randn(9, 31, device=device)
    out = poisoned((50,), torch.int64, device)
    with force_backend("triton"):
        got = K._topk_abs_select_triton(scores, 50, out=out)
    assert torch.equal(got.cpu(), topk_oracle(scores, 50))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_topk_bad_input(device, backend):
    x = torch.randn(6, 7, device=device)
    with force_backend(backend):
        for bad in (float("nan"), float("inf"), -float("inf")):
            y = x.clone()
            y[2, 3] = bad
            with pytest.raises(ValueError, match=r"^scores: expected finite values"):
                K.topk_abs_select(y, 5)
        for k in (0, -1, 43):
            with pytest.raises(ValueError, match=r"^k: expected 1 <= k <= numel = 42"):
                K.topk_abs_select(x, k)
        with pytest.raises(TypeError, match=r"^k: expected an int"):
            K.topk_abs_select(x, 2.0)
        with pytest.raises(TypeError, match=r"^scores: expected dtype"):
            K.topk_abs_select(x.long(), 2)
        with pytest.raises(TypeError, match=r"^scores: expected a torch\.Tensor"):
            K.topk_abs_select(x.tolist(), 2)


def test_topk_non_contiguous_scores_index_the_logical_layout():
    x = torch.randn(11, 13).t()  # flat index refers to x.flatten() (row-major over the view)
    for backend in ("reference", "triton") if triton_runs_on(x.device) else ("reference",):
        with force_backend(backend):
            assert torch.equal(K.topk_abs_select(x, 17), topk_oracle(x, 17))


# ----------------------------------------------------------------------------------------------
# sddmm_at_indices
# ----------------------------------------------------------------------------------------------
SDDMM_CASES = [(1, 1, 1, 1), (37, 19, 23, 50), (5, 64, 3, 192), (130, 7, 11, 20), (17, 33, 65, 1)]


def _indices(d_out, d_in, k, gen, idx_dtype, device):
    flat = torch.randperm(d_out * d_in, generator=gen)[:k].sort().values
    return (flat // d_in).to(idx_dtype).to(device), (flat % d_in).to(idx_dtype).to(device)


SDDMM_METHODS = ["auto", "sparse", "dense"]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("method", SDDMM_METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("T,d_out,d_in,k", SDDMM_CASES, ids=[str(c) for c in SDDMM_CASES])
def test_sddmm_at_indices(device, backend, method, dtype, T, d_out, d_in, k):
    if backend == "reference" and method != "auto":
        pytest.skip("the method picks a Triton path; the reference has one")
    gen = torch.Generator().manual_seed(T * 1000 + k)
    dy = torch.randn(T, d_out, generator=gen).to(dtype).to(device)
    x = torch.randn(T, d_in, generator=gen).to(dtype).to(device)
    rows, cols = _indices(d_out, d_in, k, gen, torch.int32 if k % 2 else torch.int64, device)
    with force_backend(backend):
        out = K.sddmm_at_indices(dy, x, rows, cols, method=method)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == acc and out.shape == (k,)
    expected = (dy.double().T @ x.double())[rows.long(), cols.long()]
    assert_close(out, expected, dtype=acc, scale=math.sqrt(T))


def _skewed_sets(d_out, d_in, gen):
    """Index sets that load a row-split design unevenly: everything in two rows, in one column,
    a uniform 3 %, and one outlier row holding half the entries."""
    two_rows = torch.cat([torch.arange(d_in) + 2 * d_in, torch.arange(d_in) + (d_out - 1) * d_in])
    one_col = torch.arange(d_out) * d_in + d_in // 2
    uniform = torch.randperm(d_out * d_in, generator=gen)[: max(1, d_out * d_in * 3 // 100)]
    outlier = torch.cat([torch.arange(d_in) + 5 * d_in, torch.randperm(d_out * d_in, generator=gen)[:d_in]]).unique()
    return {"two_rows": two_rows, "one_col": one_col, "uniform": uniform, "outlier_row": outlier}


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("method", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_sddmm_skewed_index_sets_are_exact_and_bitwise_reproducible(device, method, dtype):
    gen = torch.Generator().manual_seed(11)
    T, d_out, d_in = 67, 13, 97  # several T slices and chunks under the interpreter
    dy = torch.randn(T, d_out, generator=gen).to(dtype).to(device)
    x = torch.randn(T, d_in, generator=gen).to(dtype).to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, flat in _skewed_sets(d_out, d_in, gen).items():
        flat = flat[torch.randperm(flat.numel(), generator=gen)].to(device)  # any order
        rows, cols = flat // d_in, flat % d_in
        first = K._sddmm_triton(dy, x, rows, cols, out=poisoned((flat.numel(),), acc, device), method=method)
        again = K._sddmm_triton(dy, x, rows.clone(), cols.clone(), method=method)  # a fresh plan
        assert torch.equal(first, again), name
        expected = (dy.double().T @ x.double())[rows, cols]
        assert_close(first, expected, dtype=acc, scale=math.sqrt(T))


@needs_triton
def test_sddmm_dispatch_follows_the_model_on_both_sides_of_its_threshold(monkeypatch):
    """auto = the model's pick (kernels/_perf_model.sddmm_prefers_dense), both ways, and the two
    paths agree; the dense path splits big weights into row blocks."""
    from peftops.kernels import _perf_model as PM

    calls = []
    monkeypatch.setattr(K, "_sddmm_dense", lambda *a, **kw: calls.append("dense") or real_dense(*a, **kw))
    monkeypatch.setattr(K, "_sddmm_sparse_triton", lambda *a, **kw: calls.append("sparse") or real_sparse(*a, **kw))
    gen = torch.Generator().manual_seed(3)
    T, d_out, d_in = 29, 64, 24
    dy, x = torch.randn(T, d_out, generator=gen), torch.randn(T, d_in, generator=gen)
    rows, cols = _indices(d_out, d_in, 40, gen, torch.int64, "cpu")
    outs = {}
    rule = PM.sddmm_prefers_dense
    for prefers in (True, False):
        monkeypatch.setattr(PM, "sddmm_prefers_dense", lambda *a, _p=prefers, **kw: _p)
        with force_backend("triton"):
            outs[prefers] = K.sddmm_at_indices(dy, x, rows, cols)
    assert calls == ["dense", "sparse"]
    assert_close(outs[True], outs[False], dtype=torch.float32, scale=math.sqrt(T))
    monkeypatch.setattr(PM, "sddmm_prefers_dense", rule)
    # the real rule, on the two sides of its crossover density at a training shape
    c = PM.sddmm_crossover_density(4096, 4096, 4096, 2)
    assert c is not None
    assert K.sddmm_method(4096, 4096, 4096, int(1.2 * c * 4096 * 4096), torch.bfloat16, torch.device("cpu")) == "dense"
    assert K.sddmm_method(4096, 4096, 4096, int(0.8 * c * 4096 * 4096), torch.bfloat16, torch.device("cpu")) == "sparse"
    # row blocks: a weight of 200 rows makes two blocks of 128 rows (the budget is half the weight)
    d_out = 200
    dy = torch.randn(T, d_out, generator=gen)
    rows, cols = _indices(d_out, d_in, 300, gen, torch.int64, "cpu")
    assert K.sddmm_dense_rows(d_out, d_in, 4) == 128
    with force_backend("triton"):
        blocked = K.sddmm_at_indices(dy, x, rows, cols, method="dense")
        sparse = K.sddmm_at_indices(dy, x, rows, cols, method="sparse")
    plan = K._sddmm_plan(rows, cols, d_out, d_in, 32)
    assert len(plan.dense_blocks(128)[2]) == 2
    assert_close(blocked, sparse, dtype=torch.float32, scale=math.sqrt(T))
    assert_close(blocked, (dy.double().T @ x.double())[rows, cols], dtype=torch.float32, scale=math.sqrt(T))


real_dense = K._sddmm_dense
real_sparse = K._sddmm_sparse_triton


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_sddmm_bad_input(device, backend):
    dy, x = torch.randn(5, 4, device=device), torch.randn(5, 3, device=device)
    rows, cols = torch.tensor([0, 1, 3], device=device), torch.tensor([2, 0, 1], device=device)
    with force_backend(backend):
        with pytest.raises(TypeError, match=r"^x: expected dtype"):
            K.sddmm_at_indices(dy, x.double(), rows, cols)
        with pytest.raises(ValueError, match=r"^x: expected 5 rows"):
            K.sddmm_at_indices(dy, x[:4], rows, cols)
        with pytest.raises(ValueError, match=r"^dy: expected 2 dims"):
            K.sddmm_at_indices(dy[0], x, rows, cols)
        with pytest.raises(ValueError, match=r"^rows: expected 1 dims"):
            K.sddmm_at_indices(dy, x, rows[None], cols)
        with pytest.raises(ValueError, match=r"^cols: expected shape"):
            K.sddmm_at_indices(dy, x, rows, cols[:2])
        with pytest.raises(TypeError, match=r"^cols: expected dtype"):
            K.sddmm_at_indices(dy, x, rows, cols.float())
        with pytest.raises(IndexError, match=r"^rows: row indices"):
            K.sddmm_at_indices(dy, x, torch.tensor([0, 1, 4], device=device), cols)
        with pytest.raises(IndexError, match=r"^cols: column indices"):
            K.sddmm_at_indices(dy, x, rows, torch.tensor([0, -1, 1], device=device))


# ----------------------------------------------------------------------------------------------
# scatter_merged_ and the fused AdamW step
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape,k", [((1,), 1), ((13, 7), 30), ((5, 67), 335)], ids=str)
def test_scatter_merged(device, backend, dtype, shape, k):
    gen = torch.Generator().manual_seed(k)
    n = math.prod(shape)
    state = torch.float64 if dtype == torch.float64 else torch.float32
    idx = torch.randperm(n, generator=gen)[:k].to(device)
    w0 = torch.randn(k, generator=gen, dtype=state).to(device)
    delta = (torch.randn(k, generator=gen, dtype=state) * 1e-2).to(device)
    weight = torch.randn(shape, generator=gen).to(dtype).to(device)
    if k == n:
        weight = poisoned(shape, dtype, device)  # every entry written
    expected = weight.clone()
    expected.view(-1)[idx] = (w0 + delta).to(dtype)  # the state-dtype sum, rounded once to the weight dtype
    with force_backend(backend):
        out = K.scatter_merged_(weight, idx.int() if k % 2 else idx, w0, delta)
    assert out is weight
    assert torch.equal(weight, expected)


def _adamw_setup(k, dtype, device, gen):
    state = torch.float64 if dtype == torch.float64 else torch.float32
    shape = (7, 11)
    weight = torch.randn(shape, generator=gen).to(dtype).to(device)
    idx = torch.randperm(77, generator=gen)[:k].sort().values.to(device)
    w0 = weight.reshape(-1)[idx].to(state)
    return state, weight, idx, w0


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("weight_decay,maximize", [(0.0, False), (0.1, False), (0.05, True)])
def test_sparse_adamw_step_matches_torch_adamw(device, backend, dtype, weight_decay, maximize):
    gen = torch.Generator().manual_seed(3)
    k = 29
    state, weight, idx, w0 = _adamw_setup(k, dtype, device, gen)
    original = weight.clone()
    hp = dict(lr=3e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=weight_decay)
    param = torch.nn.Parameter(torch.zeros(k, dtype=state, device=device))
    opt = torch.optim.AdamW([param], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                            weight_decay=weight_decay, maximize=maximize, foreach=False)
    delta = torch.zeros(k, dtype=state, device=device)
    exp_avg, exp_avg_sq = poisoned((k,), state, device), poisoned((k,), state, device)
    exp_avg.zero_()
    exp_avg_sq.zero_()
    for step in range(1, 5):
        grad = torch.randn(k, generator=gen, dtype=state).to(device)
        param.grad = grad.clone()
        opt.step()
        with force_backend(backend):
            K.sparse_adamw_step_(weight, idx.int() if step % 2 else idx, w0, delta, grad, exp_avg, exp_avg_sq,
                                 step=step, maximize=maximize, **hp)
    st = opt.state[param]
    assert_close(exp_avg, st["exp_avg"])
    assert_close(exp_avg_sq, st["exp_avg_sq"])
    assert_close(delta, param.detach())
    merged = weight.reshape(-1)[idx]
    assert torch.equal(merged, (w0 + delta).to(dtype))  # written from the updated delta
    assert_close(merged, (w0 + param.detach()).to(dtype), dtype=dtype)
    untouched = torch.ones(77, dtype=torch.bool, device=device)
    untouched[idx] = False
    assert torch.equal(weight.reshape(-1)[untouched], original.reshape(-1)[untouched])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_sparse_adamw_step_bad_input(device, backend):
    gen = torch.Generator().manual_seed(0)
    k = 6
    state, weight, idx, w0 = _adamw_setup(k, torch.float32, device, gen)
    vecs = lambda: [torch.zeros(k, device=device) for _ in range(4)]  # noqa: E731
    hp = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)

    def call(**over):
        delta, grad, m, v = vecs()
        args = dict(weight=weight, flat_idx=idx, w0_sel=w0, delta=delta, grad=grad, exp_avg=m, exp_avg_sq=v)
        args.update({a: b for a, b in over.items() if a in args})
        kw = {**hp, **{a: b for a, b in over.items() if a in hp}}
        K.sparse_adamw_step_(args["weight"], args["flat_idx"], args["w0_sel"], args["delta"], args["grad"],
                             args["exp_avg"], args["exp_avg_sq"], **kw)

    with force_backend(backend):
        for name, value in [("step", 0), ("step", 1.5), ("lr", -1.0), ("lr", float("nan")), ("beta1", 1.0),
                            ("beta2", -0.1), ("eps", -1e-8), ("weight_decay", -0.1)]:
            with pytest.raises(ValueError, match=rf"^{name}: expected "):
                call(**{name: value})
        with pytest.raises(ValueError, match=r"^grad: expected shape"):
            call(grad=torch.zeros(k + 1, device=device))
        with pytest.raises(TypeError, match=r"^exp_avg: expected dtype"):
            call(exp_avg=torch.zeros(k, dtype=torch.bfloat16, device=device))
        with pytest.raises(ValueError, match=r"^exp_avg_sq: expected a contiguous tensor"):
            call(exp_avg_sq=torch.zeros(2 * k, device=device)[::2])
        with pytest.raises(IndexError, match=r"^flat_idx: flat indices"):
            call(flat_idx=torch.tensor([0, 1, 2, 3, 4, 77], device=device))
        with pytest.raises(TypeError, match=r"^w0_sel: expected dtype"):
            call(w0_sel=w0.double())
        with pytest.raises(ValueError, match=r"^weight: expected a contiguous tensor"):
            call(weight=torch.zeros(11, 7, device=device).t())


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_scatter_merged_bad_input(device, backend):
    weight = torch.zeros(4, 5, device=device, dtype=torch.bfloat16)
    idx = torch.tensor([0, 7, 19], device=device)
    w0, delta = torch.zeros(3, device=device), torch.zeros(3, device=device)
    with force_backend(backend):
        with pytest.raises(IndexError, match=r"^flat_idx: flat indices"):
            K.scatter_merged_(weight, torch.tensor([0, 7, 20], device=device), w0, delta)
        with pytest.raises(TypeError, match=r"^flat_idx: expected dtype"):
            K.scatter_merged_(weight, idx.float(), w0, delta)
        with pytest.raises(ValueError, match=r"^delta: expected shape"):
            K.scatter_merged_(weight, idx, w0, delta[:2])
        with pytest.raises(TypeError, match=r"^w0_sel: expected dtype"):
            K.scatter_merged_(weight, idx, w0.bfloat16(), delta)
        with pytest.raises(ValueError, match=r"^weight: expected a contiguous tensor"):
            K.scatter_merged_(torch.zeros(5, 4, device=device).t(), idx, w0, delta)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_index_range_check_is_cached_per_tensor_and_redone_after_a_write(device, backend):
    weight = torch.zeros(4, 5, device=device)
    idx = torch.tensor([0, 7, 19], device=device)
    z = torch.zeros(3, device=device)
    with force_backend(backend):
        K.scatter_merged_(weight, idx, z, z + 1)
        K.scatter_merged_(weight, idx, z, z + 2)  # same tensor, unchanged: no re-check needed
        idx[2] = 20  # an in-place write bumps the version counter: checked again
        with pytest.raises(IndexError, match=r"^flat_idx: flat indices"):
            K.scatter_merged_(weight, idx, z, z)
    assert weight.view(-1)[[0, 7, 19]].tolist() == [2.0, 2.0, 2.0]


def test_sparse_adamw_step_fp32_weight_accepts_no_fp64_state():
    weight = torch.zeros(3, 3)
    idx = torch.tensor([0, 4])
    z = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"^w0_sel: expected dtype"):
        K.scatter_merged_(weight, idx, z, z)
