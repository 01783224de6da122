"""Compile every kernel's ``SM90_COMPILE_SPECS`` to a Hopper cubin, no GPU needed.

The interpreter accepts code that the compiler rejects; this catches that on CPU-only CI.
Run as ``TRITON_INTERPRET=0 python -m peftops.kernels._compile_check [family ...]``.

Each spec is compiled twice: as given (no alignment known: scalar loads, the variant odd shapes get) and
``aligned``: every pointer and every integer argument marked divisible by 16, as the JIT specializes
them for 16-byte-aligned tensors and sizes/strides that are multiples of 16 (d = 4096 and the like).
That variant takes different code paths in the compiler (vectorized loads, pipelined tl.dot loops),
so a kernel that only fails there would otherwise first fail on a GPU.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback

FAMILIES = ["sift", "aot", "wegeft", "cka"]


def _jit_fn(kernel):
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):  # autotune / heuristics wrappers keep it in .fn
        kernel = kernel.fn
    return kernel


def aligned_attrs(fn, signature: dict) -> dict:
    """tt.divisibility 16 on every pointer and integer argument (the JIT's "D" specialization)."""
    out = {}
    for name, ty in signature.items():
        if ty.startswith("*") or ty in ("i32", "i64", "u32", "u64"):
            out[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return out


def compile_spec(spec, capability: int = 90, aligned: bool = False):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_fn(spec.kernel)
    attrs = aligned_attrs(fn, spec.signature) if aligned else None
    src = ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def _compile_one(job: tuple[str, int, bool]) -> tuple[str, bool, str]:
    """(family, spec index, aligned) -> (label, ok, message); runs in a worker process."""
    fam, index, aligned = job
    spec = importlib.import_module(f"peftops.kernels.{fam}").SM90_COMPILE_SPECS[index]
    label = f"{fam}.{spec.name}{' [aligned16]' if aligned else ''}"
    try:
        k = compile_spec(spec, aligned=aligned)
        return label, True, f"{len(k.asm['cubin'])} B cubin, {k.metadata.shared} B smem"
    except Exception:
        return label, False, traceback.format_exc()


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    families = argv or FAMILIES
    jobs = []
    for fam in families:
        try:
            mod = importlib.import_module(f"peftops.kernels.{fam}")
        except ModuleNotFoundError:
            print(f"skip {fam}: no module")
            continue
        jobs += [(fam, i, aligned) for i in range(len(getattr(mod, "SM90_COMPILE_SPECS", [])))
                 for aligned in (False, True)]
    # compiling is single-threaded CPU work: one process per core
    workers = max(1, min(len(jobs), int(os.environ.get("PEFTOPS_COMPILE_JOBS", os.cpu_count() or 1))))
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_compile_one, jobs, chunksize=1)
    else:
        results = [_compile_one(j) for j in jobs]
    failed = 0
    for label, ok, msg in results:
        if ok:
            print(f"ok   {label}: {msg}")
        else:
            failed += 1
            print(f"FAIL {label}\n{msg}")
    print(f"{len(results) - failed} compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
