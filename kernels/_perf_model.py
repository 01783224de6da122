"""A performance model that judges kernel designs without a GPU (docs/perf-model.md).

For one op (a sequence of launches) it gives the HBM bytes, the FLOPs and their unit, the roofline
floor per device (bytes / HBM bandwidth vs flops / peak, at peak and at an achievable efficiency),
an L2 roof where a design leans on L2 reuse, and the kernel's structural bound

    structural = (chain per iteration x iterations per program + tail) x ceil(programs / (SMs x blocks/SM))

(the dependent latency chain of one program times the waves its grid needs), blocks/SM taken from
the sm_90a compile report (bench/results/static-sm90a-triton*.json) when a variant of the kernel is
there, else from an explicit occupancy argument. predicted = sum over launches of
max(achievable floor, structural) + a launch gap each.

Pure Python (no torch, no triton at import): ``sddmm_prefers_dense`` is called by
kernels/sift.py at dispatch time and costs arithmetic only (the report is read once, cached).
Every figure here is an estimate from datasheet numbers and stated latencies, not a measurement.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import re

__all__ = [
    "Device", "DEVICES", "EFFICIENCY", "LATENCY", "Launch", "Estimate", "Occupancy",
    "load_report", "find_occupancy", "report_occupancy",
    "sddmm_sparse", "sddmm_sparse_old", "sddmm_dense", "sddmm_times", "sddmm_prefers_dense",
    "SDDMM_DENSE_MARGIN", "gather_add", "segment_sum", "segment_sum_old", "wegeft_generate",
    "topk", "elementwise", "cka", "gemm", "floor_only",
]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------
# hardware (NVIDIA datasheet figures; docs/perf-model.md#hardware)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    sms: int
    clock_hz: float          # cycles -> seconds for the latency chains (max boost)
    hbm_bytes_per_s: float
    hbm_bytes: float
    l2_bytes: float
    l2_bytes_per_s: float    # assumed: 2.5 x the H100's HBM (same die on H200)
    peak: dict               # flop/s per unit: tensor16 (dense bf16/fp16), tensor64, fp32, fp64
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    max_blocks_per_sm: int = 32
    max_warps_per_sm: int = 64
    l1_bytes_per_cycle: int = 128   # per SM: L1 / shared memory
    sm_bytes_per_cycle: int = 64    # per SM: what one SM can pull from L2 (assumed)


_H100_PEAK = {"tensor16": 989e12, "tensor64": 67e12, "fp32": 67e12, "fp64": 34e12}
DEVICES = {
    "h100": Device("H100 SXM5", 132, 1.98e9, 3.35e12, 80e9, 50e6, 2.5 * 3.35e12, _H100_PEAK),
    "h200": Device("H200 SXM", 132, 1.98e9, 4.8e12, 141e9, 50e6, 2.5 * 3.35e12, _H100_PEAK),
}

# achievable fraction of each peak (assumed, from typical measurements; docs/perf-model.md#efficiency)
EFFICIENCY = {"hbm": 0.90, "l2": 0.80, "l1": 0.80, "tensor": 0.70, "cuda": 0.80}
# latencies in cycles (docs/perf-model.md#latencies)
LATENCY = {"l2": 260, "hbm": 700, "shuffle": 30, "launch_s": 2e-6}


def _device(device: str | Device) -> Device:
    if isinstance(device, Device):
        return device
    try:
        return DEVICES[device]
    except KeyError:
        raise ValueError(f"device: expected one of {sorted(DEVICES)}, got {device!r}") from None


# ----------------------------------------------------------------------------------------------
# what a launch costs
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Occupancy:
    blocks_per_sm: int
    registers: int | None = None
    limited_by: str | None = None
    source: str = "assumed"  # "report:<triton version>" when it came from a compile report


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch. ``unit`` is where the flops run: tensor16 / tensor64 (tensor cores),
    fp32 / fp64 (CUDA-core FMA). Structural terms are 0 for launches modeled by their floor only
    (cuBLAS, torch copies)."""

    name: str
    bytes: float = 0.0
    flops: float = 0.0
    unit: str = "fp32"
    l2_bytes: float = 0.0
    l1_bytes: float = 0.0          # bytes the SMs load through L1 (gathers with repeats)
    issue: float = 0.0             # warp instructions in all (4 schedulers per SM, one each per cycle)
    chain_cycles: float = 0.0      # dependent latency chain of one loop iteration of one program
    iterations: int = 0            # loop iterations per program (the longest program)
    tail_cycles: float = 0.0       # once per program: prologue loads, epilogue reduction + store
    programs: int = 0
    occupancy: Occupancy | None = None
    critical_cycles: float = 0.0   # the longest program alone (a skewed grid): a bound whatever the waves

    def floor_s(self, dev: Device, efficient: bool = False) -> float:
        """max(bytes / HBM, flops / peak, L2 and L1 bytes / their bandwidth), at peak or at EFFICIENCY."""
        return max(self.roofs(dev, efficient).values())

    def roofs(self, dev: Device, efficient: bool = False) -> dict:
        """Seconds per roof: hbm, the flops' unit, l2, l1, issue."""
        e = EFFICIENCY if efficient else dict.fromkeys(EFFICIENCY, 1.0)
        unit_eff = e["tensor"] if self.unit.startswith("tensor") else e["cuda"]
        return {"hbm": self.bytes / (dev.hbm_bytes_per_s * e["hbm"]),
                self.unit: self.flops / (dev.peak[self.unit] * unit_eff) if self.flops else 0.0,
                "l2": self.l2_bytes / (dev.l2_bytes_per_s * e["l2"]),
                "l1": self.l1_bytes / (dev.sms * dev.l1_bytes_per_cycle * dev.clock_hz * e["l1"]),
                "issue": self.issue / (dev.sms * 4 * dev.clock_hz * e["cuda"])}

    def waves(self, dev: Device) -> int:
        if not self.programs or self.occupancy is None:
            return 0
        return cdiv(self.programs, dev.sms * max(1, self.occupancy.blocks_per_sm))

    def structural_s(self, dev: Device) -> float:
        if not self.programs or self.occupancy is None:
            return 0.0
        cycles = (self.chain_cycles * self.iterations + self.tail_cycles) * self.waves(dev)
        return max(cycles, self.critical_cycles) / dev.clock_hz

    def predicted_s(self, dev: Device) -> float:
        return max(self.floor_s(dev, efficient=True), self.structural_s(dev)) + LATENCY["launch_s"]


