"""AoT P-Tuning ops: the fused gather-add and its table backward (kernels/aot.py, peftops/aot.py).

Every case runs the PyTorch reference and the Triton kernels (the interpreter on CPU) against a
float64 reference of the same rounded inputs. Note: triton's CPU interpreter rounds fp32 -> bf16
toward zero (the GPU rounds to nearest even), which stays inside the bf16 tolerance.
"""
import pytest
import torch

from helpers import assert_close, device_backend_params, force_backend, poisoned
from peftops import aot
from peftops.kernels import aot as K

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (B, S, d, V): single token, prime/odd hidden sizes, a power of two, more rows than one block
SHAPES = [(1, 1, 1, 1), (2, 7, 67, 13), (3, 5, 128, 11), (1, 37, 5, 3)]


def _inputs(B, S, d, V, dtype, table_dtype, n_tasks, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, S, d, generator=g).to(dtype).to(device)
    ids = torch.randint(0, V, (B, S), generator=g).to(device)
    shape = (V, d) if n_tasks is None else (n_tasks, V, d)
    table = torch.randn(*shape, generator=g).to(table_dtype).to(device)
    tasks = None if n_tasks is None else torch.randint(0, n_tasks, (B,), generator=g).to(device)
    return h, ids, table, tasks


def _expected(h, ids, table, tasks):
    """float64 h + table[task, id], by explicit loops over samples (independent of the reference)."""
    out = h.double().clone()
    t3 = table.double() if table.dim() == 3 else table.double()[None]
    for b in range(h.shape[0]):
        t = 0 if tasks is None else int(tasks[b])
        out[b] += t3[t][ids[b].long()]
    return out


def _out_tol_dtype(h, table):
    # the sum is exact in fp32/fp64; the only rounding is the final one to hidden's dtype
    return h.dtype


# every shape in fp32; the other dtype pairs on an odd and a power-of-two hidden size
GATHER_CASES = [(torch.float32, torch.float32, s) for s in SHAPES] + [
    (dt, tdt, s) for dt, tdt in [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                 (torch.float64, torch.float64), (torch.bfloat16, torch.float32),
                                 (torch.float16, torch.float32)] for s in SHAPES[1:3]]


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("n_tasks", [None, 3])
@pytest.mark.parametrize("dtype,table_dtype,shape", GATHER_CASES,
                         ids=[f"{str(a)[6:]}-{str(b)[6:]}-{'x'.join(map(str, s))}" for a, b, s in GATHER_CASES])
def test_gather_add_matches_float64(device, backend, n_tasks, dtype, table_dtype, shape):
    B, S, d, V = shape
    h, ids, table, tasks = _inputs(B, S, d, V, dtype, table_dtype, n_tasks, device)
    out = poisoned(h.shape, dtype, device)
    with force_backend(backend):
        res = K.gather_add(h, ids, table, tasks, out=out)
    assert res is out
    assert_close(out, _expected(h, ids, table, tasks), dtype=_out_tol_dtype(h, table))
    with force_backend(backend):
        fresh = aot.aot_bias_add(h, ids, table, tasks)
    assert fresh.dtype == dtype and fresh.shape == h.shape and fresh.is_contiguous()
    torch.testing.assert_close(fresh, out, atol=0, rtol=0)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_gather_add_in_place_strided_and_int32(device, backend):
    g = torch.Generator().manual_seed(1)
    big = torch.randn(4, 3, 11, 19, generator=g).to(device)   # [T, L, V, d]
    table = big[:, 1]                                          # strided view [T, V, d]
    base = torch.randn(19, 5, 3, generator=g).to(device)
    h = base.permute(2, 1, 0)                                  # non-contiguous [3, 5, 19]
    ids = torch.randint(0, 11, (3, 5), generator=g, dtype=torch.int32).to(device)
    tasks = torch.tensor([3, 0, 2], dtype=torch.int32, device=device)
    want = _expected(h, ids, table, tasks)
    with force_backend(backend):
        out = aot.aot_bias_add(h, ids, table, tasks)
        assert_close(out, want)
        h2 = h.clone()
        with torch.no_grad():
            res = aot.aot_bias_add(h2, ids, table, tasks, inplace=None)  # autograd off: in place
        assert res is h2
        torch.testing.assert_close(h2, out, atol=0, rtol=0)
        h3 = h.clone()  # non-contiguous target, written in place through a private buffer
        K.gather_add(h, ids, table, tasks, out=h)
        torch.testing.assert_close(h, out, atol=0, rtol=0)
        one = aot.aot_bias_add(h3, ids, big[:, 1], 2)  # an int task id for the whole batch
        assert_close(one, _expected(h3, ids, big[2, 1], None))


