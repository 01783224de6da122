"""SIFT above the kernels: selection, the functional op, SIFTLinear, SparseAdamW, calibration.

Every numeric check runs on each (device, backend) pair (reference; triton interpreter on CPU;
cuda when present) against a float64 reference computed from the same rounded inputs."""
import copy
import math

import pytest
import torch
from torch import nn

from helpers import assert_close, device_backend_params, force_backend
from peftops.sift import (SIFTLinear, SparseAdamW, _merged_copy, _sift_linear_merged_op, sift_calibrate, sift_k,
                          sift_linear, sift_select)

PARAMS = device_backend_params()
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # tests that draw from the global RNG see the same numbers in any order


def _ref_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k |score| flat indices, lower index wins ties, ascending."""
    order = torch.sort(-scores.detach().abs().flatten().double(), stable=True).indices[:k]
    return torch.sort(order).values


def _eff_weight64(weight, indices, values):
    """float64 W_eff with the layer's rounding: W_eff[I] = round_to_W_dtype(W[I] + values in fp32/fp64)."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().double().clone()
    merged = (weight.detach().reshape(-1)[indices].to(acc) + values.detach().to(acc)).to(weight.dtype)
    w.view(-1)[indices] = merged.double()
    return w


def _layer(d_out, d_in, dtype, device, density=0.2, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g) * 0.5)
        if bias:
            lin.bias.copy_(torch.randn(d_out, generator=g))
    lin = lin.to(device=device, dtype=dtype)
    idx = _ref_topk(torch.randn(d_out, d_in, generator=g), sift_k(d_out * d_in, density)).to(device)
    return SIFTLinear.from_linear(lin, idx)


# ----------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("shape", [(1,), (5, 7), (13, 1), (3, 17)])
@pytest.mark.parametrize("density", [0.01, 0.3, 1.0])
def test_select_matches_topk(device, backend, shape, density):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(shape, generator=g).to(device)
    numel = s.numel()
    k = min(int(density * numel) + 1, numel)
    assert sift_k(numel, density) == k
    with force_backend(backend):
        got = sift_select(s, density)
        both = sift_select({"a": s, "b": -s}, density)
    assert got.dtype == torch.int64 and got.shape == (k,)
    assert torch.equal(got.cpu(), _ref_topk(s, k))
    assert set(both) == {"a", "b"} and torch.equal(both["b"].cpu(), got.cpu())


@pytest.mark.parametrize("device,backend", PARAMS)
def test_select_ties_lower_index_wins(device, backend):
    s = torch.tensor([[1.0, -3.0, 3.0, 0.5], [3.0, 1.0, -1.0, 2.0]], device=device)
    with force_backend(backend):
        got = sift_select(s, 0.3)  # k = int(0.3 * 8) + 1 = 3 out of the three |3|: indices 1, 2, 4
        ones = sift_select(torch.ones(6, 5, device=device), 0.2)  # k = 7: the first seven
    assert got.tolist() == [1, 2, 4]
    assert ones.tolist() == list(range(7))


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, True, "0.1", float("nan")])
def test_select_bad_density(bad):
    with pytest.raises(ValueError, match=r"^density: expected a number in \(0, 1\], got "):
        sift_select(torch.randn(4, 4), bad)


