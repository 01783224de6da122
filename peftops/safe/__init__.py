"""SAFE: selective adapter freezing (docs/design.md#safe), for every peftops adapter and Hugging Face PEFT layers.

Importance of adapter unit i is 1 - CKA(X_i, Y_i), the linear CKA (``peftops.linear_cka``) of the
representation entering the unit and the one it produces, over the batch's non-padding tokens.
Steps are counted like ``TrainerState.global_step``: step t is the (t+1)-th optimizer step.

    steps 0 .. t_w-1     warm-up: importances are measured (every ``measure_interval`` steps and
                         always at step t_w-1), nothing is frozen
    step t >= t_w        before the step runs, every unit whose compared score < T(t) is frozen:
                         T(t) = T_f * (1 - (1 - p)^3),  p = clip((t - t_w) / (t_f - t_w), 0, 1)
    compared score       "last" warm-up score (default) | "mean" of the warm-up scores |
                         "current": latest score; measurement then goes on every
                         ``measure_interval`` steps until t_f for the units still training
Frozen stays frozen; units without a score (never measured, NaN) are never frozen.

What a unit is (found by walking ``model.named_modules()``, outermost match only):
  - a peftops adapter module (class attribute ``peftops_adapter = True``): parameters =
    ``adapter_parameters()``, X = the first tensor argument of its forward, Y = its output;
  - a Hugging Face PEFT tuner layer (``peft.tuners.tuners_utils.BaseTunerLayer``: LoRA Linear /
    Embedding / Conv ...): parameters = the active adapters' entries of ``adapter_layer_names``
    (lora_A, lora_B, ...), X = the wrapped layer's input, Y = its output. Units whose input is not
    a float tensor (LoRA on an embedding: X are token ids) get no score and are never frozen.
Shared parameters (e.g. WeGeFT generators shared across layers) stop training only once every
unit owning them is frozen.

Freezing is real: ``requires_grad`` goes False, ``.grad`` is dropped and the optimizer state of the
parameter is released (optimizers passed to SAFE or to ``release``). With the base model frozen,
once every unit below a layer is frozen nothing below that layer requires grad, so autograd
records no graph there and keeps no activation (measure it with ``SavedTensorMeter``). Exception:
``model.enable_input_require_grads()`` (used for reentrant gradient checkpointing) makes the
embedding output require grad, which keeps activations all the way down.

Cost: hooks exist only during measuring steps (zero cost otherwise; under ``torch.distributed`` with
the inner model given, also one model pre-hook until the first forward through DDP shows the wrapper).
A measuring forward runs, per unit, a gather of at most ``max_tokens`` random valid tokens of X and
Y and three CKA kernel launches, all asynchronous; the scores reach the host with one sync when the
step ends. Modules in eval mode are not measured, nor activation-checkpoint recomputations (they run
inside backward).
Micro-batches of one optimizer step (gradient accumulation) are averaged.

Distributed (DDP, torchrun, accelerate, Trainer): with ``torch.distributed`` initialised and more than
one rank, every rank measures on its own data shard and the scores are averaged across ranks (one
all-reduce of the score vector per measuring step) before any decision, so every rank freezes the
same units at the same steps. The score is the mean of the per-rank scores, not the CKA over the union
of every rank's tokens. Freezing under ``DistributedDataParallel`` needs ``find_unused_parameters=True``
and ``static_graph=False`` (the Trainer's default unless activation checkpointing is on); otherwise
SAFE raises before freezing (see ``SAFE``). The wrapper is the model given, or ``SAFE(..., ddp=wrapper)``,
or else the DDP whose forward SAFE sees running the model (``DDPGuard``), never searched for on the heap.
docs/distributed.md has what is and is not released.

Checkpoints: ``SAFE.state_dict()`` (JSON-safe: scores, frozen units, log, the token-sampling
generators' states) and ``load_state_dict`` resume a run exactly; ``SAFECallback`` puts it into every
Trainer checkpoint (trainer_state.json) and restores it on ``trainer.train(resume_from_checkpoint=...)``.

    safe = peftops.SAFE(model, peftops.SAFEConfig(warmup_steps=100, ramp_end_step=600,
                                                  final_threshold=0.3), optimizer=opt)
    for t, batch in enumerate(loader):            # plain loop
        model(**batch).loss.backward(); opt.step(); opt.zero_grad()
        safe.step(t + 1)                           # = optimizer steps done so far
    trainer = Trainer(..., callbacks=[peftops.SAFECallback(config)])   # or with transformers
    print(safe.report())

Where it lives: config.py (SAFEConfig), schedule.py (T(t), measuring steps, compared score), units.py
(AdapterUnit, find_adapter_units), freezing.py (Freezer), hooks.py (the measuring hooks), meter.py
(SavedTensorMeter), distributed.py (rank agreement, score mean, DDPGuard), state.py (checkpoint state),
report.py, controller.py (SAFE), callback.py (SAFECallback, built on first access).
"""
from __future__ import annotations

from ..model import lazy_attributes
from .config import SAFEConfig
from .controller import _MANAGED_BY, SAFE, _managed  # noqa: F401  (_MANAGED_BY, _managed: for tests and tools)
from .meter import SavedTensorMeter
from .schedule import SCORE_MODES, safe_threshold
from .units import AdapterUnit, find_adapter_units

__all__ = [
    "SAFEConfig", "SAFE", "AdapterUnit", "find_adapter_units", "safe_threshold", "SavedTensorMeter",
    "SCORE_MODES",
]  # plus SAFECallback, built on first access (importing transformers' trainer stack takes seconds)


def _make_callback_class():
    from .callback import _make_callback_class as make

    return make()


__getattr__ = lazy_attributes(__name__, {"SAFECallback": _make_callback_class})