def _zipf_ids(shape, V, g):
    u = torch.rand(shape, generator=g)
    return torch.clamp((u ** 3 * V).long(), max=V - 1)  # heavy head: many duplicates of small ids


GRAD_SHAPES = [(1, 1, 1, 1), (3, 17, 67, 23), (2, 29, 5, 4), (4, 9, 128, 50)]
GRAD_CASES = [(torch.float32, s) for s in GRAD_SHAPES] + [(dt, GRAD_SHAPES[1]) for dt in FLOATS[1:]]


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("n_tasks", [None, 2])
@pytest.mark.parametrize("grad_dtype,shape", GRAD_CASES,
                         ids=[f"{str(a)[6:]}-{'x'.join(map(str, s))}" for a, s in GRAD_CASES])
def test_table_grad_rows_and_dense(device, backend, n_tasks, grad_dtype, shape):
    B, S, d, V = shape
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(B, S, d, generator=g).to(grad_dtype).to(device)
    ids = _zipf_ids((B, S), V, g).to(device)
    tasks = None if n_tasks is None else torch.randint(0, n_tasks, (B,), generator=g).to(device)
    T = n_tasks or 1
    want = torch.zeros(T * V, d, dtype=torch.float64)
    flat = ids.cpu().long() + (0 if tasks is None else tasks.cpu().long()[:, None] * V)
    want.index_add_(0, flat.reshape(-1), grad.cpu().double().reshape(-1, d))
    occurring = torch.unique(flat)
    out_dtype = torch.float64 if grad_dtype == torch.float64 else torch.float32
    # fp32 accumulation of S*B terms: atol grows with the number of summed rows
    scale = float(flat.numel()) ** 0.5
    with force_backend(backend):
        rows, sums = aot.aot_table_grad(grad, ids, V, tasks, n_tasks=T, dtype=out_dtype)
        shape = (V, d) if n_tasks is None else (T, V, d)
        dense = K.table_grad_dense(grad, ids, shape, tasks, dtype=out_dtype)
        plan = aot.aot_segment_plan(ids, V, tasks)
        dense_planned = K.table_grad_dense(grad, ids, shape, tasks, dtype=out_dtype, plan=plan)
    torch.testing.assert_close(rows.cpu(), occurring, atol=0, rtol=0)
    assert_close(sums, want[occurring], dtype=out_dtype, scale=scale)
    assert_close(dense.reshape(-1, d), want, dtype=out_dtype, scale=scale)
    assert torch.equal(dense, dense_planned), "the table backward must be bitwise deterministic"
    torch.testing.assert_close(dense.reshape(-1, d)[occurring], sums, atol=0, rtol=0)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_table_grad_every_row_occurs_writes_all_rows(device, backend):
    """A per-batch table of the batch's unique ids: every row occurs, no zero fill, all written."""
    ids = torch.tensor([[3, 0, 3, 1], [2, 2, 2, 4]], device=device)
    grad = torch.randn(2, 4, 70, dtype=torch.float64, device=device)
    want = torch.zeros(5, 70, dtype=torch.float64).index_add_(0, ids.cpu().reshape(-1), grad.cpu().reshape(-1, 70))
    with force_backend(backend):
        for _ in range(2):  # reuse of the cached (uninitialised) block must not leak into the result
            dense = K.table_grad_dense(grad, ids, (5, 70), dtype=torch.float64)
            assert_close(dense, want)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("stacked", [False, True])
