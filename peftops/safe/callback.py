"""SAFE inside ``transformers.Trainer``: ``SAFECallback`` and its checkpoint round trip. The class is built
on first access (``peftops.safe.SAFECallback``): importing transformers' trainer stack takes seconds, so
its behaviour lives in ``_SAFECallbackBase`` (no transformers import) and ``_make_callback_class`` only
adds transformers' ``TrainerCallback`` and ``ExportableState`` bases."""
from __future__ import annotations

import dataclasses
import warnings

from .config import SAFEConfig
from .controller import SAFE

_CHECKPOINT_WHAT = "resume_from_checkpoint: the checkpoint's SAFE state (trainer_state.json, stateful_callbacks[{!r}])"


def _checkpoint_safe_state(state, name: str) -> dict | None:
    """The SAFE state a resumed Trainer run restores (None: a fresh run, or a checkpoint without one)."""
    if not getattr(state, "global_step", 0):
        return None  # a fresh run: stateful_callbacks holds this run's own (initial) states
    entries = getattr(state, "stateful_callbacks", None) or {}
    data = entries.get(name) if isinstance(entries, dict) else None
    if isinstance(data, list):  # several callbacks of this class: one SAFE per model, so the first
        data = data[0] if data else None
    saved = None
    if data is not None:
        attrs = data.get("attributes") if isinstance(data, dict) else None
        if not isinstance(attrs, dict):
            raise ValueError(f"{_CHECKPOINT_WHAT.format(name)}: expected {{'args': ..., 'attributes': {{'safe_state': "
                             f"...}}}}, got {data!r:.120}")
        saved = attrs.get("safe_state")
    if saved is None:
        warnings.warn(f"SAFE: resuming at step {state.global_step} from a checkpoint without SAFE state (written "
                      "without SAFECallback, or by an older peftops); SAFE starts with no scores, so units are frozen "
                      "only after they are measured again", stacklevel=3)
    return saved


def _load_checkpoint_state(safe: SAFE, saved, name: str) -> None:
    try:
        safe.load_state_dict(saved)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{_CHECKPOINT_WHAT.format(name)} does not fit this run: {e}") from None


class _SAFECallbackBase:
    """Runs SAFE inside ``transformers.Trainer``: ``SAFECallback(SAFEConfig(...))`` builds the
    controller at train begin from the Trainer's model and optimizer (state released there);
    ``SAFECallback(safe)`` uses an existing one. Step t measures/freezes between
    ``on_step_begin`` and ``on_step_end`` (evaluation in between steps is never measured).
    ``callback.safe.report()`` after training; ``callback.safe.log`` has every step.
    ``process_group``: as in ``SAFE`` (under DDP the default WORLD group keeps the ranks'
    decisions identical; freezing needs ``ddp_find_unused_parameters=True``: the Trainer hands
    callbacks the inner model, so SAFE sees the DDP wrapper in the first forward and, when it was
    built here with ``final_threshold > 0``, refuses a wrapper that cannot freeze right there).

    Checkpoints: SAFE's state (``SAFE.state_dict()``: scores, frozen units, log, sampling state)
    goes into every Trainer checkpoint (trainer_state.json, ``stateful_callbacks['SAFECallback']``,
    through transformers' ``ExportableState``). ``trainer.train(resume_from_checkpoint=...)``
    restores it at train begin, after the Trainer loaded the weights and the optimizer state and
    before the first step: the checkpoint's frozen units are frozen again, and the run continues
    as the uninterrupted one would. This needs no Trainer option; with
    ``restore_callback_states_from_checkpoint=True`` transformers replaces this callback object
    by a copy built from its config (``trainer.callback_handler`` holds it), which restores the
    same way. A checkpoint's SAFE state that does not fit raises (starting "resume_from_checkpoint:")
    before anything changes; a checkpoint without one (written without SAFECallback) warns and
    SAFE starts with no scores."""

    def __init__(self, config_or_safe: SAFEConfig | SAFE | dict, *, verbose: bool = False, process_group=None):
        if isinstance(config_or_safe, dict):  # rebuilt from a checkpoint's args (ExportableState)
            try:
                config_or_safe = SAFEConfig(**config_or_safe)
            except TypeError as e:
                raise ValueError(f"config_or_safe: expected a SAFEConfig's fields, got {sorted(config_or_safe)} "
                                 f"({e})") from None
        if isinstance(config_or_safe, SAFE):
            self.safe, self.config = config_or_safe, config_or_safe.config
        elif isinstance(config_or_safe, SAFEConfig):
            self.safe, self.config = None, config_or_safe
        else:
            raise TypeError(f"config_or_safe: expected a SAFEConfig or a SAFE, got {type(config_or_safe).__name__}")
        if not isinstance(verbose, bool):
            raise TypeError(f"verbose: expected True or False, got {verbose!r}")
        self.verbose = verbose
        self.process_group = process_group

    def state(self) -> dict:
        """What a Trainer checkpoint keeps of this callback (ExportableState)."""
        return {"args": {"config_or_safe": dataclasses.asdict(self.config), "verbose": self.verbose},
                "attributes": {"safe_state": None if self.safe is None else self.safe.state_dict()}}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        saved = _checkpoint_safe_state(state, type(self).__name__)
        if self.safe is None:
            self.safe = self._build(state, model, optimizer, saved)
        else:
            if saved is not None:
                _load_checkpoint_state(self.safe, saved, type(self).__name__)
            if optimizer is not None:
                self.safe.release(optimizer)
            self.safe.begin_step(state.global_step)
        entries = getattr(state, "stateful_callbacks", None)
        if isinstance(entries, dict) and type(self).__name__ not in entries:
            # resumed from a checkpoint written without this callback: the Trainer's next save
            # indexes stateful_callbacks[name] and would raise KeyError
            entries[type(self).__name__] = self.state()

    def _build(self, state, model, optimizer, saved) -> SAFE:
        """A SAFE for the Trainer's (inner) model at train begin, with the checkpoint's state if any."""
        if model is None:
            raise ValueError("model: the Trainer passed no model to SAFECallback.on_train_begin")
        safe = SAFE(model, self.config, optimizer=optimizer, start_step=state.global_step,
                    process_group=self.process_group)
        # the Trainer wrapped the model before train begin: check the DDP wrapper, once the first
        # forward shows it, as SAFE's construction would have (it may still freeze everything)
        safe._ddp.strict_when_found = float(self.config.final_threshold) > 0
        if saved is not None:
            try:
                _load_checkpoint_state(safe, saved, type(self).__name__)
            except BaseException:
                safe.remove()  # built above, froze nothing: gone again
                raise
        return safe

    def on_step_begin(self, args, state, control, **kwargs):
        newly = self.safe.begin_step(state.global_step)
        if newly and self.verbose:
            print(f"SAFE step {state.global_step}: froze {len(newly)} adapter unit(s): {', '.join(newly)}")

    def on_step_end(self, args, state, control, **kwargs):
        self.safe.end_step(state.global_step - 1)

    def on_train_end(self, args, state, control, **kwargs):
        if self.safe is not None:
            self.safe.remove()


def _make_callback_class():
    """``SAFECallback``: ``_SAFECallbackBase`` as a transformers ``TrainerCallback`` and ``ExportableState``."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    return type("SAFECallback", (_SAFECallbackBase, TrainerCallback, ExportableState),
                {"__doc__": _SAFECallbackBase.__doc__, "__module__": "peftops.safe", "__qualname__": "SAFECallback"})
