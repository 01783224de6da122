"""Benchmark harness: time each case's reference, torch.compile(reference) and peftops paths side by
side in one run, next to the roofline measured on the same device in the same run.

A family module (bench/<family>.py) defines ``cases(device, quick) -> list[Case]``. A Case builds
its inputs once (``make``), then each path is a callable taking those inputs.
``bytes`` and ``flops`` are the minimum the op must move / compute; with the measured copy
bandwidth and GEMM rate they give the roofline floor and the % of it reached (GPU only).
``model`` is the performance model's estimate of the peftops path (kernels/_perf_model.py,
docs/perf-model.md: floors on H100 / H200, structural bound, prediction); ``case_model`` derives one
for a case that sets none. A GPU table prints it next to the measured time; ``--predict`` prints it alone.

Measuring (``measure``, ``Policy``): the paths of a case are interleaved, one sample of each per round in
a rotated order, so background load hits them alike; rounds go on until the spread is small or the
case's timing budget is spent. A row reports min / median / max per path and the median paired speedup
with its 95% bootstrap CI; it is UNSTABLE, with the reason, and claims no speedup when a path's spread
or the CI is too wide. The JSON (``to_json``) keeps every sample.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import math
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Any, Callable

import torch

from .paths import RESULTS_DIR, SOURCE_ROOT, default_out_dir, is_results_dir, resolve_out_dir  # noqa: F401

FAMILIES = ["sift", "aot", "wegeft", "cka", "methods"]


@dataclasses.dataclass
class Case:
    name: str                                  # e.g. "sift.topk"
    shape: str                                 # human-readable shape, e.g. "4096x4096 fp32 k=1%"
    make: Callable[[], dict]                   # builds the inputs (on the device)
    reference: Callable[[dict], Any]           # PyTorch baseline
    peftops: Callable[[dict], Any]             # our path
    bytes: float | None = None                 # minimum HBM bytes of the op
    flops: float | None = None                 # minimum flops of the op
    compile_reference: bool = True             # also time torch.compile(reference)
    sweep: tuple[str, float] | None = None     # (swept parameter, its value) for scaling plots
    measure_memory: bool = False               # record peak memory of each path
    note: str = ""
    model: Any = None                          # kernels._perf_model.Estimate of the peftops path (else derived)


@dataclasses.dataclass
class Result:
    name: str
    shape: str
    times_us: dict[str, float]                 # median per path (NaN for a failed path)
    peak_mib: dict[str, float]
    bytes: float | None
    flops: float | None
    sweep: tuple[str, float] | None
    note: str = ""
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> "Type: first line" of a failed path
    device_type: str = "cpu"
    samples_us: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # every sample, per call, in order
    stats: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # n, min, p10, median, p90, max, ...
    comparisons: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # base -> ratio, CI, verdict
    rounds: int = 0                            # interleaved rounds (one sample of every path each)
    inner_reps: dict[str, int] = dataclasses.field(default_factory=dict)  # calls per sample (CPU; 1 on CUDA)
    stop: str = ""                             # converged | budget | max rounds | once | failed
    measure_s: float = 0.0                     # wall time of the timed rounds
    policy: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: dict[str, Any] | None = None        # the performance model's figures (Estimate.to_dict), H100 and H200

    def ratio(self, base: str = "reference") -> float | None:
        """Median of the paired base/peftops ratios, whatever its stability (None if not measured)."""
        c = self.comparisons.get(base)
        return c["ratio"] if c else None

    def speedup(self, base: str = "reference") -> float | None:
        """The claimed speedup of peftops over ``base``: None when the comparison is UNSTABLE (no claim)."""
        c = self.comparisons.get(base)
        return c["ratio"] if c and c["stable"] else None

    @property
    def stable(self) -> bool | None:
        """True when every comparison of the row is stable; None when there is nothing to compare."""
        return all(c["stable"] for c in self.comparisons.values()) if self.comparisons else None

    @property
    def unstable_reasons(self) -> list[str]:
        return list(dict.fromkeys(r for c in self.comparisons.values() for r in c["reasons"]))


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: torch.device, *, once: bool = False, min_time_s: float = 0.2,
            max_reps: int = 200) -> float:
    """Median time of ``fn`` in microseconds, one path alone (the roofline probes). CUDA: events around
    each call, L2 flushed before each; CPU: perf_counter. Cases are timed by ``measure`` instead."""
    fn()  # warm-up (compiles / autotunes)
    _sync(device)
    if device.type == "cuda":
        flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
        reps = 1 if once else max(3, min(max_reps, int(min_time_s / max(_estimate(fn, device), 1e-6))))
        times = []
        for _ in range(reps):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)
    reps = 1 if once else max(3, min(max_reps, int(min_time_s / max(_estimate(fn, device), 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def _estimate(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# measuring a case: its paths interleaved, repeated until the spread is small or its budget ends
# ----------------------------------------------------------------------------------------------
_now = time.perf_counter  # the clock of every CPU sample (seconds); tests replace it to inject noise


@dataclasses.dataclass
class Policy:
    """How a case is measured and when a row is UNSTABLE.

    Every round takes one sample of each path (reference, compiled, peftops), the order rotated each
    round, so load that comes and goes hits all paths alike; the ratio of a round's samples is one
    paired ratio. Rounds go on until ``min_rounds`` are done and the row is stable with a ratio CI of at
    most half of ``max_spread``, or until ``budget_s`` of timing (warm-up and compiling not counted) or
    ``max_rounds``. A comparison is UNSTABLE when either path's spread, (p90 - p10) / median of its
    samples, exceeds ``max_spread``, when the 95% bootstrap CI of the median paired ratio is wider than
    +-``max_spread``, or with fewer than ``min_rounds`` rounds; an UNSTABLE row claims no speedup."""

    budget_s: float = 2.0        # timing budget per case (s)
    min_rounds: int = 10
    max_rounds: int = 2000
    max_spread: float = 0.10
    min_sample_s: float = 2e-3   # CPU: calls per sample so that one sample lasts at least this long
    bootstrap: int = 2000        # resamples for the final CI (fewer for the stopping checks)
    seed: int = 0


def _error_text(e: BaseException) -> str:
    first = str(e).splitlines()[0][:160] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def _sample_cpu(fn: Callable[[], Any], inner: int) -> float:
    t0 = _now()
    for _ in range(inner):
        fn()
    return (_now() - t0) * 1e6 / inner


def _sample_cuda(fn: Callable[[], Any], flush: torch.Tensor) -> float:
    flush.zero_()  # L2 flushed before each call: every path starts cold
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3


def _quantile(sorted_x: list[float], q: float) -> float:
    pos = q * (len(sorted_x) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_x) - 1)
    return sorted_x[lo] + (sorted_x[hi] - sorted_x[lo]) * (pos - lo)


def sample_stats(samples: list[float]) -> dict[str, float]:
    """n, min, p10, median, p90, max, mean, stdev and spread = (p90 - p10) / median of one path's samples."""
    x = sorted(samples)
    med = _quantile(x, 0.5)
    p10, p90 = _quantile(x, 0.1), _quantile(x, 0.9)
    return {"n": len(x), "min": x[0], "p10": p10, "median": med, "p90": p90, "max": x[-1],
            "mean": statistics.fmean(x), "stdev": statistics.stdev(x) if len(x) > 1 else 0.0,
            "spread": (p90 - p10) / med if med > 0 else float("inf")}