def test_gradcheck_float64(device, backend, stacked):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 4, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    ids = torch.tensor([[0, 4, 4, 2], [1, 1, 1, 1], [4, 0, 3, 3]], device=device)  # duplicates, id 3 once
    if stacked:
        table = torch.randn(2, 5, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
        tasks = torch.tensor([1, 0, 1], device=device)
    else:
        table = torch.randn(5, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
        tasks = None
    # the interpreter runs each launch in numpy: its fast mode (random projections) keeps this short
    fast = backend == "triton" and device == "cpu"
    with force_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b: aot.aot_bias_add(a, ids, b, tasks), (h, table), fast_mode=fast)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_sparse_grad_equals_dense_and_mixed_dtypes(device, backend):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 6, 9, generator=g).to(torch.bfloat16).to(device).requires_grad_()
    ids = torch.randint(0, 5, (2, 6), generator=g).to(device)
    table = torch.randn(3, 5, 9, generator=g).to(device)
    tasks = torch.tensor([2, 0], device=device)
    w = torch.randn(2, 6, 9, generator=g).to(torch.bfloat16).to(device)
    grads = {}
    with force_backend(backend):
        for sparse in (False, True):
            t = table.clone().requires_grad_()
            (aot.aot_bias_add(h, ids, t, tasks, sparse_grad=sparse) * w).sum().backward()
            grads[sparse] = t.grad
    assert grads[True].is_sparse and grads[True].dtype == torch.float32
    torch.testing.assert_close(grads[True].to_dense(), grads[False], atol=0, rtol=0)
    want = torch.zeros(15, 9, dtype=torch.float64).index_add_(
        0, (ids.cpu() + tasks.cpu()[:, None] * 5).reshape(-1), w.cpu().double().reshape(-1, 9))
    assert_close(grads[False].reshape(15, 9), want, dtype=torch.float32)
    assert torch.equal(h.grad, 2 * w)  # identity gradient, accumulated over the two calls


def _bad_calls():
    h = torch.randn(2, 3, 8)
    ids = torch.randint(0, 5, (2, 3))
    t2 = torch.randn(5, 8)
    t3 = torch.randn(2, 5, 8)
    tasks = torch.tensor([0, 1])
    return [
        ("id >= V", (h, ids.clone().fill_(5), t2, None), IndexError, "input_ids: token ids"),
        ("negative id", (h, ids.clone().fill_(-1), t2, None), IndexError, "input_ids: token ids"),
        ("task id >= n_tasks", (h, ids, t3, torch.tensor([0, 2])), IndexError, "task_ids: task ids"),
        ("int task out of range", (h, ids, t3, 2), IndexError, "task_ids: task 2"),
        ("hidden size", (h, ids, torch.randn(5, 7), None), ValueError, "table: hidden size 7"),
        ("ids shape", (h, ids[:, :2], t2, None), ValueError, "input_ids: expected shape"),
        ("float ids", (h, ids.float(), t2, None), TypeError, "input_ids: expected dtype"),
        ("int hidden", (ids, ids[..., 0], t2, None), TypeError, "hidden: expected dtype"),
        ("task ids for a single table", (h, ids, t2, tasks), ValueError, "task_ids: given"),
        ("stacked table, no task ids", (h, ids, t3, None), ValueError, "task_ids: required"),
        ("task ids length", (h, ids, t3, torch.tensor([0, 1, 1])), ValueError,
         "task_ids: expected one task per sample"),
        ("table rank", (h, ids, torch.randn(5), None), ValueError, "table: expected 2 or 3 dims"),
    ]


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(device, backend, case):
    _, args, exc, match = case
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    with force_backend(backend), pytest.raises(exc, match="^" + match):
        aot.aot_bias_add(*args)


