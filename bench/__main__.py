"""python -m bench [--only NAME] [--once] [--profile] [--quick] [--no-compile] [--out DIR]
       python -m bench --model [--quick] [--model-config 1b|tiny] [--methods ...] [--grad-ckpt] ...
       python -m bench --static [--rebuild]   (the sm_90a resource report of every kernel variant that runs)
       python -m bench --predict [--only NAME] [--markdown docs/perf-model.md]   (the performance model alone)
       python -m bench.gpu_run --out DIR [--budget-s 480]   (tests + these + --model + static report, one budget)

Runs every case of bench/<family>.py on the available device (CUDA if present), each case's reference,
torch.compile(reference) and peftops paths interleaved (one sample of each per round, the order rotated,
so background load hits them alike) until the spread is small or the case's timing budget is spent, and
prints a table: median (min-max) per path, the median paired speedup with its 95% bootstrap CI, and a
flag: a row is UNSTABLE (no speedup claimed, the reason given) when a path's spread exceeds --max-spread,
the ratio CI is wider than that, or it got too few rounds. GB/s, TFLOP/s and % of the roofline measured in
the same run appear only on a GPU, with the performance model's prediction next to the measured time
(--predict prints the predictions of every case alone, no GPU needed: docs/perf-model.md). Writes
<out>/<device>.json (every sample) and a PNG of the size sweeps;
<out> is --out, default $PEFTOPS_BENCH_OUT or ~/.cache/peftops/bench/ (outside the source tree: the
repository's bench/results/ holds only committed GPU results and the static reports, and is written only
when named with --out from a GPU run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .harness import (FAMILIES, RESULTS_DIR, Policy, default_out_dir, environment, format_table, load_cases, measure_roofline,
                      plot, resolve_out_dir, run_case, to_json)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    ap.add_argument("--only", action="append", default=[], help="run cases whose name contains this (repeatable)")
    ap.add_argument("--once", action="store_true", help="one warm-up and one timed call per path (for Nsight Compute)")
    ap.add_argument("--profile", action="store_true", help="write a torch profiler trace per case to --out")
    ap.add_argument("--quick", action="store_true", help="small shapes (default on CPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) column")
    ap.add_argument("--model", action="store_true", help="whole-model training-step benchmark (bench/model.py)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--out", default=None,
                    help="directory for the JSON, PNG and traces (default $PEFTOPS_BENCH_OUT or "
                         "~/.cache/peftops/bench/; bench/results/ is accepted only from a GPU run; with --static: "
                         "where the static report is read, default bench/results/)")
    tm = ap.add_argument_group("measuring (each case's paths interleaved until stable or its budget is spent)")
    tm.add_argument("--case-budget-s", type=float, default=Policy.budget_s,
                    help=f"timing budget per case in seconds, warm-up not counted (default {Policy.budget_s:g})")
    tm.add_argument("--max-spread", type=float, default=Policy.max_spread,
                    help=f"a row is UNSTABLE above this spread (p90-p10)/median of a path, or with a ratio CI wider "
                         f"than +- this (default {Policy.max_spread:g})")
    tm.add_argument("--min-rounds", type=int, default=Policy.min_rounds,
                    help=f"interleaved rounds before a row may be called stable (default {Policy.min_rounds})")
    tm.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads while timing (default 1 on CPU: multi-threaded tiny ops on a shared CPU "
                         "stall on descheduled threads; unchanged on CUDA)")
    ap.add_argument("--list", action="store_true", help="list case names and exit")
    ap.add_argument("--predict", action="store_true",
                    help="print the performance model's figures of every case (GPU shapes unless --quick; H100 and "
                         "H200 floors, structural bound, prediction) and exit: no GPU, nothing timed")
    ap.add_argument("--markdown", default=None, metavar="PATH",
                    help="with --predict: also write the tables into PATH between its generated-section markers "
                         "(docs/perf-model.md)")
    ap.add_argument("--static", action="store_true",
                    help="print the sm_90a static resource report (registers, spills, smem, warps/SM of every "
                         "kernel variant that runs) for the installed triton, from --out, building it if missing")
    ap.add_argument("--rebuild", action="store_true",
                    help="with --static: rebuild the report (minutes, no GPU) into --out (default: the default output "
                         "directory; --out bench/results to replace the committed one)")
    mg = ap.add_argument_group("whole-model benchmark (--model, bench/model.py)")
    mg.add_argument("--model-config", choices=["1b", "tiny"], default=None,
                    help="Llama shape (default: 1b on CUDA, tiny with --quick or on CPU)")
    mg.add_argument("--methods", default=None,
                    help="comma list of full,lora,sift,aot,wegeft,wegeft+safe (default: all)")
    mg.add_argument("--batch-size", type=int, default=None, help="sequences per step (1b default 4)")
    mg.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (1b default 1024)")
    mg.add_argument("--steps", type=int, default=None, help="timed steps per method (1b default 20)")
    mg.add_argument("--warmup", type=int, default=None, help="untimed steps first (1b default 3)")
    mg.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (non-reentrant) on every layer")
    mg.add_argument("--model-dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="weights dtype (default bf16)")
    args = ap.parse_args(argv)

    if args.static:
        return _static_report(args.out, args.rebuild)
    if args.rebuild:
        ap.error("--rebuild goes with --static")
    if args.markdown and not args.predict:
        ap.error("--markdown goes with --predict")
    if args.predict:
        return _predict(args)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick or device.type != "cuda"
    if device.type != "cuda":
        print("NOTE: no GPU: running small shapes on CPU (reference vs peftops CPU paths). "
              "Kernel timings and roofline figures need a CUDA GPU.")

    if args.model:
        try:
            from . import model as model_bench
        except ModuleNotFoundError as e:
            if e.name != "bench.model":
                raise
            print("--model: the whole-model benchmark (bench/model.py) is not part of this version yet")
            return 2

        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
        return model_bench.main(device, quick=quick, out_dir=args.out,
                                config=args.model_config, methods=methods, batch_size=args.batch_size,
                                seq_len=args.seq_len, steps=args.steps, warmup=args.warmup,
                                grad_ckpt=args.grad_ckpt, dtype=args.model_dtype)

    families = None  # --only sift.sddmm builds bench/sift.py's cases only (every family's take a while)
    if args.only and all(o.split(".")[0] in FAMILIES for o in args.only):
        families = sorted({o.split(".")[0] for o in args.only})
    cases = load_cases(device, quick, families)
    if args.only:
        cases = [c for c in cases if any(o in c.name for o in args.only)]
    if args.list:
        for c in cases:
            print(f"{c.name:28s} {c.shape}")
        return 0
    if not cases:
        print("no case matches", args.only)
        return 1

    if not (args.case_budget_s > 0 and args.max_spread > 0 and args.min_rounds >= 2):
        ap.error("--case-budget-s and --max-spread must be > 0, --min-rounds >= 2")
    policy = Policy(budget_s=args.case_budget_s, max_spread=args.max_spread, min_rounds=args.min_rounds)
    official = device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"
    out_dir = resolve_out_dir(args.out, official=official)
    threads = torch.get_num_threads()
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    try:
        return _run(args, device, cases, policy, out_dir)
    finally:
        torch.set_num_threads(threads)


def _run(args, device, cases, policy, out_dir) -> int:
    env = environment(device)
    env["cpu_threads"] = torch.get_num_threads()
    env["policy"] = dict(vars(policy))
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}  "
          f"torch threads {env['cpu_threads']}")
    print(f"measuring: paths interleaved per round, >= {policy.min_rounds} rounds, until spread <= "
          f"{100 * policy.max_spread:.0f}% or {policy.budget_s:g} s per case; results to {out_dir}")
    roof = measure_roofline(device)
    if device.type == "cuda":
        print(f"roofline (this run): copy {roof['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
              f"bf16 GEMM {roof['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s")
    results = []
    try:
        from tqdm import tqdm
    except Exception:  # pragma: no cover
        def tqdm(x, **_):
            return x
    os.makedirs(out_dir, exist_ok=True)
    for case in tqdm(cases, desc="bench", unit="case", file=sys.stderr):
        if args.profile:
            _profile(case, device, out_dir)
        results.append(run_case(case, device, once=args.once, compile_ref=not args.no_compile, policy=policy))

    print(format_table(results, roof))
    tag = f"{device.type}-{env['device'].replace(' ', '_').replace('/', '_')}"
    if args.only or args.once:
        tag += "-partial"
    json_path = os.path.join(out_dir, f"{tag}.json")
    with open(json_path, "w") as f:
        json.dump(to_json(results, roof, env), f, indent=1, default=float)
    print(f"wrote {json_path}")
    png = os.path.join(out_dir, f"{tag}.png")
    if plot(results, png):
        print(f"wrote {png}")
    else:
        print("no plot (matplotlib missing or no sweep)")
    return 0


MD_BEGIN = "<!-- generated by: python -m bench --predict --markdown docs/perf-model.md (do not edit below) -->"
MD_END = "<!-- end of generated section -->"


def _predict(args) -> int:
    """The model's figures of the (GPU-shape) cases: pure arithmetic on the case list; no input is built."""
    from peftops.kernels import _perf_model

    from .harness import format_predictions, predictions_markdown

    families = None
    if args.only and all(o.split(".")[0] in FAMILIES for o in args.only):
        families = sorted({o.split(".")[0] for o in args.only})
    cases = load_cases(torch.device("cpu"), args.quick, families)
    if args.only:
        cases = [c for c in cases if any(o in c.name for o in args.only)]
    if not cases:
        print("no case matches", args.only)
        return 1
    print(format_predictions(cases))
    if args.markdown:
        with open(args.markdown, encoding="utf-8") as f:
            text = f.read()
        if MD_BEGIN not in text or MD_END not in text:
            print(f"--markdown: {args.markdown} has no generated-section markers ({MD_BEGIN!r} ... {MD_END!r})",
                  file=sys.stderr)
            return 2
        head, rest = text.split(MD_BEGIN, 1)
        tail = rest.split(MD_END, 1)[1]
        body = "\n".join(["", _perf_model.design_tables_markdown(), "",
                           f"### Every bench case ({'quick' if args.quick else 'GPU'} shapes)", "",
                           predictions_markdown(cases), ""])
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(head + MD_BEGIN + body + MD_END + tail)
        print(f"wrote {args.markdown}")
    return 0


