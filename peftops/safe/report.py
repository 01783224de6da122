"""SAFE's report: the readable table of ``SAFE.report()``, built from the controller's public views only."""
from __future__ import annotations


def _unique_params(units):
    seen, out = set(), []
    for u in units:
        for p in u.params:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _table(rows: list[list[str]]) -> list[str]:
    """Rows as aligned columns (the first two left-aligned), a rule under the header row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(v.ljust(w) if j < 2 else v.rjust(w) for j, (v, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def report(safe) -> str:
    """One row per unit (type, parameters, scores, when frozen), then the steps at which units were frozen."""
    c = safe.config
    params = _unique_params(safe.units)
    total = sum(p.numel() for p in params)
    frozen_params = sum(p.numel() for p in params if not p.requires_grad)
    n_frozen = sum(u.frozen for u in safe.units)
    lines = [
        f"SAFE: warm-up steps 0..{c.warmup_steps - 1}, threshold ramps to {c.final_threshold:g} at step "
        f"{c.ramp_end_step}; score = {c.score_mode}; measured every {c.measure_interval} step(s) on <= "
        f"{c.max_tokens if c.max_tokens else 'all'} tokens",
        f"step {safe.step_index}: threshold {safe.threshold():.4f}; {n_frozen}/{len(safe.units)} units frozen, "
        f"{frozen_params:,}/{total:,} adapter parameters frozen ({100.0 * frozen_params / max(total, 1):.1f}%)",
        "",
    ]
    rows = [["unit", "type", "params", "score", "last", "warm-up mean", "measured", "frozen at"]]
    compared = safe.scores()
    for u in safe.units:
        warm = [s for t, s in u.history if t < c.warmup_steps and s == s]
        used = compared[u.name]
        rows.append([
            u.name, u.kind, f"{u.numel:,}", "-" if used is None else f"{used:.4f}",
            f"{u.history[-1][1]:.4f}" if u.history else "-",
            f"{sum(warm) / len(warm):.4f}" if warm else "-", str(len(u.history)),
            "-" if u.frozen_at is None else f"step {u.frozen_at}",
        ])
    lines += _table(rows)
    events = [e for e in safe.log if e.get("newly_frozen")]
    if events:
        lines += ["", "freezing decisions:"]
        for e in events:
            lines.append(f"  step {e['step']} (threshold {e['threshold']:.4f}): froze {len(e['newly_frozen'])}: "
                         + ", ".join(e["newly_frozen"]))
    return "\n".join(lines)