def _median_ci(values: list[float], resamples: int, seed: int, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the median of ``values`` (resampled with replacement)."""
    n = len(values)
    if n < 2:
        return values[0], values[0]
    x = torch.tensor(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    s = x[idx].sort(dim=1).values
    meds = (s[:, (n - 1) // 2] + s[:, n // 2]) / 2
    meds = meds.sort().values
    a = (1 - confidence) / 2
    return _quantile(meds.tolist(), a), _quantile(meds.tolist(), 1 - a)


def compare(base: str, base_samples: list[float], ours: list[float], policy: Policy, *, once: bool = False,
            resamples: int | None = None) -> dict[str, Any]:
    """The paired ratios base/peftops of the rounds: their median (the speedup), its 95% bootstrap CI and
    the verdict: stable, or the reasons it is UNSTABLE."""
    pairs = [(b, o) for b, o in zip(base_samples, ours) if b > 0 and o > 0]
    logs = [math.log(b / o) for b, o in pairs]
    if not logs:
        return {"base": base, "ratio": None, "ci_low": None, "ci_high": None, "ci_halfwidth": None, "n": 0,
                "stable": False, "reasons": [f"no valid {base}/peftops pair"]}
    med = math.exp(statistics.median(logs))
    lo, hi = (math.exp(v) for v in _median_ci(logs, resamples or policy.bootstrap, policy.seed))
    half = max(hi / med - 1.0, 1.0 - lo / med)
    reasons = []
    limit = f"{100 * policy.max_spread:.0f}%"
    if once:
        reasons.append("1 sample (--once): no dispersion, no ratio claimed")
    else:
        for label, xs in ((base, base_samples), ("peftops", ours)):
            sp = sample_stats(xs)["spread"]
            if sp > policy.max_spread:
                reasons.append(f"{label} spread {100 * sp:.0f}% > {limit}")
        if half > policy.max_spread:
            crosses = " crosses 1," if lo <= 1.0 <= hi else ""
            reasons.append(f"ratio vs {base} CI {lo:.3g}-{hi:.3g}{crosses} +-{100 * half:.0f}% > {limit}")
        if len(logs) < policy.min_rounds:
            reasons.append(f"{len(logs)} rounds < {policy.min_rounds} (budget)")
    return {"base": base, "ratio": med, "ci_low": lo, "ci_high": hi, "ci_halfwidth": half, "n": len(logs),
            "ci_spans_1": lo <= 1.0 <= hi, "stable": not reasons, "reasons": reasons}


def _comparisons(samples: dict[str, list[float]], policy: Policy, once: bool, resamples: int | None = None):
    if "peftops" not in samples:
        return {}
    return {base: compare(base, samples[base], samples["peftops"], policy, once=once, resamples=resamples)
            for base in ("reference", "compiled") if base in samples}


def measure(fns: dict[str, Callable[[], Any]], device: torch.device, policy: Policy | None = None, *,
            once: bool = False, errors: dict[str, str] | None = None, name: str = "") -> dict[str, Any]:
    """Time zero-argument callables side by side (see ``Policy``). Returns samples (us per call, one per
    round per path), inner_reps, rounds, stop, measure_s, stats, comparisons; a path that raises is left
    out and its error recorded in ``errors``."""
    policy = policy or Policy()
    errors = {} if errors is None else errors
    cuda = device.type == "cuda"
    live: dict[str, Callable[[], Any]] = {}
    inner: dict[str, int] = {}
    for label, fn in fns.items():
        try:
            fn()  # warm-up: compiles, autotunes, fills caches
            _sync(device)
            if cuda or once:
                inner[label] = 1
            else:
                est_s = min(_sample_cpu(fn, 1) for _ in range(3)) * 1e-6
                inner[label] = max(1, min(10_000, math.ceil(policy.min_sample_s / max(est_s, 1e-9))))
            live[label] = fn
        except Exception as e:  # a failed path is reported, not fatal
            errors[label] = _error_text(e)
            print(f"  [{name}] {label} failed: {errors[label]}")
    samples: dict[str, list[float]] = {label: [] for label in live}
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device) if cuda and live else None
    labels = list(live)
    rounds, stop = 0, "failed" if not labels else ""
    next_check = policy.min_rounds
    t0 = time.monotonic()
    while labels:
        k = rounds % len(labels)
        for label in labels[k:] + labels[:k]:  # rotated: no path is always first after the previous one
            try:
                samples[label].append(_sample_cuda(live[label], flush) if cuda else _sample_cpu(live[label], inner[label]))
            except Exception as e:
                errors[label] = _error_text(e)
                print(f"  [{name}] {label} failed: {errors[label]}")
                samples.pop(label)
        labels = [label for label in labels if label in samples]  # the rest stay aligned: one sample a round
        rounds += 1
        if once:
            stop = "once"
            break
        if rounds >= policy.max_rounds:
            stop = "max rounds"
            break
        if time.monotonic() - t0 >= policy.budget_s and rounds >= min(3, policy.min_rounds):
            stop = "budget"
            break
        if rounds >= next_check:
            next_check = rounds + max(1, rounds // 10)
            comps = _comparisons(samples, policy, once, resamples=500)
            tight = all(c["stable"] and c["ci_halfwidth"] <= policy.max_spread / 2 for c in comps.values())
            quiet = all(sample_stats(v)["spread"] <= policy.max_spread for v in samples.values())
            if tight and quiet:
                stop = "converged"
                break
    if not labels and live:
        stop = "failed"
    measure_s = time.monotonic() - t0
    del flush
    return {"samples": samples, "inner_reps": {k: v for k, v in inner.items() if k in samples}, "rounds": rounds,
            "stop": stop, "measure_s": measure_s,
            "stats": {k: sample_stats(v) for k, v in samples.items() if v},
            "comparisons": _comparisons(samples, policy, once)}


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory allocated above the current level while ``fn`` runs (CUDA only; NaN on CPU)."""
    if device.type != "cuda":
        return float("nan")
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


# ----------------------------------------------------------------------------------------------
# rooflines, measured in the same run
# ----------------------------------------------------------------------------------------------
def measure_roofline(device: torch.device) -> dict[str, float]:
    """Device-to-device copy bandwidth (B/s, bytes read + written) and bf16 GEMM rate (flop/s)."""
    if device.type != "cuda":
        return {"copy_bytes_per_s": float("nan"), "gemm_flops_per_s": float("nan")}
    n = 512 * 1024 * 1024  # 1 GiB of bf16 each way
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), device) * 1e-6
    bw = 2 * a.numel() * a.element_size() / t
    a = b = None  # free 2 GiB before the GEMM
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    y = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    t = time_fn(lambda: x @ y, device) * 1e-6
    return {"copy_bytes_per_s": bw, "gemm_flops_per_s": 2 * m**3 / t}


