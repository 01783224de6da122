"""Pins: behaviour no other test would notice losing.

1. ``peftops.load_adapter`` refuses an adapter file whose float tensors hold NaN/Inf
   (peftops/model.py ``_read_adapter``), names the tensor, and leaves the model as it was.
2. WeGeFT's bf16 numerics under triton's CPU interpreter (kernels/wegeft.py ``INTERP_BF16``:
   ``_mma`` runs the dot on exactly-upcast fp32 operands, ``_cvt``/``_bf16_rne_bits`` round
   fp32 -> bf16 to nearest even by bit arithmetic, as the GPU does, where the interpreter alone
   would truncate). Each bf16 output, including the backward's, must be the exact result of the
   documented sequence of roundings, built here from integers in float64; the PyTorch reference
   (``backend="reference"``) rounds the same intermediates where it claims to (ū = uᵀG is rounded
   to bf16 before the product with W in both) and differs where documented (merge: the kernel rounds
   B to bf16 before W + BΨ, the reference rounds once).
"""
import os
import re

import pytest
import torch
from torch import nn

import peftops
from peftops.kernels import HAS_TRITON, force_backend, triton_runs_on
from peftops.kernels import wegeft as K

BF = torch.bfloat16


# ----------------------------------------------------------------------------------------------
# 1. NaN/Inf in an adapter file
# ----------------------------------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q_proj, self.v_proj, self.head = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(6, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.to(dtype)

    def forward(self, x):
        return self.head(self.q_proj(x) + self.v_proj(x))


def _adapted(dtype, seed=1):
    cfg = peftops.WeGeFTConfig(r=2, alpha=4.0, target_modules=["q_proj", "v_proj"], upcast_generators=False)
    model = peftops.apply(_Tiny(dtype), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _fingerprint(model):
    """Everything a failed load could change: module types, parameters/buffers (values, dtype,
    requires_grad), applied configs, merged flags."""
    return {
        "modules": [(n, type(m).__name__, getattr(m, "merged", None)) for n, m in model.named_modules()],
        "tensors": {n: (t.detach().clone(), t.dtype, t.requires_grad)
                    for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]},
        "configs": [c.to_dict() for c in peftops.model.applied_configs(model)],
    }


