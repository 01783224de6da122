"""kernels/wegeft.py: the split-K generate (small d_out) against a float64 oracle and against the
one-kernel sweep.

Under the interpreter the launcher assumes ``_OFF_GPU_SMS`` = 8 SMs and 16-row blocks, so a d_out of
at most 32 (2 row blocks: a third of the SMs or less) with a d_in of several 32-column steps splits;
each test checks from the recorded launches that the split pass and the finish kernel really ran
(``_OFF_GPU_SMS`` = 1 turns the split off: the one-kernel reference of the equivalence test). Fresh
buffers, the split partials included, start as NaN (helpers.poison_fresh_buffers) and the explicit
outputs are ``poisoned``.
"""
import pytest
import torch

from helpers import TOL, assert_close, force_backend, poison_fresh_buffers, poisoned
from peftops.kernels import HAS_TRITON, triton_runs_on

pytestmark = pytest.mark.skipif(not (HAS_TRITON and triton_runs_on(torch.device("cpu"))),
                                reason="needs triton's CPU interpreter (TRITON_INTERPRET=1)")

if HAS_TRITON:
    from peftops.kernels import wegeft as K

SHAPES = [  # (d_out, d_in, r): d_out <= 32 (at most 2 row blocks of 16), d_in spanning several BK = 32 steps
    (1, 131, 1),     # one row; 5 K steps, 2 splits
    (1, 257, 1),     # 4 splits asked, 3 ranges of 96 columns after rounding to whole K steps
    (7, 263, 3),     # primes
    (17, 131, 16),   # two row blocks, the second one row long; r = RP
    (31, 293, 5),    # 4 ranges of 96 columns, the last one 5 wide
    (29, 263, 33),   # RP = 64
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
S = 0.7


def _sid(shape):
    return "x".join(map(str, shape))


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_fresh_buffers(monkeypatch)


@pytest.fixture
def launches(monkeypatch):
    """(kernel name, grid, SPLIT) of every generate launch, recorded at the interpreter's run."""
    from triton.runtime.interpreter import InterpretedFunction

    seen = []
    orig = InterpretedFunction.run

    def run(self, *args, **kwargs):
        if self.fn.__name__.startswith("_generate"):
            seen.append((self.fn.__name__, tuple(kwargs["grid"]), kwargs.get("SPLIT")))
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return seen


def _split_ran(seen):
    """The last generate call ran the split pass with more than one range, then the finish kernel."""
    names = [n for n, _, _ in seen]
    assert "_generate_finish_kernel" in names, f"no finish kernel launched: {seen}"
    split = [(g, s) for n, g, s in seen if n == "_generate_kernel"]
    assert split and all(s is True and g[1] > 1 for g, s in split), f"the split pass did not run: {seen}"


def _tensors(d_out, d_in, r, dtype, seed=0, ints=False):
    """W [d_out, d_in], Φ, Ψ [r, d_in]; ``ints``: small integers and halves whose every fp32 partial
    sum is exact, so any summation order gives the same bits."""
    g = torch.Generator().manual_seed(seed)
    if ints:
        def rnd(*shape, s=None):
            return (torch.randint(-6, 7, shape, generator=g) / 2).to(dtype)
    else:
        def rnd(*shape, s=1.0):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)
    w = rnd(d_out, d_in, s=d_in ** -0.5)
    return w, rnd(r, d_in, s=d_in ** -0.5), rnd(r, d_in, s=d_in ** -0.5)


def _expected(w, phi, psi, p, seed):
    """(B, W') in float64: B = S/(1-p) (W∘M) Φᵀ, W' = W + B Ψ (the merge sees the undropped W)."""
    b = K.generate_b_reference(w.double(), phi.double(), S, p, seed)
    return b, w.double() + b @ psi.double()


