"""peftops.linear_cka: the Triton kernels (interpreter on CPU) and the reference against a float64
reference, masks, both Gram forms, odd shapes, invariances, undefined cases and bad input."""
import math
import warnings

import pytest
import torch

from helpers import TOL, device_backend_params, force_backend, poison_fresh_buffers

from peftops.kernels.cka import cka_form, linear_cka, linear_cka_reference

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

SHAPES = [(2, 1, 1), (13, 7, 5), (37, 50, 3), (64, 32, 64), (101, 33, 17)]  # (T, dx, dy)


def _pair(T, dx, dy, device, dtype, seed=0, offset=0.0):
    """x with per-column means, y partly linear in x plus noise: CKA well inside (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, dx, generator=g, dtype=torch.float64) * 2.0 + offset + torch.randn(dx, generator=g, dtype=torch.float64)
    mix = torch.randn(dx, dy, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ mix / math.sqrt(dx)) + 0.5 * torch.randn(T, dy, generator=g, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def _mask(T, device, kind, seed=1):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(T, generator=g) > 0.3
    keep[:2] = True  # at least two valid rows
    if kind == "bool":
        return keep.to(device)
    return keep.to(device=device, dtype=torch.int64)  # attention_mask style


def _ref64(x, y, mask):
    """float64 reference on the same (rounded) inputs."""
    return linear_cka_reference(x.double().reshape(-1, x.shape[-1]), y.double().reshape(-1, y.shape[-1]),
                                None if mask is None else mask.reshape(-1))


def _tol(dtype):
    # the bar: 1e-6 against float64 for fp32; 16-bit operands by their dtype's tolerance
    return {torch.float32: 1e-6, torch.float64: TOL[torch.float64][0]}.get(dtype, TOL[dtype][0])


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("T,dx,dy", SHAPES)
@pytest.mark.parametrize("form", ["features", "tokens"])
def test_matches_float64_reference(device, backend, dtype, T, dx, dy, form):
    x, y = _pair(T, dx, dy, device, dtype)
    mask = _mask(T, device, "bool" if T > 2 else None)
    with force_backend(backend):
        got = linear_cka(x, y, mask, form=form)
    assert got.shape == () and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not got.requires_grad
    want = _ref64(x, y, mask)
    assert abs(float(got) - float(want)) <= _tol(dtype), (float(got), float(want))


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("mask_kind", [None, "bool", "int"])
def test_mask_equals_dropping_the_rows(device, backend, mask_kind):
    """Masked rows hold garbage (huge values, NaN, Inf): the result equals CKA of the kept rows."""
    T, dx, dy = 45, 20, 36
    x, y = _pair(T, dx, dy, device, torch.float32, seed=3)
    mask = _mask(T, device, mask_kind, seed=4)
    if mask is not None:
        pad = mask == 0
        x[pad] = 1e6
        y[pad] = float("nan")
        x[pad.nonzero()[0]] = float("inf")
    with force_backend(backend):
        got = linear_cka(x, y, mask)
    keep = torch.ones(T, dtype=torch.bool, device=device) if mask is None else mask != 0
    want = linear_cka_reference(x[keep].double(), y[keep].double())
    assert abs(float(got) - float(want)) <= 1e-6


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_leading_dims_flatten(device, backend):
    x, y = _pair(3 * 11, 16, 9, device, torch.float32, seed=5)
    mask = _mask(33, device, "int", seed=6)
    with force_backend(backend):
        flat = linear_cka(x, y, mask)
        batched = linear_cka(x.reshape(3, 11, 16), y.reshape(3, 11, 9), mask.reshape(3, 11))
    assert abs(float(flat) - float(batched)) <= 1e-6


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_invariances(device, backend):
    """Orthogonal transforms, isotropic scaling and translation of either side leave CKA unchanged."""
    T, dx, dy = 40, 24, 12
    x, y = _pair(T, dx, dy, device, torch.float64, seed=7)
    g = torch.Generator().manual_seed(8)
    qx, _ = torch.linalg.qr(torch.randn(dx, dx, generator=g, dtype=torch.float64))
    qy, _ = torch.linalg.qr(torch.randn(dy, dy, generator=g, dtype=torch.float64))
    qx, qy = qx.to(device), qy.to(device)
    mask = _mask(T, device, "bool", seed=9)
    f32 = torch.float32
    with force_backend(backend):
        base = float(linear_cka(x.to(f32), y.to(f32), mask))
        variants = [
            linear_cka((x @ qx).to(f32), (y @ qy).to(f32), mask),
            linear_cka((3.7 * x).to(f32), (0.02 * y).to(f32), mask),
            linear_cka((x + 5.0).to(f32), (y - 2.0).to(f32), mask),
            linear_cka(y.to(f32), x.to(f32), mask),  # symmetric
        ]
    for v in variants:
        assert abs(float(v) - base) <= 2e-6, (float(v), base)
    with force_backend(backend):  # identical (or scaled) representations: CKA = 1
        assert abs(float(linear_cka(x.to(f32), (2 * x @ qx).to(f32), mask)) - 1.0) <= 2e-6


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_large_mean_columns_stay_accurate(device, backend):
    """|mean| >> std (outlier channels): centring before the products keeps fp32 at 1e-6."""
    x, y = _pair(96, 32, 40, device, torch.float64, seed=10)
    x[:, :4] += 3000.0
    y[:, -3:] -= 500.0
    x32, y32 = x.float(), y.float()
    with force_backend(backend):
        got = [float(linear_cka(x32, y32, form=f)) for f in ("features", "tokens")]
    want = float(_ref64(x32, y32, None))
    for g_ in got:
        assert abs(g_ - want) <= 1e-6, (got, want)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_mixed_dtypes_and_strided_views(device, backend):
    x, y = _pair(50, 40, 24, device, torch.float32, seed=11)
    mask = _mask(50, device, "bool", seed=12)
    xt = x.t().contiguous().t()  # column-major view: strides (1, T)
    y16 = y.to(torch.bfloat16)
    with force_backend(backend):
        got_strided = float(linear_cka(xt, y, mask))
        got_mixed = float(linear_cka(x, y16, mask))
        got_slice = float(linear_cka(x[:, ::2], y[:, 1::3], mask))
    assert abs(got_strided - float(_ref64(x, y, mask))) <= 1e-6
    assert abs(got_mixed - float(_ref64(x, y16, mask))) <= 1e-6  # promoted to fp32 operands
    assert abs(got_slice - float(_ref64(x[:, ::2], y[:, 1::3], mask))) <= 1e-6


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("form", ["features", "tokens"])
def test_fresh_buffers_poisoned_with_nan(device, backend, form, monkeypatch):
    """Every partial the final reduction reads is written by the kernels (buffers start as NaN)."""
    x, y = _pair(70, 40, 33, device, torch.bfloat16, seed=15)
    mask = _mask(70, device, "bool", seed=16)
    poison_fresh_buffers(monkeypatch)
    with force_backend(backend):
        got = float(linear_cka(x, y, mask, form=form))
    monkeypatch.undo()
    assert abs(got - float(_ref64(x, y, mask))) <= TOL[torch.bfloat16][0]


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_long_inputs_split_the_column_sums(device, backend, monkeypatch):
    """Past _ONE_SPLIT_ROWS rows the means come from split partial sums (lowered here)."""
    import peftops.kernels.cka as cka

    monkeypatch.setattr(cka, "_ONE_SPLIT_ROWS", 64)
    x, y = _pair(600, 9, 5, device, torch.float32, seed=17)
    mask = _mask(600, device, "int", seed=18)
    with force_backend(backend):
        got = float(linear_cka(x, y, mask))
    assert abs(got - float(_ref64(x, y, mask))) <= 1e-6


def test_form_choice():
    assert cka_form(100, 64, 64) == "tokens"      # T < dx + dy: T x T Grams are cheaper
    assert cka_form(128, 64, 64) == "features"
    assert cka_form(16384, 4096, 4096) == "features"
    assert cka_form(4096, 4096, 4096) == "tokens"


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_undefined_cases_give_nan(device, backend):
    x, y = _pair(9, 6, 5, device, torch.float32, seed=13)
    one = torch.zeros(9, dtype=torch.bool, device=device)
    one[4] = True
    with force_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(float(linear_cka(x, y, one)))                      # 1 valid row
        assert math.isnan(float(linear_cka(x, y, torch.zeros_like(one))))    # none
        assert math.isnan(float(linear_cka(torch.ones_like(x), y)))          # constant x: 0/0
        two = one.clone()
        two[7] = True
        assert abs(float(linear_cka(x, y, two)) - 1.0) <= 1e-6               # 2 points: rank 1, CKA 1


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_no_autograd(device, backend):
    x, y = _pair(20, 8, 8, device, torch.float32, seed=14)
    x.requires_grad_(True)
    with force_backend(backend):
        out = linear_cka(x, y)
    assert not out.requires_grad and out.grad_fn is None


def test_bad_input_names_the_argument():
    x, y = torch.randn(10, 4), torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"^x: CKA needs at least 2 tokens"):
        linear_cka(torch.randn(1, 4), torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"^x: expected shape"):
        linear_cka(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match=r"^y: leading dims"):
        linear_cka(x, torch.randn(9, 3))
    with pytest.raises(TypeError, match=r"^x: expected dtype"):
        linear_cka(torch.ones(10, 4, dtype=torch.int64), y)
    with pytest.raises(TypeError, match=r"^y: expected a torch.Tensor"):
        linear_cka(x, [[1.0]])
    with pytest.raises(ValueError, match=r"^mask: expected shape"):
        linear_cka(x, y, torch.ones(9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^form: expected one of"):
        linear_cka(x, y, form="gram")
    with pytest.raises(ValueError, match=r"^x: need at least one feature"):
        linear_cka(torch.randn(10, 0), y)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^y: expected a tensor on"):
            linear_cka(x.cuda(), y)


# ----------------------------------------------------------------------------------------------
# regressions (issue 12): scale invariance at the ends of the range, named errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("form", ["features", "tokens"])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_extreme_scales(device, backend, dtype, form):
    """CKA is scale invariant: inputs ~1e30 (squares overflowed fp32) or ~1e-30 (underflowed) give the
    fp64 reference's value; padding rows with huge garbage do not set the scale."""
    x, y = _pair(37, 13, 9, device, torch.float64, seed=30)
    mask = _mask(37, device, "int", seed=31)
    exps = {torch.float16: (-10, 10)}.get(dtype, (-100, 100)) if dtype != torch.float64 else (-1000, 1000)
    for ex, ey in [(exps[1], exps[1]), (exps[0], exps[0]), (exps[1], exps[0])]:
        xs, ys = (x * 2.0 ** ex).to(dtype), (y * 2.0 ** ey).to(dtype)
        if dtype != torch.float16:
            xs[mask == 0] = torch.finfo(dtype).max / 2   # padding: garbage far above the valid rows
        want = _ref64(xs, ys, mask)
        with force_backend(backend):
            got = linear_cka(xs, ys, mask, form=form)
            got_unmasked = linear_cka(xs[mask != 0], ys[mask != 0], form=form)
        assert abs(float(got) - float(want)) <= _tol(dtype), (ex, ey, float(got), float(want))
        assert abs(float(got_unmasked) - float(want)) <= _tol(dtype)
    if dtype in (torch.float32, torch.bfloat16):  # 1e±30 as in the issue (not powers of two)
        for s in (1e30, 1e-30):
            xs, ys = (x * s).to(dtype), (y * s).to(dtype)
            with force_backend(backend):
                got = linear_cka(xs, ys, mask, form=form)
            assert abs(float(got) - float(_ref64(xs, ys, mask))) <= _tol(dtype), (s, float(got))


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_power_of_two_scaling_is_bitwise_invariant(device, backend, dtype):
    x, y = _pair(29, 11, 6, device, torch.float64, seed=32)
    x, y = x.to(dtype), y.to(dtype)
    mask = _mask(29, device, "bool", seed=33)
    with force_backend(backend):
        base = linear_cka(x, y, mask)
        for ex, ey in [(3, -4), (-2, 5)]:
            got = linear_cka(x * 2.0 ** ex, y * 2.0 ** ey, mask)
            assert torch.equal(got, base), (ex, ey, float(got), float(base))


def test_more_bad_input_names_the_argument():
    x, y = torch.randn(10, 4), torch.randn(10, 3)
    with pytest.raises(TypeError, match=r"^mask: expected a torch.Tensor"):
        linear_cka(x, y, [1] * 10)
    with pytest.raises(TypeError, match=r"^mask: expected a bool, integer or float"):
        linear_cka(x, y, torch.ones(10, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"^y: need at least one feature"):
        linear_cka(x, torch.randn(10, 0))
    for args, exc, name in [((True, 3, 4), TypeError, "tokens"), ((10, 2.0, 4), TypeError, "dx"),
                            ((10, 3, 0), ValueError, "dy"), ((-1, 3, 4), ValueError, "tokens")]:
        with pytest.raises(exc, match=rf"^{name}: "):
            cka_form(*args)
