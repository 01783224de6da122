"""No host sync in a training step (issue #11): after one warm-up step (plans, range checks and
autotuning happen once per index set / shape), a SIFT, AoT or WeGeFT step (forward, backward,
optimizer step) on the Triton path never makes the host wait for the device.

On CPU the Triton kernels run in the interpreter and tests/host_sync.py counts every host read of
tensor data made by peftops code (``.item()``, ``.tolist()``, ``nonzero``, ``unique``, boolean
indexing, ...); the optimizer's step counters live on the host by design (torch keeps them there
unless ``capturable``) and are exempt. On a GPU, ``torch.cuda.set_sync_debug_mode`` checks the same.
"""
import warnings

import pytest
import torch

import peftops
from helpers import force_backend, tiny_batch, tiny_llama, train_steps
from host_sync import count_host_syncs
from peftops.kernels import HAS_TRITON, interpreting

needs_interpreter = pytest.mark.skipif(not (HAS_TRITON and interpreting()),
                                       reason="runs the kernels in triton's CPU interpreter")


def _step_counters(opt) -> list:
    return [st["step"] for st in opt.state.values() if isinstance(st.get("step"), torch.Tensor)]


def _batches(n, vocab, device=None):
    g = torch.Generator().manual_seed(5)
    return [tiny_batch("llama", vocab=vocab, generator=g, device=device) for _ in range(n)]


def _sift_model(device=None):
    from peftops.sift import SIFTConfig, SparseAdamW

    model = tiny_llama().to(device)
    peftops.apply(model, SIFTConfig(density=0.05, init_indices="random"))
    return model, SparseAdamW(model, lr=1e-3)


def _assert_steps_sync_free(model, opt, vocab=37):
    """One warm-up step, then two counted steps: no host read by peftops code."""
    batches = _batches(3, vocab)
    train_steps(model, opt, batches[:1])
    with count_host_syncs(allow=_step_counters(opt)) as log:
        train_steps(model, opt, batches[1:])
    assert not log.ours(), log.report(log.ours())


def _adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


@needs_interpreter
def test_sift_training_step_has_no_host_sync():
    with force_backend("triton"):
        model, opt = _sift_model()
        _assert_steps_sync_free(model, opt)


@needs_interpreter
def test_functional_sift_linear_step_has_no_host_sync_and_plans_once(monkeypatch):
    """The functional form rebuilt rows/cols (hence the SDDMM plan and its range checks) every
    step; now they are cached per index tensor."""
    from peftops.kernels import sift as K

    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 13, generator=g, requires_grad=True)
    w = torch.randn(7, 13, generator=g)
    idx = torch.randperm(7 * 13, generator=g)[:17]
    values = torch.zeros(17, requires_grad=True)
    built = []
    real_plan = K._SDDMMPlan.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        real_plan(self, *args, **kwargs)

    monkeypatch.setattr(K._SDDMMPlan, "__init__", counting_init)
    with force_backend("triton"):
        peftops.sift_linear(x, w, None, idx, values).square().sum().backward()
        with count_host_syncs() as log:
            for _ in range(3):
                peftops.sift_linear(x, w, None, idx, values).square().sum().backward()
    assert not log.ours(), log.report(log.ours())
    assert len(built) == 1
    # values stay 0, so each of the 4 backwards adds the same gradient: 2 y at (row, col) of I
    dy = 2.0 * (x.detach().double() @ w.double().t())
    ref = K.sddmm_at_indices_reference(dy, x.detach().double(), idx // 13, idx % 13)
    torch.testing.assert_close(values.grad.double(), 4 * ref, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_the_counter_sees_what_a_gpu_would_wait_for():
    """The check above can fail: a range check per step (the old functional path) is counted."""
    from peftops.kernels._checks import check_index_range

    t = torch.arange(5)
    with count_host_syncs() as log:
        check_index_range("indices", t, 9, what="entries")
        t.tolist()
        torch.unique(t)
        t[t > 2]
    assert len(log.events) >= 4


@torch.library.custom_op("peftops_test::reads_a_scalar", mutates_args=())
def _reads_a_scalar(t: torch.Tensor) -> torch.Tensor:
    if int(t.sum()) > 0 and t.nonzero().numel():
        return t + 1
    return t.clone()


def test_the_counter_sees_inside_custom_ops():
    with count_host_syncs() as log:
        _reads_a_scalar(torch.arange(3))
    assert {what for what, _ in log.events} >= {"Tensor.__int__", "Tensor.nonzero"}, [w for w, _ in log.events]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sift_training_step_has_no_host_sync_on_cuda():
    model, opt = _sift_model("cuda")
    batches = _batches(3, 37, device="cuda")
    train_steps(model, opt, batches[:1])
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_steps(model, opt, batches[1:])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ours = [w for w in caught if "peftops" in str(w.filename) or "/kernels/" in str(w.filename)]
    assert not ours, [(str(w.message), w.filename, w.lineno) for w in ours]


@needs_interpreter
@pytest.mark.parametrize("reparam", ["kron", "fc"])
def test_aot_training_step_has_no_host_sync(reparam):
    """Capture (the batch's distinct ids without torch.unique, ids clamped instead of range-checked:
    the embedding's own lookup rejects a bad id first), the gather-add, the chunked segment sums of
    the backward: nothing waits for the device."""
    from peftops.aot import AoTConfig

    with force_backend("triton"):
        model = peftops.apply(tiny_llama(), AoTConfig(reparam=reparam, rank=3))
        _assert_steps_sync_free(model, _adamw(model))


@needs_interpreter
@pytest.mark.parametrize("wide", [False, True], ids=["one-kernel", "split-generate"])
def test_wegeft_training_step_has_no_host_sync(wide):
    """wide: hidden 64 makes the interpreter's generate take the split-K pass + finish kernel."""
    from peftops.wegeft import WeGeFTConfig

    with force_backend("triton"):
        model = tiny_llama(hidden=64, intermediate=48) if wide else tiny_llama()
        model = peftops.apply(model, WeGeFTConfig(r=4, init_weights=not wide))
        _assert_steps_sync_free(model, _adamw(model))
