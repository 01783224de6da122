"""Benchmark harness: time each case's reference, torch.compile(reference) and peftops paths side by
side in one run, next to the roofline measured on the same device in the same run.

A family module (bench/<family>.py) defines ``cases(device, quick) -> list[Case]``. A Case builds
its inputs once (``make``), then each path is a zero-argument-free callable taking those inputs.
``bytes`` and ``flops`` are the minimum the op must move / compute; with the measured copy
bandwidth and GEMM rate they give the roofline floor and the % of it reached.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable

import torch

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


@dataclasses.dataclass
class Result:
    name: str
    shape: str
    times_us: dict[str, float]
    peak_mib: dict[str, float]
    bytes: float | None
    flops: float | None
    sweep: tuple[str, float] | None
    note: str = ""
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> "Type: first line" of a failed path

    def speedup(self, base: str = "reference") -> float | None:
        t, b = self.times_us.get("peftops"), self.times_us.get(base)
        return b / t if t and b else None


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: torch.device, *, once: bool = False, min_time_s: float = 0.2,
            max_reps: int = 200) -> float:
    """Median time of ``fn`` in microseconds. CUDA: events around each call, L2 flushed before
    each; CPU: perf_counter. ``once``: one warm-up call, one timed call (for Nsight Compute)."""
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
    del a, b
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


def run_case(case: Case, device: torch.device, *, once: bool = False, compile_ref: bool = True) -> Result:
    inputs = case.make()
    times: dict[str, float] = {}
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
    for label, fn in paths.items():
        try:
            times[label] = time_fn(lambda: fn(inputs), device, once=once)
            if case.measure_memory:
                peaks[label] = peak_memory_mib(lambda: fn(inputs), device)
        except Exception as e:  # a failed baseline is reported, not fatal
            times[label] = float("nan")
            first = str(e).splitlines()[0][:160] if str(e) else ""
            errors[label] = f"{type(e).__name__}: {first}"
            print(f"  [{case.name}] {label} failed: {errors[label]}")
    del inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Result(case.name, case.shape, times, peaks, case.bytes, case.flops, case.sweep, case.note, errors)


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


def format_table(results: list[Result], roof: dict[str, float]) -> str:
    head = ["op", "shape", "reference us", "compiled us", "peftops us", "speedup", "vs compiled",
            "GB/s | TFLOP/s", "% roofline", "peak MiB ref/ours"]
    rows = [head]
    for r in results:
        t = r.times_us
        fl = floor_us(r, roof)
        ours = t.get("peftops")
        rate = ""
        if ours and ours == ours:
            if r.flops and (not r.bytes or r.flops / roof.get("gemm_flops_per_s", 1) > r.bytes / roof.get("copy_bytes_per_s", 1)):
                rate = f"{r.flops / ours / 1e6:.1f} TF/s"
            elif r.bytes:
                rate = f"{r.bytes / ours / 1e3:.0f} GB/s"
        sp = r.speedup()
        spc = r.speedup("compiled")
        mem = ""
        if r.peak_mib:
            mem = f"{r.peak_mib.get('reference', float('nan')):.1f}/{r.peak_mib.get('peftops', float('nan')):.1f}"
        rows.append([
            r.name, r.shape,
            f"{t.get('reference', float('nan')):.1f}", f"{t.get('compiled', float('nan')):.1f}", f"{ours:.1f}",
            f"{sp:.2f}x" if sp else "-", f"{spc:.2f}x" if spc else "-", rate,
            f"{100 * fl / ours:.0f}%" if fl and ours else "-", mem,
        ])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_json(results: list[Result], roof: dict[str, float], env: dict[str, Any]) -> dict[str, Any]:
    out = []
    for r in results:
        fl = floor_us(r, roof)
        ours = r.times_us.get("peftops")
        out.append({
            **dataclasses.asdict(r),
            "speedup_vs_reference": r.speedup(),
            "speedup_vs_compiled": r.speedup("compiled"),
            "floor_us": fl,
            "percent_of_roofline": (100 * fl / ours) if fl and ours else None,
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
