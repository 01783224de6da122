"""kernels/wegeft.py: every kernel and both execution paths against a float64 oracle.

Every fresh buffer is NaN-poisoned (helpers.poison_fresh_buffers: torch.empty starts as NaN), so an
element a kernel fails to write shows up as a mismatch. Shapes are odd on purpose (primes, r = 1, d_in != d_out).
"""
import math

import pytest
import torch

from helpers import TOL, assert_close, device_backend_params, force_backend, poison_fresh_buffers
from peftops.kernels import wegeft as K

SHAPES = [  # (T, d_in, d_out, r)
    (37, 29, 23, 5),
    (6, 17, 40, 1),
    (19, 48, 31, 17),
    (8, 64, 32, 4),  # K = d_in and K = d_out multiples of the interpreter's BK (the EVEN_K1 loop)
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_fresh_buffers(monkeypatch)


def _close(actual, expected, dtype, what):
    """Per-dtype tolerance, atol relative to the tensor's magnitude (rounding errors of a sum scale
    with the size of its terms, not with the result entry)."""
    scale = max(1.0, float(expected.abs().max()))
    assert actual is not None, what
    assert torch.isfinite(actual.double()).all(), f"{what}: non-finite (unwritten?) entries"
    assert_close(actual, expected, dtype, scale=scale, msg=f"{what}: mismatch beyond {TOL[dtype]} x {scale:.3g}")


def _inputs(t, d_in, d_out, r, dtype, device, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(device)

    x = rnd(t, d_in)
    w = rnd(d_out, d_in, s=d_in ** -0.5)
    b = rnd(d_out) if bias else None
    phi = rnd(r, d_in, s=d_in ** -0.5)
    psi = rnd(r, d_in, s=d_in ** -0.5)
    grad = rnd(t, d_out)
    return x, w, b, phi, psi, grad


def _oracle(x, w, b, phi, psi, grad, scaling, p=0.0, seed=0):
    d = [t.double() if t is not None else None for t in (x, w, b, phi, psi, grad)]
    y, u = K.wegeft_forward_reference(d[0], d[1], d[2], d[3], d[4], scaling, p, seed)
    g = K.wegeft_backward_reference(d[5], d[0], u, d[1], d[3], d[4], scaling, p, seed, True, True, True, True)
    return y, u, g


def _run(backend, path, x, w, b, phi, psi, grad, scaling, p=0.0, seed=0):
    with force_backend(backend):
        y, u = K.wegeft_forward(x, w, b, phi, psi, scaling, dropout_p=p, seed=seed, path=path)
        g = K.wegeft_backward(grad, x, u, w, phi, psi, scaling, dropout_p=p, seed=seed, path=path, need_dbias=True)
    return y, u, g


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_match_fp64(device, backend, dtype, shape):
    x, w, b, phi, psi, grad = _inputs(*shape, dtype, device)
    y0, u0, g0 = _oracle(x, w, b, phi, psi, grad, 1.7)
    for path in (("fused", "merged") if backend == "triton" else ("auto",)):
        y, u, g = _run(backend, path, x, w, b, phi, psi, grad, 1.7)
        assert y.dtype == dtype and u.dtype == dtype and y.shape == y0.shape
        _close(y, y0, dtype, f"{path} y")
        _close(u, u0, dtype, f"{path} u")
        for name, a, e in zip(("dx", "dphi", "dpsi", "dbias"), g, g0):
            _close(a, e, dtype, f"{path} {name}")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("path", ["fused", "merged"])
def test_dropout_generated_branch_only(device, backend, path):
    """p > 0: B and dΦ see W∘M/(1-p) with M = dropout_keep_mask(seed); x Wᵀ and dx's G W do not."""
    shape, p, seed = (21, 33, 19, 6), 0.35, 1234
    x, w, b, phi, psi, grad = _inputs(*shape, torch.float64, device, seed=3)
    y, u, g = _run(backend, path, x, w, b, phi, psi, grad, 0.9, p, seed)
    keep = K.dropout_keep_mask(seed, w.shape[0], w.shape[1], p, device)
    scale = 1.0 / (1.0 - K.dropout_threshold(p) / 2**24)
    b_gen = (w * keep * scale) @ phi.t() * 0.9
    y_expect = x @ w.t() + b + (x @ psi.t()) @ b_gen.t()
    assert_close(y, y_expect, torch.float64)
    v = grad @ b_gen
    assert_close(g[0], grad @ w + v @ psi, torch.float64)
    assert_close(g[1], ((x @ psi.t()).t() @ grad) @ (w * keep) * (0.9 * scale), torch.float64)
    assert_close(g[2], v.t() @ x, torch.float64)
    # a different seed draws a different mask
    y2, _, _ = _run(backend, path, x, w, b, phi, psi, grad, 0.9, p, seed + 1)
    assert not torch.allclose(y, y2)


def test_dropout_mask_statistics_and_bits():
    keep = K.dropout_keep_mask(7, 256, 384, 0.25)
    assert abs(keep.double().mean().item() - 0.75) < 0.01
    assert not torch.equal(keep, K.dropout_keep_mask(8, 256, 384, 0.25))
    assert K.dropout_keep_mask(7, 4, 5, 0.0).all()
    # rows and columns are not trivially correlated: each row keeps about 75%
    assert keep.double().mean(1).std() < 0.05


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_merge_and_generate_b(device, backend, dtype):
    d_out, d_in, r = 23, 41, 7
    _, w, _, phi, psi, _ = _inputs(3, d_in, d_out, r, dtype, device, seed=5)
    acc = w.double() + (w.double() @ phi.double().t()) @ psi.double() * 0.6
    with force_backend(backend):
        merged = K.wegeft_merge(w, phi, psi, 0.6)
        b_gen = K.generate_b(w, phi, 0.6)
        inplace = w.clone()
        ret = K.wegeft_merge(inplace, phi, psi, 0.6, out=inplace)
    assert ret.data_ptr() == inplace.data_ptr()
    _close(merged, acc, dtype, "merge")
    assert torch.equal(merged, inplace), "in-place merge differs from out-of-place"
    _close(b_gen, (w.double() @ phi.double().t()) * 0.6, dtype, "B")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("path", ["fused", "merged"])
def test_backward_computes_only_what_is_needed(device, backend, path, monkeypatch):
    x, w, b, phi, psi, grad = _inputs(9, 13, 11, 3, torch.float64, device)
    _, u0, g0 = _oracle(x, w, b, phi, psi, grad, 1.1)
    with force_backend(backend):
        y, u = K.wegeft_forward(x, w, b, phi, psi, 1.1, path=path)
        for needs in [(True, False, False, False), (False, True, False, False), (False, False, True, False),
                      (False, False, False, True), (True, False, True, False)]:
            # inputs that are not needed may be None (the op does not save them)
            xa = x if needs[2] else None
            ua = u if needs[1] else None
            got = K.wegeft_backward(grad, xa, ua, w, phi, psi, 1.1, path=path, need_dx=needs[0],
                                    need_dphi=needs[1], need_dpsi=needs[2], need_dbias=needs[3])
            for need, a, e in zip(needs, got, g0):
                if need:
                    assert_close(a, e, torch.float64)
                else:
                    assert a is None


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_output_layout(device, backend):
    """y and dx are contiguous on every path (nn.Linear's layout)."""
    t, d_in, d_out, r = 10, 12, 14, 3
    x, w, b, phi, psi, grad = _inputs(t, d_in, d_out, r, torch.float32, device)
    with force_backend(backend):
        y_m, _ = K.wegeft_forward(x, w, b, phi, psi, 1.0, path="merged")
        y_f, _ = K.wegeft_forward(x, w, b, phi, psi, 1.0, path="fused")
        dx_m = K.wegeft_backward(grad, x, y_m[:, :r].contiguous(), w, phi, psi, 1.0, path="merged")[0]
    assert y_f.is_contiguous() and y_m.is_contiguous() and dx_m.is_contiguous()


def test_choose_path():
    assert K.choose_path(16, 4096, 4096) == "fused"
    assert K.choose_path(2048, 4096, 4096) == "fused"
    assert K.choose_path(16384, 4096, 4096) == "merged"


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("path", ["fused", "merged"])
def test_zero_tokens(device, backend, path):
    x, w, b, phi, psi, grad = _inputs(0, 8, 6, 2, torch.float32, device)
    with force_backend(backend):
        y, u = K.wegeft_forward(x, w, b, phi, psi, 1.0, path=path)
        dx, dphi, dpsi, db = K.wegeft_backward(grad, x, u, w, phi, psi, 1.0, path=path, need_dbias=True)
    assert y.shape == (0, 6) and u.shape == (0, 2) and dx.shape == (0, 8)
    for g in (dphi, dpsi, db):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_large_rank_uses_composite_path(device, backend):
    """r > MAX_TRITON_RANK runs the PyTorch composite (still correct)."""
    x, w, b, phi, psi, grad = _inputs(4, 6, 5, K.MAX_TRITON_RANK + 1, torch.float64, device)
    y0, _, _ = _oracle(x, w, b, phi, psi, grad, 0.5)
    with force_backend(backend):
        y, _ = K.wegeft_forward(x, w, b, phi, psi, 0.5)
    assert_close(y, y0, torch.float64, scale=math.sqrt(K.MAX_TRITON_RANK))


def test_bad_inputs_name_the_argument():
    x, w, b, phi, psi, grad = _inputs(4, 6, 5, 3, torch.float32, "cpu")
    cases = [
        (dict(psi=psi[:2]), ValueError, "psi: rank mismatch"),
        (dict(phi=phi[:, :5]), ValueError, "phi: expected shape"),
        (dict(psi=torch.randn(3, 7)), ValueError, "psi: expected shape"),
        (dict(x=torch.randn(4, 7)), ValueError, "x: last dim"),
        (dict(x=x.double()), TypeError, "x: dtype"),
        (dict(phi=phi.half()), TypeError, "phi: dtype"),
        (dict(bias=torch.randn(4)), ValueError, "bias: expected shape"),
        (dict(bias=b.double()), TypeError, "bias: dtype"),
        (dict(weight=w.reshape(-1)), ValueError, "weight: expected 2"),
        (dict(x=x.int()), TypeError, "x: expected dtype"),
        (dict(scaling=float("nan")), TypeError, "scaling: expected a finite real"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p: expected a value in \[0.0, 1.0\)"),
        (dict(path="fast"), ValueError, "path: expected one of"),
    ]
    base = dict(x=x, weight=w, bias=b, phi=phi, psi=psi, scaling=1.0, dropout_p=0.0, path="auto")
    for override, exc, text in cases:
        kw = {**base, **override}
        with pytest.raises(exc, match="^" + text):
            K.wegeft_forward(kw["x"], kw["weight"], kw["bias"], kw["phi"], kw["psi"], kw["scaling"],
                             dropout_p=kw["dropout_p"], path=kw["path"])
    with pytest.raises(ValueError, match=r"^grad: expected shape"):
        K.wegeft_backward(grad[:, :4], x, x[:, :3], w, phi, psi, 1.0)
    with pytest.raises(ValueError, match=r"^u: expected shape"):
        K.wegeft_backward(grad, x, x[:, :2], w, phi, psi, 1.0)
    with pytest.raises(ValueError, match=r"^out: expected shape"):
        K.wegeft_merge(w, phi, psi, 1.0, out=torch.empty(5, 5))