def _generate(w, phi, psi, p, seed, store_b=True, merge=True, w_out=None):
    """The launcher with the flags of one call site; fresh NaN outputs."""
    b_out = poisoned((w.shape[0], phi.shape[0]), w.dtype) if store_b else None
    if merge and w_out is None:
        w_out = poisoned(tuple(w.shape), w.dtype)
    with force_backend("triton"):
        K._launch_generate(w, phi, psi, S * K.dropout_keep_scale(p), b_out=b_out, w_out=w_out if merge else None,
                           seed=seed, thresh=K.dropout_threshold(p))
    return b_out, (w_out if merge else None)


def _close(actual, expected, dtype, what):
    scale = max(1.0, float(expected.abs().max()))
    assert torch.isfinite(actual.double()).all(), f"{what}: non-finite (unwritten?) entries"
    assert_close(actual, expected, dtype, scale=scale, msg=f"{what}: mismatch beyond {TOL[dtype]} x {scale:.3g}")


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
def test_split_generate_matches_fp64(shape, dtype, p, launches):
    """B and W' from one call (the merged backward's STORE_B + MERGE); the single-flag calls are
    pinned to the same bits in test_split_flags_give_the_same_bits."""
    w, phi, psi = _tensors(*shape, dtype)
    b, merged = _generate(w, phi, psi, p, seed=11)
    _split_ran(launches)
    b0, merged0 = _expected(w, phi, psi, p, 11)
    _close(b, b0, dtype, "B")
    _close(merged, merged0, dtype, "W'")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_flags_give_the_same_bits(dtype, launches):
    """B alone (the fused path), W' alone (the merged forward) and both: the same B and W' bits,
    so the forward and the backward of a step see one generated weight."""
    w, phi, psi = _tensors(17, 131, 16, dtype, seed=3)
    both = _generate(w, phi, psi, 0.3, 7)
    b_only = _generate(w, phi, psi, 0.3, 7, merge=False)
    merged_only = _generate(w, phi, psi, 0.3, 7, store_b=False)
    _split_ran(launches)
    finish_grids = [g for n, g, _ in launches if n == "_generate_finish_kernel"]
    assert [g[1] for g in finish_grids] == [2, 1, 2]  # B alone: one program per row block
    assert b_only[1] is None and merged_only[0] is None
    assert torch.equal(b_only[0], both[0]) and torch.equal(merged_only[1], both[1])


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[5]], ids=_sid)
def test_split_equals_one_kernel_on_exact_data(shape, dtype, p, launches, monkeypatch):
    """On data whose sums are exact in fp32 the split changes nothing: B and W' bit for bit as the
    one-kernel sweep."""
    w, phi, psi = _tensors(*shape, dtype, seed=2, ints=True)
    split = _generate(w, phi, psi, p, 5)
    _split_ran(launches)
    monkeypatch.setattr(K, "_OFF_GPU_SMS", 1)
    launches.clear()
    whole = _generate(w, phi, psi, p, 5)
    assert [(n, s) for n, _, s in launches] == [("_generate_kernel", False)]
    assert torch.equal(split[0], whole[0]), "B: the split differs from the one-kernel sweep"
    assert torch.equal(split[1], whole[1]), "W': the split differs from the one-kernel sweep"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_is_bitwise_reproducible(dtype, launches):
    w, phi, psi = _tensors(31, 293, 5, dtype, seed=4)
    first = _generate(w, phi, psi, 0.2, 9)
    _split_ran(launches)
    for _ in range(2):
        again = _generate(w, phi, psi, 0.2, 9)
        assert all(torch.equal(a, e) for a, e in zip(first, again)), "run-to-run difference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_split_public_ops(dtype, launches):
    """generate_b, wegeft_merge (out of place, in place) and a strided W on the split path."""
    d_out, d_in, r = 23, 263, 7
    w, phi, psi = _tensors(d_out, d_in, r, dtype, seed=6)
    b0, merged0 = _expected(w, phi, psi, 0.0, 0)
    wide = poisoned((d_out, d_in + 9), dtype)
    wide[:, 3:3 + d_in] = w
    strided = wide[:, 3:3 + d_in]  # row stride d_in + 9: not contiguous
    with force_backend("triton"):
        b_gen = K.generate_b(w, phi, S)
        merged = K.wegeft_merge(w, phi, psi, S)
        in_place = w.clone()
        ret = K.wegeft_merge(in_place, phi, psi, S, out=in_place)
        merged_strided = K.wegeft_merge(strided, phi, psi, S)
        b_strided = K.generate_b(strided, phi, S)
    _split_ran(launches)
    _close(b_gen, b0, dtype, "B")
    _close(merged, merged0, dtype, "W'")
    assert ret.data_ptr() == in_place.data_ptr()
    assert torch.equal(merged, in_place), "in-place merge differs from out-of-place"
    assert torch.equal(merged_strided, merged) and torch.equal(b_strided, b_gen), "strided W differs"


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("path", ["fused", "merged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_backward_on_the_split_path(dtype, path, p, launches):
    """The layer ops with a d_out that splits: y, u, dx, dΦ, dΨ, db against the float64 oracle."""
    t, d_in, d_out, r = 13, 263, 19, 6
    g = torch.Generator().manual_seed(8)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    x, w, b = rnd(t, d_in), rnd(d_out, d_in, s=d_in ** -0.5), rnd(d_out)
    phi, psi, grad = rnd(r, d_in, s=d_in ** -0.5), rnd(r, d_in, s=d_in ** -0.5), rnd(t, d_out)
    with force_backend("triton"):
        y, u = K.wegeft_forward(x, w, b, phi, psi, S, dropout_p=p, seed=21, path=path)
        got = K.wegeft_backward(grad, x, u, w, phi, psi, S, dropout_p=p, seed=21, path=path, need_dbias=True)
    _split_ran(launches)
    d = [v.double() for v in (x, w, b, phi, psi, grad)]
    y0, u0 = K.wegeft_forward_reference(d[0], d[1], d[2], d[3], d[4], S, p, 21)
    g0 = K.wegeft_backward_reference(d[5], d[0], u0, d[1], d[3], d[4], S, p, 21, True, True, True, True)
    _close(y, y0, dtype, f"{path} y")
    _close(u, u0, dtype, f"{path} u")
    for name, a, e in zip(("dx", "dphi", "dpsi", "dbias"), got, g0):
        _close(a, e, dtype, f"{path} {name}")


def test_split_choice():
    """The grid from the shape on 132 SMs (bf16 tiles: BM = 32, BK = 128): a d_out of at most a third
    of the SMs' row blocks splits to fill the GPU, d_out = 2048, 4096 and 14336 keep one program per
    row block."""
    for r, rp in ((16, 16), (64, 64)):
        assert K.generate_splits(1024, 4096, rp, 32, 128, 132) == 4, r   # 32 row blocks -> 128 programs
        assert K.generate_splits(1408, 4096, rp, 32, 128, 132) == 3, r   # 44 -> 132
        assert K.generate_splits(1440, 4096, rp, 32, 128, 132) == 1, r   # 45 > 132 / 3
        assert K.generate_splits(2048, 4096, rp, 32, 128, 132) == 1, r   # 64 programs: about HBM rate
        assert K.generate_splits(4096, 4096, rp, 32, 128, 132) == 1, r
        assert K.generate_splits(14336, 4096, rp, 32, 128, 132) == 1, r
    assert K.generate_splits(256, 4096, 64, 32, 128, 132) == 8           # splits² <= d_in / RP
    assert K.generate_splits(1, 100, 16, 32, 128, 132) == 1              # one K step
    assert K.generate_splits(0, 4096, 16, 32, 128, 132) == 1             # no rows
    assert K.generate_splits(64, 0, 16, 32, 128, 132) == 1               # no columns