def _assert_same(a, b):
    assert a["modules"] == b["modules"] and a["configs"] == b["configs"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for n, (t, dt, rg) in a["tensors"].items():
        t2, dt2, rg2 = b["tensors"][n]
        assert dt == dt2 and rg == rg2 and torch.equal(t, t2), f"{n} changed"


def _poisoned_adapter(tmp_path, dtype, bad, which):
    """A saved WeGeFT adapter whose tensor ``which`` (index into the sorted keys) has one entry
    set to ``bad``; returns (directory, that tensor's key)."""
    from safetensors.torch import load_file, save_file

    out = str(tmp_path / "adapter")
    peftops.save_adapter(_adapted(dtype), out)
    path = os.path.join(out, "peftops_adapter.safetensors")
    state = load_file(path)
    key = sorted(state)[which]
    assert state[key].dtype == dtype and state[key].is_floating_point()
    state[key].view(-1)[3] = bad
    save_file(state, path, metadata={"format": "pt", "peftops": "1"})
    return out, key


BAD = [pytest.param(float("nan"), id="nan"), pytest.param(float("inf"), id="inf"),
       pytest.param(-float("inf"), id="-inf")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(BF, id="bf16")]
WHICH = [pytest.param(0, id="first"), pytest.param(-1, id="last")]  # every tensor is scanned, not just one


def _nan_inf_error(key):
    return rf"^directory: .*/peftops_adapter\.safetensors: tensor {re.escape(repr(key))} holds NaN/Inf values$"


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", BAD)
def test_load_adapter_rejects_nan_inf_naming_the_tensor(tmp_path, bad, dtype, which):
    out, key = _poisoned_adapter(tmp_path, dtype, bad, which)
    with force_backend("reference"):
        with pytest.raises(ValueError, match=_nan_inf_error(key)):
            peftops.load_adapter(_Tiny(dtype), out)
        with pytest.raises(ValueError, match=_nan_inf_error(key)):  # into a model that has the method already
            peftops.load_adapter(_adapted(dtype, seed=2), out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", BAD)
def test_load_adapter_nan_inf_leaves_the_model_unchanged(tmp_path, bad, dtype):
    out, _ = _poisoned_adapter(tmp_path, dtype, bad, -1)
    for model in (_Tiny(dtype), _adapted(dtype, seed=2)):
        before = _fingerprint(model)
        with force_backend("reference"), pytest.raises(ValueError, match=r"^directory: .* holds NaN/Inf values$"):
            peftops.load_adapter(model, out)
        _assert_same(before, _fingerprint(model))


def test_load_adapter_accepts_the_clean_file(tmp_path):
    """The control: the same file without the poison loads, so the errors above come from the poison."""
    out = str(tmp_path / "adapter")
    src = _adapted(torch.float32)
    peftops.save_adapter(src, out)
    with force_backend("reference"):
        loaded = peftops.load_adapter(_Tiny(), out)
    for k, v in peftops.adapter_state_dict(src).items():
        assert torch.equal(peftops.adapter_state_dict(loaded)[k], v)


# ----------------------------------------------------------------------------------------------
# 2. WeGeFT bf16 rounding under the interpreter
# ----------------------------------------------------------------------------------------------
needs_interpreter = pytest.mark.skipif(not (HAS_TRITON and triton_runs_on(torch.device("cpu"))),
                                       reason="needs triton's CPU interpreter (TRITON_INTERPRET=1)")
S = 0.5  # a power of two: scaling is exact, so the reference's bf16 ``* s`` adds no rounding of its own


def _rne_bf16_model(z: float) -> int:
    """bf16 bits of round-to-nearest-even(z) for a finite fp32-exact z, in plain integers (no torch
    cast): the definition the expectations below rely on."""
    bits = int(torch.tensor(z, dtype=torch.float32).view(torch.int32)) & 0xFFFFFFFF
    hi, lo = bits >> 16, bits & 0xFFFF
    if lo > 0x8000 or (lo == 0x8000 and hi & 1):
        hi += 1
    return hi & 0xFFFF


def _bits(t):
    return t.view(torch.int16).to(torch.int32) & 0xFFFF


def _rb(exact64, log=None, name=None):
    """One round-to-nearest-even of exactly known values (exact in fp32 first: checked here);
    ``log[name]`` records the fraction of entries that needed rounding."""
    f32 = exact64.to(torch.float32)
    assert torch.equal(f32.double(), exact64), "test data: a value is not exact in fp32"
    out = f32.to(BF)
    if log is not None:
        log[name] = float((out.double() != exact64).double().mean())
    return out


def _exact(a, b):
    """a @ b in float64 for operands in multiples of 1/2 whose every fp32 partial sum is exact (every
    term is a multiple of 1/4, every partial sum below 2^22 in magnitude)."""
    a, b = a.double(), b.double()
    assert torch.equal(2 * a, (2 * a).round()) and torch.equal(2 * b, (2 * b).round())
    assert float((a.abs() @ b.abs()).max()) < 2 ** 22, "test data: an fp32 partial sum could round"
    return a @ b


def _inputs(seed=0, t=11, d_in=40, d_out=13, r=5):
    g = torch.Generator().manual_seed(seed)

    def ints(*shape):
        return torch.randint(-15, 16, shape, generator=g).to(BF)

    return ints(t, d_in), ints(d_out, d_in), ints(d_out), ints(r, d_in), ints(r, d_in), ints(t, d_out)


def _expected(x, w, b, phi, psi, grad, log=None):
    """Every bf16 output as the exact result of its documented rounding sequence."""
    e = {}

    def rb(name, exact64):
        e[name] = _rb(exact64, log, name)
        return e[name]

    rb("u", _exact(x, psi.t()))                                    # u = bf16(x Ψᵀ)
    rb("B", S * _exact(w, phi.t()))                                # B = bf16(s W Φᵀ)
    rb("y fused", _exact(x, w.t()) + _exact(e["u"], e["B"].t()) + b.double())  # one rounding of [x|u][W|B]ᵀ + b
    rb("W'", w.double() + _exact(e["B"], psi))                     # merge: B rounded first, then W + BΨ once
    rb("y merged", _exact(x, e["W'"].t()) + b.double())            # x W'ᵀ + b, W' rounded (torch.addmm)
    ubar = rb("ū", _exact(e["u"].t(), grad))                       # ū = uᵀG rounded to bf16 before the product
    rb("dphi", S * _exact(ubar, w))
    v = rb("v", _exact(grad, e["B"]))                              # v = bf16(G B)
    rb("dpsi", _exact(v.t(), x))
    rb("dx fused", _exact(grad, w) + _exact(v, psi))               # one rounding of [G|v][W;Ψ]
    rb("dx merged", _exact(grad, e["W'"]))                         # G W' with W' rounded (torch.mm)
    rb("db", grad.double().sum(0))
    # what dΦ would be without the intermediate rounding of ū: the data must tell the two apart
    e["dphi, ū unrounded"] = _rb(S * _exact(e["u"].t(), grad) @ w.double())
    e["W', one rounding"] = _rb(w.double() + (S * _exact(w, phi.t())) @ psi.double())
    return e


def _run(backend, path, x, w, b, phi, psi, grad):
    with force_backend(backend):
        y, u = K.wegeft_forward(x, w, b, phi, psi, S, path=path)
        dx, dphi, dpsi, db = K.wegeft_backward(grad, x, u, w, phi, psi, S, path=path, need_dbias=True)
        return {"y": y, "u": u, "dx": dx, "dphi": dphi, "dpsi": dpsi, "db": db,
                "B": K.generate_b(w, phi, S), "W'": K.wegeft_merge(w, phi, psi, S)}


def _assert_bitwise(got, want, what):
    assert got.dtype == BF and got.shape == want.shape, what
    bad = int((_bits(got) != _bits(want)).sum())
    assert bad == 0, f"{what}: {bad} of {want.numel()} entries differ from the documented rounding"


def test_rne_model_agrees_with_torch_cast():
    """The expectations use torch's fp32 -> bf16 cast; pin it to round-to-nearest-even itself."""
    one = 1.0
    cases = [one, one + 2 ** -8, one + 3 * 2 ** -8, one + 2 ** -8 + 2 ** -20, one + 2 ** -9, -(one + 3 * 2 ** -8),
             257.0, 259.0, 261.0, 263.0, 65535.0, 3.0 * 2 ** 20 + 1, 2 ** -130, -(2 ** -133) * 3]
    for z in cases:
        assert int(_bits(torch.tensor([z], dtype=torch.float32).to(BF))) == _rne_bf16_model(z), z


def test_bf16_test_data_needs_rounding():
    """The data below exercises the roundings: most intermediates are not bf16 numbers, and the
    alternatives (ū unrounded, merge rounded once) give other bits on many entries."""
    log = {}
    e = _expected(*_inputs(), log=log)
    for a, c in (("dphi", "dphi, ū unrounded"), ("W'", "W', one rounding")):
        assert (_bits(e[a]) != _bits(e[c])).float().mean() > 0.2, (a, c)
    for k, frac in log.items():
        if k != "db":  # a sum of 11 small integers: exact in bf16
            assert frac > 0.25, f"{k}: only {frac:.0%} of the entries need rounding"


@needs_interpreter
@pytest.mark.parametrize("path", ["fused", "merged"])
def test_bf16_triton_outputs_are_the_documented_roundings(path):
    """Forward and backward of the Triton path (interpreter) are bit for bit the exact results of the
    documented rounding sequence: removing or changing the INTERP_BF16 emulation (the fp32-upcast dot,
    the round-to-nearest-even downcasts, including ū's in the dΦ reduction) changes bits here."""
    x, w, b, phi, psi, grad = inputs = _inputs()
    assert K._upcast(w) and not K._upcast(w.float()) and not K._upcast(w.half())
    e = _expected(*inputs)
    got = _run("triton", path, *inputs)
    for k in ("u", "dphi", "dpsi", "db", "B", "W'"):
        _assert_bitwise(got[k], e[k], f"triton {path} {k}")
    for k in ("y", "dx"):
        _assert_bitwise(got[k], e[f"{k} {path}"], f"triton {path} {k}")


@needs_interpreter
def test_bf16_reference_rounds_like_the_kernels_where_documented():
    """The PyTorch reference in bf16: u, B, dΦ (ū rounded to bf16 before the product with W), dΨ and
    db are bit for bit the Triton path's; merge differs by design (one rounding, B not rounded first)
    and is pinned to its own rounding; y and dx (several bf16 roundings in the reference) stay within
    the bf16 tolerance of the kernel's single rounding."""
    inputs = _inputs()
    e = _expected(*inputs)
    ref, tri = _run("reference", "auto", *inputs), _run("triton", "fused", *inputs)
    for k in ("u", "B", "dphi", "dpsi", "db"):
        _assert_bitwise(ref[k], e[k], f"reference {k}")
        assert torch.equal(_bits(ref[k]), _bits(tri[k])), k
    _assert_bitwise(ref["W'"], e["W', one rounding"], "reference merge")
    assert not torch.equal(ref["W'"], tri["W'"])
    for k in ("y", "dx"):
        scale = float(tri[k].double().abs().max())
        torch.testing.assert_close(ref[k].double(), tri[k].double(), atol=1.6e-2 * scale, rtol=1.6e-2)