def floor_us(res: Result, roof: dict[str, float]) -> float | None:
    parts = []
    if res.bytes:
        parts.append(res.bytes / roof["copy_bytes_per_s"])
    if res.flops:
        parts.append(res.flops / roof["gemm_flops_per_s"])
    parts = [p for p in parts if p == p]  # drop NaN (no roofline on CPU)
    return max(parts) * 1e6 if parts else None


# ----------------------------------------------------------------------------------------------
# the performance model's figures (kernels/_perf_model.py, docs/perf-model.md)
# ----------------------------------------------------------------------------------------------
MODEL_DEVICES = ("h100", "h200")
_ELEM_BYTES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float32": 4, "fp32": 4, "float64": 8, "fp64": 8}


def _elem_bytes(shape: str) -> int | None:
    return next((_ELEM_BYTES[t] for t in re.split(r"[\s()]+", shape) if t in _ELEM_BYTES), None)


def _aot_model(case: Case):
    from peftops.kernels import _perf_model as PM

    m = re.match(r"(\d+)x(\d+) (\w+) V=(\d+)( zipf\(([\d.]+)\))?", case.shape)
    if not m or _elem_bytes(case.shape) is None:
        return None
    n, d, e, vocab = int(m.group(1)), int(m.group(2)), _elem_bytes(case.shape), int(m.group(4))
    if case.name.startswith("aot.gather_add"):
        return PM.gather_add(n, d, e)
    if case.name.startswith("aot.table_backward") and m.group(5):
        from . import aot as aot_bench

        zipf = getattr(aot_bench, "_zipf_ids", None)
        if zipf is None:
            return None
        counts = torch.unique(zipf(n, vocab, "cpu"), return_counts=True)[1].tolist()
        return PM.segment_sum(counts, d, e)
    return None


