"""Property-based suite for SIFT and WeGeFT at the functional / module / config level.

Valid input (odd shapes incl. 0 and 1, every float dtype and the allowed mixes, strided layouts,
non-finite values where they are allowed) gives the float64 reference's result within the
per-dtype tolerance of tests/helpers.py, gradients included; bad input raises a peftops error whose
message starts with the argument's name and a colon, before anything is changed (inputs compared
bitwise). Every numeric property runs on each (device, backend) pair."""
import dataclasses
import math
import re

import pytest

hypothesis = pytest.importorskip("hypothesis")
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from helpers import TOL, assert_close, device_backend_params, force_backend, poisoned  # noqa: E402
from peftops.kernels.wegeft import dropout_keep_mask, dropout_keep_scale  # noqa: E402
from peftops.sift import SIFTConfig, SIFTLinear, SparseAdamW, sift_k, sift_linear, sift_select  # noqa: E402
from peftops.wegeft import WeGeFTConfig, WeGeFTLinear, wegeft_linear  # noqa: E402

PARAMS = device_backend_params()
FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DIMS = st.sampled_from([1, 2, 3, 5, 7, 13])          # 1, primes, non-powers of two
DIMS0 = st.sampled_from([0, 1, 2, 3, 5, 7, 13])      # and 0 where an empty dim is meaningful
LAYOUTS = ["contiguous", "strided", "transposed"]
NONFINITE = [float("nan"), float("inf"), float("-inf")]
BAD_REALS = [True, False, float("nan"), float("inf"), float("-inf"), "0.1", None]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _coarser(*dtypes):
    """The dtype of the widest tolerance among ``dtypes``."""
    return max(dtypes, key=lambda d: TOL[d][0])


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` in a contiguous, strided ([..., ::2]) or transposed layout."""
    if layout == "strided" and t.dim() >= 1:
        shape = (*t.shape[:-1], 2 * t.shape[-1])  # the gaps must never be read: NaN, or -1 between indices
        if t.dtype.is_floating_point:
            buf = poisoned(shape, t.dtype, t.device)
        else:
            buf = torch.full(shape, -1, dtype=t.dtype, device=t.device)
        buf[..., ::2] = t
        return buf[..., ::2]
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t.contiguous()


def _rand(data, shape, dtype, device, *, scale=1.0, label="t", layout=None):
    """N(0, scale²) values rounded to ``dtype``, in a drawn layout."""
    seed = data.draw(st.integers(0, 2**31 - 1), label=f"{label} seed")
    if layout is None:
        layout = data.draw(st.sampled_from(LAYOUTS), label=f"{label} layout")
    g = torch.Generator().manual_seed(seed)
    vals = (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    return _layout(vals, layout)


def _snapshot(*tensors):
    return [None if t is None or t.is_meta else t.detach().clone() for t in tensors]


def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.numel(), dtype=t.dtype)  # stride 1 even where t's size-1/empty dims have odd strides
    flat.copy_(t.detach().cpu().reshape(-1))
    return flat.view(torch.uint8)


def _assert_unchanged(tensors, before):
    for t, b in zip(tensors, before):
        if b is None:
            continue
        assert t.shape == b.shape and t.dtype == b.dtype and torch.equal(_bits(t), _bits(b)), "input changed"


def _raises(exc, name, fn, *tensors):
    """fn() raises ``exc`` whose message starts with ``name:``, leaving ``tensors`` bit for bit."""
    before = _snapshot(*tensors)
    with pytest.raises(exc, match=rf"^{re.escape(name)}:"):
        fn()
    _assert_unchanged(tensors, before)


def _close(actual, expected, dtype, scale=1.0, msg=""):
    """assert_close where NaN/±Inf must sit at the same places (and have the same sign)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{msg}: NaN pattern differs"
    assert torch.equal(torch.isposinf(a), torch.isposinf(e)) and torch.equal(torch.isneginf(a), torch.isneginf(e)), \
        f"{msg}: Inf pattern differs"
    fin = torch.isfinite(e)
    assert_close(a[fin], e[fin], dtype, scale=scale, msg=msg)


def _distinct(data, numel, k, label="indices"):
    """k distinct flat indices in [0, numel), in a drawn (not necessarily sorted) order."""
    seed = data.draw(st.integers(0, 2**31 - 1), label=f"{label} seed")
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:k]


# ----------------------------------------------------------------------------------------------
# SIFT: k and selection
# ----------------------------------------------------------------------------------------------
@given(numel=st.integers(0, 10**7), density=st.floats(0.0, 1.0, exclude_min=True))
def test_sift_k_formula(numel, density):
    k = sift_k(numel, density)
    assert k == min(int(density * numel) + 1, numel) and 0 <= k <= numel
    assert (k >= 1) == (numel >= 1)


@given(bad=st.sampled_from([True, False, 0, 0.0, -0.5, 1.0000001, 2, "0.1", None, *NONFINITE]))
def test_bad_density_is_named_everywhere(bad):
    _raises(ValueError, "density", lambda: sift_k(10, bad))
    _raises(ValueError, "density", lambda: sift_select(torch.ones(3), bad))
    _raises(ValueError, "density", lambda: SIFTConfig(density=bad).validate())
    if bad is None:  # a layer's density may be unset
        return
    _raises(ValueError, "density", lambda: SIFTLinear(3, 2, density=bad))
    lin = nn.Linear(3, 2)
    _raises(ValueError, "density", lambda: SIFTLinear.from_linear(lin, density=bad))
    assert lin.weight.requires_grad
    _raises(ValueError, "density", lambda: SIFTConfig(density=bad).validate())


@given(bad=st.sampled_from([True, False, 2.0, -1, -7, "3", None]))
def test_sift_k_bad_numel(bad):
    exc = ValueError if isinstance(bad, int) and not isinstance(bad, bool) else TypeError
    _raises(exc, "numel", lambda: sift_k(bad, 0.5))


def _topk_oracle(scores: torch.Tensor, k: int) -> torch.Tensor:
    """k largest |s| (ties: lower flat index first), ascending, via a stable sort in fp64."""
    order = torch.sort(-scores.detach().double().cpu().reshape(-1).abs(), stable=True).indices[:k]
    return torch.sort(order).values


@pytest.mark.parametrize("device,backend", PARAMS)
@settings(max_examples=10)  # a top-k is ~10 interpreted launches
@given(data=st.data())
def test_sift_select_matches_oracle(device, backend, data):
    shape = data.draw(st.lists(DIMS, min_size=1, max_size=3), label="shape")
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    density = data.draw(st.floats(1e-3, 1.0), label="density")
    if data.draw(st.booleans(), label="ties"):  # few distinct |values|, ±0 included: ties decide
        palette = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.5, -2.5], dtype=torch.float64)
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="tie seed"))
        vals = palette[torch.randint(0, len(palette), tuple(shape), generator=g)]
        scores = _layout(vals.to(dtype).to(device), data.draw(st.sampled_from(LAYOUTS), label="layout"))
    else:
        scores = _rand(data, shape, dtype, device)
    before = _snapshot(scores)
    with force_backend(backend):
        idx = sift_select(scores, density)
        many = sift_select({"a": scores, "b": scores[..., :1]}, density)
    k = sift_k(scores.numel(), density)
    assert idx.dtype == torch.int64 and idx.shape == (k,)
    assert torch.equal(idx.cpu(), _topk_oracle(scores, k))
    assert set(many) == {"a", "b"} and torch.equal(many["a"], idx)
    assert torch.equal(many["b"].cpu(), _topk_oracle(scores[..., :1], sift_k(scores[..., :1].numel(), density)))
    _assert_unchanged([scores], before)


@pytest.mark.parametrize("device,backend", PARAMS)
@settings(max_examples=15)
@given(data=st.data())
def test_sift_select_rejects_bad_scores(device, backend, data):
    shape = data.draw(st.lists(DIMS, min_size=1, max_size=2), label="shape")
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    scores = _rand(data, shape, dtype, device)
    kind = data.draw(st.sampled_from(["nonfinite", "empty", "int", "list"]), label="kind")
    as_dict = data.draw(st.booleans(), label="in a dict")
    if kind == "nonfinite":
        pos = data.draw(st.integers(0, scores.numel() - 1), label="position")
        flat = scores.detach().clone().reshape(-1)
        flat[pos] = data.draw(st.sampled_from(NONFINITE), label="value")
        bad, exc = _layout(flat.reshape(shape), "strided"), ValueError
    elif kind == "empty":
        bad, exc = scores[..., :0], ValueError
    elif kind == "int":
        bad, exc = torch.arange(scores.numel(), device=device).reshape(shape), TypeError
    else:
        bad, exc = scores.tolist(), TypeError
    arg = {"good": scores, "bad": bad} if as_dict else bad
    name = "grads_or_scores: entry 'bad'" if as_dict else "grads_or_scores"
    tensors = [t for t in (scores, bad) if isinstance(t, torch.Tensor)]
    with force_backend(backend):
        _raises(exc, name, lambda: sift_select(arg, 0.3), *tensors)


# ----------------------------------------------------------------------------------------------
# SIFT: sift_linear
# ----------------------------------------------------------------------------------------------
def _w_eff64(weight, indices, values):
    """fp64 W_eff with the op's rounding: W_eff[I] = round_to_W_dtype(W[I] + values in fp32/fp64)."""
    acc = _acc(weight.dtype)
    idx = indices.long()
    flat = weight.detach().reshape(-1)
    w = flat.double().clone()
    w[idx] = (flat[idx].to(acc) + values.detach().to(acc)).to(weight.dtype).double()
    return w.reshape(weight.shape)


def _sift_problem(data, device, *, zero_dims=True):
    d = DIMS0 if zero_dims else DIMS
    lead = data.draw(st.lists(d, min_size=0, max_size=2), label="lead")
    d_out, d_in = data.draw(d, label="d_out"), data.draw(d, label="d_in")
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    vdtype = data.draw(st.sampled_from(FLOATS), label="values dtype")  # any float: promoted to fp32/fp64
    numel = d_out * d_in
    k = data.draw(st.integers(0 if numel == 0 else 1, numel), label="k")
    idx = _distinct(data, numel, k).to(device, data.draw(st.sampled_from([torch.int32, torch.int64]), label="idx dtype"))
    idx = _layout(idx, data.draw(st.sampled_from(["contiguous", "strided"]), label="idx layout"))
    x = _rand(data, (*lead, d_in), dtype, device, label="x")
    w = _rand(data, (d_out, d_in), dtype, device, scale=0.5, label="w")
    b = _rand(data, (d_out,), dtype, device, label="b") if data.draw(st.booleans(), label="bias") else None
    v = _rand(data, (k,), vdtype, device, scale=0.3, label="values")
    return x, w, b, idx, v


@pytest.mark.parametrize("device,backend", PARAMS)
@given(data=st.data())
def test_sift_linear_matches_fp64(device, backend, data):
    x, w, b, idx, v = _sift_problem(data, device)
    if v.numel() and data.draw(st.booleans(), label="non-finite values"):
        pos = data.draw(st.integers(0, v.numel() - 1), label="position")
        v = v.detach().clone()
        v[pos] = data.draw(st.sampled_from(NONFINITE), label="value")
    dtype = x.dtype
    x.requires_grad_()
    v.requires_grad_()
    if b is not None:
        b.requires_grad_()
    dy = _rand(data, (*x.shape[:-1], w.shape[0]), dtype, device, label="dy")
    before = _snapshot(x, w, b, idx, v, dy)
    with force_backend(backend):
        y = sift_linear(x, w, b, idx, v)
        y.backward(dy)
    _assert_unchanged([x, w, b, idx, v, dy], before)  # the weight is frozen, never merged in place
    d_out, d_in = w.shape
    w64 = _w_eff64(w, idx, v)
    x64 = x.detach().double().reshape(math.prod(x.shape[:-1]), d_in)
    dy64 = dy.double().reshape(x64.shape[0], d_out)
    y64 = x64 @ w64.T + (b.detach().double() if b is not None else 0)
    assert y.shape == (*x.shape[:-1], d_out) and y.dtype == dtype
    _close(y.reshape(y64.shape), y64, dtype, scale=math.sqrt(max(d_in, 1)), msg="y")
    _close(x.grad.reshape(x64.shape), dy64 @ w64, dtype, scale=math.sqrt(max(d_out, 1)), msg="dx")
    dv64 = (dy64.T @ x64).reshape(-1)[idx.long()]
    assert v.grad.dtype == v.dtype and v.grad.shape == v.shape
    assert_close(v.grad, dv64, _coarser(dtype, v.dtype), scale=math.sqrt(max(x64.shape[0], 1)), msg="dvalues")
    if b is not None:
        assert_close(b.grad, dy64.sum(0), dtype, scale=math.sqrt(max(x64.shape[0], 1)), msg="db")
    assert w.grad is None


@pytest.mark.parametrize("device,backend", PARAMS)
@given(data=st.data())
def test_sift_linear_rejects_bad_input(device, backend, data):
    x, w, b, idx, v = _sift_problem(data, device, zero_dims=False)
    numel = w.numel()
    kind = data.draw(st.sampled_from(["duplicate", "high", "negative", "float_idx", "int16_idx", "2d_idx",
                                      "values_len", "values_int", "x_dtype", "x_dim", "x_scalar", "bias_dtype",
                                      "bias_shape", "weight_1d", "weight_int", "device"]), label="kind")
    args = dict(x=x, weight=w, bias=b, indices=idx, values=v)
    if kind == "duplicate":
        pos = data.draw(st.integers(0, idx.numel() - 1), label="copied")
        args["indices"] = torch.cat([idx, idx[pos:pos + 1]])
        args["values"] = torch.cat([v, v[:1]])
        name, exc = "indices", ValueError
    elif kind in ("high", "negative"):
        bad = data.draw(st.integers(numel, numel + 50) if kind == "high" else st.integers(-50, -1), label="bad index")
        pos = data.draw(st.integers(0, idx.numel() - 1), label="position")
        idx2 = idx.clone()
        idx2[pos] = bad
        args["indices"], name, exc = idx2, "indices", IndexError
    elif kind == "float_idx":
        args["indices"], name, exc = idx.float(), "indices", TypeError
    elif kind == "int16_idx":
        args["indices"], name, exc = idx.to(torch.int16), "indices", TypeError
    elif kind == "2d_idx":
        args["indices"], name, exc = idx[None], "indices", ValueError
    elif kind == "values_len":
        args["values"], name, exc = torch.cat([v, v[:1]]), "values", ValueError
    elif kind == "values_int":
        args["values"], name, exc = torch.zeros(v.shape, dtype=torch.int64, device=device), "values", TypeError
    elif kind == "x_dtype":
        other = data.draw(st.sampled_from([d for d in FLOATS if d != x.dtype]), label="x dtype")
        args["x"], name, exc = x.to(other), "x", TypeError
    elif kind == "x_dim":
        args["x"], name, exc = torch.zeros((*x.shape[:-1], x.shape[-1] + 1), dtype=x.dtype, device=device), "x", ValueError
    elif kind == "x_scalar":
        args["x"], name, exc = x.reshape(-1)[0].clone() if x.numel() else torch.zeros((), dtype=x.dtype), "x", ValueError
    elif kind == "bias_dtype":
        other = data.draw(st.sampled_from([d for d in FLOATS if d != w.dtype]), label="bias dtype")
        args["bias"], name, exc = torch.zeros(w.shape[0], dtype=other, device=device), "bias", TypeError
    elif kind == "bias_shape":
        args["bias"], name, exc = torch.zeros(w.shape[0] + 1, dtype=w.dtype, device=device), "bias", ValueError
    elif kind == "weight_1d":
        args["weight"], name, exc = w.reshape(-1), "weight", ValueError
    elif kind == "weight_int":
        args["weight"], name, exc = w.to(torch.int32), "weight", TypeError
    else:  # another device (meta stands in for one on a CPU-only machine)
        name = data.draw(st.sampled_from(["indices", "values"] + (["bias"] if b is not None else [])), label="moved")
        args[name], exc = args[name].to("meta"), ValueError
    if args["x"].dtype.is_floating_point:
        args["x"] = args["x"].detach().requires_grad_()
    with force_backend(backend):
        _raises(exc, name, lambda: sift_linear(**args), *args.values())
    assert args["x"].grad is None


# ----------------------------------------------------------------------------------------------
# SIFT: SIFTLinear
# ----------------------------------------------------------------------------------------------
def _sift_layer(data, device, dtype, *, select=True):
    d_out, d_in = data.draw(DIMS, label="d_out"), data.draw(DIMS, label="d_in")
    bias = data.draw(st.booleans(), label="bias")
    lin = nn.Linear(d_in, d_out, bias=bias).to(device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(_rand(data, (d_out, d_in), dtype, device, scale=0.5, label="w"))
    if not select:
        return lin, None
    k = data.draw(st.integers(1, d_out * d_in), label="k")
    idx = _distinct(data, d_out * d_in, k).to(device)
    return lin, idx


@pytest.mark.parametrize("device,backend", PARAMS)
@given(data=st.data())
def test_sift_layer_matches_fp64(device, backend, data):
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    lin, idx = _sift_layer(data, device, dtype)
    w0 = lin.weight.detach().clone()
    layer = SIFTLinear.from_linear(lin, idx)
    assert torch.equal(layer.indices.cpu(), torch.sort(idx.cpu()).values)  # any order in, ascending kept
    with torch.no_grad():
        layer.delta.copy_(_rand(data, (layer.k,), layer.delta.dtype, device, scale=0.3, label="delta"))
    if layer.bias is not None:
        layer.bias.requires_grad_(True)
    lead = data.draw(st.lists(DIMS0, min_size=0, max_size=2), label="lead")
    x = _rand(data, (*lead, layer.in_features), dtype, device, label="x").requires_grad_()
    dy = _rand(data, (*lead, layer.out_features), dtype, device, label="dy")
    x_before = _snapshot(x)
    with force_backend(backend):
        y = layer(x)
        y.backward(dy)
    _assert_unchanged([x], x_before)
    w64 = _w_eff64(w0, layer.indices, layer.delta)
    assert torch.equal(_bits(layer.weight), _bits(w64.to(dtype))), "W must hold round(W0[I] + δ) at I, W0 elsewhere"
    d_in, d_out = layer.in_features, layer.out_features
    x64 = x.detach().double().reshape(-1, d_in)
    dy64 = dy.double().reshape(-1, d_out)
    y64 = x64 @ w64.T + (layer.bias.detach().double() if layer.bias is not None else 0)
    assert y.shape == (*lead, d_out) and y.dtype == dtype
    assert_close(y.reshape(-1, d_out), y64, dtype, scale=math.sqrt(d_in), msg="y")
    assert_close(x.grad.reshape(-1, d_in), dy64 @ w64, dtype, scale=math.sqrt(d_out), msg="dx")
    assert layer.delta.grad.dtype == _acc(dtype)
    t = max(x64.shape[0], 1)
    assert_close(layer.delta.grad, (dy64.T @ x64).reshape(-1)[layer.indices], dtype, scale=math.sqrt(t), msg="ddelta")
    if layer.bias is not None:
        assert_close(layer.bias.grad, dy64.sum(0), dtype, scale=math.sqrt(t), msg="db")
    layer.restore_base_()
    assert torch.equal(_bits(layer.weight), _bits(w0))


def _layer_state(layer):
    return [layer.weight, layer.indices, layer.w0_sel, layer.delta, layer.rows, layer.cols]


@pytest.mark.parametrize("device,backend", PARAMS)
@given(data=st.data())
def test_sift_layer_rejects_bad_input(device, backend, data):
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    lin, idx = _sift_layer(data, device, dtype)
    numel = lin.weight.numel()
    kind = data.draw(st.sampled_from(["duplicate", "high", "negative", "empty", "too_many", "float", "2d"]),
                     label="kind")
    if kind == "duplicate":
        pos = data.draw(st.integers(0, idx.numel() - 1), label="copied")
        bad, exc = torch.cat([idx, idx[pos:pos + 1]]), ValueError
    elif kind in ("high", "negative"):
        bad = idx.clone()
        bad[data.draw(st.integers(0, idx.numel() - 1), label="position")] = data.draw(
            st.integers(numel, numel + 50) if kind == "high" else st.integers(-50, -1), label="bad index")
        exc = IndexError
    elif kind == "empty":
        bad, exc = idx[:0], ValueError
    elif kind == "too_many":
        bad, exc = torch.arange(numel + 1, device=device), ValueError
    elif kind == "float":
        bad, exc = idx.double(), TypeError
    else:
        bad, exc = idx[None], ValueError
    # from_linear: nothing happens to the linear (its weight is not frozen)
    _raises(exc, "indices", lambda: SIFTLinear.from_linear(lin, bad), lin.weight, bad)
    assert lin.weight.requires_grad
    # set_indices on a trained layer: W, I, W0[I], δ stay as they were
    layer = SIFTLinear.from_linear(lin, idx)
    with torch.no_grad():
        layer.delta.copy_(_rand(data, (layer.k,), layer.delta.dtype, device, scale=0.1, label="delta"))
    x = _rand(data, (2, layer.in_features), dtype, device, label="x")
    with force_backend(backend), torch.no_grad():
        y_before = layer(x)
    _raises(exc, "indices", lambda: layer.set_indices(bad), *_layer_state(layer), bad)
    # a checkpoint with a bad index set loads nothing
    fresh = SIFTLinear.from_linear(nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
                                   .to(device=device, dtype=dtype), idx)
    sd = {**layer.state_dict(), "indices": torch.sort(bad).values if bad.dim() == 1 else bad}
    if kind != "empty":  # no indices at all is an unselected layer's checkpoint
        _raises(exc, "state_dict: indices", lambda: fresh.load_state_dict(sd), *_layer_state(fresh))
    with force_backend(backend), torch.no_grad():
        assert torch.equal(layer(x), y_before)
    # forward: x of another dtype / width / not a tensor
    other = data.draw(st.sampled_from([d for d in FLOATS if d != dtype]), label="x dtype")
    with force_backend(backend):
        _raises(TypeError, "x", lambda: layer(x.to(other)), x, *_layer_state(layer))
        _raises(ValueError, "x", lambda: layer(x[..., :-1] if x.shape[-1] > 1 else x.new_zeros(2, 2)), x)
        _raises(TypeError, "x", lambda: layer(x.tolist()))
        _raises(ValueError, "x", lambda: layer(x.to("meta")), *_layer_state(layer))


@given(in_f=st.sampled_from([True, False, 2.0, -1, "3", None]))
def test_sift_layer_bad_features(in_f):
    exc = ValueError if in_f == -1 and not isinstance(in_f, bool) else TypeError
    _raises(exc, "in_features", lambda: SIFTLinear(in_f, 3))
    _raises(exc, "out_features", lambda: SIFTLinear(3, in_f))


# ----------------------------------------------------------------------------------------------
# SIFT: SparseAdamW
# ----------------------------------------------------------------------------------------------
def _adamw64(p, grads, lr, betas, eps, wd, maximize):
    """torch.optim.AdamW's math in fp64 over a sequence of gradients."""
    p = p.detach().double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    b1, b2 = betas
    for step, g in enumerate(grads, 1):
        g = -g.double() if maximize else g.double()
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr / (1 - b1**step) * m / (v.sqrt() / math.sqrt(1 - b2**step) + eps)
    return p, m, v


_HPARAMS = st.fixed_dictionaries(dict(
    lr=st.sampled_from([0.0, 1e-3, 3e-2, 0.1]), betas=st.tuples(st.sampled_from([0.0, 0.5, 0.9]),
                                                                 st.sampled_from([0.0, 0.9, 0.999])),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]), weight_decay=st.sampled_from([0.0, 0.01, 0.5]),
    maximize=st.booleans()))


@pytest.mark.parametrize("device,backend", PARAMS)
@settings(max_examples=15)
@given(data=st.data(), hp=_HPARAMS, steps=st.integers(1, 3))
def test_sparse_adamw_matches_fp64(device, backend, data, hp, steps):
    """δ (fused step) and a plain parameter (standard step) follow AdamW's fp64 math within the state
    dtype's tolerance, like torch.optim.AdamW; W[I] = round(W0[I] + δ) bit for bit, W0 elsewhere."""
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    lin, idx = _sift_layer(data, device, dtype)
    w0 = lin.weight.detach().clone()
    layer = SIFTLinear.from_linear(lin, idx)
    head = nn.Parameter(_rand(data, (3,), torch.float32, device, label="head", layout="contiguous"))
    d0, h0 = layer.delta.detach().clone(), head.detach().clone()
    twin_d, twin_h = nn.Parameter(d0.clone()), nn.Parameter(h0.clone())
    opt = SparseAdamW([layer.delta, head], **hp)
    ref = torch.optim.AdamW([twin_d, twin_h], foreach=False, **hp)
    gd = [_rand(data, (layer.k,), layer.delta.dtype, device, label=f"g{i}", layout="contiguous") for i in range(steps)]
    gh = [_rand(data, (3,), torch.float32, device, label=f"h{i}", layout="contiguous") for i in range(steps)]
    for a, b in zip(gd, gh):
        layer.delta.grad, head.grad, twin_d.grad, twin_h.grad = a.clone(), b.clone(), a.clone(), b.clone()
        with force_backend(backend):
            opt.step()
        ref.step()
    for p, p0, grads, twin in ((layer.delta, d0, gd, twin_d), (head, h0, gh, twin_h)):
        p64, m64, v64 = _adamw64(p0, grads, hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"], hp["maximize"])
        st_ = opt.state[p]
        assert int(st_["step"]) == steps
        assert_close(p, p64, p.dtype, msg="param")
        assert_close(st_["exp_avg"], m64, p.dtype, msg="exp_avg")
        assert_close(st_["exp_avg_sq"], v64, p.dtype, msg="exp_avg_sq")
        assert_close(p, twin, p.dtype, msg="vs torch.optim.AdamW")
    assert torch.equal(_bits(layer.weight), _bits(_w_eff64(w0, layer.indices, layer.delta).to(dtype)))


_BAD_HP = [("lr", v, e) for v, e in [(True, TypeError), (float("nan"), ValueError), (float("inf"), ValueError),
                                      (-1e-3, ValueError), ("1e-3", TypeError), (None, TypeError)]] + \
    [("eps", v, e) for v, e in [(False, TypeError), (float("inf"), ValueError), (-1.0, ValueError)]] + \
    [("weight_decay", v, e) for v, e in [(True, TypeError), (float("nan"), ValueError), (-0.1, ValueError)]] + \
    [("betas", v, e) for v, e in [((0.9, 1.0), ValueError), ((-0.1, 0.9), ValueError), ((False, 0.9), TypeError),
                                  ((0.9, float("nan")), ValueError), (0.9, TypeError), ((0.9,), ValueError),
                                  ((0.9, 0.99, 0.999), ValueError)]] + \
    [("maximize", v, TypeError) for v in (1, "yes", None)]


@pytest.mark.parametrize("device,backend", PARAMS)
@settings(max_examples=20)
@given(data=st.data(), bad=st.sampled_from(_BAD_HP))
def test_sparse_adamw_rejects_bad_hparams(device, backend, data, bad):
    """At construction (keyword or a param group's own value) and at step() after a scheduler-style
    rewrite of param_groups: nothing moves (step counter, moments, δ, W, other parameters)."""
    field, value, exc = bad
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    lin, idx = _sift_layer(data, device, dtype)
    layer = SIFTLinear.from_linear(lin, idx)
    head = nn.Parameter(torch.randn(3, device=device))
    _raises(exc, field, lambda: SparseAdamW([layer.delta, head], **{field: value}))
    _raises(exc, field, lambda: SparseAdamW([{"params": [layer.delta]}, {"params": [head], field: value}]))
    opt = SparseAdamW([{"params": [layer.delta]}, {"params": [head]}], lr=1e-2)
    _raises(exc, field, lambda: opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], field: value}))
    assert len(opt.param_groups) == 2
    with force_backend(backend):
        if data.draw(st.booleans(), label="a good step first"):
            layer.delta.grad, head.grad = torch.ones_like(layer.delta), torch.ones_like(head)
            opt.step()
        opt.param_groups[data.draw(st.integers(0, 1), label="group")][field] = value
        layer.delta.grad, head.grad = torch.randn_like(layer.delta), torch.randn_like(head)
        had_state = [bool(opt.state[p]) for p in (layer.delta, head)]
        state = [t for p in (layer.delta, head) for t in opt.state[p].values()]
        _raises(exc, field, opt.step, layer.weight, layer.delta, head, *state)
    assert [bool(opt.state[p]) for p in (layer.delta, head)] == had_state


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
@given(density=st.floats(0.0, 1.0, exclude_min=True), calib=st.integers(1, 10**6))
def test_sift_config_accepts_valid(density, calib):
    cfg = SIFTConfig(density=density, calib_batches=calib)
    cfg.validate()
    assert SIFTConfig.from_dict(cfg.to_dict()) == cfg


@given(field=st.sampled_from(["density", "calib_batches", "target_modules"]), data=st.data())
def test_sift_config_rejects_bad_fields(field, data):
    bad = {"density": [*BAD_REALS, 0.0, -0.1, 1.5], "calib_batches": [True, False, 0, -2, 2.0, "2", None, float("nan")],
           "target_modules": [[""], [1], ["q", None], 5, "(unclosed"]}[field]
    value = data.draw(st.sampled_from(bad), label="value")
    _raises(ValueError, field, lambda: SIFTConfig(**{field: value}))  # where it is written
    cfg = SIFTConfig()
    setattr(cfg, field, value)  # and at apply, for a field changed after construction
    before = dataclasses.asdict(cfg)
    _raises(ValueError, field, cfg.validate)
    assert dataclasses.asdict(cfg) == before
    _raises(ValueError, field, lambda: SIFTConfig.from_dict({"method": "sift", field: value}))


_WEGEFT_BAD = {
    "r": [True, False, 0, -1, 2.0, "4", None, float("nan")],
    "alpha": [*BAD_REALS, 0, -1.0],
    "dropout": [*BAD_REALS, 1.0, -0.1, 1.5],
    "share_generators": [1, 0, "yes", None],
    "upcast_generators": [1, 0, "yes", None],
    "path": ["fast", None, 1, ["fused"]],
    "merge_backup": ["gpu", None, True],
    "exclude_modules": [[""], [1], 3],
    "target_modules": [[""], [None], 5, "(unclosed", []],
}


@given(r=st.integers(1, 512), alpha=st.floats(1e-3, 1e3), dropout=st.floats(0.0, 0.999),
       path=st.sampled_from(["auto", "fused", "merged"]), share=st.booleans(), upcast=st.booleans())
def test_wegeft_config_accepts_valid(r, alpha, dropout, path, share, upcast):
    cfg = WeGeFTConfig(r=r, alpha=alpha, dropout=dropout, path=path, share_generators=share, upcast_generators=upcast)
    cfg.validate()
    assert WeGeFTConfig.from_dict(cfg.to_dict()) == cfg


@given(field=st.sampled_from(sorted(_WEGEFT_BAD)), data=st.data())
def test_wegeft_config_rejects_bad_fields(field, data):
    value = data.draw(st.sampled_from(_WEGEFT_BAD[field]), label="value")
    _raises(ValueError, field, lambda: WeGeFTConfig(**{field: value}))
    cfg = WeGeFTConfig()
    setattr(cfg, field, value)
    before = dataclasses.asdict(cfg)
    _raises(ValueError, field, cfg.validate)
    assert dataclasses.asdict(cfg) == before


# ----------------------------------------------------------------------------------------------
# WeGeFT: wegeft_linear
# ----------------------------------------------------------------------------------------------
def _wegeft_problem(data, device, *, zero_dims=True):
    d = DIMS0 if zero_dims else DIMS
    lead = data.draw(st.lists(d, min_size=0, max_size=2), label="lead")
    d_out, d_in = data.draw(d, label="d_out"), data.draw(d, label="d_in")
    r = data.draw(st.sampled_from([1, 2, 3]), label="r")
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    s = max(d_in, 1) ** -0.5
    x = _rand(data, (*lead, d_in), dtype, device, label="x")
    w = _rand(data, (d_out, d_in), dtype, device, scale=s, label="w")
    b = _rand(data, (d_out,), dtype, device, label="b") if data.draw(st.booleans(), label="bias") else None
    phi = _rand(data, (r, d_in), dtype, device, scale=s, label="phi")
    psi = _rand(data, (r, d_in), dtype, device, scale=s, label="psi")
    scaling = data.draw(st.sampled_from([0.0, 0.5, -1.3, 2.0]), label="scaling")
    return x, w, b, phi, psi, scaling


@pytest.mark.parametrize("device,backend", PARAMS)
@settings(max_examples=12)
@given(data=st.data())
def test_wegeft_linear_matches_fp64(device, backend, data):
    x, w, b, phi, psi, scaling = _wegeft_problem(data, device)
    dtype = x.dtype
    path = data.draw(st.sampled_from(["auto", "fused", "merged"]), label="path")
    p = data.draw(st.sampled_from([0.0, 0.0, 0.3]), label="dropout_p")
    seed = data.draw(st.integers(0, 2**31 - 1), label="dropout seed")
    seed_arg = torch.tensor(seed) if data.draw(st.booleans(), label="seed as tensor") else seed
    for t in (x, b, phi, psi):
        if t is not None:
            t.requires_grad_()
    dy = _rand(data, (*x.shape[:-1], w.shape[0]), dtype, device, label="dy")
    before = _snapshot(x, w, b, phi, psi, dy)
    with force_backend(backend):
        y = wegeft_linear(x, w, b, phi, psi, scaling, dropout_p=p, dropout_seed=seed_arg, path=path)
        y.backward(dy)
    _assert_unchanged([x, w, b, phi, psi, dy], before)
    assert y.shape == (*x.shape[:-1], w.shape[0]) and y.dtype == dtype and y.is_contiguous()
    # fp64 oracle: autograd through the formula, the generated branch seeing W∘M/(1-p)
    d_out, d_in = w.shape
    x64, b64, phi64, psi64 = (None if t is None else t.detach().double().requires_grad_() for t in (x, b, phi, psi))
    w64 = w.double()
    wd = w64 * dropout_keep_mask(seed, d_out, d_in, p, device) * dropout_keep_scale(p) if p > 0 else w64
    xt = x64.reshape(math.prod(x.shape[:-1]), d_in)
    y64 = xt @ w64.T + scaling * (xt @ psi64.T) @ (phi64 @ wd.T) + (b64 if b64 is not None else 0)
    y64.backward(dy.double().reshape(y64.shape))
    for name, a, e in (("y", y.detach().reshape(y64.shape), y64.detach()), ("dx", x.grad, x64.grad),
                       ("db", None if b is None else b.grad, None if b is None else b64.grad),
                       ("dphi", phi.grad, phi64.grad), ("dpsi", psi.grad, psi64.grad)):
        if e is None:
            continue
        assert a.shape == e.shape and a.dtype == dtype, name
        scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
        assert_close(a, e, dtype, scale=scale, msg=f"{path} {name}")


@pytest.mark.parametrize("device,backend", PARAMS)
@given(data=st.data())
def test_wegeft_linear_rejects_bad_input(device, backend, data):
    x, w, b, phi, psi, scaling = _wegeft_problem(data, device, zero_dims=False)
    if b is None:
        b = torch.zeros(w.shape[0], dtype=w.dtype, device=device)
    args = dict(x=x, weight=w, bias=b, phi=phi, psi=psi, scaling=scaling)
    kw = {}
    others = [d for d in FLOATS if d != x.dtype]
    kind = data.draw(st.sampled_from(["x_dtype", "bias_dtype", "phi_dtype", "psi_dtype", "x_dim", "x_scalar",
                                      "phi_shape", "psi_rank", "bias_shape", "weight_1d", "x_int", "scaling",
                                      "dropout_p", "path", "dropout_seed", "weight_grad", "device"]), label="kind")
    if kind.endswith("_dtype"):
        name = kind[:-6]
        args[name], exc = args[name].to(data.draw(st.sampled_from(others), label="other dtype")), TypeError
    elif kind == "x_dim":
        args["x"], name, exc = torch.zeros((*x.shape[:-1], x.shape[-1] + 1), dtype=x.dtype, device=device), "x", ValueError
    elif kind == "x_scalar":
        args["x"], name, exc = torch.zeros((), dtype=x.dtype, device=device), "x", ValueError
    elif kind == "phi_shape":
        args["phi"], name, exc = torch.zeros(phi.shape[0], phi.shape[1] + 1, dtype=x.dtype, device=device), "phi", ValueError
    elif kind == "psi_rank":
        args["psi"], name, exc = torch.cat([psi, psi[:1]]), "psi", ValueError
    elif kind == "bias_shape":
        args["bias"], name, exc = torch.cat([b, b[:1]]), "bias", ValueError
    elif kind == "weight_1d":
        args["weight"], name, exc = w.reshape(-1), "weight", ValueError
    elif kind == "x_int":
        args["x"], name, exc = torch.ones(x.shape, dtype=torch.int64, device=device), "x", TypeError
    elif kind == "scaling":
        args["scaling"], name, exc = data.draw(st.sampled_from(BAD_REALS), label="scaling"), "scaling", TypeError
    elif kind == "dropout_p":
        value = data.draw(st.sampled_from([*BAD_REALS, 1.0, -0.1, 2.0]), label="dropout_p")
        kw["dropout_p"], name = value, "dropout_p"
        exc = ValueError if isinstance(value, float) and math.isfinite(value) else TypeError
    elif kind == "path":
        kw["path"], name, exc = data.draw(st.sampled_from(["fast", "", "FUSED"]), label="path"), "path", ValueError
    elif kind == "dropout_seed":
        value = data.draw(st.sampled_from(["a", True, 1.5, torch.tensor([1, 2]), torch.tensor(1.0)]), label="seed")
        kw["dropout_p"], kw["dropout_seed"], name = 0.2, value, "dropout_seed"
        exc = ValueError if isinstance(value, torch.Tensor) and value.numel() == 2 else TypeError
    elif kind == "weight_grad":
        args["weight"], name, exc = w.detach().clone().requires_grad_(), "weight", ValueError
    else:  # another device (meta stands in for one on a CPU-only machine)
        name = data.draw(st.sampled_from(["x", "bias", "phi", "psi"]), label="moved")
        args[name], exc = args[name].to("meta"), ValueError
    tensors = [t for t in (*args.values(), *kw.values()) if isinstance(t, torch.Tensor)]
    with force_backend(backend):
        _raises(exc, name, lambda: wegeft_linear(*args.values(), **kw), *tensors)


# ----------------------------------------------------------------------------------------------
# WeGeFT: WeGeFTLinear
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", PARAMS)
@settings(max_examples=12)
@given(data=st.data())
def test_wegeft_layer_matches_fp64_and_merges(device, backend, data):
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    d_out, d_in = data.draw(DIMS, label="d_out"), data.draw(DIMS, label="d_in")
    r, alpha = data.draw(st.sampled_from([1, 2, 3]), label="r"), data.draw(st.sampled_from([0.5, 2.0, 16.0]), label="alpha")
    lin = nn.Linear(d_in, d_out, bias=data.draw(st.booleans(), label="bias")).to(device=device, dtype=dtype)
    with torch.no_grad():  # every value drawn, none from the global RNG
        lin.weight.copy_(_rand(data, (d_out, d_in), dtype, device, scale=d_in ** -0.5, label="w"))
        if lin.bias is not None:
            lin.bias.copy_(_rand(data, (d_out,), dtype, device, label="b"))
    upcast = data.draw(st.booleans(), label="upcast")
    layer = WeGeFTLinear(lin, r, alpha, upcast_generators=upcast, path=data.draw(
        st.sampled_from(["auto", "fused", "merged"]), label="path"))
    with torch.no_grad():
        layer.phi.copy_(_rand(data, (r, d_in), layer.phi.dtype, device, scale=d_in ** -0.5, label="phi"))
        layer.psi.copy_(_rand(data, (r, d_in), layer.psi.dtype, device, scale=d_in ** -0.5, label="psi"))
    gdtype = layer.phi.dtype
    assert gdtype == (torch.float32 if upcast and dtype in (torch.float16, torch.bfloat16) else dtype)
    lead = data.draw(st.lists(DIMS0, min_size=0, max_size=2), label="lead")
    x = _rand(data, (*lead, d_in), dtype, device, label="x").requires_grad_()
    dy = _rand(data, (*lead, d_out), dtype, device, label="dy")
    w0 = layer.weight.detach().clone()
    with force_backend(backend):
        y = layer(x)
        y.backward(dy)
    # oracle: the generators as the layer uses them (cast to the weight dtype)
    phi_w, psi_w = layer.phi.detach().to(dtype), layer.psi.detach().to(dtype)
    x64, phi64, psi64 = (t.detach().double().requires_grad_() for t in (x, phi_w, psi_w))
    w64 = w0.double()
    xt = x64.reshape(-1, d_in)
    b64 = layer.bias.detach().double() if layer.bias is not None else 0
    y64 = xt @ w64.T + layer.scaling * (xt @ psi64.T) @ (phi64 @ w64.T) + b64
    y64.backward(dy.double().reshape(y64.shape))
    for name, a, e, dt in (("y", y.detach().reshape(y64.shape), y64.detach(), dtype), ("dx", x.grad, x64.grad, dtype),
                           ("dphi", layer.phi.grad, phi64.grad, dtype), ("dpsi", layer.psi.grad, psi64.grad, dtype)):
        scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
        assert_close(a.reshape(e.shape), e, dt, scale=scale, msg=name)
    assert layer.phi.grad.dtype == gdtype and layer.weight.grad is None
    with force_backend(backend), torch.no_grad():
        y_unmerged = layer(x)
        layer.merge()
        y_merged = layer(x)
        _raises(TypeError, "x", lambda: layer(x.to([d for d in FLOATS if d != dtype][0])), x, layer.weight)
        layer.unmerge()
    assert torch.equal(_bits(layer.weight), _bits(w0)), "unmerge must restore W bit for bit"
    e = y64.detach()
    assert_close(y_merged.reshape(e.shape), e, dtype, scale=max(1.0, float(e.abs().max())) if e.numel() else 1.0)
    assert_close(y_merged.reshape(e.shape), y_unmerged.reshape(e.shape).double(), dtype,
                 scale=max(1.0, float(e.abs().max())) if e.numel() else 1.0)


@given(data=st.data())
def test_wegeft_layer_rejects_bad_args(data):
    """Bad hyperparameters / generators: TypeError/ValueError naming them, the base linear untouched
    (still trainable); a bad x fails alike merged and unmerged."""
    lin = nn.Linear(5, 3)
    field = data.draw(st.sampled_from(["r", "alpha", "dropout", "path", "merge_backup", "upcast_generators",
                                       "generator_key", "phi", "psi", "base"]), label="field")
    kw = {}
    if field in ("phi", "psi"):
        value = data.draw(st.sampled_from(["shape", "tensor", "int", "list"]), label="value")
        good = nn.Parameter(torch.zeros(2, 5))
        kw[field] = {"shape": nn.Parameter(torch.zeros(2, 4)), "tensor": torch.zeros(2, 5),
                     "int": nn.Parameter(torch.zeros(2, 5, dtype=torch.int64), requires_grad=False),
                     "list": [[0.0] * 5] * 2}[value]
        kw["psi" if field == "phi" else "phi"] = good
        exc = ValueError if value == "shape" else TypeError
        args = (lin, 2)
    elif field == "base":
        args, exc = (nn.Conv1d(5, 3, 1), 2), TypeError
    elif field == "upcast_generators":
        args, exc = (lin, 2), TypeError
        kw[field] = data.draw(st.sampled_from([1, 0, "yes", None]), label="value")
    elif field == "generator_key":
        args, exc = (lin, 2), TypeError
        kw[field] = data.draw(st.sampled_from([1, b"q", ["q"]]), label="value")
    else:
        args, exc = (lin, 2), ValueError
        kw[field] = data.draw(st.sampled_from(_WEGEFT_BAD[field]), label="value")
        if field == "r":
            args, kw = (lin, kw.pop("r")), {}
    _raises(exc, field, lambda: WeGeFTLinear(*args, **kw), lin.weight)
    assert lin.weight.requires_grad