def _static_report(out_dir: str | None, rebuild: bool) -> int:
    """Print the static report of the installed triton: from ``out_dir`` (default bench/results/, the committed
    ones) unless ``rebuild``; a missing or rebuilt report is built into ``out_dir`` if named, else into the default
    output directory (bench/results/ gets one only with ``--out bench/results``)."""
    import subprocess

    try:
        import triton
    except ImportError:
        print("--static: triton is not installed", file=sys.stderr)
        return 2
    name = f"static-sm90a-triton{triton.__version__}"
    stem = os.path.join(out_dir or RESULTS_DIR, name)
    if rebuild or not os.path.exists(stem + ".md"):
        build_dir = out_dir or default_out_dir()
        os.makedirs(build_dir, exist_ok=True)
        stem = os.path.join(build_dir, name)
        print(f"building {stem}.md (compiles every variant for sm_90a; minutes on a few cores)", file=sys.stderr)
        env = dict(os.environ, TRITON_INTERPRET="0")
        rc = subprocess.run([sys.executable, "-m", "peftops.kernels._compile_check", "--json", stem + ".json",
                             "--markdown", stem + ".md"], env=env).returncode
        if not os.path.exists(stem + ".md"):
            return rc or 1
    with open(stem + ".md", encoding="utf-8") as f:
        print(f.read())
    return 0


def _profile(case, device, out_dir):
    from torch.profiler import ProfilerActivity, profile

    inputs = case.make()
    case.peftops(inputs)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        case.reference(inputs)
        case.peftops(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
    path = os.path.join(out_dir, f"{case.name}.{case.sweep[1] if case.sweep else 0}.trace.json")
    prof.export_chrome_trace(path)
    print(f"profile: {path}")


if __name__ == "__main__":
    sys.exit(main())
