"""SAFEConfig: SAFE's settings, each with its help (``dataclasses.fields(SAFEConfig)[i].metadata["help"]``),
checked at construction; the schedule they define is computed in schedule.py."""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import field

from .schedule import SCORE_MODES, measures, safe_threshold


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclasses.dataclass
class SAFEConfig:
    """SAFE's schedule. ``warmup_steps`` t_w >= 1, ``ramp_end_step`` t_f > t_w,
    ``final_threshold`` T_f in [0, 1], ``score_mode`` in SCORE_MODES, ``measure_interval`` >= 1
    (warm-up step t measures when t % interval == 0, and step t_w - 1 always does; the default 10
    keeps the measuring cost of a warm-up near 1-3% of its time even on small models, where one
    measuring step costs 10-30% extra), ``max_tokens`` (random valid tokens per measurement;
    None = all; >= 2; 1024 keeps most adapters in the cheap T x T form), ``seed`` of that
    sampling. ``allow_freezing_all``: False (default) keeps the most important unit training when
    the schedule would otherwise freeze the last trainable parameter of the model (with a warning
    naming it), so a high threshold never ends in autograd's "does not require grad"; True lets
    the schedule freeze everything. Every field is checked at construction (``validate``): a bad
    value raises ValueError starting with the field's name."""

    warmup_steps: int = field(metadata={"help": (
        "t_w, an integer >= 1: optimizer steps 0 .. t_w-1 are the warm-up, where importances are measured and "
        "nothing is frozen; freezing starts at step t_w.")})
    ramp_end_step: int = field(metadata={"help": (
        "t_f, an integer > warmup_steps: the step at which the threshold T(t) = T_f (1 - (1 - p)^3), "
        "p = clip((t - t_w) / (t_f - t_w), 0, 1), reaches final_threshold.")})
    final_threshold: float = field(metadata={"help": (
        "T_f, a number in [0, 1]: the threshold's final value; a unit whose compared importance (1 - CKA, in "
        "[0, 1]) is below T(t) is frozen at step t. 0 never freezes.")})
    score_mode: str = field(default="last", metadata={"help": (
        f"One of {SCORE_MODES}: the score compared with T(t): the last warm-up measurement, the mean of the "
        "warm-up measurements, or the latest measurement ('current': units still training are measured every "
        "measure_interval steps until ramp_end_step).")})
    measure_interval: int = field(default=10, metadata={"help": (
        "An integer >= 1: warm-up step t measures when t % measure_interval == 0 (and step t_w - 1 always "
        "does). 10 keeps the measuring cost of a warm-up near 1-3% of its time even on small models, where "
        "one measuring step costs 10-30% extra.")})
    max_tokens: int | None = field(default=1024, metadata={"help": (
        "An integer >= 2 or None: at most this many random non-padding tokens per measurement (None: all). "
        "1024 keeps most adapters in the cheap T x T form of the CKA.")})
    seed: int = field(default=0, metadata={"help": (
        "An integer: the seed of the token sampling (one torch.Generator per device; checkpointed).")})
    allow_freezing_all: bool = field(default=False, metadata={"help": (
        "False keeps the most important unit training (with a warning naming it) when the schedule would "
        "freeze the model's last trainable parameter, so a high threshold never ends in autograd's 'does not "
        "require grad'; True lets the schedule freeze everything.")})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not _is_int(self.warmup_steps) or self.warmup_steps < 1:
            raise ValueError(f"warmup_steps: expected an integer >= 1 (t_w), got {self.warmup_steps!r}")
        if not _is_int(self.ramp_end_step) or self.ramp_end_step <= self.warmup_steps:
            raise ValueError(f"ramp_end_step: expected an integer > warmup_steps={self.warmup_steps} "
                             f"(t_f > t_w), got {self.ramp_end_step!r}")
        ft = self.final_threshold
        if isinstance(ft, bool) or not isinstance(ft, numbers.Real) or not (0.0 <= float(ft) <= 1.0):
            raise ValueError(f"final_threshold: expected a number in [0, 1] (importance = 1 - CKA lies in "
                             f"[0, 1]), got {ft!r}")
        if self.score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode: expected one of {SCORE_MODES}, got {self.score_mode!r}")
        if not _is_int(self.measure_interval) or self.measure_interval < 1:
            raise ValueError(f"measure_interval: expected an integer >= 1, got {self.measure_interval!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 2):
            raise ValueError(f"max_tokens: expected None or an integer >= 2 (CKA needs 2 tokens), "
                             f"got {self.max_tokens!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed: expected an integer, got {self.seed!r}")
        if not isinstance(self.allow_freezing_all, bool):
            raise ValueError(f"allow_freezing_all: expected True or False, got {self.allow_freezing_all!r}")

    def threshold(self, step: int) -> float:
        """T(t) = T_f (1 - (1 - p)^3), p = clip((t - t_w) / (t_f - t_w), 0, 1)."""
        return safe_threshold(step, self.warmup_steps, self.ramp_end_step, self.final_threshold)

    def measures(self, step: int) -> bool:
        """Whether step ``step`` measures importances (for the units still training)."""
        return measures(step, self.warmup_steps, self.ramp_end_step, self.measure_interval, self.score_mode)