def _wegeft_model(case: Case):
    from peftops.kernels import _perf_model as PM

    m = re.match(r"(\d+)x(\d+) r=(\d+)", case.shape)
    e = _elem_bytes(case.shape)
    if not (case.name.startswith("wegeft.merge") and m and e):
        return None
    d_out, d_in, r = (int(g) for g in m.groups())
    return PM.wegeft_generate(d_out, d_in, r, e, splits=PM.generate_splits(d_out, d_in, r, e))


_FAMILY_MODELS = {"aot": _aot_model, "wegeft": _wegeft_model}


def case_model(case: Case):
    """The case's ``model`` if it set one; else the family's model read off its name and shape (aot,
    wegeft: their bench modules set none); else a floor from its bytes / flops; None without either."""
    from peftops.kernels import _perf_model as PM

    if case.model is not None:
        return case.model
    derive = _FAMILY_MODELS.get(case.name.split(".")[0])
    est = derive(case) if derive else None
    if est is None and (case.bytes or case.flops):
        unit = {2: "tensor16", 4: "fp32", 8: "tensor64"}.get(_elem_bytes(case.shape) or 2)
        est = PM.floor_only(case.name, case.bytes, case.flops, unit)
    return est


def case_model_dict(case: Case) -> dict[str, Any] | None:
    est = case_model(case)
    return est.to_dict(MODEL_DEVICES) if est is not None else None