@dataclasses.dataclass(frozen=True)
class Estimate:
    """An op = launches run one after the other on a stream: each figure is the sum over them."""

    op: str
    launches: tuple[Launch, ...]
    note: str = ""

    @property
    def bytes(self) -> float:
        return sum(x.bytes for x in self.launches)

    @property
    def flops(self) -> float:
        return sum(x.flops for x in self.launches)

    @property
    def l2_bytes(self) -> float:
        return sum(x.l2_bytes for x in self.launches)

    @property
    def unit(self) -> str:
        units = [x.unit for x in self.launches if x.flops]
        return max(units, key=lambda u: sum(x.flops for x in self.launches if x.unit == u)) if units else "-"

    def floor_s(self, device: str | Device = "h100") -> float:
        """The roofline floor at peak: what no implementation of these launches can beat."""
        dev = _device(device)
        return sum(x.floor_s(dev) for x in self.launches)

    def structural_s(self, device: str | Device = "h100") -> float:
        dev = _device(device)
        return sum(x.structural_s(dev) for x in self.launches)

    def predicted_s(self, device: str | Device = "h100") -> float:
        dev = _device(device)
        return sum(x.predicted_s(dev) for x in self.launches)

    def bound(self, device: str | Device = "h100") -> str:
        """What limits the slowest launch: hbm, l2, tensor/fp32/fp64 (its unit) or structure."""
        dev = _device(device)
        x = max(self.launches, key=lambda x: x.predicted_s(dev))
        terms = {**x.roofs(dev, efficient=True), "structure": x.structural_s(dev)}
        return f"{x.name}: {max(terms, key=terms.get)}"

    def to_dict(self, devices=("h100", "h200")) -> dict:
        out = {"op": self.op, "bytes": self.bytes, "flops": self.flops, "unit": self.unit,
               "l2_bytes": self.l2_bytes, "note": self.note}
        for d in devices:
            out[d] = {"floor_us": 1e6 * self.floor_s(d), "structural_us": 1e6 * self.structural_s(d),
                      "predicted_us": 1e6 * self.predicted_s(d), "bound": self.bound(d)}
        out["launches"] = [{"name": x.name, "bytes": x.bytes, "flops": x.flops, "unit": x.unit,
                            "l2_bytes": x.l2_bytes, "programs": x.programs, "iterations": x.iterations,
                            "chain_cycles": x.chain_cycles,
                            "blocks_per_sm": x.occupancy.blocks_per_sm if x.occupancy else None,
                            "occupancy_source": x.occupancy.source if x.occupancy else None}
                           for x in self.launches]
        return out


# ----------------------------------------------------------------------------------------------
# occupancy from the sm_90a compile report
# ----------------------------------------------------------------------------------------------
_REPORT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")
_CONSTEXPR = re.compile(r"([A-Z][A-Z0-9_]*)=(\S+)")
_WARPS = re.compile(r"\bw(\d+)\b")


