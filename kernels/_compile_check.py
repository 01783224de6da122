"""Compile every Triton kernel variant that runs, for Hopper (sm_90a), without a GPU; report its
resources (registers, spills, shared memory, occupancy) and gate on them.

    TRITON_INTERPRET=0 python -m peftops.kernels._compile_check [family ...]
        [--json PATH] [--markdown PATH] [--jobs N] [--list]

What "runs" means: kernels/_variants.py drives each family's public ops on CPU tensors with the
launches captured instead of executed (``capturing_launches``: CPU tensors take the Triton path,
and each kernel object's ``run`` records its arguments). Every recorded launch is expanded as the
runtime would expand it: an autotuned kernel into every config its pruning keeps (with the
config's own warps and stages), heuristics applied, then triton's own binder computes the JIT's
specialization (16-divisible pointers and integers, integers equal to 1 as constexpr) and the
compile options (warps, stages, FP fusion). Identical variants are compiled once.

Exit status: 0 all compiled and the gate holds; 1 gate failures; 2 bad arguments or environment;
3 ``--budget-s`` ran out (or Ctrl-C) first: the report written is partial.

Gate (exit 1): a variant that fails to compile; ptxas spill stores/loads or more than 227 KiB of
shared memory, unless listed with its reason in ``_variants.ACCEPTED_RESOURCE_EXCEPTIONS`` (or, for
what only one triton's ptxas shows, ``ACCEPTED_ON_TRITON``);
a launch that leaves ``enable_fp_fusion`` to triton's default (which triton 3.10 flips); a kernel in a
family module that no driver launches (so a new kernel cannot be forgotten).

Resources come from the ptxas run triton itself makes (its log, ``TRITON_DUMP_PTXAS_LOG``), so the
flags are exactly triton's. Occupancy is the sm_90 limit from registers, shared memory, warps and
blocks per SM (no GPU query).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import sys
import time
import traceback

FAMILIES = ["sift", "aot", "wegeft", "cka"]

# sm_90 (H100 / H200) per-SM limits (CUDA occupancy calculator figures)
SM90 = dict(regs_per_sm=65536, reg_alloc_unit=256, max_warps=64, max_blocks=32,
            smem_per_sm=233472, smem_per_block=232448, smem_reserved_per_block=1024)


# ----------------------------------------------------------------------------------------------
# capture: what the launchers launch
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    family: str
    jit_fn: object      # the innermost JITFunction
    args: tuple
    kwargs: dict        # constexprs and launch options, after autotune config / heuristics expansion
    fusion_explicit: bool


def _kernel_types():
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    return JITFunction, Autotuner, Heuristics


def entry_points(module) -> dict[int, tuple[str, object]]:
    """The launchable kernel objects of a family module: JIT functions, autotuners and heuristics
    wrappers at module level (or in a module-level dict), minus the JIT functions that another
    object wraps or another kernel calls (device helpers). id(obj) -> (name, obj)."""
    JITFunction, Autotuner, Heuristics = _kernel_types()
    found = {}
    for name, value in vars(module).items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, obj in items:
            if isinstance(obj, (JITFunction, Autotuner, Heuristics)):
                found[id(obj)] = (name if key is None else f"{name}[{key}]", obj)
    wrapped = set()
    for _, obj in found.values():
        inner = obj
        while isinstance(inner, (Autotuner, Heuristics)):
            inner = inner.fn
            wrapped.add(id(inner))
    # every kernel's source, the ones under an autotuner / heuristics too: a helper that only an
    # autotuned kernel calls is a helper, not a kernel nobody launches
    jit_src = list({id(fn): fn.src for fn in (_innermost(obj) for _, obj in found.values())}.values())
    out = {}
    for i, (name, obj) in found.items():
        if i in wrapped:
            continue
        if isinstance(obj, JITFunction):
            called = re.compile(rf"\b{re.escape(obj.__name__)}\s*\(")
            if any(called.search(src) and src is not obj.src for src in jit_src):
                continue
        out[i] = (name, obj)
    return out


def _innermost(obj):
    JITFunction, _, _ = _kernel_types()
    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def _expand(obj, args: tuple, kwargs: dict) -> list[tuple[object, dict]]:
    """[(JITFunction, kwargs)] the runtime would compile for one launch of ``obj``."""
    JITFunction, Autotuner, Heuristics = _kernel_types()
    if isinstance(obj, Autotuner):
        obj.nargs = dict(zip(obj.arg_names, args))
        try:
            configs = obj.prune_configs(kwargs)
        finally:
            obj.nargs = None
        out = []
        for cfg in configs:
            out += _expand(obj.fn, args, {**kwargs, **cfg.all_kwargs()})
        return out
    if isinstance(obj, Heuristics):
        kwargs = dict(kwargs)
        for name, rule in obj.values.items():
            kwargs[name] = rule({**dict(zip(obj.arg_names, args)), **kwargs})
        return _expand(obj.fn, args, kwargs)
    assert isinstance(obj, JITFunction), type(obj)
    return [(obj, kwargs)]


def capture(families: list[str]) -> tuple[list[Launch], dict[str, list[str]], int]:
    """Run the drivers with launches recorded. Returns (launches, never-launched kernels per
    family, refused argument combinations)."""
    import torch

    from . import _variants
    from ._dispatch import capturing_launches

    launches: list[Launch] = []
    missing: dict[str, list[str]] = {}
    refusals = _variants.Refusals()
    torch.manual_seed(0)
    for fam in families:
        module = importlib.import_module(f"peftops.kernels.{fam}")
        points = entry_points(module)
        seen: set[int] = set()

        def recorder(obj, *args, grid=None, warmup=False, **kwargs):
            seen.add(id(obj))  # noqa: B023 - recorder is installed and removed within this iteration
            explicit = "enable_fp_fusion" in kwargs
            for fn, kw in _expand(obj, args, kwargs):
                launches.append(Launch(fam, fn, args, kw, explicit))  # noqa: B023 - as above
                if callable(grid):  # as the JIT does; some launchers read back what their grid saw
                    grid({**dict(zip(fn.arg_names, args)), **kw})
            for a in args:  # outputs stay deterministic for host code that reads them (top-k's counters)
                if isinstance(a, torch.Tensor):
                    a.zero_()
            return None

        for _, obj in points.values():
            obj.run = lambda *a, _obj=obj, **kw: recorder(_obj, *a, **kw)
        try:
            with capturing_launches():
                _variants.DRIVERS[fam](refusals)
        finally:
            for _, obj in points.values():
                del obj.run
        never = sorted(name for i, (name, _) in points.items() if i not in seen)
        if never:
            missing[fam] = never
    return launches, missing, refusals.count


# ----------------------------------------------------------------------------------------------
# variants: what the JIT compiles for each launch
# ----------------------------------------------------------------------------------------------
def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


@dataclasses.dataclass
class Variant:
    family: str
    kernel: str
    signature: dict          # arg name -> triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict         # (arg index,) -> value (constexpr params and integers specialized to 1)
    attrs: dict              # (arg index,) -> [["tt.divisibility", 16]]
    options: dict            # launch options: num_warps, num_stages, enable_fp_fusion, ...
    fusion_explicit: bool
    launches: int = 1

    def key(self) -> str:
        return repr((self.kernel, sorted(self.signature.items()), sorted((k, repr(v)) for k, v in self.constexprs.items()),
                     sorted((k, repr(v)) for k, v in self.attrs.items()), sorted(self.options.items())))

    def describe(self) -> str:
        """e.g. 'bf16 | BLOCK_E=64 | aligned16, =1: stride_x | w4 s3'."""
        names = list(self.signature)
        ptr_types = sorted({t[1:] for t in self.signature.values() if t.startswith("*")})
        consts = []
        ones = []
        for (i,), v in sorted(self.constexprs.items()):
            name = names[i]
            if name.isupper() or not isinstance(v, int) or v != 1:
                consts.append(f"{name}={_short(v)}")
            else:
                ones.append(name)
        types = list(self.signature.values())
        ptrs = [i for i, t in enumerate(types) if t.startswith("*")]
        unaligned = [names[i] for i in ptrs if not self.attrs.get((i,))]
        align = "aligned16" if not unaligned else "unaligned: " + ",".join(unaligned)
        ints16 = [names[i] for i, t in enumerate(types) if t[0] in "iu" and self.attrs.get((i,))]
        parts = ["/".join(ptr_types), " ".join(consts), align + (f"; %16: {','.join(ints16)}" if ints16 else "")]
        if ones:
            parts.append("=1: " + ",".join(ones))
        parts.append(f"w{self.options.get('num_warps', 4)} s{self.options.get('num_stages', 3)}"
                     f" fma={'on' if self.options.get('enable_fp_fusion', True) else 'off'}")
        return " | ".join(p for p in parts if p)


def _short(v) -> str:
    return str(v).replace("triton.language.", "")


def to_variants(launches: list[Launch]) -> list[Variant]:
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(_target())
    binders: dict[int, object] = {}
    variants: dict[str, Variant] = {}
    for ln in launches:
        fn = ln.jit_fn
        if id(fn) not in binders:
            binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binders[id(fn)](*ln.args, **ln.kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, ln.kwargs, bound, spec, opts)
        opt_names = set(options.__dict__)
        launch_opts = {k: v for k, v in ln.kwargs.items() if k in opt_names}
        v = Variant(ln.family, fn.__name__, signature, constexprs, {k: a for k, a in attrs.items() if a},
                    launch_opts, ln.fusion_explicit)
        key = v.key()
        if key in variants:
            variants[key].launches += 1
            variants[key].fusion_explicit &= ln.fusion_explicit
        else:
            variants[key] = v
    return sorted(variants.values(), key=lambda v: (v.family, v.kernel, v.describe()))


# ----------------------------------------------------------------------------------------------
# compile + resources (one worker process per core; each captures once, compiles its share)
# ----------------------------------------------------------------------------------------------
_WORKER_VARIANTS: dict[tuple, list[Variant]] = {}
_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}


def _variants_for(families: tuple) -> list[Variant]:
    if families not in _WORKER_VARIANTS:
        launches, _, _ = capture(list(families))
        _WORKER_VARIANTS[families] = to_variants(launches)
    return _WORKER_VARIANTS[families]


def occupancy(registers: int, smem: int, num_warps: int) -> dict:
    """Resident warps per SM on sm_90 and what limits them."""
    regs_per_warp = -(-max(registers, 1) * 32 // SM90["reg_alloc_unit"]) * SM90["reg_alloc_unit"]
    by_regs = (SM90["regs_per_sm"] // regs_per_warp) // num_warps
    by_warps = SM90["max_warps"] // num_warps
    by_smem = SM90["smem_per_sm"] // (smem + SM90["smem_reserved_per_block"])
    # on a tie the hardware's fixed limits are named first: nothing in the kernel would lift them
    limits = {"warps": by_warps, "blocks": SM90["max_blocks"], "registers": by_regs, "shared memory": by_smem}
    blocks = min(limits.values())
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps, "limited_by": min(limits, key=limits.get)}


def compile_variant(v: Variant) -> dict:
    """Compile one variant to a cubin for sm_90a; its resources from triton's own ptxas log."""
    import triton
    from triton.compiler import ASTSource

    fn = None
    module = importlib.import_module(f"peftops.kernels.{v.family}")
    for _, obj in entry_points(module).values():
        inner = _innermost(obj)
        if inner.__name__ == v.kernel:
            fn = inner
            break
    src = ASTSource(fn=fn, signature=v.signature, constexprs=v.constexprs, attrs=v.attrs)
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        k = triton.compile(src, target=_target(), options=dict(v.options))
    res = {"compile_s": round(time.perf_counter() - t0, 2), "cubin_bytes": len(k.asm["cubin"])}
    text = log.getvalue()
    for name, rx in _PTXAS_RE.items():
        m = rx.search(text)
        res[name] = int(m.group(1)) if m else 0
    if not _PTXAS_RE["registers"].search(text):
        raise RuntimeError("no ptxas resource line in triton's ptxas log (TRITON_DUMP_PTXAS_LOG not honoured?)")
    res["smem_bytes"] = int(k.metadata.shared) + res.pop("static_smem")
    res.update(occupancy(res["registers"], res["smem_bytes"], int(v.options.get("num_warps", 4))))
    return res