def model_device(name: str | None) -> str:
    """The model's device for a GPU named ``name``: h200 for an H200, else h100 (the default)."""
    return "h200" if name and "H200" in name.upper() else "h100"


def _run_model_device() -> str:
    return model_device(torch.cuda.get_device_name() if torch.cuda.is_available() else None)


def measured_over_model(r: Result, device: str | None = None) -> float | None:
    """Measured peftops time / the model's prediction on ``device`` (None without either)."""
    pred = ((r.model or {}).get(device or _run_model_device()) or {}).get("predicted_us")
    ours = r.times_us.get("peftops")
    return ours / pred if pred and _finite(ours) and r.device_type == "cuda" else None


def _si(v: float, unit: str) -> str:
    for scale, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {p}{unit}"
    return f"{v:.3g} {unit}"


_PREDICT_HEAD = ["op", "shape", "HBM bytes", "flops (unit)", "floor H100 us", "floor H200 us", "structural H100 us",
                 "predicted H100 us", "predicted H200 us", "bound (H100)"]


def prediction_rows(cases: list[Case]) -> list[list[str]]:
    """One row per case with a model: _PREDICT_HEAD's columns (the model's figures alone: no GPU needed)."""
    rows = []
    for c in cases:
        m = case_model_dict(c)
        if m is None:
            rows.append([c.name, c.shape, "-", "-", "-", "-", "-", "-", "-", "no model (no bytes / flops)"])
            continue
        h100, h200 = m["h100"], m["h200"]
        rows.append([c.name, c.shape, _si(m["bytes"], "B"), f"{_si(m['flops'], 'F')} ({m['unit']})" if m["flops"] else "-",
                     _us(h100["floor_us"]), _us(h200["floor_us"]), _us(h100["structural_us"]),
                     _us(h100["predicted_us"]), _us(h200["predicted_us"]), h100["bound"]])
    return rows


def format_predictions(cases: list[Case]) -> str:
    rows = [_PREDICT_HEAD] + prediction_rows(cases)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(_PREDICT_HEAD))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("model figures only (kernels/_perf_model.py, docs/perf-model.md): estimates from datasheet peaks and "
                 "stated latencies, not measurements; floor = max(bytes / HBM, flops / peak) at peak, predicted = "
                 "max(floor at achievable efficiency, structural bound) + launch gaps, summed over launches")
    return "\n".join(lines)


def predictions_markdown(cases: list[Case]) -> str:
    rows = prediction_rows(cases)
    md = ["| " + " | ".join(_PREDICT_HEAD) + " |", "|" + "---|" * len(_PREDICT_HEAD)]
    md += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(md)


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
def load_cases(device: torch.device, quick: bool, families: list[str] | None = None) -> list[Case]:
    """Every case of every bench/<family>.py present (a family module that is missing is skipped);
    ``families``: only those modules (default: all of FAMILIES)."""
    import importlib

    cases: list[Case] = []
    for fam in FAMILIES if families is None else [f for f in FAMILIES if f in families]:
        try:
            mod = importlib.import_module(f"{__package__}.{fam}")
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.{fam}":
                continue
            raise
        cases.extend(mod.cases(device, quick))
    return cases