# ----------------------------------------------------------------------------------------------
# functional op
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d_out,d_in", [((1,), 1, 1), ((3, 5), 5, 7), ((11,), 13, 17)])
def test_sift_linear_matches_dense(device, backend, dtype, lead, d_out, d_in):
    g = torch.Generator().manual_seed(2)
    weight = (torch.randn(d_out, d_in, generator=g) * 0.5).to(device, dtype)
    bias = torch.randn(d_out, generator=g).to(device, dtype).requires_grad_()
    idx = _ref_topk(torch.randn(d_out, d_in, generator=g), sift_k(d_out * d_in, 0.3)).to(device)
    idx = idx[torch.randperm(idx.numel(), generator=g).to(device)]  # the functional takes any order
    vdtype = torch.float64 if dtype == torch.float64 else torch.float32
    values = (torch.randn(idx.numel(), generator=g) * 0.1).to(device, vdtype).requires_grad_()
    x = torch.randn(*lead, d_in, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(*lead, d_out, generator=g).to(device, dtype)
    with force_backend(backend):
        y = sift_linear(x, weight, bias, idx, values)
        y.backward(dy)
    # float64 reference on the same rounded inputs
    w64 = _eff_weight64(weight, idx, values)
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    w_dense = w64.clone().requires_grad_()
    y64 = x64 @ w_dense.T + b64
    y64.backward(dy.double())
    scale = math.sqrt(d_in)
    assert y.shape == (*lead, d_out) and y.dtype == dtype
    assert_close(y, y64, dtype, scale=scale)
    assert_close(x.grad, x64.grad, dtype, scale=math.sqrt(d_out))
    assert_close(bias.grad, b64.grad, dtype, scale=math.sqrt(x.numel() / d_in))
    assert values.grad.dtype == vdtype
    assert_close(values.grad, w_dense.grad.reshape(-1)[idx], dtype, scale=math.sqrt(x.numel() / d_in))
    assert weight.grad is None


@pytest.mark.parametrize("device,backend", PARAMS)
def test_sift_linear_gradcheck(device, backend):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(5, 7, generator=g, dtype=torch.float64).to(device)
    idx = torch.tensor([30, 2, 11, 17, 4], device=device)
    x = torch.randn(2, 3, 7, generator=g, dtype=torch.float64).to(device).requires_grad_()
    v = torch.randn(5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    with force_backend(backend):
        assert torch.autograd.gradcheck(lambda x, v, b: sift_linear(x, weight, b, idx, v), (x, v, b))
        assert torch.autograd.gradcheck(lambda x, v: sift_linear(x, weight, None, idx, v), (x, v))


@pytest.mark.parametrize("device,backend", PARAMS)
def test_merged_op_gradcheck(device, backend):
    """The module's op: forward on a weight already holding W0 + δ, gradient to δ by SDDMM."""
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(6, 5, generator=g, dtype=torch.float64).to(device)
    idx = torch.tensor([0, 3, 7, 8, 22, 29], device=device)
    rows, cols = (idx // 5).int(), (idx % 5).int()
    x = torch.randn(4, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    d = torch.randn(6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(6, generator=g, dtype=torch.float64).to(device).requires_grad_()

    def f(x, d, b):  # the weight is re-merged from d's current values, as SIFTLinear does before forward
        return _sift_linear_merged_op(x, _merged_copy(w0, idx, d), b, d, rows, cols)

    with force_backend(backend):
        assert torch.autograd.gradcheck(f, (x, d, b))


def test_sift_linear_bad_inputs():
    w = torch.randn(4, 6)
    idx = torch.tensor([1, 5])
    v = torch.zeros(2)
    with pytest.raises(ValueError, match=r"^x: expected last dim 6"):
        sift_linear(torch.randn(3, 5), w, None, idx, v)
    with pytest.raises(TypeError, match=r"^x: expected dtype"):
        sift_linear(torch.randn(3, 6, dtype=torch.float64), w, None, idx, v)
    with pytest.raises(TypeError, match=r"^indices: expected dtype"):
        sift_linear(torch.randn(3, 6), w, None, idx.float(), v)
    with pytest.raises(ValueError, match=r"^values: expected shape"):
        sift_linear(torch.randn(3, 6), w, None, idx, torch.zeros(3))
    with pytest.raises(ValueError, match=r"^bias: expected shape"):
        sift_linear(torch.randn(3, 6), w, torch.zeros(5), idx, v)
    with pytest.raises(ValueError, match=r"^weight: expected 2 dims"):
        sift_linear(torch.randn(3, 6), w[None], None, idx, v)


# ----------------------------------------------------------------------------------------------
# SIFTLinear
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_matches_functional_and_reference(device, backend, dtype, bias):
    layer = _layer(13, 17, dtype, device, density=0.1, bias=bias)
    w0 = layer.weight.detach().clone()
    if bias:
        layer.bias.requires_grad_(True)
    with torch.no_grad():
        layer.delta.normal_(0, 0.1)  # bumps δ's version: the next forward merges it into W
    x = torch.randn(2, 3, 17).to(device, dtype).requires_grad_()
    dy = torch.randn(2, 3, 13).to(device, dtype)
    with force_backend(backend):
        y = layer(x)
        y.backward(dy)
    # W holds round(W0[I] + δ) at I, W0 elsewhere, bit for bit
    assert torch.equal(layer.weight.detach(), _eff_weight64(w0, layer.indices, layer.delta).to(dtype))
    w64 = _eff_weight64(w0, layer.indices, layer.delta).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y64 = x64 @ w64.T + (layer.bias.detach().double() if bias else 0)
    y64.backward(dy.double())
    assert_close(y, y64, dtype, scale=math.sqrt(17))
    assert_close(x.grad, x64.grad, dtype, scale=math.sqrt(13))
    assert_close(layer.delta.grad, w64.grad.reshape(-1)[layer.indices], dtype, scale=math.sqrt(6))
    assert layer.delta.grad.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert layer.weight.grad is None
    if bias:
        assert_close(layer.bias.grad, dy.double().sum((0, 1)), dtype, scale=math.sqrt(6))


@pytest.mark.parametrize("device,backend", PARAMS)
def test_layer_saves_only_what_backward_needs(device, backend):
    """x is saved only when δ needs grad, W only when x needs grad (W is the live Parameter, not a copy)."""
    layer = _layer(16, 24, torch.float32, device)
    x = torch.randn(5, 24, device=device)

    def saved(x_requires_grad, delta_requires_grad):
        layer.delta.requires_grad_(delta_requires_grad)
        xx = x.clone().requires_grad_(x_requires_grad)
        packed = []

        def pack(t):
            packed.append(t)
            return t

        with force_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(xx)
        return packed

    both = saved(True, True)
    assert any(t.shape == x.shape for t in both) and any(t.shape == layer.weight.shape for t in both)
    no_delta = saved(True, False)
    assert not any(t.shape == x.shape for t in no_delta), "x saved although δ needs no gradient"
    assert any(t.data_ptr() == layer.weight.data_ptr() for t in no_delta)
    no_x = saved(False, True)
    assert not any(t.shape == layer.weight.shape for t in no_x), "W saved although x needs no gradient"
    assert any(t.shape == x.shape for t in no_x)
    layer.delta.requires_grad_(True)


def _big_allocations(step, threshold):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # self_cpu_memory_usage: bytes an op allocated itself (children excluded), so many small buffers
    # inside one parent never add up to a false positive.
    return [(e.name, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage >= threshold]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_training_step_allocates_no_weight_sized_buffer(backend):
    """forward + backward + SparseAdamW step never allocates a d_out × d_in buffer (no dense ∇W, no
    merged copy); the same check flags the dense nn.Linear step, so it can fail."""
    from peftops.kernels import triton_runs_on

    if backend == "triton" and not triton_runs_on(torch.device("cpu")):
        pytest.skip("triton does not run on cpu here")
    d_out, d_in, tokens = 256, 320, 4
    weight_bytes = d_out * d_in * 4
    layer = _layer(d_out, d_in, torch.float32, "cpu", density=0.01)
    opt = SparseAdamW(layer, lr=1e-2)
    x = torch.randn(tokens, d_in, requires_grad=True)

    def sift_step():
        with force_backend(backend):
            layer(x).square().sum().backward()
            opt.step()
            opt.zero_grad()

    sift_step()  # optimizer state exists before measuring (it is k-sized anyway)
    assert _big_allocations(sift_step, weight_bytes) == []
    assert opt.state[layer.delta]["exp_avg"].numel() == layer.k

    dense = nn.Linear(d_in, d_out)
    dense_opt = torch.optim.AdamW(dense.parameters(), lr=1e-2)

    def dense_step():
        dense(x).square().sum().backward()
        dense_opt.step()
        dense_opt.zero_grad()

    assert _big_allocations(dense_step, weight_bytes), "the check must catch a dense weight gradient"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_step_peak_memory_cuda():
    d, tokens = 2048, 64
    layer = _layer(d, d, torch.bfloat16, "cuda", density=0.01)
    opt = SparseAdamW(layer, lr=1e-3)
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):
        layer(x).float().square().sum().backward()
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    layer(x).float().square().sum().backward()
    opt.step()
    opt.zero_grad()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < d * d * 2


def test_unselected_layer():
    lin = nn.Linear(6, 4)
    layer = SIFTLinear.from_linear(lin)
    assert not layer.selected and layer.k == 0 and not lin.weight.requires_grad
    x = torch.randn(3, 6)
    with pytest.raises(RuntimeError, match=r"^SIFTLinear has no index set yet: run peftops\.sift_calibrate"):
        layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), lin(x))
    with pytest.raises(ValueError, match=r"^x: expected last dim 6"):
        with torch.no_grad():
            layer(torch.randn(3, 5))


def test_set_indices_validation():
    layer = SIFTLinear.from_linear(nn.Linear(5, 4))
    with pytest.raises(IndexError, match=r"^indices: entries must lie in \[0, 20\)"):
        layer.set_indices(torch.tensor([0, 20]))
    with pytest.raises(IndexError, match=r"^indices: entries must lie in \[0, 20\)"):
        layer.set_indices(torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match=r"^indices: entries must be unique"):
        layer.set_indices(torch.tensor([3, 3, 4]))
    with pytest.raises(TypeError, match=r"^indices: expected dtype"):
        layer.set_indices(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"^indices: expected 1 dims"):
        layer.set_indices(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=r"^indices: expected 1\.\.20 entries"):
        layer.set_indices(torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^density: expected a number in"):
        SIFTLinear.from_linear(nn.Linear(5, 4), density=2.0)
    with pytest.raises(TypeError, match=r"^linear: expected an nn\.Linear"):
        SIFTLinear.from_linear(nn.Conv1d(2, 2, 1))
    layer.set_indices(torch.tensor([7, 2, 19]))  # any order in, ascending kept
    assert layer.indices.tolist() == [2, 7, 19] and layer.rows.tolist() == [0, 1, 3] and layer.cols.tolist() == [2, 2, 4]


@pytest.mark.parametrize("device,backend", PARAMS)
def test_reselect_restores_base(device, backend):
    layer = _layer(7, 9, torch.bfloat16, device)
    w0 = layer.weight.detach().clone()
    opt = SparseAdamW(layer, lr=0.1)
    with force_backend(backend):
        layer(torch.randn(3, 9, device=device, dtype=torch.bfloat16)).float().sum().backward()
        opt.step()
        assert not torch.equal(layer.weight, w0)
        layer.set_indices(torch.tensor([0, 1, 2], device=device))
    assert torch.equal(layer.weight, w0) and layer.delta.abs().sum() == 0
    layer.delta.grad = torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match=r"^SparseAdamW: a SIFT layer's index set changed after its optimizer state"):
        opt.step()


# ----------------------------------------------------------------------------------------------
# SparseAdamW
# ----------------------------------------------------------------------------------------------
def _train(layer, head, opt, backend, steps=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    dev, dt = layer.weight.device, layer.weight.dtype
    losses = []
    for _ in range(steps):
        x = torch.randn(6, layer.in_features, generator=g).to(dev, dt)
        with force_backend(backend):
            loss = (head(layer(x).float()) ** 2).mean()
            loss.backward()
            opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay,maximize,impl", [(0.0, False, {"foreach": False}), (0.1, False, {"fused": True}),
                                                         (0.05, True, {"foreach": True})])
def test_sparse_adamw_matches_torch_adamw(device, backend, dtype, weight_decay, maximize, impl):
    """SparseAdamW (fused δ step + standard head step) == torch.optim.AdamW on [δ, head] with the
    layer resyncing W before its next forward (also after torch's fused AdamW, which leaves δ's
    version counter alone); W[I] = round(W0[I] + δ) exactly, W0 elsewhere."""
    layer_a = _layer(11, 13, dtype, device, density=0.15)
    head_a = nn.Linear(11, 3).to(device)
    layer_b, head_b = copy.deepcopy(layer_a), copy.deepcopy(head_a)
    w0 = layer_a.weight.detach().clone()
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, maximize=maximize)
    opt_a = SparseAdamW(list(layer_a.parameters()) + list(head_a.parameters()), **kw)
    opt_b = torch.optim.AdamW([p for p in list(layer_b.parameters()) + list(head_b.parameters()) if p.requires_grad],
                              **impl, **kw)
    la = _train(layer_a, head_a, opt_a, backend)
    lb = _train(layer_b, head_b, opt_b, backend)
    # bf16: an fp32 ulp of difference in δ (fused vs single-tensor AdamW math) can flip one rounding of
    # W[I] to bf16 and from there the trajectories differ at bf16 level, so compare at the model's dtype.
    assert_close(torch.tensor(la), torch.tensor(lb), dtype)
    assert_close(layer_a.delta, layer_b.delta, dtype)
    assert_close(head_a.weight, head_b.weight, dtype)
    assert_close(head_a.bias, head_b.bias, dtype)
    assert layer_a.delta.abs().min() > 0, "every selected entry must train"
    assert set(opt_a.state[layer_a.delta]) >= {"exp_avg", "exp_avg_sq", "step"}
    assert opt_a.state[layer_a.delta]["exp_avg"].shape == (layer_a.k,)
    expected = _eff_weight64(w0, layer_a.indices, layer_a.delta).to(dtype)
    assert torch.equal(layer_a.weight.detach(), expected), "fused step must write W[I] = round(W0[I] + δ)"
    with torch.no_grad():
        layer_b(torch.zeros(1, 13, device=device, dtype=dtype))  # plain AdamW: W is rewritten at the next forward
    assert torch.equal(layer_b.weight.detach(), _eff_weight64(w0, layer_b.indices, layer_b.delta).to(dtype))


@pytest.mark.parametrize("device,backend", PARAMS)
def test_sparse_adamw_float64_layer(device, backend):
    layer_a = _layer(5, 6, torch.float64, device, density=0.3)
    head_a = nn.Linear(5, 2).to(device)
    layer_b, head_b = copy.deepcopy(layer_a), copy.deepcopy(head_a)
    opt_a = SparseAdamW(nn.ModuleList([layer_a, head_a]), lr=1e-2, weight_decay=0.01)
    opt_b = torch.optim.AdamW([layer_b.delta, layer_b.bias, *head_b.parameters()], lr=1e-2, weight_decay=0.01,
                              foreach=False)
    _train(layer_a, head_a, opt_a, backend, steps=3)
    _train(layer_b, head_b, opt_b, backend, steps=3)
    assert layer_a.delta.dtype == torch.float64
    assert_close(layer_a.delta, layer_b.delta, torch.float64)


def test_sparse_adamw_bad_args():
    p = [nn.Parameter(torch.zeros(3))]
    for kw, name in [(dict(lr=-1.0), "lr"), (dict(eps=-1.0), "eps"), (dict(betas=(0.9, 1.0)), "betas"),
                     (dict(weight_decay=-0.1), "weight_decay")]:
        with pytest.raises(ValueError, match=rf"^{name}: expected "):
            SparseAdamW(p, **kw)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"^params_or_model: "):
        SparseAdamW(frozen)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(device, backend, compile_backend):
    if compile_backend == "inductor" and backend == "triton":
        pytest.skip("inductor codegen is backend-independent (the ops are opaque); one run is enough")
    torch._dynamo.reset()
    layer = _layer(9, 12, torch.float32, device, density=0.2)
    layer.bias.requires_grad_(True)
    with torch.no_grad():
        layer.delta.normal_(0, 0.1)
    twin = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, backend=compile_backend)
    x = torch.randn(2, 5, 12, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with force_backend(backend):
        y = compiled(x)
        y.square().sum().backward()
        y2 = twin(x2)
        y2.square().sum().backward()
    torch.testing.assert_close(y, y2, atol=1e-6, rtol=1e-6)
    for a, b in [(x.grad, x2.grad), (layer.delta.grad, twin.delta.grad), (layer.bias.grad, twin.bias.grad)]:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # an optimizer step between calls: the compiled layer sees the new δ
    with torch.no_grad():
        layer.delta.add_(0.5)
        twin.delta.add_(0.5)
    with force_backend(backend), torch.no_grad():
        torch.testing.assert_close(compiled(x), twin(x2), atol=1e-6, rtol=1e-6)

    funcs = torch.compile(sift_linear, fullgraph=True, backend=compile_backend)
    v = layer.delta.detach().clone().requires_grad_()
    v2 = v.detach().clone().requires_grad_()
    w0 = torch.randn(9, 12, device=device)
    with force_backend(backend):
        yf = funcs(x.detach(), w0, None, layer.indices, v)
        yf.sum().backward()
        ye = sift_linear(x.detach(), w0, None, layer.indices, v2)
        ye.sum().backward()
    torch.testing.assert_close(yf, ye, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(v.grad, v2.grad, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# module plumbing: dtype moves, state_dict
# ----------------------------------------------------------------------------------------------
def test_dtype_conversion_keeps_fp32_masters():
    layer = _layer(6, 8, torch.float32, "cpu")
    with torch.no_grad():
        layer.delta.fill_(1e-4)  # far below bf16 resolution of W
    w0 = layer.w0_sel.clone()
    delta = layer.delta
    layer.to(torch.bfloat16)
    assert layer.delta is delta and layer.delta.dtype == torch.float32 and layer.delta[0].item() == pytest.approx(1e-4)
    assert torch.equal(layer.w0_sel, w0.to(torch.bfloat16).float())
    with torch.no_grad():
        layer(torch.zeros(1, 8, dtype=torch.bfloat16))
    assert torch.equal(layer.weight.view(-1)[layer.indices], (layer.w0_sel + layer.delta).to(torch.bfloat16))
    layer.double()
    assert layer.delta.dtype == torch.float64 and layer.w0_sel.dtype == torch.float64


def test_state_dict_roundtrip_into_unselected_layer():
    layer = _layer(6, 8, torch.float32, "cpu")
    with torch.no_grad():
        layer.delta.normal_()
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = layer(x)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "delta", "indices", "w0_sel"}
    fresh = SIFTLinear(8, 6)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    assert torch.equal(fresh.rows, layer.rows) and torch.equal(fresh.cols, layer.cols)


# ----------------------------------------------------------------------------------------------
# calibration (plain nn model; the HF models are in test_sift_model.py)
# ----------------------------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(9, 16), nn.Tanh(), nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, 3))


def _mlp_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("calib_batches", [1, 3])
def test_calibrate_selects_topk_of_summed_abs_grad(device, backend, calib_batches):
    base = _mlp().to(device)
    g = torch.Generator().manual_seed(8)
    batches = [(torch.randn(4, 9, generator=g).to(device), torch.randint(0, 3, (4,), generator=g).to(device))
               for _ in range(4)]
    # dense reference scores
    ref = copy.deepcopy(base)
    scores = {n: torch.zeros_like(m.weight, dtype=torch.float64) for n, m in ref.named_children() if isinstance(m, nn.Linear)}
    for b in batches[:calib_batches]:
        ref.zero_grad()
        _mlp_loss(ref, b).backward()
        for n in scores:
            scores[n] += getattr(ref, n).weight.grad.abs().double()
    model = copy.deepcopy(base)
    for n in ["0", "2"]:
        setattr(model, n, SIFTLinear.from_linear(getattr(model, n), density=0.1))
    model[4].weight.requires_grad_(True)  # a non-target parameter keeps its flag
    model[4].bias.requires_grad_(False)
    with force_backend(backend):
        got = sift_calibrate(model, iter(batches), loss_fn=_mlp_loss, calib_batches=calib_batches, progress=False)
    assert set(got) == {"0", "2"}
    for n in ["0", "2"]:
        layer = getattr(model, n)
        assert torch.equal(layer.indices.cpu(), _ref_topk(scores[n], sift_k(layer.weight.numel(), 0.1)))
        assert torch.equal(got[n].cpu(), layer.indices.cpu())
        assert layer.weight.grad is None and not layer.weight.requires_grad and layer.delta.requires_grad
        assert torch.equal(layer.weight, getattr(base, n).weight), "calibration must not move the weights"
        assert layer.delta.abs().sum() == 0
    assert model[4].weight.requires_grad and not model[4].bias.requires_grad and model[4].weight.grad is None


def test_calibrate_errors():
    with pytest.raises(ValueError, match=r"^model: no SIFTLinear module"):
        sift_calibrate(_mlp(), [], loss_fn=_mlp_loss)
    model = _mlp()
    model[0] = SIFTLinear.from_linear(model[0], density=0.1)
    batch = (torch.randn(2, 9), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^batches: calib_batches=2 but only 1"):
        sift_calibrate(model, [batch], loss_fn=_mlp_loss, calib_batches=2, progress=False)
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad, "flags restored after an error"
    with pytest.raises(ValueError, match=r"^calib_batches: expected an int >= 1"):
        sift_calibrate(model, [batch], loss_fn=_mlp_loss, calib_batches=0)
    with pytest.raises(ValueError, match=r"^batches: the model output has no scalar loss"):
        sift_calibrate(model, [batch[0]], progress=False)  # default loss: the output is not a scalar loss
    model[2] = SIFTLinear.from_linear(model[2])
    with pytest.raises(ValueError, match=r"^density: layer '2' has no density"):
        sift_calibrate(model, [batch], loss_fn=_mlp_loss, progress=False)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_layer_under_autocast(device, backend):
    """fp32 layer under bf16 autocast (eager): bf16 GEMMs, fp32 δ gradient close to the fp32 one."""
    if device == "cpu" and backend == "triton":
        pytest.skip("autocast changes only the GEMM inside the op; the reference run covers it on CPU")
    layer = _layer(8, 16, torch.float32, device)
    twin = copy.deepcopy(layer)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(9)).to(device)
    with force_backend(backend):
        with torch.autocast(device, dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()
        twin(x).square().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.delta.grad.dtype == torch.float32
    assert_close(layer.delta.grad, twin.delta.grad, torch.bfloat16, scale=math.sqrt(5))


# ----------------------------------------------------------------------------------------------
# regressions: named errors on the index set, hyperparameters checked before a step moves anything
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", PARAMS)
def test_sift_linear_refuses_duplicate_and_out_of_range_indices(device, backend):
    """A duplicated flat index used to merge one copy's value while the SDDMM gave every copy the full
    gradient; out-of-range ones surfaced as torch's IndexError or under the kernel's name flat_idx."""
    x, w, v = torch.randn(3, 6, device=device), torch.randn(4, 6, device=device), torch.ones(3, device=device)
    with force_backend(backend):
        with pytest.raises(ValueError, match=r"^indices: entries must be unique .*found 1 duplicate"):
            sift_linear(x, w, None, torch.tensor([5, 1, 5], device=device), v)
        for bad in (24, -1):
            with pytest.raises(IndexError, match=r"^indices: entries must lie in \[0, 24\)"):
                sift_linear(x, w, None, torch.tensor([1, bad, 2], device=device), v)
        for bad in ([1, 1], [3, 24], [-1, 3]):
            with pytest.raises(IndexError if len(set(bad)) == 2 else ValueError, match=r"^indices: entries must"):
                SIFTLinear.from_linear(nn.Linear(6, 4).to(device), torch.tensor(bad, device=device))


def test_sift_linear_empty_dims_backward():
    """d_in = 0 / d_out = 0: the backward's [*, d] reshapes cannot infer the token count from -1."""
    for d_out, d_in in ((4, 0), (0, 5)):
        x = torch.randn(3, d_in, requires_grad=True)
        v = torch.zeros(0, requires_grad=True)
        y = sift_linear(x, torch.randn(d_out, d_in), None, torch.zeros(0, dtype=torch.int64), v)
        y.backward(torch.ones_like(y))
        assert y.shape == (3, d_out) and x.grad.shape == x.shape and v.grad.shape == (0,)


def test_load_state_dict_refuses_bad_index_set():
    layer = _layer(4, 5, torch.float32, "cpu")
    fresh = SIFTLinear.from_linear(nn.Linear(5, 4))
    for bad, exc in ((torch.tensor([0, 99]), IndexError), (torch.tensor([3, 3]), ValueError),
                     (torch.tensor([4, 2]), ValueError)):
        sd = {**layer.state_dict(), "indices": bad, "delta": torch.zeros(2), "w0_sel": torch.zeros(2)}
        with pytest.raises(exc, match=r"^state_dict: indices:"):
            fresh.load_state_dict(sd)
        assert not fresh.selected
    fresh.load_state_dict(SIFTLinear.from_linear(nn.Linear(5, 4)).state_dict())  # an unselected checkpoint loads


@pytest.mark.parametrize("device,backend", PARAMS)
def test_sparse_adamw_checks_param_groups_at_step(device, backend):
    """lr = NaN set by a scheduler used to step anyway: NaN weights, a moved step counter."""
    layer = _layer(4, 5, torch.float32, device)
    opt = SparseAdamW(layer)
    layer.delta.grad = torch.ones_like(layer.delta)
    with force_backend(backend):
        opt.step()
        before = [t.clone() for t in (layer.weight, layer.delta, *opt.state[layer.delta].values())]
        for field, bad, exc in (("lr", float("nan"), ValueError), ("lr", float("inf"), ValueError),
                                ("lr", -1.0, ValueError), ("lr", True, TypeError), ("eps", float("inf"), ValueError),
                                ("betas", (0.9, True), TypeError), ("weight_decay", float("nan"), ValueError)):
            good = opt.param_groups[0][field]
            opt.param_groups[0][field] = bad
            with pytest.raises(exc, match=rf"^{field}: .*\(param_groups\[0\]\)"):
                opt.step()
            opt.param_groups[0][field] = good
            after = (layer.weight, layer.delta, *opt.state[layer.delta].values())
            assert all(torch.equal(a, b) for a, b in zip(after, before))
    for kw in (dict(lr=float("inf")), dict(lr=True), dict(eps=True), dict(weight_decay=float("inf"))):
        with pytest.raises((TypeError, ValueError), match=rf"^{next(iter(kw))}:"):
            SparseAdamW(layer, **kw)
    with pytest.raises(ValueError, match=r"^lr: .*\(param group 0\)"):
        SparseAdamW([{"params": [layer.delta], "lr": -1.0}])