def test_bad_grad_and_inplace_calls():
    h = torch.randn(2, 3, 8, requires_grad=True)
    ids = torch.tensor([[0, 4, 1], [2, 2, 3]])
    with pytest.raises(ValueError, match=r"^inplace: True, but autograd"):
        aot.aot_bias_add(h, ids, torch.randn(5, 8), inplace=True)
    with pytest.raises(IndexError, match=r"^input_ids: token ids"):
        aot.aot_table_grad(torch.randn(2, 3, 8), ids, 4)
    with pytest.raises(ValueError, match=r"^task_ids: required"):
        aot.aot_table_grad(torch.randn(2, 3, 8), ids, 5, n_tasks=2)
    with pytest.raises(ValueError, match=r"^vocab_size: expected an int >= 1"):
        aot.aot_table_grad(torch.randn(2, 3, 8), ids, 0)


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if "triton" in p.id])
def test_unvalidated_bad_ids_never_read_out_of_bounds(device, backend):
    """validate=False skips the host check; the kernel masks bad ids (no bias) instead of reading past the table."""
    h = torch.randn(2, 4, 16, device=device)
    ids = torch.tensor([[0, 5, -3, 1], [10**9, 2, 4, 4]], device=device)
    table = torch.randn(2, 5, 16, device=device)
    tasks = torch.tensor([1, 7], device=device)  # sample 1: bad task id
    with force_backend(backend):
        out = K.gather_add(h, ids, table, tasks, validate=False)
    good = (ids >= 0) & (ids < 5) & (tasks[:, None] < 2)
    want = h.clone()
    want[0, 0] += table[1, 0]
    want[0, 3] += table[1, 1]
    assert good.sum() == 2
    torch.testing.assert_close(out, want, atol=0, rtol=0)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_torch_compile_fullgraph_matches_eager(device, backend):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 5, 33, generator=g).to(device).requires_grad_()
    ids = torch.randint(0, 13, (2, 5), generator=g).to(device)
    table = torch.randn(3, 13, 33, generator=g).to(device).requires_grad_()
    tasks = torch.tensor([2, 0], device=device)
    w = torch.randn(2, 5, 33, generator=g).to(device)

    def f(h, ids, table, tasks):
        return aot.aot_bias_add(h, ids, table, tasks) * w

    def serve(h, ids, table, tasks):
        return aot.aot_bias_add(h, ids, table, tasks, inplace=True)

    with force_backend(backend):
        compiled = torch.compile(f, fullgraph=True)
        got = compiled(h, ids, table, tasks)
        got.sum().backward()
        got_grads = (h.grad.clone(), table.grad.clone())
        h.grad = table.grad = None
        want = f(h, ids, table, tasks)
        want.sum().backward()
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        torch.testing.assert_close(got_grads[0], h.grad, atol=0, rtol=0)
        torch.testing.assert_close(got_grads[1], table.grad, atol=0, rtol=0)
        with torch.no_grad():
            h2 = h.detach().clone()
            torch.compile(serve, fullgraph=True)(h2, ids, table.detach(), tasks)
        torch.testing.assert_close(h2, want / w, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# regressions (issue 12): mixed dtypes, named errors, plans that are not the ids'
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp64_table_under_16bit_hidden(device, backend, dtype):
    """16-bit hidden + fp64 table: the fp64 sum rounded to hidden's dtype (the interpreter's direct
    fp64 -> bf16 cast returned NaN / garbage); and the fp64 gradient back into a 16-bit table."""
    g = torch.Generator().manual_seed(20)
    h = (torch.randn(3, 7, 67, generator=g) * 100).to(dtype).to(device)
    ids = torch.randint(0, 11, (3, 7), generator=g).to(device)
    table = (torch.randn(11, 67, generator=g, dtype=torch.float64) * 1000).to(device)
    with force_backend(backend):
        out = aot.aot_bias_add(h, ids, table)
    assert out.dtype == dtype
    assert_close(out, _expected(h, ids, table, None), dtype=dtype)
    h64 = h.double().requires_grad_()
    t16 = table.to(dtype).requires_grad_()
    w = torch.randn(3, 7, 67, generator=g, dtype=torch.float64).to(device)
    with force_backend(backend):
        (aot.aot_bias_add(h64, ids, t16) * w).sum().backward()
        rows, sums = aot.aot_table_grad(w, ids, 11, dtype=dtype)
    want = torch.zeros(11, 67, dtype=torch.float64).index_add_(0, ids.cpu().reshape(-1), w.cpu().reshape(-1, 67))
    assert t16.grad.dtype == dtype
    assert_close(t16.grad, want, dtype=dtype)
    assert_close(sums, want[rows.cpu()], dtype=dtype)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_fp64_sum_is_rounded_once(device, backend):
    """1 + 2^-11 + 2^-40 is just above an fp16 midpoint: rounded once it is 1 + 2^-10; through fp32
    (torch's fp64 -> fp16 cast) it lands on the midpoint and rounds to even, 1."""
    h = torch.ones(1, 1, 1, dtype=torch.float16, device=device)
    table = torch.tensor([[2.0 ** -11 + 2.0 ** -40]], dtype=torch.float64, device=device)
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    with force_backend(backend):
        out = aot.aot_bias_add(h, ids, table)
        _, sums = aot.aot_table_grad(table.view(1, 1, 1) + 1, ids, 1, dtype=torch.float16)
    assert float(out) == 1 + 2.0 ** -10
    assert float(sums) == 1 + 2.0 ** -10
    assert float(K.round_once(torch.tensor([1 + 2.0 ** -8 + 2.0 ** -40], dtype=torch.float64),
                              torch.bfloat16)) == 1 + 2.0 ** -7


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_integer_dtype_is_refused(device, backend):
    grad = torch.randn(2, 3, 4, device=device)
    ids = torch.tensor([[0, 1, 1], [2, 0, 3]], device=device)
    with force_backend(backend):
        for dt in (torch.int32, torch.int64, torch.bool):
            with pytest.raises(TypeError, match=r"^dtype: expected a floating dtype"):
                aot.aot_table_grad(grad, ids, 4, dtype=dt)
            with pytest.raises(TypeError, match=r"^dtype: expected a floating dtype"):
                K.table_grad_dense(grad, ids, (4, 4), dtype=dt)
        with pytest.raises(TypeError, match=r"^dtype: expected a floating torch.dtype"):
            aot.aot_table_grad(grad, ids, 4, dtype="float32")


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_plan_of_other_ids_is_refused(device, backend):
    g = torch.Generator().manual_seed(21)
    grad = torch.randn(3, 5, 8, generator=g).to(device)
    ids = torch.randint(0, 6, (3, 5), generator=g).to(device)
    tasks = torch.tensor([1, 0, 1], device=device)
    plan = aot.aot_segment_plan(ids, 6, tasks)
    other = aot.aot_segment_plan(torch.roll(ids, 1, dims=1), 6, tasks)  # same length, other rows
    perm = plan[:15]
    n_seg = K.plan_num_segments(plan, 15)
    seg_count = plan[15 + n_seg:15 + 2 * n_seg]
    s = int(torch.argmax(seg_count))
    start = int(seg_count[:s].sum())
    unstable = plan.clone()  # two tokens of one segment swapped: the same sums, not the same order
    unstable[start], unstable[start + 1] = plan[start + 1], plan[start]
    chunks = plan.clone()
    chunks[15 + 2 * n_seg:15 + 3 * n_seg] += 1  # chunk starts shifted
    with force_backend(backend):
        for bad, exc, match in [(other, ValueError, "rows its tokens read"), (unstable, ValueError, "stable"),
                                (chunks, ValueError, "chunk table"), (plan[:-1], ValueError, "entries do not fit"),
                                (plan[:-7], ValueError, "counts"),
                                (plan.int(), TypeError, "expected dtype"), (plan.float(), TypeError, "expected dtype"),
                                (plan.view(1, -1), ValueError, "expected 1 dims")]:
            with pytest.raises(exc, match=r"^plan: .*" + match):
                aot.aot_table_grad(grad, ids, 6, tasks, n_tasks=2, plan=bad)
            with pytest.raises(exc, match=r"^plan: .*" + match):
                K.table_grad_dense(grad, ids, (2, 6, 8), tasks, plan=bad)
        with pytest.raises(ValueError, match=r"^plan: .*rows its tokens read"):
            aot.aot_bias_add(grad, ids, torch.randn(2, 6, 8, device=device), tasks, plan=other)
        with pytest.raises(ValueError, match=r"^plan: .*entries do not fit"):  # shape: checked unvalidated too
            aot.aot_bias_add(grad, ids, torch.randn(2, 6, 8, device=device), tasks, plan=plan[:-1], validate=False)
        rows, sums = aot.aot_table_grad(grad, ids, 6, tasks, n_tasks=2, plan=plan)  # its own plan passes
        rows2, sums2 = aot.aot_table_grad(grad, ids, 6, tasks, n_tasks=2)
    assert torch.equal(rows, rows2) and torch.equal(sums, sums2)
    assert torch.equal(perm, torch.sort(K.flat_table_rows(ids, tasks, 6), stable=True)[1])


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_more_bad_arguments_are_named(device, backend):
    h = torch.randn(2, 3, 4, device=device)
    ids = torch.tensor([[0, 4, 1], [2, 2, 3]], device=device)
    t3 = torch.randn(2, 5, 4, device=device)
    cases = [
        (lambda: aot.aot_bias_add(h, ids, t3, True), TypeError, "task_ids"),
        (lambda: aot.aot_bias_add(h, ids, t3, 1.0), TypeError, "task_ids"),
        (lambda: aot.aot_bias_add(h, ids, t3, torch.tensor([True, False], device=device)), TypeError, "task_ids"),
        (lambda: aot.aot_bias_add(h, ids, t3, -1), IndexError, "task_ids"),
        (lambda: aot.aot_bias_add(h, ids, t3[0], inplace="yes"), TypeError, "inplace"),
        (lambda: aot.aot_bias_add(h, ids, t3[0], sparse_grad=1), TypeError, "sparse_grad"),
        (lambda: aot.aot_bias_add(h, ids, t3[0], validate=None), TypeError, "validate"),
        (lambda: aot.aot_bias_add(h, ids, t3[:, :0], torch.tensor([0, 1], device=device)), ValueError, "table"),
        (lambda: aot.aot_bias_add(h[:1, :1].expand(2, 3, 4), ids, t3[0], inplace=True), ValueError, "inplace"),
        (lambda: K.gather_add(h, ids, t3[0], out=h[:1, :1].expand(2, 3, 4)), ValueError, "out"),
        (lambda: aot.aot_table_grad(h, ids, True), TypeError, "vocab_size"),
        (lambda: aot.aot_table_grad(h, ids, 5.0), TypeError, "vocab_size"),
        (lambda: aot.aot_table_grad(h, ids, 5, torch.tensor([0, 1], device=device), n_tasks=True), TypeError,
         "n_tasks"),
        (lambda: aot.aot_table_grad(h, ids, 5, torch.tensor([0, 2], device=device), n_tasks=2), IndexError,
         "task_ids"),
        (lambda: aot.aot_table_grad(h[..., :0], ids, 5), ValueError, "grad"),
        (lambda: aot.aot_table_grad(torch.randn((), device=device), ids[0, 0], 5), ValueError, "grad"),
        (lambda: K.table_grad_dense(h, ids, (5.0, 4)), TypeError, "table_shape"),
        (lambda: K.table_grad_dense(h, ids, (True, 4)), TypeError, "table_shape"),
        (lambda: aot.aot_segment_plan(ids, True), TypeError, "vocab_size"),
        (lambda: aot.aot_segment_plan(ids, 4), IndexError, "input_ids"),
        (lambda: aot.aot_segment_plan(ids, 5, torch.tensor([0.0, 1.0], device=device)), TypeError, "task_ids"),
        (lambda: aot.aot_segment_plan(ids, 5, torch.tensor([0, -1], device=device)), IndexError, "task_ids"),
        (lambda: aot.aot_segment_plan(ids, 5, torch.tensor([0, 2], device=device), n_tasks=2), IndexError,
         "task_ids"),
        (lambda: aot.aot_segment_plan(ids, 5, torch.tensor([0], device=device)), ValueError, "task_ids"),
        (lambda: aot.aot_segment_plan(ids, 5, 1), TypeError, "task_ids"),
    ]
    with force_backend(backend):
        for call, exc, name in cases:
            with pytest.raises(exc, match=rf"^{name}: "):
                call()


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_expanded_hidden_is_added_out_of_place_when_automatic(device, backend):
    h = torch.randn(1, 1, 4, device=device).expand(2, 3, 4)
    ids = torch.tensor([[0, 4, 1], [2, 2, 3]], device=device)
    table = torch.randn(5, 4, device=device)
    with force_backend(backend), torch.no_grad():
        out = aot.aot_bias_add(h, ids, table, inplace=None)
    assert out is not h
    assert_close(out, _expected(h, ids, table, None))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_unvalidated_bad_ids_add_and_send_nothing_on_both_paths(device, backend):
    """validate=False: a token with a bad id or task id gets no bias and sends no gradient, the
    same on both paths (the reference used to wrap negative ids / raise; the backward wrote the row)."""
    h = torch.randn(2, 4, 16, device=device, requires_grad=True)
    ids = torch.tensor([[0, 5, -3, 1], [10 ** 9, 2, 4, 4]], device=device)
    table = torch.randn(2, 5, 16, device=device, requires_grad=True)
    tasks = torch.tensor([1, 7], device=device)
    w = torch.randn(2, 4, 16, device=device)
    with force_backend(backend):
        out = aot.aot_bias_add(h, ids, table, tasks, validate=False)
        (out * w).sum().backward()
    want = h.detach().clone()
    want[0, 0] += table.detach()[1, 0]
    want[0, 3] += table.detach()[1, 1]
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    grad = torch.zeros(2, 5, 16, device=device)
    grad[1, 0] = w[0, 0]
    grad[1, 1] = w[0, 3]
    torch.testing.assert_close(table.grad, grad, atol=0, rtol=0)


def test_config_and_task_id_values_are_named():
    from peftops import AoTConfig

    for kw, exc, name in [(dict(rank=True), TypeError, "rank"), (dict(rank=float("nan")), TypeError, "rank"),
                          (dict(rank=0), ValueError, "rank"), (dict(n_tasks=True), TypeError, "n_tasks"),
                          (dict(n_tasks=0), ValueError, "n_tasks"), (dict(kron_factors=[True, 4]), TypeError,
                                                                     "kron_factors"),
                          (dict(kron_factors=[0, 4]), ValueError, "kron_factors"),
                          (dict(kron_factors=4), TypeError, "kron_factors"),
                          (dict(activation=["relu"]), TypeError, "activation"),
                          (dict(table_dtype=["float32"]), TypeError, "table_dtype"),
                          (dict(table_dtype="int8"), ValueError, "table_dtype"),
                          (dict(reparam=None), TypeError, "reparam"), (dict(sparse_grad="no"), TypeError,
                                                                       "sparse_grad"),
                          (dict(inplace=1), TypeError, "inplace"), (dict(compiled=None), TypeError, "compiled")]:
        with pytest.raises(exc, match=rf"^{name}: "):
            AoTConfig(**kw).validate()
    AoTConfig(rank=3, kron_factors=(2, 3), n_tasks=2, table_dtype="bfloat16").validate()


def test_check_task_ids_values_are_named():
    from torch import nn

    from peftops import AoTConfig

    owner = aot.AoTBias(AoTConfig(compiled=True, n_tasks=3), 1, 5, 4, nn.Embedding(5, 4))
    assert owner.check_task_ids(2) == 2 and owner.check_task_ids(None) is None
    assert torch.equal(owner.check_task_ids([0, 2, 1]), torch.tensor([0, 2, 1]))
    for value, exc in [(True, TypeError), ([True, 1], TypeError), ([0.0, 1.0], TypeError), ([], TypeError),
                       ([0, 3], IndexError), ([2 ** 70], IndexError), (3, IndexError), (-1, IndexError),
                       (torch.tensor([0.0]), TypeError), (torch.tensor([[0]]), ValueError), ("0", TypeError)]:
        with pytest.raises(exc, match=r"^task_ids: "):
            owner.check_task_ids(value)