def run_case(case: Case, device: torch.device, *, once: bool = False, compile_ref: bool = True,
             policy: Policy | None = None) -> Result:
    """Time the case's reference, torch.compile(reference) and peftops paths interleaved (``measure``)."""
    policy = policy or Policy()
    inputs = case.make()
    peaks: dict[str, float] = {}
    errors: dict[str, str] = {}
    paths: dict[str, Callable[[dict], Any]] = {"reference": case.reference}
    if compile_ref and case.compile_reference:
        # The cases of one op share their reference's code object (a lambda made per case): dynamo caches per
        # code object and stops compiling after config.recompile_limit (8) shapes, silently timing eager
        # for the rest of a sweep. A reset per case compiles each case afresh.
        torch._dynamo.reset()
        paths["compiled"] = torch.compile(case.reference, dynamic=False)
    paths["peftops"] = case.peftops
    fns = {label: (lambda fn=fn: fn(inputs)) for label, fn in paths.items()}
    m = measure(fns, device, policy, once=once, errors=errors, name=case.name)
    if case.measure_memory and device.type == "cuda":  # no allocator peak on CPU: no column
        for label in m["samples"]:
            try:
                peaks[label] = peak_memory_mib(fns[label], device)
            except Exception as e:
                errors[label] = _error_text(e)
    times = {label: (m["stats"][label]["median"] if label in m["stats"] else float("nan")) for label in paths}
    inputs = fns = None  # free the case's tensors before the next case (the closures are done with them)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Result(case.name, case.shape, times, peaks, case.bytes, case.flops, case.sweep, case.note, errors,
                  device_type=device.type, samples_us=m["samples"], stats=m["stats"], comparisons=m["comparisons"],
                  rounds=m["rounds"], inner_reps=m["inner_reps"], stop=m["stop"], measure_s=m["measure_s"],
                  policy={**dataclasses.asdict(policy), "once": once}, model=case_model_dict(case))


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip())
    except Exception:
        commit, dirty = None, None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _us(v: float) -> str:
    return "-" if not _finite(v) else f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def has_roofline(roof: dict[str, float]) -> bool:
    """A roofline was measured (CUDA): only then do GB/s, TFLOP/s and % of roofline mean something."""
    return _finite(roof.get("copy_bytes_per_s")) and _finite(roof.get("gemm_flops_per_s")) and \
        os.environ.get("TRITON_INTERPRET", "0") != "1"


def _ratio_cells(r: Result, base: str) -> tuple[str, str]:
    c = r.comparisons.get(base)
    if not c or c["ratio"] is None:
        return "-", "-"
    ci = f"{c['ci_low']:.2f}-{c['ci_high']:.2f}"
    if not c["stable"]:
        return "UNSTABLE", ci
    return (f"~{c['ratio']:.2f}x" if c["ci_spans_1"] else f"{c['ratio']:.2f}x"), ci


def format_table(results: list[Result], roof: dict[str, float]) -> str:
    """Only the columns that mean something here: a path column only if some row timed it, the rates and
    the % of roofline only with a measured roofline (CUDA), peak memory only where it was measured.
    Times are median (min-max) us per call; a row whose comparison is UNSTABLE shows no speedup."""
    paths = [p for p in ("reference", "compiled", "peftops") if any(_finite(r.times_us.get(p)) for r in results)]
    roofline = has_roofline(roof)
    peaks = any(_finite(v) for r in results for v in r.peak_mib.values())
    head = ["op", "shape", "rounds"] + [f"{p} us" for p in paths]
    if "reference" in paths and "peftops" in paths:
        head += ["speedup", "95% CI"]
    if "compiled" in paths and "peftops" in paths:
        head += ["vs compiled", "95% CI "]
    model_dev = _run_model_device() if roofline else None
    if roofline:
        head += ["GB/s | TFLOP/s", "% roofline", f"model {model_dev.upper()} us", "meas/model"]
    if peaks:
        head += ["peak MiB ref/ours"]
    head += ["flag"]
    rows = [head]
    for r in results:
        row = [r.name, r.shape, str(r.rounds)]
        for p in paths:
            st = r.stats.get(p)
            row.append(f"{_us(st['median'])} ({_us(st['min'])}-{_us(st['max'])})" if st else
                       ("failed" if p in r.errors else "-"))
        if "speedup" in head:
            row += list(_ratio_cells(r, "reference"))
        if "vs compiled" in head:
            row += list(_ratio_cells(r, "compiled"))
        ours = r.times_us.get("peftops")
        if roofline:
            fl = floor_us(r, roof)
            rate = ""
            if _finite(ours) and ours > 0:
                if r.flops and (not r.bytes or r.flops / roof["gemm_flops_per_s"] > r.bytes / roof["copy_bytes_per_s"]):
                    rate = f"{r.flops / ours / 1e6:.1f} TF/s"
                elif r.bytes:
                    rate = f"{r.bytes / ours / 1e3:.0f} GB/s"
            row += [rate or "-", f"{100 * fl / ours:.0f}%" if fl and _finite(ours) else "-"]
            pred = ((r.model or {}).get(model_dev) or {}).get("predicted_us")
            ratio = measured_over_model(r, model_dev)
            row += [_us(pred) if pred else "-", f"{ratio:.2f}" if ratio else "-"]
        if peaks:
            ref_p, our_p = r.peak_mib.get("reference"), r.peak_mib.get("peftops")
            row.append(f"{_us(ref_p)}/{_us(our_p)}" if _finite(ref_p) or _finite(our_p) else "-")
        if r.stable is None:
            flag = "; ".join(f"{k} failed" for k in r.errors) or "-"
        else:
            flag = "ok" if r.stable else "UNSTABLE: " + "; ".join(r.unstable_reasons)
            if r.errors:
                flag += "; " + "; ".join(f"{k} failed" for k in r.errors)
        row.append(flag)
        rows.append(row)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    pol = next((r.policy for r in results if r.policy), None)
    if pol:
        lines.append(f"times: median (min-max) us per call over the interleaved rounds; speedup: median of the "
                     f"paired reference/peftops ratios (~: its 95% bootstrap CI spans 1). UNSTABLE (no speedup "
                     f"claimed): a path's spread (p90-p10)/median > {100 * pol['max_spread']:.0f}%, the ratio CI "
                     f"wider than +-{100 * pol['max_spread']:.0f}%, or under {pol['min_rounds']} rounds; timing "
                     f"budget {pol['budget_s']:g} s per case.")
    n_bad = sum(r.stable is False for r in results)
    if n_bad:
        lines.append(f"{n_bad} of {len(results)} rows UNSTABLE: their figures are not measurements to quote; rerun "
                     f"on a quiet machine (a larger --case-budget-s narrows a wide CI, not a path's spread).")
    if not roofline:
        lines.append("bandwidth, flop rate and % of roofline are shown only with a roofline measured on a GPU: "
                     "here they would mean nothing (CPU, or the Triton interpreter); these are CPU times of the "
                     "reference vs the peftops CPU path, not kernel figures.")
    else:
        lines.append(f"model {model_dev.upper()} us: the performance model's prediction for the peftops path "
                     f"(docs/perf-model.md; an estimate, not a measurement); meas/model = measured / predicted.")
    return "\n".join(lines)