def load_report(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _version_key(path: str):
    m = re.search(r"triton(\d+(?:\.\d+)*)", os.path.basename(path))
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


@functools.lru_cache(maxsize=None)
def _default_report() -> dict | None:
    """The committed report of the installed triton (by package metadata: no import), else the newest."""
    paths = sorted(glob.glob(os.path.join(_REPORT_DIR, "static-sm90a-triton*.json")), key=_version_key)
    if not paths:
        return None
    try:
        from importlib.metadata import version

        installed = version("triton")
    except Exception:
        installed = None
    chosen = next((p for p in paths if installed and f"triton{installed}.json" in p), paths[-1])
    try:
        return load_report(chosen)
    except (OSError, ValueError):
        return None


def find_occupancy(report: dict | None, kernel: str, constexprs: dict | None = None, dtype: str | None = None,
                   num_warps: int | None = None) -> Occupancy | None:
    """The lowest blocks/SM among the report's variants of ``kernel`` whose constexprs include
    ``constexprs``, whose dtype signature starts with ``dtype`` (e.g. "bf16") and which run
    ``num_warps`` warps; None when nothing matches (or a variant has no resources)."""
    if not report:
        return None
    best = None
    for v in report.get("variants", []):
        res = v.get("resources") or {}
        if v.get("kernel") != kernel or not res.get("blocks_per_sm"):
            continue
        parts = [p.strip() for p in v.get("variant", "").split("|")]
        if dtype and not (parts and parts[0].split("/")[0] == dtype):
            continue
        given = dict(_CONSTEXPR.findall(parts[1])) if len(parts) > 1 else {}
        if constexprs and any(given.get(k) != str(val) for k, val in constexprs.items()):
            continue
        warps = (v.get("options") or {}).get("num_warps")
        if warps is None and parts:
            m = _WARPS.search(parts[-1])
            warps = int(m.group(1)) if m else None
        if num_warps is not None and warps != num_warps:
            continue
        if best is None or res["blocks_per_sm"] < best.blocks_per_sm:
            version = (report.get("env") or {}).get("triton", "?")
            best = Occupancy(res["blocks_per_sm"], res.get("registers"), res.get("limited_by"), f"report:triton{version}")
    return best


@functools.lru_cache(maxsize=None)
def report_occupancy(kernel: str, constexprs: tuple = (), dtype: str | None = None, num_warps: int | None = None,
                     fallback: int = 1) -> Occupancy:
    """``find_occupancy`` on the default report, cached; ``Occupancy(fallback)`` when no variant matches."""
    hit = find_occupancy(_default_report(), kernel, dict(constexprs), dtype, num_warps)
    return hit or Occupancy(fallback, source="assumed")


def _occ(kernel: str, constexprs: dict, dtype: str | None, num_warps: int | None, occupancy) -> Occupancy:
    """An explicit occupancy (int or Occupancy) wins; else the report; else the int ``occupancy``'s
    default of the caller (passed as a tuple ("fallback", n))."""
    if isinstance(occupancy, Occupancy):
        return occupancy
    if isinstance(occupancy, int):
        return Occupancy(occupancy, source="given")
    fallback = occupancy[1] if isinstance(occupancy, tuple) else 1
    return report_occupancy(kernel, tuple(sorted(constexprs.items())), dtype, num_warps, fallback)


_DTYPE = {2: "bf16", 4: "fp32", 8: "fp64"}


# ----------------------------------------------------------------------------------------------
# SIFT SDDMM: out[m] = sum_t dY[t, rows[m]] X[t, cols[m]]   (T tokens, W is d_out x d_in, k entries)
# ----------------------------------------------------------------------------------------------
def _check_sddmm(T, d_out, d_in, k, elem_bytes):
    for name, v in (("T", T), ("d_out", d_out), ("d_in", d_in), ("k", k)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if elem_bytes not in (2, 4, 8):
        raise ValueError(f"elem_bytes: expected 2, 4 or 8, got {elem_bytes!r}")


def _transposes(T, d_out, d_in, e) -> Launch:
    # dY^T and X^T copies: read and write T (d_out + d_in) elements (torch copy kernels: floor only)
    return Launch("transpose dY, X", bytes=2 * T * (d_out + d_in) * e, unit="fp32")


def _issue_cycles(elems_per_thread: float, e: int) -> float:
    """Cycles one warp takes to issue an iteration alone on its scheduler: per element one FMA
    (two cycles for fp64: half-rate pipe) + two conversions for 16-bit inputs, plus 16-byte loads."""
    fma = 2 if e == 8 else 1
    cvt = 2 if e == 2 else 0
    loads = 2 * elems_per_thread * e / 16
    return elems_per_thread * (fma + cvt) + loads


def _sddmm_reduce(k, n_split, acc) -> Launch:
    # partial [n_split, k] read, e_pos (int64) read, out [k] written; 1 program per 1024 entries, one
    # dependent L2/HBM load per split (the adds are in split order)
    return Launch("sddmm reduce", bytes=n_split * k * acc + k * 8 + k * acc, unit="fp64" if acc == 8 else "fp32",
                  flops=(n_split - 1) * k, chain_cycles=LATENCY["hbm"], iterations=n_split,
                  programs=cdiv(k, 1024), occupancy=Occupancy(8, source="assumed"))


# The chunk kernel's configuration per element size, as kernels/sift.py's _sddmm_params has it:
# (BLOCK_E, BLOCK_T, N_SUB, num_warps, T_SLICE); tests/test_perf_model.py checks that the two agree.
SDDMM_PARAMS = {2: (128, 64, 8, 16, 128), 4: (128, 32, 8, 8, 64), 8: (64, 16, 16, 4, 32)}


# blocks/SM of _sddmm_chunk_kernel from the sm_90a compile check (triton 3.6 and 3.9: 16-bit ~92
# registers x 16 warps -> 1, fp32 80-100 x 8 -> 2, fp64 48 x 4 -> 10), used until the committed static
# report (bench/results/static-sm90a-*.json) has the kernel
_SDDMM_CHUNK_BLOCKS = {2: 1, 4: 2, 8: 10}


def sddmm_split(T: int, k: int, elem_bytes: int) -> tuple[int, int, int]:
    """(n_chunks, n_slices, T_SLICE) of the chunk kernel's grid (kernels/sift.py's sddmm_grid):
    chunks of N_SUB x BLOCK_E entries, token slices of T_SLICE."""
    block_e, _, n_sub, _, t_slice = SDDMM_PARAMS[elem_bytes]
    return cdiv(k, n_sub * block_e), cdiv(T, t_slice), t_slice


def sddmm_tile(k: int, d_out: int, d_in: int, chunk: int) -> tuple[int, int]:
    """(R, C) of the W tiles the plan orders the entries by (kernels/sift.py's sddmm_tile): ~chunk
    entries per tile at this density, sides multiples of 16."""
    density = k / (d_out * d_in)
    side = math.sqrt(chunk / density)
    tile_r = min(d_out, max(16, 16 * math.ceil(side / 16)))
    tile_c = min(d_in, max(16, 16 * math.ceil(chunk / (density * tile_r) / 16)))
    return tile_r, tile_c


def tile_chunk_lines(chunk: int, tile_r: int, tile_c: int, density: float) -> float:
    """Distinct operand lines (dY^T rows + X^T columns) a chunk of ``chunk`` consecutive entries
    gathers per T tile, for a uniform random mask, entries tile-major and row-major inside a tile.
    A chunk covers a band of rows of one tile, or two bands (fractions f, 1 - f, f uniform) of two
    tiles: rows R (1 - exp(-C p)); columns C (1 - exp(-f R p)) + C (1 - exp(-(1 - f) R p)), whose mean
    over f is C (2 - 2 (1 - exp(-R p)) / (R p)). At most 2 x chunk (no line shared)."""
    rp, cp = tile_r * density, tile_c * density
    rows = tile_r * (1 - math.exp(-cp))
    cols = tile_c * (2 - 2 * (1 - math.exp(-rp)) / rp) if rp > 0 else 0.0
    return min(2.0 * chunk, rows + cols)


def _sddmm_chunk_issue(block_e: int, block_t: int, t_slice: int, warps: int, e: int) -> float:
    """Warp instructions of one sub-block over one token slice: per element an FMA (2 issue slots for
    fp64) + 2 conversions for 16-bit inputs and its share of the 16-byte loads; then the row
    reduction of the [BLOCK_E, BLOCK_T] tile (a shuffle and an add per level, log2 of the threads
    sharing a row), the (row, col) loads and the store."""
    elems = block_e * t_slice / (32 * warps)                 # per thread, all tiles of the slice
    per_row = max(1, min(32, block_t * e // 16))             # threads sharing a row (16-byte vectors)
    rows_per_thread = max(1.0, block_e * block_t / (32 * warps) * e / 16)
    fma, cvt = (2 if e == 8 else 1), (2 if e == 2 else 0)
    return warps * (elems * (fma + cvt + 2 * e / 16) + rows_per_thread * 2 * math.log2(per_row) + 4)


def sddmm_sparse(T: int, d_out: int, d_in: int, k: int, elem_bytes: int, device: str | Device = "h100",
                 occupancy=None) -> Estimate:
    """The chunk design (kernels/sift.py): transposes, the chunk kernel (grid (cdiv(k, N_SUB x BLOCK_E),
    cdiv(T, T_SLICE)); a program sweeps its N_SUB sub-blocks one after the other, each gathering the
    slice's [BLOCK_E, BLOCK_T] tile pairs into a register tile, reduced and stored once), then the
    fixed-order reduce over the slices.

    HBM: transposes 2 T (d_out + d_in) e; operands read once, T (d_out + d_in) e (L2 catches the reuse
    between chunks); plan k 8 (row, col int32) per slice from L2, once from HBM; partial n_slices k 4
    written, then read by the reduce with e_pos k 8 and out k 4. L1: every entry gathers its two
    T-runs, k T 2 e, and reloads its (row, col) per slice. L2: the distinct lines of each chunk
    (``tile_chunk_lines``; L1 serves the repeats within the slice). FLOPs 2 k T on CUDA cores; issue
    ``_sddmm_chunk_issue``. Chain per sub-block: the index load, then the dependent gathers (two L2
    latencies), the issue of the sub-block (its warps two to a scheduler), the reduction's shuffles."""
    _check_sddmm(T, d_out, d_in, k, elem_bytes)
    _device(device)  # validates the name
    e, acc = elem_bytes, (8 if elem_bytes == 8 else 4)
    block_e, block_t, n_sub, warps, t_slice = SDDMM_PARAMS[e]
    chunk = n_sub * block_e
    n_chunks, n_slices, _ = sddmm_split(T, k, e)
    occ = _occ("_sddmm_chunk_kernel", {"BLOCK_E": block_e, "BLOCK_T": block_t, "N_SUB": n_sub, "T_SLICE": t_slice},
               _DTYPE[e], warps, occupancy if occupancy is not None else ("fallback", _SDDMM_CHUNK_BLOCKS[e]))
    tile_r, tile_c = sddmm_tile(k, d_out, d_in, chunk)
    lines = tile_chunk_lines(min(chunk, k), tile_r, tile_c, k / (d_out * d_in))
    sub_issue = _sddmm_chunk_issue(block_e, block_t, t_slice, warps, e)
    per_row = max(1, min(32, block_t * e // 16))
    kern = Launch(
        "sddmm chunk kernel", bytes=T * (d_out + d_in) * e + k * 8 + n_slices * k * acc,
        flops=2 * k * T, unit="fp64" if e == 8 else "fp32", l1_bytes=k * T * 2 * e + k * 8 * n_slices,
        l2_bytes=n_chunks * lines * T * e + k * 8 * n_slices, issue=n_chunks * n_sub * n_slices * sub_issue,
        chain_cycles=2 * LATENCY["l2"] + sub_issue / min(4, warps) + math.log2(per_row) * LATENCY["shuffle"],
        iterations=n_sub, programs=n_chunks * n_slices, occupancy=occ)
    return Estimate("sddmm sparse (chunks)", (_transposes(T, d_out, d_in, e), kern, _sddmm_reduce(k, n_slices, acc)),
                    note=f"grid {n_chunks}x{n_slices}, {n_sub} sub-blocks/program, {occ.blocks_per_sm} blocks/SM "
                         f"({occ.source}), tile {tile_r}x{tile_c}: {lines:.0f} L2 lines per {min(chunk, k)} entries")


def chunk_lines(block_e: int, group_rows: int, density: float) -> tuple[float, float]:
    """(distinct dY^T rows, distinct X^T columns) among BLOCK_E consecutive entries of the old plan
    order (row group, column, row), uniform random mask: a column holds c = group_rows x density
    entries of a group, so a chunk spans ~BLOCK_E / c + 1 columns; its rows are ~BLOCK_E draws from
    the group's rows."""
    c = max(1.0, group_rows * density)
    cols = min(float(block_e), block_e / c + 1)
    rows = group_rows * (1 - (1 - 1 / group_rows) ** block_e)
    return rows, cols


def sddmm_sparse_old(T: int, d_out: int, d_in: int, k: int, elem_bytes: int, device: str | Device = "h100",
                     occupancy=None, block_e: int = 128) -> Estimate:
    """The replaced design: one program per (row group of 512 rows, T slice), ~1 per SM, T outer /
    entries inner, partial[e] read-modified-written every T tile. L2: X^T gathers (distinct columns
    per chunk of BLOCK_E, ``chunk_lines``), the group's
    dY^T rows once per program d_out T e (assumed held in L1 across the group's entries), the RMW
    (T / BLOCK_T) k 8. Chain per inner step: index load -> dependent gather -> FMA + row reduction ->
    store (the partial load overlaps the gather)."""
    _check_sddmm(T, d_out, d_in, k, elem_bytes)
    dev = _device(device)
    e, acc = elem_bytes, (8 if elem_bytes == 8 else 4)
    block_t, warps = 128 // e, 4 if block_e <= 128 else 8
    n_groups = cdiv(d_out, 512)
    n_split = max(1, min(cdiv(dev.sms, n_groups), cdiv(T, block_t)))
    t_split = cdiv(cdiv(T, n_split), block_t) * block_t
    n_split = cdiv(T, t_split)
    k_group = cdiv(k, n_groups)  # uniform mask: entries per row group
    elems = block_e * block_t / (32 * warps)
    occ = _occ("_sddmm_partial_kernel", {"BLOCK_E": block_e, "BLOCK_T": block_t}, _DTYPE[e], warps,
               occupancy if occupancy is not None else ("fallback", 3))
    reduce_cycles = math.log2(max(2, block_t * e // 16)) * LATENCY["shuffle"]
    _, cols = chunk_lines(min(block_e, k), min(512, d_out), k / (d_out * d_in))
    kern = Launch(
        "sddmm partial kernel (old)", bytes=T * (d_out + d_in) * e + k * 8 + n_split * k * acc,
        flops=2 * k * T, unit="fp64" if e == 8 else "fp32", l1_bytes=k * T * 2 * e,
        l2_bytes=cdiv(k, block_e) * T * e * cols + d_out * T * e + cdiv(T, block_t) * k * 2 * acc,
        chain_cycles=2 * LATENCY["l2"] + _issue_cycles(elems, e) + reduce_cycles,
        iterations=cdiv(t_split, block_t) * cdiv(k_group, block_e), programs=n_groups * n_split, occupancy=occ)
    return Estimate("sddmm sparse (old: group x T-slice)",
                    (_transposes(T, d_out, d_in, e), kern, _sddmm_reduce(k, n_split, acc)),
                    note=f"grid {n_groups}x{n_split}, {kern.iterations} steps/program")


def gemm(name: str, m: int, n: int, kdim: int, elem_bytes: int, out_bytes: int, device: str | Device = "h100",
         tile=(128, 256)) -> Launch:
    """A cuBLAS-like GEMM [m, kdim] x [kdim, n]: bytes = operands once + output; tensor cores for 16-bit
    and fp64 (DMMA), CUDA cores for fp32 (torch's default: no TF32). Structural: tile waves, each tile
    at its SM's share of the efficient peak (what under-fills a small grid)."""
    dev = _device(device)
    unit = {2: "tensor16", 4: "fp32", 8: "tensor64"}[elem_bytes]
    tiles = cdiv(m, tile[0]) * cdiv(n, tile[1])
    eff = EFFICIENCY["tensor"] if unit.startswith("tensor") else EFFICIENCY["cuda"]
    tile_cycles = 2 * tile[0] * tile[1] * kdim / (dev.peak[unit] * eff / dev.sms) * dev.clock_hz
    return Launch(name, bytes=(m + n) * kdim * elem_bytes + m * n * out_bytes, flops=2 * m * n * kdim, unit=unit,
                  chain_cycles=tile_cycles, iterations=1, programs=tiles, occupancy=Occupancy(1, source="assumed"))


def sddmm_dense(T: int, d_out: int, d_in: int, k: int, elem_bytes: int, device: str | Device = "h100") -> Estimate:
    """dY^T X on the tensor cores into an fp32 (fp64) G, then the gather G[rows, cols]: k 32-byte sectors."""
    _check_sddmm(T, d_out, d_in, k, elem_bytes)
    acc = 8 if elem_bytes == 8 else 4
    rows = sddmm_dense_rows(d_out, d_in, elem_bytes)
    blocks = [min(rows, d_out - r0) for r0 in range(0, d_out, rows)]
    gemms = tuple(gemm(f"dense G[{i}] = dY^T X", m, d_in, T, elem_bytes, acc, device) for i, m in enumerate(blocks))
    gather = Launch("gather G[idx]", bytes=k * 32 + k * 8 + k * acc, unit="fp32")
    return Estimate(f"sddmm dense (dY^T X in {len(blocks)} row blocks + gather)", (*gemms, gather))


# kernels/sift.py's dense row blocks: fp32 (fp64) blocks within min(256 MiB, weight bytes / 2)
SDDMM_DENSE_BLOCK_BYTES = 1 << 28
SDDMM_DENSE_BLOCK_FRACTION = 2


def sddmm_dense_rows(d_out: int, d_in: int, elem_bytes: int) -> int:
    """Rows per dense block, as kernels/sift.py picks them: equal blocks, rounded up to 128 rows."""
    acc = 8 if elem_bytes == 8 else 4
    budget = max(1, min(SDDMM_DENSE_BLOCK_BYTES, d_out * d_in * elem_bytes // SDDMM_DENSE_BLOCK_FRACTION))
    n_blocks = cdiv(d_out * d_in * acc, budget)
    return min(d_out, cdiv(cdiv(d_out, n_blocks), 128) * 128)


# dense only when predicted at least this much faster: the sparse path needs no d_out x d_in buffer, and
# near the crossover the two predictions are within the model's error anyway
SDDMM_DENSE_MARGIN = 0.10


def sddmm_times(T: int, d_out: int, d_in: int, k: int, elem_bytes: int, device: str | Device = "h100") -> dict:
    """Predicted seconds of both designs on ``device``: {"sparse": s, "dense": s} (cached per shape
    for a device name; a Device object, e.g. a variant for a sensitivity study, is not cached)."""
    if isinstance(device, Device):
        return {"sparse": sddmm_sparse(T, d_out, d_in, k, elem_bytes, device).predicted_s(device),
                "dense": sddmm_dense(T, d_out, d_in, k, elem_bytes, device).predicted_s(device)}
    return {"sparse": _sddmm_sparse_s(T, d_out, d_in, k, elem_bytes, device),
            "dense": _sddmm_dense_s(T, d_out, d_in, k, elem_bytes, device)}


@functools.lru_cache(maxsize=4096)
def _sddmm_sparse_s(T, d_out, d_in, k, elem_bytes, device):
    return sddmm_sparse(T, d_out, d_in, k, elem_bytes, device).predicted_s(device)


@functools.lru_cache(maxsize=4096)
def _sddmm_dense_s(T, d_out, d_in, k, elem_bytes, device):
    return sddmm_dense(T, d_out, d_in, k, elem_bytes, device).predicted_s(device)


def sddmm_prefers_dense(T: int, d_out: int, d_in: int, k: int, elem_bytes: int, device: str | Device = "h100") -> bool:
    """True unless the sparse chunk design is predicted faster than dY^T X + gather by more than
    SDDMM_DENSE_MARGIN (sparse x (1 + margin) < dense): near the crossover the two predictions are
    within the model's error, and the dispatch must never be slower than dense (issue #11), so the
    tie goes to the dense GEMM, whose speed is cuBLAS's and well known."""
    t = sddmm_times(T, d_out, d_in, k, elem_bytes, device)
    return not t["sparse"] * (1 + SDDMM_DENSE_MARGIN) < t["dense"]


# ----------------------------------------------------------------------------------------------
# AoT: gather-add out = h + P[ids], table backward dP[r] = sum_{ids[n] = r} dY[n]
# ----------------------------------------------------------------------------------------------
def gather_add(n: int, d: int, elem_bytes: int, *, block_r: int = 1, block_d: int = 1024, warps: int = 4,
               occupancy=None) -> Estimate:
    """One pass: read h and the gathered table rows, write out (3 n d e) + ids n 8. Chain per
    program: the id load, then the dependent row load (both HBM), the add and the store."""
    occ = _occ("_gather_add_kernel", {"HAS_TASK": False, "BLOCK_R": block_r, "BLOCK_D": block_d},
               _DTYPE[elem_bytes], warps, occupancy if occupancy is not None else ("fallback", 16))
    x = Launch("gather-add", bytes=3 * n * d * elem_bytes + n * 8, unit="fp32", flops=n * d,
               chain_cycles=2 * LATENCY["hbm"], iterations=1, programs=cdiv(n, block_r) * cdiv(d, block_d),
               occupancy=occ)
    return Estimate("aot gather-add", (x,))


_SEGMENT_ROWS = 8  # rows loaded per step (kernels/aot.py: BLOCK_R of the segment sum)


def _segment_step_cycles() -> float:
    # plan indices (L2) -> the 8 gradient rows (HBM, in flight together) -> 8 dependent fp32 adds
    return LATENCY["l2"] + LATENCY["hbm"] + _SEGMENT_ROWS * 4


def _segment_occ(elem_bytes, block_d, warps, occupancy):
    return _occ("_segment_sum_kernel", {"BLOCK_R": _SEGMENT_ROWS, "BLOCK_D": block_d}, _DTYPE[elem_bytes], warps,
                occupancy if occupancy is not None else ("fallback", 8))


def _check_counts(counts):
    if not counts or any((not isinstance(c, int)) or c < 1 for c in counts):
        raise ValueError(f"counts: expected a non-empty list of positive ints (tokens per segment), got {counts!r:.80}")


def segment_sum_old(counts: list[int], d: int, elem_bytes: int, *, block_d: int = 1024, warps: int = 8,
                    occupancy=None) -> Estimate:
    """One program per (segment, column block) sums its rows in plan order, BLOCK_R = 8 at a time:
    a segment of c tokens is one chain of cdiv(c, 8) steps, so a heavy id is the critical path."""
    _check_counts(counts)
    n, u = sum(counts), len(counts)
    col_blocks = cdiv(d, block_d)
    steps = [cdiv(c, _SEGMENT_ROWS) for c in counts]
    step = _segment_step_cycles()
    x = Launch("segment sum (one program per segment)", bytes=n * d * elem_bytes + u * d * 4 + n * 8 + u * 48,
               flops=n * d, unit="fp32", chain_cycles=step, iterations=cdiv(sum(steps), u),
               programs=u * col_blocks, occupancy=_segment_occ(elem_bytes, block_d, warps, occupancy),
               critical_cycles=max(steps) * step)
    return Estimate("aot table backward (segment per program)", (x,),
                    note=f"{u} segments, longest {max(counts)} tokens")


SEGMENT_CHUNK = 256  # tokens per program of the chunked table backward (kernels/aot.py: segment_chunk on a GPU)


def segment_sum(counts: list[int], d: int, elem_bytes: int, *, chunk: int = SEGMENT_CHUNK, block_d: int = 1024, warps: int = 8,
                occupancy=None) -> Estimate:
    """The chunked design: a segment is cut into chunks of at most ``chunk`` rows, one program per
    (chunk, column block); a single-chunk segment writes its row, the others write fp32 partials
    [chunks, d] that a second pass adds per segment in chunk order (fixed order, no atomics)."""
    _check_counts(counts)
    n, u = sum(counts), len(counts)
    col_blocks = cdiv(d, block_d)
    chunks = [cdiv(c, chunk) for c in counts]
    multi = [m for m in chunks if m > 1]
    n_chunks, n_partial = sum(chunks), sum(multi)
    step = _segment_step_cycles()
    steps = [cdiv(min(c - i * chunk, chunk), _SEGMENT_ROWS) for c, m in zip(counts, chunks) for i in range(m)]
    occ = _segment_occ(elem_bytes, block_d, warps, occupancy)
    first = Launch("segment sum chunks", bytes=n * d * elem_bytes + (u - len(multi)) * d * 4 + n_partial * d * 4
                   + n * 8 + n_chunks * 48, flops=n * d, unit="fp32", chain_cycles=step,
                   iterations=cdiv(sum(steps), n_chunks), programs=n_chunks * col_blocks, occupancy=occ,
                   critical_cycles=max(steps) * step)
    launches = [first]
    if multi:
        # reads its chunks' partial rows (HBM / L2), 8 at a time, and writes the segment's row
        launches.append(Launch("segment sum: chunk partials", bytes=n_partial * d * 4 + len(multi) * d * 4,
                               flops=n_partial * d, unit="fp32", chain_cycles=LATENCY["hbm"] + _SEGMENT_ROWS * 4,
                               iterations=cdiv(sum(cdiv(m, _SEGMENT_ROWS) for m in multi), len(multi)),
                               programs=len(multi) * col_blocks, occupancy=occ,
                               critical_cycles=cdiv(max(multi), _SEGMENT_ROWS) * (LATENCY["hbm"] + 32)))
    return Estimate(f"aot table backward (chunks of {chunk})", tuple(launches),
                    note=f"{u} segments, {n_chunks} chunks, longest {max(counts)} tokens")


def uniform_counts(n: int, vocab: int) -> list[int]:
    """Expected segment sizes of n uniform ids over vocab: U = V (1 - (1 - 1/V)^n) segments of n / U."""
    u = max(1, min(n, round(vocab * (1 - (1 - 1 / vocab) ** n))))
    base, extra = divmod(n, u)
    return [base + 1] * extra + [base] * (u - extra)


def skewed_counts(n: int, vocab: int, heavy_fraction: float = 0.5) -> list[int]:
    """One id holding ``heavy_fraction`` of the n tokens, the rest uniform over the other ids."""
    heavy = max(1, int(n * heavy_fraction))
    return [heavy] + (uniform_counts(n - heavy, vocab - 1) if n > heavy else [])


# ----------------------------------------------------------------------------------------------
# WeGeFT generate: B = s W Phi^T [d_out, r], then W' = W + B Psi, one program per BM rows
# ----------------------------------------------------------------------------------------------
def _pipelined_step(dev: Device, step_bytes: float, flops: float, stages: int = 3) -> float:
    """Cycles of one software-pipelined K step of one program: loads (HBM latency spread over
    stages - 1 steps, or the SM's L2 -> SM bandwidth) overlap the tensor-core work (its SM share)."""
    mma = flops / (dev.peak["tensor16"] / dev.sms) * dev.clock_hz
    return max(LATENCY["hbm"] / max(1, stages - 1), step_bytes / dev.sm_bytes_per_cycle, mma)


def _rank_pad(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def generate_blocks(r: int, elem_bytes: int) -> tuple[int, int]:
    """(BM, BK = BN) of kernels/wegeft.py's generate kernels (_generate_blocks on a GPU)."""
    rp = _rank_pad(r)
    bm, bk = (32, 128) if rp <= 64 else (16, 64)
    return bm, (bk // 2 if elem_bytes > 2 else bk)


def wegeft_generate(d_out: int, d_in: int, r: int, elem_bytes: int, *, splits: int = 1,
                    device: str | Device = "h100", occupancy=None) -> Estimate:
    """HBM: W read once (pass 2 re-reads a program's rows from L2), W' and B written, Phi / Psi once.
    FLOPs 4 d_out d_in r (tensor cores). Grid cdiv(d_out, BM) x splits: with splits = 1 each program
    runs cdiv(d_in, BK) + cdiv(d_in, BN) pipelined steps, so d_out / BM < SMs leaves SMs idle."""
    dev = _device(device)
    e = elem_bytes
    rp = _rank_pad(r)
    bm, bk = generate_blocks(r, e)
    bn = bk
    row_blocks = cdiv(d_out, bm)
    occ = _occ("_generate_kernel", {"BM": bm, "RP": rp}, _DTYPE[e], 4,
               occupancy if occupancy is not None else ("fallback", 2))
    p1 = _pipelined_step(dev, bm * bk * e + bk * rp * e, 2 * bm * rp * bk)
    p2 = _pipelined_step(dev, 2 * bm * bn * e + rp * bn * e, 2 * bm * rp * bn)
    hbm = 2 * d_out * d_in * e + 2 * r * d_in * e + d_out * r * e
    flops = 4 * d_out * d_in * r
    if splits <= 1:
        x = Launch("generate (one pass per row block)", bytes=hbm, flops=flops, unit="tensor16",
                   chain_cycles=(p1 * cdiv(d_in, bk) + p2 * cdiv(d_in, bn)) / (cdiv(d_in, bk) + cdiv(d_in, bn)),
                   iterations=cdiv(d_in, bk) + cdiv(d_in, bn), programs=row_blocks, occupancy=occ)
        return Estimate("wegeft generate", (x,), note=f"{row_blocks} programs on {dev.sms} SMs")
    ws = splits * d_out * rp * 4
    w_again = d_out * d_in * e  # the finish pass re-reads W: from L2 when W fits in half of it
    hbm_again, l2_again = (0, w_again) if w_again <= dev.l2_bytes / 2 else (w_again, 0)
    a = Launch("generate split-K pass", bytes=d_out * d_in * e + r * d_in * e + ws, flops=flops // 2, unit="tensor16",
               chain_cycles=p1, iterations=cdiv(cdiv(d_in, bk), splits), programs=row_blocks * splits, occupancy=occ)
    b = Launch("generate finish (sum splits, merge)", bytes=ws + hbm_again + d_out * d_in * e + r * d_in * e,
               l2_bytes=splits * ws + l2_again,
               flops=flops // 2, unit="tensor16", chain_cycles=p2, iterations=cdiv(cdiv(d_in, bn), splits),
               tail_cycles=splits * LATENCY["l2"], programs=row_blocks * splits, occupancy=occ)
    return Estimate(f"wegeft generate (split {splits})", (a, b), note=f"{row_blocks * splits} programs on {dev.sms} SMs")


# ----------------------------------------------------------------------------------------------
# simpler floors: top-k, elementwise (scatter, AdamW step), anything given as bytes / flops
# ----------------------------------------------------------------------------------------------
HOST_SYNC_S = 10e-6  # one device -> host read (top-k reads its counters once)


def topk(numel: int, k: int, elem_bytes: int, *, radix_passes: int | None = None) -> Estimate:
    """Sample, compact (the one pass over the scores: numel e read, ~1.1 k candidates written with
    their offsets), radix passes over the candidates (11-bit digits), count, write k int64."""
    cand = min(numel, int(1.1 * k) + 1)
    passes = radix_passes or cdiv(elem_bytes * 8 - 1, 11)
    launches = [Launch("topk compact", bytes=numel * elem_bytes + cand * (elem_bytes + 8), unit="fp32")]
    launches += [Launch(f"topk radix pass {i + 1}", bytes=cand * elem_bytes, unit="fp32") for i in range(passes)]
    launches += [Launch("topk count + write", bytes=2 * cand * elem_bytes + cand * 8 + k * 8, unit="fp32"),
                 Launch("host sync", chain_cycles=HOST_SYNC_S * 1.98e9, iterations=1, programs=1,
                        occupancy=Occupancy(1, source="assumed"))]
    return Estimate("sift top-k", tuple(launches))


def elementwise(op: str, k: int, bytes_per_entry: float, flops_per_entry: float = 0, *, block: int = 1024,
                dependent_loads: int = 2) -> Estimate:
    """k independent entries, ``bytes_per_entry`` of HBM each (indices, values, a scattered write:
    a 32-byte sector per scattered entry is the caller's to count); chain: dependent_loads HBM loads."""
    x = Launch(op, bytes=k * bytes_per_entry, flops=k * flops_per_entry, unit="fp32",
               chain_cycles=dependent_loads * LATENCY["hbm"], iterations=1, programs=cdiv(k, block),
               occupancy=Occupancy(8, source="assumed"))
    return Estimate(op, (x,))


def floor_only(op: str, bytes: float | None, flops: float | None, unit: str = "tensor16") -> Estimate:
    """An op known only by its minimum bytes and flops (one launch, no structure)."""
    return Estimate(op, (Launch(op, bytes=bytes or 0.0, flops=flops or 0.0, unit=unit),),
                    note="floor only (bytes / flops of the case)")


def cka(T: int, d: int, elem_bytes: int) -> Estimate:
    """Linear CKA of X, Y [T, d]: the Gram-free feature form reads X and Y once and does three
    d x d cross products (3 x 2 T d^2 flops) on the tensor cores (16-bit) or CUDA cores (fp32)."""
    unit = {2: "tensor16", 4: "fp32", 8: "fp64"}[elem_bytes]
    return floor_only("cka linear", 2 * T * d * elem_bytes, 6 * T * d * d, unit)


# ----------------------------------------------------------------------------------------------
# design comparisons (the generated tables of docs/perf-model.md)
# ----------------------------------------------------------------------------------------------
def generate_splits(d_out: int, d_in: int, r: int, elem_bytes: int = 2, sms: int = 132) -> int:
    """The split count kernels/wegeft.py's generate_splits picks (replicated: no torch here)."""
    rp = _rank_pad(r)
    bm, bk = generate_blocks(r, elem_bytes)
    row_blocks = cdiv(d_out, bm)
    if row_blocks == 0 or 3 * row_blocks > sms:  # the programs already cover a third of the SMs
        return 1
    return max(1, min(cdiv(d_in, bk), sms // row_blocks, math.isqrt(d_in // rp)))


def sddmm_crossover_density(T: int, d_out: int, d_in: int, elem_bytes: int,
                            device: str | Device = "h100") -> float | None:
    """The lowest density at which ``sddmm_prefers_dense`` holds (bisection on k; None if never)."""
    numel = d_out * d_in
    if not sddmm_prefers_dense(T, d_out, d_in, numel, elem_bytes, device):
        return None
    lo, hi = 1, numel
    while hi - lo > max(1, numel // 100000):
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if sddmm_prefers_dense(T, d_out, d_in, mid, elem_bytes, device) else (mid, hi)
    return hi / numel


def _md(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
           ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _u(s: float) -> str:
    us = s * 1e6
    return f"{us:.0f}" if us >= 100 else f"{us:.1f}"


def design_tables_markdown() -> str:
    """The docs' comparison tables: SDDMM new sparse vs dense vs old, the dispatch crossover, AoT
    skewed vs uniform ids, WeGeFT generate at small d_out. Pure arithmetic."""
    D = 4096
    out = ["### SDDMM, 4096 x 4096 bf16 (predicted us, H100 / H200)", ""]
    rows = []
    for T in (4096, 16384):
        for p in (0.005, 0.01, 0.02, 0.05):
            k = min(int(p * D * D) + 1, D * D)
            new, dense, old = (f(T, D, D, k, 2) for f in (sddmm_sparse, sddmm_dense, sddmm_sparse_old))
            h1 = [x.predicted_s("h100") for x in (new, dense, old)]
            h2 = [x.predicted_s("h200") for x in (new, dense, old)]
            rows.append([T, f"{100 * p:g}%", k, f"{_u(h1[0])} / {_u(h2[0])}", f"{_u(h1[1])} / {_u(h2[1])}",
                         f"{_u(h1[2])} / {_u(h2[2])}", f"{h1[0] / h1[1]:.2f} / {h2[0] / h2[1]:.2f}",
                         f"{h1[2] / h1[0]:.2f} / {h2[2] / h2[0]:.2f}",
                         "dense" if sddmm_prefers_dense(T, D, D, k, 2) else "sparse",
                         new.bound("h100"), old.bound("h100")])
    out += _md(["T", "density", "k", "new sparse", "dense", "old sparse", "new / dense", "old / new", "auto (H100)",
                "new: bound", "old: bound"], rows)
    out += ["", "### SDDMM dispatch crossover (lowest density where auto takes dense, H100 / H200)", ""]
    rows = []
    for e, name in ((2, "bf16"), (4, "fp32"), (8, "fp64")):
        for T in (1024, 4096, 16384):
            c = [sddmm_crossover_density(T, D, D, e, dev) for dev in ("h100", "h200")]
            rows.append([name, T, " / ".join(f"{100 * x:.2f}%" if x else "never" for x in c)])
    out += _md(["dtype", "T", "crossover density"], rows)
    out += ["", "Sensitivity of the bf16 crossover (T = 4096, H100) to the assumed L2 bandwidth:", ""]
    rows = []
    h100 = DEVICES["h100"]
    for factor in (1.5, 2.5, 3.5):
        dev = dataclasses.replace(h100, l2_bytes_per_s=factor * h100.hbm_bytes_per_s)
        c = sddmm_crossover_density(4096, D, D, 2, dev)
        rows.append([f"{factor:g} x HBM = {factor * h100.hbm_bytes_per_s / 1e12:.1f} TB/s",
                     f"{100 * c:.2f}%" if c else "never"])
    out += _md(["L2 bandwidth", "crossover density"], rows)
    out += ["", "### AoT table backward, 16384 tokens x 4096 bf16, V = 32000 (predicted us, H100)", ""]
    rows = []
    for label, counts in (("uniform ids", uniform_counts(16384, 32000)),
                          ("one id = 50% of tokens", skewed_counts(16384, 32000, 0.5))):
        old, new = segment_sum_old(counts, D, 2), segment_sum(counts, D, 2)
        rows.append([label, len(counts), max(counts), _u(old.floor_s()), _u(old.predicted_s()), old.bound(),
                     _u(new.predicted_s()), new.bound(), f"{old.predicted_s() / new.predicted_s():.2f}"])
    out += _md(["ids", "segments", "longest", "floor", "one program per segment", "bound", "chunks of 256", "bound",
                "old / chunked"], rows)
    g = gather_add(16384, D, 2)
    out += ["", f"Gather-add 16384 x 4096 bf16: floor {_u(g.floor_s())} us, predicted {_u(g.predicted_s())} us "
                f"(H100; {g.bound()}).", ""]
    out += ["### WeGeFT generate, d_in = 4096, r = 64, bf16 (predicted us, H100)", ""]
    rows = []
    for d_out in (512, 1024, 2048, 4096, 11008):
        one = wegeft_generate(d_out, D, 64, 2)
        s = generate_splits(d_out, D, 64)
        split = wegeft_generate(d_out, D, 64, 2, splits=s) if s > 1 else one
        rows.append([d_out, cdiv(d_out, 32), _u(one.floor_s()), _u(one.structural_s()), _u(one.predicted_s()),
                     f"{one.predicted_s() / one.floor_s():.1f}x", s, _u(split.predicted_s())])
    out += _md(["d_out", "programs (BM = 32)", "floor", "structural", "predicted (no split)", "predicted / floor",
                "splits", "predicted (split)"], rows)
    return "\n".join(out)