def _worker_init():
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cached cubin would skip ptxas and its log
    os.environ["TRITON_INTERPRET"] = "0"


def _compile_job(job: tuple[tuple, int]) -> tuple[int, dict | None, str]:
    families, index = job
    try:
        v = _variants_for(families)[index]
        return index, compile_variant(v), ""
    except Exception:
        return index, None, traceback.format_exc()


# ----------------------------------------------------------------------------------------------
# gate + report
# ----------------------------------------------------------------------------------------------
def _accepted(v: Variant) -> str | None:
    import triton

    from ._variants import ACCEPTED_ON_TRITON, ACCEPTED_RESOURCE_EXCEPTIONS

    label = v.describe()
    version = ".".join(triton.__version__.split(".")[:2])
    listed = {**ACCEPTED_RESOURCE_EXCEPTIONS, **ACCEPTED_ON_TRITON.get(version, {})}
    for (kernel, sub), reason in listed.items():
        if kernel == v.kernel and sub in label:
            return reason
    return None


def gate(variants: list[Variant], results: dict[int, dict], errors: dict[int, str],
         missing: dict[str, list[str]]) -> list[str]:
    """Every reason the check fails, one line each."""
    problems = []
    for fam, names in missing.items():
        problems.append(f"{fam}: never launched by kernels/_variants.py's driver: {', '.join(names)}")
    for i, v in enumerate(variants):
        label = f"{v.family}.{v.kernel} [{v.describe()}]"
        if i in errors:
            problems.append(f"{label}: compile failed: {errors[i].strip().splitlines()[-1]}")
            continue
        if not v.fusion_explicit:
            problems.append(f"{label}: launched without enable_fp_fusion= (triton's default flips in 3.10)")
        r = results.get(i)
        if r is None:
            continue
        bad = []
        if r["spill_store_bytes"] or r["spill_load_bytes"]:
            bad.append(f"spills {r['spill_store_bytes']} B stores / {r['spill_load_bytes']} B loads")
        if r["smem_bytes"] > SM90["smem_per_block"]:
            bad.append(f"{r['smem_bytes']} B shared memory > {SM90['smem_per_block']} B")
        if bad:
            reason = _accepted(v)
            if reason:
                r["accepted"] = reason
            else:
                problems.append(f"{label}: {'; '.join(bad)}")
    return problems


