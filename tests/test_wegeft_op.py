"""peftops.wegeft_linear: the custom op + autograd (gradcheck, fp64 oracle, what it saves, fake/compile)."""
import pytest
import torch

from helpers import TOL, assert_close, device_backend_params, force_backend, poison_fresh_buffers
from peftops.wegeft import wegeft_linear


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Fresh buffers start as NaN, so an output element a kernel fails to write shows up."""
    poison_fresh_buffers(monkeypatch)


def _leaves(t, d_in, d_out, r, dtype, device, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0, grad=True):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(device).requires_grad_(grad)

    x = rnd(*lead, t, d_in)
    w = rnd(d_out, d_in, s=d_in ** -0.5, grad=False)
    b = rnd(d_out)
    phi = rnd(r, d_in, s=d_in ** -0.5)
    psi = rnd(r, d_in, s=d_in ** -0.5)
    return x, w, b, phi, psi


def _paths(backend):
    return ("fused", "merged") if backend == "triton" else ("auto",)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_gradcheck_fp64(device, backend):
    x, w, b, phi, psi = _leaves(3, 5, 4, 2, torch.float64, device, lead=(2,))
    with force_backend(backend):
        for path in _paths(backend):
            assert torch.autograd.gradcheck(
                lambda x, b, phi, psi, path=path: wegeft_linear(x, w, b, phi, psi, 0.8, path=path), (x, b, phi, psi))
            # dropout with a fixed seed is a deterministic function of the inputs
            assert torch.autograd.gradcheck(
                lambda x, b, phi, psi, path=path: wegeft_linear(x, w, b, phi, psi, 0.8, path=path, dropout_p=0.3, dropout_seed=11),
                (x, b, phi, psi), fast_mode=True)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_autograd_matches_fp64(device, backend, dtype):
    """Odd shapes with leading dims: y and every gradient against autograd of the fp64 formula."""
    x, w, b, phi, psi = _leaves(7, 19, 13, 3, dtype, device, lead=(2,), seed=1)
    gy = torch.randn(2, 7, 13, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    xd, bd, phid, psid = (t.detach().double().requires_grad_() for t in (x, b, phi, psi))
    wd = w.double()
    yd = xd @ wd.t() + bd + 1.3 * (xd @ psid.t()) @ (phid @ wd.t())
    yd.backward(gy.double())
    for path in _paths(backend):
        for t in (x, b, phi, psi):
            t.grad = None
        with force_backend(backend):
            y = wegeft_linear(x, w, b, phi, psi, 1.3, path=path)
            y.backward(gy)
        assert y.shape == (2, 7, 13) and y.dtype == dtype
        for name, a, e in (("y", y, yd), ("dx", x.grad, xd.grad), ("db", b.grad, bd.grad),
                           ("dphi", phi.grad, phid.grad), ("dpsi", psi.grad, psid.grad)):
            scale = max(1.0, float(e.detach().abs().max()))
            assert_close(a, e.detach(), dtype, scale=scale, msg=f"{path} {name} beyond {TOL[dtype]} x {scale:.3g}")


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_saves_only_what_the_needed_gradients_read(device, backend):
    """x is saved only when Ψ needs a gradient, u only when Φ does; frozen generators save neither."""
    x, w, b, phi, psi = _leaves(5, 6, 7, 2, torch.float32, device)

    def saved(**req):
        tensors = []

        def pack(t):
            tensors.append(t)
            return t

        xs = x.detach().requires_grad_(req.get("x", False))
        ps = phi.detach().requires_grad_(req.get("phi", False))
        qs = psi.detach().requires_grad_(req.get("psi", False))
        with force_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = wegeft_linear(xs, w, b.detach(), ps, qs, 1.0)
        shapes = sorted(tuple(t.shape) for t in tensors if t is not None and t.numel() > 1)
        y.sum().backward()
        return shapes, (xs.grad, ps.grad, qs.grad)

    w_shapes = sorted([(7, 6), (2, 6), (2, 6)])  # W, Φ, Ψ: parameters, no memory
    shapes, grads = saved(x=True)
    assert shapes == w_shapes and grads[0] is not None and grads[1] is None and grads[2] is None
    shapes, _ = saved(psi=True)
    assert shapes == sorted(w_shapes + [(5, 6)])
    shapes, _ = saved(phi=True)
    assert shapes == sorted(w_shapes + [(5, 2)])


def test_frozen_weight_required():
    x, w, b, phi, psi = _leaves(3, 4, 5, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"^weight: WeGeFT keeps the base weight frozen"):
        wegeft_linear(x, w.detach().requires_grad_(), b, phi, psi, 1.0)
    with torch.no_grad():
        wegeft_linear(x, w.detach().requires_grad_(), b, phi, psi, 1.0)  # fine without autograd
    with pytest.raises(ValueError, match=r"^psi: rank mismatch"):
        wegeft_linear(x, w, b, phi, psi[:1], 1.0)
    with pytest.raises(TypeError, match=r"^x: dtype"):
        wegeft_linear(x.double(), w, b, phi, psi, 1.0)


def test_no_bias_and_1d_input():
    x, w, _, phi, psi = _leaves(1, 4, 5, 2, torch.float64, "cpu")
    y = wegeft_linear(x[0], w, None, phi, psi, 2.0)
    assert y.shape == (5,)
    assert_close(y, x[0] @ w.t() + 2.0 * (x[0] @ psi.t()) @ (phi @ w.t()), torch.float64)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_opcheck(device, backend):
    """Fake (meta) outputs match the real ones, strides included, on every path."""
    x, w, b, phi, psi = _leaves(6, 5, 7, 2, torch.float32, device)
    with force_backend(backend):
        for path in _paths(backend):
            torch.library.opcheck(torch.ops.peftops.wegeft_linear.default,
                                  (x, w, b, phi, psi, 0.5, 0.0, None, path),
                                  test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
            g = torch.randn(6, 7, device=device)
            u = (x @ psi.t()).detach()
            torch.library.opcheck(torch.ops.peftops.wegeft_linear_backward.default,
                                  (g, x.detach(), u, w, phi.detach(), psi.detach(), 0.5, 0.0, None, path,
                                   [True, True, True, True]),
                                  test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_dropout_fresh_mask_per_call(device, backend):
    x, w, b, phi, psi = _leaves(4, 9, 6, 3, torch.float64, device)
    with force_backend(backend):
        y1 = wegeft_linear(x, w, b, phi, psi, 1.0, dropout_p=0.5)
        y2 = wegeft_linear(x, w, b, phi, psi, 1.0, dropout_p=0.5)
        y3 = wegeft_linear(x, w, b, phi, psi, 1.0, dropout_p=0.5, dropout_seed=5)
        y4 = wegeft_linear(x, w, b, phi, psi, 1.0, dropout_p=0.5, dropout_seed=torch.tensor(5))
    assert not torch.allclose(y1, y2)
    assert torch.equal(y3, y4)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_strided_bias_and_empty_dims(device, backend):
    """The fused Triton GEMM read the bias as contiguous (a [::2] bias gave wrong y); d_in = 0 failed
    the [-1, d_in] reshape and d_out = 0 / d_in = 0 divided by zero in the split-K launcher."""
    x, w, b, phi, psi = _leaves(3, 5, 4, 2, torch.float64, device)
    b2 = torch.randn(8, dtype=torch.float64, device=device)[::2]
    ref = x @ w.t() + 0.7 * (x @ psi.t()) @ (phi @ w.t()) + b2
    with force_backend(backend):
        for path in _paths(backend) + ("auto",):
            assert_close(wegeft_linear(x, w, b2, phi, psi, 0.7, path=path), ref, torch.float64)
            for d_out, d_in in ((4, 0), (0, 5)):
                xs, bs, ps, qs = (torch.randn(*s, dtype=torch.float64, device=device, requires_grad=True)
                                  for s in ((3, d_in), (d_out,), (2, d_in), (2, d_in)))
                ws = torch.randn(d_out, d_in, dtype=torch.float64, device=device)
                y = wegeft_linear(xs, ws, bs, ps, qs, 0.7, path=path)
                y.backward(torch.ones_like(y))
                assert y.shape == (3, d_out) and xs.grad.shape == xs.shape and ps.grad.shape == ps.shape
                assert_close(bs.grad, torch.full((d_out,), 3.0, dtype=torch.float64), torch.float64)


def test_bad_dropout_seed_is_named():
    x, w, b, phi, psi = _leaves(3, 4, 5, 2, torch.float32, "cpu")
    for seed, exc in (("a", TypeError), (True, TypeError), (2.5, TypeError), (torch.tensor([1, 2]), ValueError),
                      (torch.tensor(1.5), TypeError)):
        with pytest.raises(exc, match=r"^dropout_seed:"):
            wegeft_linear(x, w, b, phi, psi, 1.0, dropout_p=0.2, dropout_seed=seed)
