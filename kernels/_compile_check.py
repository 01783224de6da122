"""Compile every kernel's ``SM90_COMPILE_SPECS`` to a Hopper cubin, no GPU needed.

The interpreter accepts code that the compiler rejects; this catches that on CPU-only CI.
Run as ``TRITON_INTERPRET=0 python -m peftops.kernels._compile_check [family ...]``.
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


def compile_spec(spec, capability: int = 90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_fn(spec.kernel)
    src = ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    families = argv or FAMILIES
    failed = 0
    count = 0
    for fam in families:
        try:
            mod = importlib.import_module(f"peftops.kernels.{fam}")
        except ModuleNotFoundError:
            print(f"skip {fam}: no module")
            continue
        for spec in getattr(mod, "SM90_COMPILE_SPECS", []):
            count += 1
            try:
                k = compile_spec(spec)
                print(f"ok   {fam}.{spec.name}: {len(k.asm['cubin'])} B cubin, {k.metadata.shared} B smem")
            except Exception:
                failed += 1
                print(f"FAIL {fam}.{spec.name}")
                traceback.print_exc()
    print(f"{count - failed} compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