def environment() -> dict:
    import triton

    from ._dispatch import HAS_TRITON

    env = {"triton": triton.__version__, "target": "sm_90a", "has_triton": HAS_TRITON}
    try:
        import torch

        env["torch"] = torch.__version__
    except Exception:  # pragma: no cover
        pass
    return env


def markdown(report: dict) -> str:
    lines = [f"# sm_90a static resource report (triton {report['env']['triton']})", "",
             f"{report['summary']['variants']} variants compiled from {report['summary']['launches']} captured "
             f"launches ({report['summary']['refused']} refused argument combinations skipped); "
             f"{report['summary']['failed']} failed, {report['summary']['spilling']} spill, "
             f"{report['summary']['not_compiled']} not compiled (budget), "
             f"{report['summary']['accepted']} accepted exceptions. Warps/SM: resident warps on one SM "
             f"(of 64) from registers, shared memory and warps per block.", ""]
    for fam in report["families"]:
        rows = [v for v in report["variants"] if v["family"] == fam]
        lines += [f"## {fam}", "", "| kernel | variant | regs | spill B (st/ld) | smem KiB | warps/SM (limit) |",
                  "|---|---|---:|---:|---:|---|"]
        for v in rows:
            r = v.get("resources")
            if r is None:
                lines.append(f"| {v['kernel']} | {v['variant']} | FAILED | | | |")
                continue
            spill = f"{r['spill_store_bytes']}/{r['spill_load_bytes']}"
            if r.get("accepted"):
                spill += f" (accepted: {r['accepted']})"
            lines.append(f"| {v['kernel']} | {v['variant']} | {r['registers']} | {spill} | "
                         f"{r['smem_bytes'] / 1024:.1f} | {r['warps_per_sm']} ({r['limited_by']}) |")
        lines.append("")
    if report["problems"]:
        lines += ["## Gate failures", ""] + [f"- {p}" for p in report["problems"]] + [""]
    return "\n".join(lines)


