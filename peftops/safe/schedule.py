"""SAFE's schedule as pure functions: the cubic threshold T(t), which steps measure, and the score a
unit is compared with T(t) by (``score_mode``). No state: ``SAFEConfig`` and ``SAFE`` call these.

    T(t) = T_f * (1 - (1 - p)^3),  p = clip((t - t_w) / (t_f - t_w), 0, 1)
    measuring steps: t < t_w with t % interval == 0, and t = t_w - 1; with score_mode "current" also
                     t_w <= t < t_f with (t - t_w) % interval == 0
    compared score:  "last" / "mean" of the defined warm-up scores (t < t_w), "current": the latest
                     defined score; None when there is none (never frozen)
"""
from __future__ import annotations

SCORE_MODES = ("last", "mean", "current")


def safe_threshold(step: int, warmup_steps: int, ramp_end_step: int, final_threshold: float) -> float:
    """The cubic freezing threshold T(t) = T_f (1 - (1 - p)^3), p = clip((t - t_w)/(t_f - t_w), 0, 1)."""
    p = min(max((step - warmup_steps) / (ramp_end_step - warmup_steps), 0.0), 1.0)
    return float(final_threshold) * (1.0 - (1.0 - p) ** 3)


def measures(step: int, warmup_steps: int, ramp_end_step: int, measure_interval: int, score_mode: str) -> bool:
    """Whether step ``step`` measures importances (for the units still training)."""
    t_w, k = warmup_steps, measure_interval
    if step < 0:
        return False
    if step < t_w:
        return step % k == 0 or step == t_w - 1
    if score_mode == "current" and step < ramp_end_step:
        return (step - t_w) % k == 0
    return False


def compared_score(history: list[tuple[int, float]], score_mode: str, warmup_steps: int) -> float | None:
    """The score of a unit with measurement ``history`` [(step, importance)] that is compared with T(t)."""
    hist = [(t, s) for t, s in history if s == s]  # NaN: undefined measurement
    if score_mode != "current":
        hist = [(t, s) for t, s in hist if t < warmup_steps]
    if not hist:
        return None
    if score_mode == "mean":
        return sum(s for _, s in hist) / len(hist)
    return hist[-1][1]
