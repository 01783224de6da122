"""python -m bench [--only NAME] [--once] [--profile] [--quick] [--no-compile] [--out DIR]
       python -m bench --model [--quick] [--model-config 1b|tiny] [--methods ...] [--grad-ckpt] ...
       python -m bench --static [--rebuild]   (the sm_90a resource report of every kernel variant that runs)
       python -m bench.gpu_run --out DIR [--budget-s 480]   (tests + these + --model + static report, one budget)

Runs every case of bench/<family>.py on the available device (CUDA if present), prints a table
(reference, torch.compile(reference), peftops, speedups, GB/s or TFLOP/s, % of the roofline
measured in the same run) and writes JSON + a PNG of the size sweeps under bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .harness import environment, format_table, load_cases, measure_roofline, plot, run_case, to_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    ap.add_argument("--only", action="append", default=[], help="run cases whose name contains this (repeatable)")
    ap.add_argument("--once", action="store_true", help="one warm-up and one timed call per path (for Nsight Compute)")
    ap.add_argument("--profile", action="store_true", help="write a torch profiler trace per case to --out")
    ap.add_argument("--quick", action="store_true", help="small shapes (default on CPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) column")
    ap.add_argument("--model", action="store_true", help="whole-model training-step benchmark (bench/model.py)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--list", action="store_true", help="list case names and exit")
    ap.add_argument("--static", action="store_true",
                    help="print the sm_90a static resource report (registers, spills, smem, warps/SM of every "
                         "kernel variant that runs) for the installed triton, from --out, building it if missing")
    ap.add_argument("--rebuild", action="store_true", help="with --static: rebuild the report (minutes, no GPU)")
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
        out_default = ap.get_default("out")
        return model_bench.main(device, quick=quick, out_dir=None if args.out == out_default else args.out,
                                config=args.model_config, methods=methods, batch_size=args.batch_size,
                                seq_len=args.seq_len, steps=args.steps, warmup=args.warmup,
                                grad_ckpt=args.grad_ckpt, dtype=args.model_dtype)

    cases = load_cases(device, quick)
    if args.only:
        cases = [c for c in cases if any(o in c.name for o in args.only)]
    if args.list:
        for c in cases:
            print(f"{c.name:28s} {c.shape}")
        return 0
    if not cases:
        print("no case matches", args.only)
        return 1

    env = environment(device)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
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
    os.makedirs(args.out, exist_ok=True)
    for case in tqdm(cases, desc="bench", unit="case", file=sys.stderr):
        if args.profile:
            _profile(case, device, args.out)
        results.append(run_case(case, device, once=args.once, compile_ref=not args.no_compile))

    print(format_table(results, roof))
    tag = f"{device.type}-{env['device'].replace(' ', '_').replace('/', '_')}"
    if args.only or args.once:
        tag += "-partial"
    json_path = os.path.join(args.out, f"{tag}.json")
    with open(json_path, "w") as f:
        json.dump(to_json(results, roof, env), f, indent=1, default=float)
    print(f"wrote {json_path}")
    png = os.path.join(args.out, f"{tag}.png")
    if plot(results, png):
        print(f"wrote {png}")
    else:
        print("no plot (matplotlib missing or no sweep)")
    return 0


def _static_report(out_dir: str, rebuild: bool) -> int:
    """Print bench/results/static-sm90a-triton<version>.md, running the compile check first if asked or missing."""
    import subprocess

    try:
        import triton
    except ImportError:
        print("--static: triton is not installed", file=sys.stderr)
        return 2
    stem = os.path.join(out_dir, f"static-sm90a-triton{triton.__version__}")
    if rebuild or not os.path.exists(stem + ".md"):
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