def ptxas_problem(path: str | None = None) -> str | None:
    """None when triton can find a ptxas (its bundled one, or TRITON_PTXAS_PATH), else why not."""
    import triton

    path = path or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if os.path.exists(path) or os.environ.get("TRITON_PTXAS_PATH"):
        return None
    return (f"this triton ({triton.__version__}) has no bundled ptxas at {path}; install a triton wheel for "
            "Linux x86_64/aarch64 (they bundle it) or set TRITON_PTXAS_PATH to a CUDA 12.8+ ptxas")


def _parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m peftops.kernels._compile_check",
                                 description="Compile every kernel variant that runs for sm_90a; report and gate resources.")
    ap.add_argument("families", nargs="*", help=f"kernel families (default: all of {FAMILIES})")
    ap.add_argument("--json", help="write the full report (every variant, its resources) as JSON here")
    ap.add_argument("--markdown", help="write the report as a markdown table here")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("PEFTOPS_COMPILE_JOBS", os.cpu_count() or 1)),
                    help="compile worker processes (default: one per core)")
    ap.add_argument("--list", action="store_true", help="list the variants without compiling")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop compiling after this many seconds and write a partial report (exit 3)")
    return ap.parse_args(argv)


def _usage_problem(args) -> str | None:
    """Why this run cannot start (None: it can)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "unset TRITON_INTERPRET (or set it to 0): the interpreter compiles nothing"
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        return f"unknown kernel family {', '.join(unknown)}; expected some of {FAMILIES}"
    if args.budget_s is not None and not args.budget_s > 0:
        return f"--budget-s must be > 0 seconds, got {args.budget_s}"
    if args.jobs < 1:
        return f"--jobs must be >= 1, got {args.jobs}"
    from ._dispatch import HAS_TRITON

    if not HAS_TRITON:
        return "triton is not installed"
    no_ptxas = ptxas_problem()
    if no_ptxas and not args.list:
        return no_ptxas
    return None


def _compile_all(variants, families, args, t0) -> tuple[dict[int, dict], dict[int, str], bool]:
    """(resources by variant index, errors by index, interrupted): every variant compiled in worker
    processes until done or the budget runs out; progress per family on stdout."""
    results: dict[int, dict] = {}
    errors: dict[int, str] = {}
    jobs = [(families, i) for i in range(len(variants))]
    workers = max(1, min(args.jobs, len(jobs)))
    done_per_family: dict[str, int] = {}
    total_per_family = {f: sum(v.family == f for v in variants) for f in families}

    def take(item):
        i, res, err = item
        fam = variants[i].family
        done_per_family[fam] = done_per_family.get(fam, 0) + 1
        if res is None:
            errors[i] = err
            print(f"FAIL {fam}.{variants[i].kernel} [{variants[i].describe()}]\n{err}", flush=True)
        else:
            results[i] = res
        if done_per_family[fam] == total_per_family[fam] or done_per_family[fam] % 50 == 0:
            print(f"  {fam}: {done_per_family[fam]}/{total_per_family[fam]} compiled "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    deadline = t0 + args.budget_s if args.budget_s else None
    try:
        if workers > 1:
            import multiprocessing

            pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init)
            try:
                it = pool.imap_unordered(_compile_job, jobs, chunksize=1)
                while len(results) + len(errors) < len(jobs):
                    timeout = None if deadline is None else deadline - time.perf_counter()
                    if timeout is not None and timeout <= 0:
                        raise TimeoutError
                    take(it.next(timeout=timeout))
            except multiprocessing.TimeoutError:
                raise TimeoutError from None
            finally:
                pool.terminate()
        else:
            _worker_init()
            for job in jobs:
                if deadline is not None and time.perf_counter() > deadline:
                    raise TimeoutError
                take(_compile_job(job))
    except (TimeoutError, KeyboardInterrupt) as e:
        why = "the time budget ran out" if isinstance(e, TimeoutError) else "interrupted"
        print(f"compile check: {why} after {len(results) + len(errors)}/{len(jobs)} variants; "
              "writing a partial report", file=sys.stderr, flush=True)
        return results, errors, True
    return results, errors, False


def _write_report(args, families, launches, variants, refused, results, errors, problems, interrupted, t0) -> dict:
    not_compiled = len(variants) - len(results) - len(errors)
    report = {
        "env": environment(), "families": list(families),
        "summary": {"launches": len(launches), "variants": len(variants), "refused": refused,
                    "failed": len(errors), "not_compiled": not_compiled, "partial": interrupted,
                    "spilling": sum(1 for r in results.values() if r["spill_store_bytes"] or r["spill_load_bytes"]),
                    "accepted": sum(1 for r in results.values() if r.get("accepted")),
                    "wall_s": round(time.perf_counter() - t0, 1)},
        "variants": [{"family": v.family, "kernel": v.kernel, "variant": v.describe(), "launches": v.launches,
                      "options": v.options, "resources": results.get(i), "error": errors.get(i)}
                     for i, v in enumerate(variants)],
        "problems": problems,
    }
    for path, text in ((args.json, lambda: json.dumps(report, indent=1, default=str)),
                       (args.markdown, lambda: markdown(report))):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text())
            print(f"wrote {path}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    problem = _usage_problem(args)
    if problem:
        print(f"compile check: {problem}", file=sys.stderr)
        return 2
    families = tuple(args.families or FAMILIES)

    t0 = time.perf_counter()
    launches, missing, refused = capture(list(families))
    variants = to_variants(launches)
    print(f"captured {len(launches)} launches -> {len(variants)} variants "
          f"({refused} refused argument combinations) in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.list:
        for v in variants:
            print(f"{v.family}.{v.kernel} [{v.describe()}] x{v.launches}")
        return 0

    results, errors, interrupted = _compile_all(variants, families, args, t0)
    problems = gate(variants, results, errors, missing)
    report = _write_report(args, families, launches, variants, refused, results, errors, problems, interrupted, t0)
    s = report["summary"]
    print(f"{s['variants'] - s['failed']} compiled, {s['failed']} failed, {s['spilling']} spilling "
          f"({s['accepted']} accepted), {len(problems)} gate problems, {s['wall_s']} s")
    for p in problems:
        print(f"GATE {p}")
    if interrupted:
        print(f"PARTIAL: {s['not_compiled']} variants not compiled: the gate is not proven", file=sys.stderr)
        return 3
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