def to_json(results: list[Result], roof: dict[str, float], env: dict[str, Any]) -> dict[str, Any]:
    out = []
    for r in results:
        fl = floor_us(r, roof) if has_roofline(roof) else None
        ours = r.times_us.get("peftops")
        ref_c, cmp_c = r.comparisons.get("reference") or {}, r.comparisons.get("compiled") or {}
        out.append({
            **dataclasses.asdict(r),
            "speedup_vs_reference": r.speedup(),       # None when UNSTABLE: no claim
            "speedup_vs_compiled": r.speedup("compiled"),
            "ratio_vs_reference": ref_c.get("ratio"),  # the median paired ratio, stable or not
            "ratio_vs_reference_ci": [ref_c.get("ci_low"), ref_c.get("ci_high")] if ref_c else None,
            "ratio_vs_compiled": cmp_c.get("ratio"),
            "ratio_vs_compiled_ci": [cmp_c.get("ci_low"), cmp_c.get("ci_high")] if cmp_c else None,
            "stable": r.stable,
            "unstable_reasons": r.unstable_reasons,
            "floor_us": fl,
            "percent_of_roofline": (100 * fl / ours) if fl and _finite(ours) else None,
            "model_device": _run_model_device() if r.device_type == "cuda" else None,
            "model_predicted_us": ((r.model or {}).get(_run_model_device()) or {}).get("predicted_us"),
            "measured_over_model": measured_over_model(r),
        })
    return {"environment": env, "roofline": roof, "results": out}


def plot(results: list[Result], path: str) -> bool:
    """Time against the swept size for reference and peftops, one panel per op. False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    groups: dict[str, list[Result]] = {}
    for r in results:
        if r.sweep:
            groups.setdefault(r.name, []).append(r)
    if not groups:
        return False
    n = len(groups)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, rs) in zip(axes.flat, groups.items()):
        rs = sorted(rs, key=lambda r: r.sweep[1])
        xs = [r.sweep[1] for r in rs]
        for label, style in (("reference", "o-"), ("compiled", "s--"), ("peftops", "^-")):
            ys = [r.times_us.get(label, float("nan")) for r in rs]
            if any(y == y for y in ys):
                ax.plot(xs, ys, style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(rs[0].sweep[0])
        ax.set_ylabel("time (us)")
        ax.set_title(name)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
