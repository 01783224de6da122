"""Where bench output goes (no torch import: bench.gpu_run parses its arguments before importing torch).

Every run writes outside the source tree by default: ``--out DIR``, else $PEFTOPS_BENCH_OUT, else
${XDG_CACHE_HOME:-~/.cache}/peftops/bench/. The repository's bench/results/ holds only committed, measured
GPU results and the static sm_90a reports; a run writes there only when named with ``--out bench/results``
and only from a CUDA GPU (not the CPU, not the Triton interpreter).
"""
from __future__ import annotations

import os

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_out_dir(sub: str = "") -> str:
    """$PEFTOPS_BENCH_OUT if set, else ${XDG_CACHE_HOME:-~/.cache}/peftops/bench (``sub``: a folder in it)."""
    base = os.environ.get("PEFTOPS_BENCH_OUT") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "peftops", "bench")
    return os.path.abspath(os.path.join(base, sub) if sub else base)


def is_results_dir(path: str) -> bool:
    return os.path.abspath(path).rstrip(os.sep) == RESULTS_DIR


def resolve_out_dir(out_dir: str | None, *, official: bool) -> str:
    """``out_dir``, or ``default_out_dir()`` when None. bench/results/ only takes ``official`` figures (a CUDA
    GPU, not the interpreter): anything else asked to go there goes to the default instead, with a note."""
    if out_dir is None:
        return default_out_dir()
    if is_results_dir(out_dir) and not official:
        print(f"note: bench/results/ holds only measured GPU results; writing to {default_out_dir()} instead")
        return default_out_dir()
    return out_dir
