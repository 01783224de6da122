"""The first GPU hour as one command: ``python -m bench.gpu_run --out DIR [--budget-s 480]``.

Run from the repository root on a machine with one CUDA GPU. Within the time budget it:

1. ``env``    records the device (name, capability, SM count, memory), torch / triton / CUDA / driver
              versions, the packages present, the git commit and dirty flag (no hostname);
2. ``tests``  runs the CUDA test subset that matters most (``TEST_SELECTION`` below: every kernel against
              its reference, the top-k pipeline, the SparseAdamW bit-exactness claims) as pytest
              subprocesses, several at once (``--test-jobs``), each with a JUnit XML file that is parsed
              for pass / fail / skip counts and the failing ids with their short tracebacks;
3. ``bench``  every microbenchmark case of bench/ (``bench.harness``, what ``python -m bench`` runs), the
              headline shape of every op first, then the rest of each sweep, until its share of the budget
              is spent (cases not reached are listed "not run: budget"; a failing case is recorded and the
              next one runs). Each case's paths are timed interleaved until stable or its per-case budget
              (``--case-budget-s``) ends; a row is flagged UNSTABLE, with the reason, and claims no speedup
              when its spread or the ratio's 95% CI is too wide (every sample is in the JSON);
4. ``model``  the whole-model training step of every method (bench/model.py, ``python -m bench --model``),
              method by method until its share is spent (the tiny model without a GPU: a smoke run, said
              so in the JSON and the summary);
5. ``static`` the sm_90a static resource report (``python -m peftops.kernels._compile_check --json
              --markdown``) as a subprocess, run alongside the tests (it is CPU-only work), summarised per
              kernel family next to the measured figures;

and writes into ``--out``: ``gpu_run.json`` (everything, rewritten after each phase so a killed run
leaves what it had), ``summary.md`` (a one-minute read), ``bench.png`` (if matplotlib is installed),
``static.json`` / ``static.md`` and the logs of every subprocess.

Budget: each phase gets a share (``--shares``, default tests 0.35, bench 0.40, model 0.25 of what is
left after a small reserve for writing the outputs); time a phase leaves unused goes to the later ones.
Exit status: 0 when it ran what it could (phases cut by the budget are recorded, not failures), 1 when a
selected test failed or errored (everything is still written), 2 for bad arguments, 3 when the environment
cannot even be read (torch fails to import), 130 on Ctrl-C / SIGTERM (what was done is written).

Without a GPU it runs end to end at tiny sizes (quick bench shapes, the tiny model, the tests under
TRITON_INTERPRET=1, which tests/conftest.py sets): tests/test_gpu_run.py runs it that way in CI.

Expected runtime on an H100 / H200 (an estimate, not a measurement: no GPU has been lent to this project
yet). With the default 480 s the slots are about: tests 160 s (static alongside), bench 180 s, model 115 s,
plus whatever an earlier phase leaves. Compiling dominates, not timing, so it depends on the caches:

* Cold caches (a fresh machine: empty ~/.triton/cache and inductor cache):
  - tests: ~600 CUDA tests (the 5 kernel files have ~510 "cpu" ids on CPU, the same parametrization gives
    as many "cuda" ids; plus ~85 SparseAdamW / training tests). At their sizes each runs in ms; the cost is
    the Triton JIT compiling every (kernel, dtype, alignment, constexpr) specialization they hit, and every
    autotune config at each: 7 gather-add, 6 segment-sum, 3 SDDMM, 2-3 per CKA size class, 7 WeGeFT GEMM
    tiles. Taking the static check's cost per compile (148 variants x 2 in ~3.5 min on 2 cores: ~1.4 s) and
    300-1000 compiles: 7-23 min single-core, 2-6 min on 4 pytest processes. So expect the last entries of
    TEST_SELECTION to be cut (recorded, with the test running at the cut) on the first run.
  - static: the compile check enumerates 815 variants (kernels/_variants.py); the committed reports took 225 s
    (triton 3.6, the GPU image's) and 881 s (3.9) of wall time on this project's 2-core CPU (``summary.wall_s``
    in bench/results/static-sm90a-triton*.json, ``python -m bench --static --rebuild``); on the ~12 cores the
    tests leave, an estimated ~1 min with 3.6. If it is cut, that is recorded and the partial report kept.
    Run it on its own (``--phases static --budget-s 400``) or on any CPU machine; it needs no GPU.
  - bench: 74 cases at full size. 47 also time torch.compile(reference): ~3-8 s of inductor each (~150-350 s);
    Triton compiles + autotuning of the bf16 variants ~60 s; timing ~0.3 s x 3 paths x 74 ~70 s (per path
    a warm-up, then interleaved rounds: >= 10, until stable, at most --case-budget-s (default 2 s) per case;
    stable GPU cases stop at ~10-20 rounds; the ops take 10 us - 5 ms: a 4096x4096 fp32 top-k
    reads 68 MB, ~25 us at 3 TB/s; SDDMM T=16384 270 MB / 5.5 GFLOP); the six SAFE model cases ~5-10 s each.
    ~300-450 s in all against ~180 s: the headline shape of every op runs (they go first), part of the sweeps
    is cut. ``--no-compile`` saves the inductor time.
  - model (1.1B Llama, bf16, batch 4 x 1024, 3 warm-up + 20 timed steps, 6 methods): a full fine-tuning
    step is 6 x 1.1e9 x 4096 ~ 2.7e13 flop, ~70-100 ms at 300-400 TFLOP/s, so 23 steps ~2 s; building,
    SIFT calibration and the warm-up's autotuning make it ~15-30 s per method: 100-180 s for all six, so the
    last one or two may be cut.
* Warm caches (the same machine again): tests ~1-2 min, bench ~2.5 min with compile, model ~1.5 min,
  static still ~1 min (it always recompiles, TRITON_ALWAYS_COMPILE): everything but static fits in 480 s;
  ``--budget-s 900`` should fit all of it but the static report even cold.

On CPU (2 cores) the run with the defaults takes its whole budget too (the interpreter is slow); CI runs
small subsets (see tests/test_gpu_run.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from typing import Any

from .paths import default_out_dir  # no torch import: a broken torch still gets exit 3, not a traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the tests phase runs: (test file, pytest -k expression, kernel family). "{dev}" becomes "cuda" on a
# GPU (every op is parametrized "cuda-reference" / "cuda-triton", the triton-only tests "cuda-..."), "cpu"
# without one. Listed in priority order: with too little time the last ones are cut.
TEST_SELECTION: list[tuple[str, str, str]] = [
    ("tests/test_sift_kernels.py", "{dev} and topk", "sift"),      # the top-k pipeline (exact radix select, fast path)
    ("tests/test_sift_kernels.py", "{dev} and not topk", "sift"),  # abs-accumulate, SDDMM, scatter, fused AdamW step
    ("tests/test_aot_kernels.py", "{dev}", "aot"),       # gather-add, sorted segment-reduce backward
    ("tests/test_wegeft_kernels.py", "{dev}", "wegeft"),  # fused / merged low-rank forward+backward, merge
    ("tests/test_wegeft_op.py", "{dev}", "wegeft"),      # the custom op: gradcheck, autograd vs fp64, opcheck
    ("tests/test_cka.py", "{dev}", "cka"),               # linear CKA Frobenius products
    # bit-exactness: SparseAdamW == torch AdamW (W[I] = round(W0[I] + delta) exactly), the layer, peak memory
    ("tests/test_sift.py", "{dev} and (sparse_adamw or layer_matches or sift_linear_matches or select_matches "
                           "or peak_memory)", "sift"),
    # model level: SIFT training == masked dense AdamW; plain AdamW on delta == SparseAdamW bit for bit
    ("tests/test_sift_model.py", "plain_adamw_on_delta or (training_matches and {dev})", "sift"),
]

PHASES = ("tests", "bench", "model", "static")
DEFAULT_SHARES = {"tests": 0.35, "bench": 0.40, "model": 0.25, "static": 0.15}  # static: only when run alone
MIN_BUDGET_S = 60.0
DEFAULT_BUDGET_S = 480.0
SCHEMA = "peftops.gpu_run/1"


def log(msg: str) -> None:
    t = time.monotonic() - _T0
    print(f"[gpu_run {t:6.1f}s] {msg}", file=sys.stderr, flush=True)


_T0 = time.monotonic()


# ----------------------------------------------------------------------------------------------
# results and budget
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Phase:
    """One phase's outcome. status: ok | failed | cut: budget | error | skipped | interrupted | not run."""

    name: str
    status: str = "not run"
    wall_s: float = 0.0
    share_s: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"status": self.status, "wall_s": round(self.wall_s, 2),
                "share_s": None if self.share_s is None else round(self.share_s, 1), "notes": self.notes}


class Budget:
    """Wall-clock budget split into shares; a phase's slot is its share of what is left (minus the reserve
    for writing the outputs), so time an earlier phase did not use goes to the later ones."""

    def __init__(self, total_s: float, shares: dict[str, float]):
        self.total_s = total_s
        self.shares = shares
        self.start = time.monotonic()
        self.end = self.start + total_s
        self.reserve_s = max(5.0, 0.03 * total_s)

    def used(self) -> float:
        return time.monotonic() - self.start

    def slot(self, phase: str, still_to_run: list[str]) -> tuple[float, float]:
        """(deadline as time.monotonic(), seconds) for ``phase`` given the phases not run yet (it included)."""
        now = time.monotonic()
        left = max(0.0, self.end - self.reserve_s - now)
        total = sum(self.shares[p] for p in still_to_run) or 1.0
        secs = left * self.shares[phase] / total
        return now + secs, secs


@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    out: str
    budget: Budget
    device: Any = None              # torch.device
    env: dict[str, Any] = dataclasses.field(default_factory=dict)
    phases: dict[str, Phase] = dataclasses.field(default_factory=dict)
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)   # {"what", "why"}
    status: str = "running"
    exit_code: int | None = None
    started: str = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    @property
    def cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    @property
    def quick(self) -> bool:
        return bool(self.args.quick) or not self.cuda

    def skip(self, what: str, why: str) -> None:
        self.skipped.append({"what": what, "why": why})
        log(f"skip {what}: {why}")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _short(text: str, limit: int = 3000, lines: int = 40) -> str:
    """The tail of a traceback / log: the last ``lines`` lines, at most ``limit`` characters."""
    text = "\n".join(text.strip().splitlines()[-lines:])
    return text if len(text) <= limit else "..." + text[-limit:]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------------------------
# subprocesses: own process group, killed (SIGINT first, so pytest writes its XML) at the deadline
# ----------------------------------------------------------------------------------------------
class Child:
    def __init__(self, cmd: list[str], log_path: str, env: dict[str, str], deadline: float):
        self.cmd, self.log_path, self.deadline = cmd, log_path, deadline
        self.started = time.monotonic()
        self.ended: float | None = None
        self.cut = False
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        threading.Thread(target=self._watch, daemon=True).start()  # the exit time, even if nobody polls

    def _watch(self) -> None:
        self.proc.wait()
        self.ended = time.monotonic()

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is None and time.monotonic() >= self.deadline:
            self.cut = True
            self.stop()
            rc = self.proc.returncode
        if rc is not None:
            self.ended = self.ended or time.monotonic()
            self._log.close()
        return rc

    def wait(self) -> int:
        while (rc := self.poll()) is None:
            time.sleep(0.2)
        return rc

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, grace_s: float = 8.0) -> None:
        """SIGINT (pytest stops and still writes its JUnit XML), then SIGKILL after ``grace_s``."""
        stop_all([self], grace_s)

    @property
    def wall_s(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def stop_all(children: list[Child], grace_s: float = 8.0) -> None:
    """Interrupt every child at once, wait up to ``grace_s`` for all of them, then SIGTERM, then SIGKILL."""
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 2.0)):
        for c in children:
            c.signal(sig)
        end = time.monotonic() + wait_s
        while time.monotonic() < end and any(c.proc.poll() is None for c in children):
            time.sleep(0.1)
    for c in children:
        c.signal(signal.SIGKILL)
        try:
            c.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
        c.ended = c.ended or time.monotonic()
        c._log.close()


def _python() -> list[str]:
    # -P: keep the repository root off sys.path as plain `pytest` does (the top-level name `kernels`
    # belongs to Hugging Face; ours is installed as peftops.kernels)
    return [sys.executable] + (["-P"] if sys.version_info >= (3, 11) else [])


# ----------------------------------------------------------------------------------------------
# phase: environment
# ----------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15).stdout.strip()
        if out:
            return out.splitlines()[0].strip()
    except Exception:
        pass
    try:
        import torch

        v = torch._C._cuda_getDriverVersion()  # e.g. 12040: the CUDA version the driver supports
        return f"supports CUDA {v // 1000}.{(v % 1000) // 10}"
    except Exception:
        return None


def _triton_cache_files() -> int | None:
    d = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    try:
        return sum(len(files) for _, _, files in os.walk(d))
    except Exception:
        return None


def source_digest() -> str:
    """sha256 (first 16 hex digits) of every .py file under kernels/, peftops/, bench/ and tests/: which code
    ran, also where the tree was copied without its .git."""
    import hashlib

    h = hashlib.sha256()
    for top in ("kernels", "peftops", "bench", "tests"):
        for dirpath, dirnames, files in sorted(os.walk(os.path.join(ROOT, top))):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, ROOT).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:16]


def phase_env(run: Run, ph: Phase) -> None:
    import platform

    import torch

    from .harness import environment

    if run.args.device:
        run.device = torch.device(run.args.device)
    else:
        run.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(run.device)
    if env.get("commit") is None:  # no git, or a copy of the tree without .git: the digest names the code
        env["dirty"] = None
    env["source_digest"] = source_digest()
    env["platform"] = platform.platform()
    env["cpu_count"] = os.cpu_count()
    if run.cuda:
        p = torch.cuda.get_device_properties(run.device)
        env.update(capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), driver=_driver_version(),
                   cudnn=torch.backends.cudnn.version(), device_count=torch.cuda.device_count())
    env["packages"] = {name: _version(name) for name in
                       ("numpy", "transformers", "safetensors", "tqdm", "pytest", "peft", "pytest-benchmark",
                        "pytest-timeout", "matplotlib", "hypothesis", "accelerate")}
    env["triton_cache_files"] = _triton_cache_files()  # 0: a cold cache, every kernel compiles in this run
    env["env_vars"] = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "TRITON_CACHE_DIR",
                                                       "TORCHINDUCTOR_CACHE_DIR", "PEFTOPS_COMPILE_JOBS")}
    run.env = env
    ph.status = "ok"
    if not run.cuda:
        ph.notes.append("no GPU: tiny sizes on CPU (quick bench shapes, tiny model, tests in triton's interpreter); "
                        "the timings are not kernel figures")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        ph.notes.append("TRITON_INTERPRET=1 is set: the Triton kernels run in the interpreter, timings are meaningless")
    log(f"device {env['device']} ({env.get('capability', '-')}, {env.get('sm_count', '-')} SMs), torch {env['torch']}, "
        f"triton {env['triton']}, CUDA {env['cuda']}, driver {env.get('driver', '-')}, commit {env['commit']}"
        f"{' (dirty)' if env.get('dirty') else ''}")


# ----------------------------------------------------------------------------------------------
# phase: tests
# ----------------------------------------------------------------------------------------------
def select_tests(args, dev: str) -> list[dict[str, str]]:
    """[{file, k, family}]: TEST_SELECTION, or its entries for --tests-files (a file it does not list: "{dev}"),
    every -k replaced by --tests-k if given; "{dev}" becomes the device type."""
    def family(f):
        return next((fam for g, _, fam in TEST_SELECTION if g == f), None) or \
            next((x for x in ("sift", "aot", "wegeft", "cka", "safe") if x in f), "other")

    if args.tests_files:
        chosen = []
        for f in args.tests_files:
            chosen += [(g, k) for g, k, _ in TEST_SELECTION if g == f] or [(f, "{dev}")]
    else:
        chosen = [(f, k) for f, k, _ in TEST_SELECTION]
    if args.tests_k is not None:  # one run per file with the given expression
        chosen = list(dict.fromkeys((f, args.tests_k) for f, _ in chosen))
    return [{"file": f, "k": k.replace("{dev}", dev), "family": family(f)} for f, k in chosen]


_STATUS = "PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS"
_OUTCOME = re.compile(rf"^(?!(?:{_STATUS})\b)(\S.*?::.*?) ({_STATUS})\b")  # not the -ra summary lines
_COLLECTED = re.compile(r"collected (\d+) items?(?: / (\d+) deselected)?(?: / (\d+) selected)?")


def parse_junit(path: str, file: str) -> list[dict[str, Any]]:
    """[{id, outcome, message, traceback, time_s}] from a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    mod = file[:-3].replace("/", ".") if file.endswith(".py") else file
    cases = []
    for tc in root.iter("testcase"):
        name, cls = tc.get("name", ""), tc.get("classname", "")
        rest = cls[len(mod):].lstrip(".") if cls.startswith(mod) else ""
        tid = "::".join(x for x in (file, rest.replace(".", "::"), name) if x) if cls else name
        outcome, message, tb = "passed", "", ""
        for child in tc:
            tag = child.tag
            if tag in ("failure", "error"):
                outcome = "failed" if tag == "failure" else "error"
                message, tb = child.get("message", ""), child.text or ""
                break
            if tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                message = child.get("message", "")
        cases.append({"id": tid, "outcome": outcome, "message": message[:500], "traceback": _short(tb),
                      "time_s": float(tc.get("time", 0) or 0)})
    return cases


def parse_pytest_log(text: str) -> tuple[list[dict[str, Any]], int | None, str | None]:
    """From ``pytest -v`` output: the finished tests, the number selected, the test running when it stopped."""
    found: dict[str, dict[str, Any]] = {}
    selected, running = None, None
    for line in text.splitlines():
        m = _COLLECTED.search(line)
        if m and selected is None:
            n, desel, sel = (int(x) if x else None for x in m.groups())
            selected = sel if sel is not None else n - (desel or 0)
        m = _OUTCOME.match(line)
        if m:
            outcome = {"XFAIL": "xfailed"}.get(m.group(2), m.group(2).lower())
            found[m.group(1)] = {"id": m.group(1), "outcome": outcome, "message": "", "traceback": "",
                                 "time_s": None}
            running = None
        elif "::" in line and not re.match(rf"(?:{_STATUS})\b", line) and line.endswith(" "):
            running = line.strip()  # "-v" writes the id, then the outcome when the test is done
    return list(found.values()), selected, running


def _tally(entry: dict[str, Any], cases: list[dict[str, Any]]) -> None:
    for key in ("passed", "failed", "error", "skipped", "xfailed", "xpass"):
        entry[key] = sum(c["outcome"] == key for c in cases)
    entry["failures"] = [{k: c[k] for k in ("id", "outcome", "message", "traceback")}
                         for c in cases if c["outcome"] in ("failed", "error")]
    reasons: dict[str, int] = {}
    for c in cases:
        if c["outcome"] == "skipped":
            r = c["message"] or "?"
            reasons[r] = reasons.get(r, 0) + 1
    entry["skip_reasons"] = reasons


def n_pytest_processes(run: Run) -> int:
    return run.args.test_jobs or (min(4, max(1, (os.cpu_count() or 1) // 4)) if run.cuda else 1)


def phase_tests(run: Run, ph: Phase, deadline: float) -> None:
    dev = run.device.type
    entries = select_tests(run.args, dev)
    jobs = n_pytest_processes(run)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))  # no oversubscription
    extra = []
    if _has("pytest_timeout"):
        extra = ["--timeout", str(int(run.args.test_timeout_s))]
    else:
        run.skip("per-test time limit", "pytest-timeout not installed (the phase deadline still holds)")
    pending = list(enumerate(entries))
    running: dict[int, Child] = {}
    results: list[dict[str, Any]] = [dict(e) for e in entries]
    os.makedirs(os.path.join(run.out, "tests"), exist_ok=True)
    try:
        while pending or running:
            while pending and len(running) < jobs and time.monotonic() < deadline - 5:
                i, e = pending.pop(0)
                stem = f"{i:02d}-{os.path.basename(e['file'])[:-3]}"  # one file may have several entries
                xml = os.path.join(run.out, "tests", stem + ".xml")
                cmd = _python() + ["-m", "pytest", e["file"], "-k", e["k"], "-v", "--tb=short", "--color=no",
                                   "-p", "no:cacheprovider", f"--junitxml={xml}"] + extra
                results[i].update(cmd="python " + " ".join(cmd[1:]), junit=os.path.relpath(xml, run.out),
                                  log=os.path.relpath(os.path.join(run.out, "tests", stem + ".log"), run.out))
                log(f"tests: {e['file']} -k '{e['k']}'")
                running[i] = Child(cmd, os.path.join(run.out, "tests", stem + ".log"), env, deadline)
            if not pending and not running:
                break
            if pending and not running:  # nothing can start: the deadline is too close
                break
            time.sleep(0.3)
            if time.monotonic() >= deadline:  # interrupt them all at once (pytest then writes its XML)
                for child in running.values():
                    child.cut = True
                stop_all(list(running.values()))
            for i, child in list(running.items()):
                if child.poll() is not None:
                    _finish_test_entry(results[i], child, run.out)
                    del running[i]
                    r = results[i]
                    log(f"tests: {r['file']}: {r['status']} ({r['passed']} passed, {r['failed']} failed, "
                        f"{r['error']} errors, {r['skipped']} skipped) in {r['wall_s']:.0f} s")
    except KeyboardInterrupt:
        stop_all(list(running.values()), grace_s=5.0)
        for i, child in running.items():
            _finish_test_entry(results[i], child, run.out, interrupted=True)
        for i, _ in pending:
            results[i]["status"] = "not run: interrupted"
        for r in results:  # interrupted while its pytest child was being started
            if "cmd" in r and "status" not in r:
                r["status"] = "interrupted"
        raise
    finally:
        ph.data = {"device": dev, "jobs": jobs, "entries": results}
    for i, e in pending:
        results[i].update(status="not run: budget")
        run.skip(f"tests {e['file']}", "not run: budget")
    bad = [r for r in results if r.get("status") == "failed"]
    cut = [r for r in results if r.get("status") in ("cut: budget", "not run: budget")]
    ph.status = "failed" if bad else ("cut: budget" if cut else "ok")
    totals = {k: sum(r.get(k, 0) or 0 for r in results) for k in ("passed", "failed", "error", "skipped", "not_run")}
    ph.data["totals"] = totals


def _finish_test_entry(entry: dict[str, Any], child: Child, out: str, interrupted: bool = False) -> None:
    rc = child.proc.returncode
    text = child.log_text()
    log_cases, selected, running = parse_pytest_log(text)
    xml = os.path.join(out, entry["junit"])
    cases, source = log_cases, "log"
    if os.path.exists(xml):
        try:
            cases, source = parse_junit(xml, entry["file"]), "junit"
        except Exception as e:  # a half-written file after a kill
            entry["junit_error"] = f"{type(e).__name__}: {e}"
    entry.update(rc=rc, wall_s=round(child.wall_s, 1), selected=selected, source=source)
    _tally(entry, cases)
    done = entry["passed"] + entry["failed"] + entry["error"] + entry["skipped"] + entry["xfailed"] + entry["xpass"]
    entry["not_run"] = max(0, (selected or 0) - done)
    if running and rc not in (0, 1, 5):  # stopped in the middle of this test (deadline or Ctrl-C)
        entry["running_at_cut"] = running
    if interrupted:
        entry["status"] = "interrupted"
    elif child.cut:
        entry["status"] = "cut: budget"
    elif rc == 5:
        entry["status"] = "no tests selected"
    elif rc in (0, 1) and not (rc == 1 and not entry["failures"]):
        entry["status"] = "failed" if entry["failures"] else "ok"
    else:  # 2 interrupted, 3 internal error, 4 usage error (a bad -k), or a crash
        entry["status"] = "failed"
        entry["failures"].append({"id": entry["file"], "outcome": "error", "message": f"pytest exited with {rc}",
                                  "traceback": _short(text)})
    if entry["failures"] and entry["status"] in ("cut: budget", "interrupted"):
        entry["status"] = "failed"  # a failure found before the cut is still a failure


# ----------------------------------------------------------------------------------------------
# phase: static resource report (a subprocess, usually alongside the tests)
# ----------------------------------------------------------------------------------------------
def start_static(run: Run, deadline: float, cores: int) -> Child:
    cmd = [sys.executable, "-m", "peftops.kernels._compile_check", "--json", os.path.join(run.out, "static.json"),
           "--markdown", os.path.join(run.out, "static.md")] + list(run.args.static_families or [])
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONUNBUFFERED="1", PEFTOPS_COMPILE_JOBS=str(max(1, cores)))
    log(f"static: python {' '.join(cmd[1:])} ({cores} compile workers)")
    for stale in ("static.json", "static.md"):
        try:
            os.remove(os.path.join(run.out, stale))
        except FileNotFoundError:
            pass
    return Child(cmd, os.path.join(run.out, "static.log"), env, deadline)


def finish_static(run: Run, child: Child, interrupted: bool = False) -> Phase:
    rc = child.wait()
    ph = Phase("static", wall_s=child.wall_s)
    text = child.log_text()
    path = os.path.join(run.out, "static.json")
    ph.data = {"cmd": "TRITON_INTERPRET=0 python " + " ".join(child.cmd[1:]).replace(run.out + os.sep, "DIR/"), "rc": rc,
               "log": "static.log"}
    report = None
    if os.path.exists(path):
        try:
            with open(path) as f:
                report = json.load(f)
        except Exception as e:
            ph.notes.append(f"static.json unreadable: {type(e).__name__}: {e}")
    if report is not None:
        ph.data.update(summarize_static(report))
        ph.data["markdown"] = "static.md" if os.path.exists(os.path.join(run.out, "static.md")) else None
        ph.status = "ok" if rc == 0 else ("gate failures" if rc == 1 else f"rc {rc}")
    elif interrupted:
        ph.status = "interrupted"
        ph.data["error"] = "interrupted after {:.0f} s".format(child.wall_s)
        ph.notes.append("no static.json (interrupted)")
    elif child.cut:
        ph.status = "cut: budget"
        progress = [ln.strip() for ln in text.splitlines() if re.search(r"captured|compiled|\bFAIL\b", ln)]
        ph.data["error"] = f"stopped at its deadline after {child.wall_s:.0f} s; last progress: " + \
            (" | ".join(progress[-3:]) or "(none)")
        ph.notes.append("no static.json (cut by its deadline)")
        run.skip("static resource report", f"not finished: budget ({child.wall_s:.0f} s)")
    else:
        ph.status = "error"
        ph.data["error"] = _short(text, limit=2000, lines=25) or f"exited with {rc}, no output"
        ph.notes.append("no static.json (the compile check failed, or does not take --json/--markdown yet)")
    log(f"static: {ph.status} in {ph.wall_s:.0f} s")
    return ph


def summarize_static(report: dict[str, Any]) -> dict[str, Any]:
    """Per family: variants, failed, spilling, max registers, max shared memory, min resident warps/SM."""
    fams: dict[str, dict[str, Any]] = {}
    for v in report.get("variants", []) or []:
        fam = v.get("family") or str(v.get("kernel", "?")).split(".")[0]
        f = fams.setdefault(fam, {"variants": 0, "failed": 0, "spilling": 0, "accepted": 0, "max_registers": None,
                                  "max_smem_kib": None, "min_warps_per_sm": None, "lowest_occupancy": None,
                                  "compile_s": 0.0})
        f["variants"] += 1
        r = v.get("resources")
        if not isinstance(r, dict) or v.get("error"):
            f["failed"] += 1
            continue
        if r.get("spill_store_bytes") or r.get("spill_load_bytes"):
            f["spilling"] += 1
        if r.get("accepted"):
            f["accepted"] += 1
        if _finite(r.get("compile_s")):
            f["compile_s"] = round(f["compile_s"] + r["compile_s"], 1)  # what the JIT pays for these on a cold cache
        regs, smem, warps = r.get("registers"), r.get("smem_bytes"), r.get("warps_per_sm")
        if _finite(regs):
            f["max_registers"] = max(f["max_registers"] or 0, regs)
        if _finite(smem):
            f["max_smem_kib"] = round(max(f["max_smem_kib"] or 0, smem / 1024), 1)
        if _finite(warps) and (f["min_warps_per_sm"] is None or warps < f["min_warps_per_sm"]):
            f["min_warps_per_sm"] = warps
            f["lowest_occupancy"] = f"{v.get('kernel')} [{v.get('variant')}] ({r.get('limited_by')})"
    problems = report.get("problems", []) or []
    return {"summary": report.get("summary"), "families": fams, "problems": problems[:100],
            "problems_total": len(problems), "static_env": report.get("env")}


# ----------------------------------------------------------------------------------------------
# phase: microbenchmarks
# ----------------------------------------------------------------------------------------------
def breadth_first(cases: list) -> list[int]:
    """Indices in run order: the middle point of every op's sweep first (the headline shapes:
    4096x4096 1% top-k, SDDMM T=4096, ...), then the rest of each sweep in the listed order."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(cases):
        groups.setdefault(c.name, []).append(i)
    first = [idx[len(idx) // 2] for idx in groups.values()]
    chosen = set(first)
    return first + [i for i in range(len(cases)) if i not in chosen]


def phase_bench(run: Run, ph: Phase, deadline: float) -> None:
    import gc

    import torch

    from .harness import (FAMILIES, Policy, case_model_dict, format_table, load_cases, measure_roofline, plot, run_case,
                          to_json)

    device = run.device
    modules = None  # --bench-only sift.topk loads bench/sift.py only (building every family's cases takes a while)
    if run.args.bench_only and all(o.split(".")[0] in FAMILIES for o in run.args.bench_only):
        modules = sorted({o.split(".")[0] for o in run.args.bench_only})
    cases = load_cases(device, run.quick, modules)
    if run.args.bench_only:
        cases = [c for c in cases if any(o in c.name for o in run.args.bench_only)]
        if not cases:
            ph.status = "error"
            ph.notes.append(f"no bench case matches --bench-only {run.args.bench_only}")
            return
    roof = measure_roofline(device)
    if run.cuda:
        log(f"bench: roofline copy {roof['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
            f"bf16 GEMM {roof['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s")
    log(f"bench: {len(cases)} cases ({'quick' if run.quick else 'full'} shapes), "
        f"{max(0.0, deadline - time.monotonic()):.0f} s")
    results: dict[int, Any] = {}
    status: dict[int, dict[str, Any]] = {}
    durations: list[float] = []
    order = breadth_first(cases)
    ph.data = {"roofline": roof, "quick": run.quick, "compile_reference": not run.args.no_compile,
               "once": run.args.bench_once}
    try:
        for n, i in enumerate(order):
            case = cases[i]
            left = deadline - time.monotonic()
            estimate = statistics.median(durations) if durations else 0.0
            if left <= 0 or left < estimate:
                for j in order[n:]:
                    status[j] = {"status": "not run: budget"}
                break
            t0 = time.perf_counter()
            try:
                policy = Policy(budget_s=max(0.05, min(run.args.case_budget_s, left)))
                res = run_case(case, device, once=run.args.bench_once, compile_ref=not run.args.no_compile,
                               policy=policy)
                results[i] = res
                bad = [k for k, v in res.times_us.items() if not _finite(v)]
                # a failed torch.compile baseline is recorded, the row still stands on reference vs peftops
                status[i] = {"status": "error" if {"reference", "peftops"} & set(bad) else "ok",
                             "errors": res.errors or {k: "failed" for k in bad}}
            except KeyboardInterrupt:
                status[i] = {"status": "interrupted"}
                raise
            except Exception as e:
                msg = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                skipped = isinstance(e, ModuleNotFoundError)
                status[i] = {"status": "skipped" if skipped else "error", "error": msg}
                log(f"bench: {case.name} [{case.shape}] {'skipped' if skipped else 'FAILED'}: {msg}")
                if skipped:
                    run.skip(f"bench {case.name} [{case.shape}]", msg)
            finally:
                dt = time.perf_counter() - t0
                status.setdefault(i, {})["wall_s"] = round(dt, 2)
                durations.append(dt)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        ordered = [results[i] for i in sorted(results)]
        rows_by_index = dict(zip(sorted(results), to_json(ordered, roof, run.env)["results"]))
        rows = []
        for i, c in enumerate(cases):
            row = rows_by_index.get(i) or {"name": c.name, "shape": c.shape, "times_us": {}, "sweep": c.sweep,
                                           "note": c.note, "model": case_model_dict(c)}
            row.update(status.get(i, {"status": "not run: interrupted"}))
            row["family"] = c.name.split(".")[0]
            row["order"] = order.index(i)
            rows.append(row)
        ph.data["rows"] = rows
        ph.data["not_run"] = [f"{r['name']} [{r['shape']}]" for r in rows if r["status"] == "not run: budget"]
        if ordered:
            print(format_table(ordered, roof), flush=True)
            png = os.path.join(run.out, "bench.png")
            if plot(ordered, png):
                ph.data["plot"] = "bench.png"
            elif not _has("matplotlib"):
                run.skip("bench plot", "matplotlib not installed")
            else:
                ph.notes.append("no plot: no swept case ran")
    n_cut = len(ph.data["not_run"])
    n_err = sum(r["status"] == "error" for r in rows)
    n_unstable = sum(r.get("stable") is False for r in rows)
    if n_unstable:
        ph.notes.append(f"{n_unstable} rows UNSTABLE (no speedup claimed; reasons per row)")
    if n_cut:
        ph.notes.append(f"{n_cut} of {len(cases)} cases not run: budget")
        run.skip(f"bench: {n_cut} cases", "not run: budget")
    if n_err:
        ph.notes.append(f"{n_err} cases failed (recorded per row)")
    ph.status = "cut: budget" if n_cut else "ok"


# ----------------------------------------------------------------------------------------------
# phase: whole-model benchmark
# ----------------------------------------------------------------------------------------------
def phase_model(run: Run, ph: Phase, deadline: float) -> None:
    import torch

    from . import model as M

    device = run.device
    spec = M.SPECS["tiny" if run.quick else "1b"]
    s = M.Settings(spec=spec, batch_size=spec.batch_size, seq_len=spec.seq_len, dtype=spec.dtype,
                   warmup=spec.warmup, steps=spec.steps, grad_ckpt=False)
    methods = run.args.model_methods or list(M.METHODS)
    g = torch.Generator().manual_seed(s.seed + 1)
    ids = torch.randint(0, spec.vocab_size, (s.batch_size, s.seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids}
    rows: list[dict[str, Any]] = []
    durations: list[float] = []
    smoke = M.smoke_reasons(s)
    ph.data = {"settings": s.to_json(), "tokens_per_step": s.tokens, "rows": rows, "smoke": bool(smoke),
               "smoke_reasons": smoke}
    if smoke:
        ph.notes.append("smoke run: " + "; ".join(smoke) + " (its step times say nothing about speed)")
    log(f"model: '{spec.name}' Llama, batch {s.batch_size} x {s.seq_len}, {s.warmup} warm-up + {s.steps} steps, "
        f"{len(methods)} methods, {max(0.0, deadline - time.monotonic()):.0f} s")
    threads = torch.get_num_threads()
    if device.type == "cpu" and spec.name == "tiny":
        torch.set_num_threads(1)  # as bench/model.py does: tiny ops gain nothing from threads
    M._cleanup(device)
    try:
        for n, name in enumerate(methods):
            if name == "lora" and not _has("peft"):
                rows.append({"method": name, "status": "skipped", "error": "peft not installed"})
                run.skip("model lora", "peft not installed")
                continue
            left = deadline - time.monotonic()
            # before the first method: a guess (the 1.1B model's build + warm-up autotuning + 20 steps)
            estimate = max(durations) if durations else (15.0 if spec.name == "1b" else 0.0)
            if left <= 0 or left < estimate:
                for rest in methods[n:]:
                    rows.append({"method": rest, "status": "not run: budget", "error": "not run: budget"})
                break
            t0 = time.perf_counter()
            try:
                rows.append(M.run_method(name, s, batch, device, log=lambda m: log(f"model: {m}")))
            except KeyboardInterrupt:
                rows.append({"method": name, "status": "interrupted", "error": "interrupted"})
                raise
            except Exception as e:
                st = "oom" if M._is_oom(e) else "error"
                rows.append({"method": name, "status": st,
                             "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"})
                log(f"model: {name}: {st.upper()}: {rows[-1]['error']}")
            finally:
                durations.append(time.perf_counter() - t0)
                rows[-1]["wall_s"] = round(durations[-1], 1)
                M._cleanup(device)
    finally:
        torch.set_num_threads(threads)
        M.add_ratios(rows, device)
        if rows:
            print(M.format_table(rows, device, smoke=bool(smoke)), flush=True)
    cut = [r["method"] for r in rows if r["status"] == "not run: budget"]
    if cut:
        ph.notes.append(f"not run: budget: {', '.join(cut)}")
        run.skip(f"model: {', '.join(cut)}", "not run: budget")
    errs = [r["method"] for r in rows if r["status"] == "error"]
    if errs:
        ph.notes.append(f"failed: {', '.join(errs)}")
    ph.status = "cut: budget" if cut else "ok"


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def to_json_doc(run: Run) -> dict[str, Any]:
    return {
        "schema": SCHEMA, "status": run.status, "exit_code": run.exit_code,
        "command": "python -m bench.gpu_run " + " ".join(run.args.argv), "started": run.started,
        "budget_s": run.budget.total_s, "budget_used_s": round(run.budget.used(), 1),
        "shares": run.budget.shares, "phases_selected": run.args.phases,
        "phases": {name: ph.summary() for name, ph in run.phases.items()},
        "skipped": run.skipped, "environment": run.env,
        **{name: run.phases[name].data if name in run.phases else None for name in PHASES},
    }


def write_outputs(run: Run) -> None:
    doc = to_json_doc(run)
    tmp = os.path.join(run.out, "gpu_run.json.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=_json_default)
    os.replace(tmp, os.path.join(run.out, "gpu_run.json"))
    with open(os.path.join(run.out, "summary.md"), "w") as f:
        f.write(summary_markdown(doc))


def _json_default(o):
    if isinstance(o, float):
        return None if not math.isfinite(o) else o
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return str(o)


def _f(v, spec: str = ".1f", suffix: str = "") -> str:
    return f"{v:{spec}}{suffix}" if _finite(v) else "-"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in cells]


def _ci(ci) -> str:
    return f"{ci[0]:.2f}-{ci[1]:.2f}" if ci and _finite(ci[0]) and _finite(ci[1]) else "-"


def _flag(row: dict[str, Any]) -> str:
    if row.get("stable") is None:
        return "-"
    return "ok" if row["stable"] else "UNSTABLE: " + "; ".join(row.get("unstable_reasons") or [])


def _bench_status(row: dict[str, Any]) -> str:
    errs = row.get("error") or "; ".join(f"{k}: {v}" for k, v in (row.get("errors") or {}).items())
    return f"{row['status']}: {errs[:100]}" if errs else row["status"]


def _model_us(row: dict[str, Any], device: str) -> float | None:
    """The model's predicted us of a bench row on ``device`` (also for rows that did not run)."""
    return row.get("model_predicted_us") or ((row.get("model") or {}).get(device) or {}).get("predicted_us")


def summary_markdown(doc: dict[str, Any]) -> str:
    env = doc.get("environment") or {}
    run_device = "h200" if "H200" in str(env.get("device", "")).upper() else "h100"
    L = [f"# peftops GPU run: {env.get('device', '?')}", ""]
    L.append(f"status **{doc['status']}** (exit {doc['exit_code']}), {doc['budget_used_s']:.0f} s of "
             f"{doc['budget_s']:.0f} s budget; commit {env.get('commit') or '?'}{' (dirty)' if env.get('dirty') else ''} "
             f"(source digest {env.get('source_digest')}); "
             f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, driver "
             f"{env.get('driver', '-')}; capability {env.get('capability', '-')}, {env.get('sm_count', '-')} SMs; "
             f"triton cache files at start: {env.get('triton_cache_files')}")
    L.append("")
    L += _table(["phase", "status", "wall s", "share s", "notes"],
                [[n, p["status"], _f(p["wall_s"]), _f(p["share_s"]), "; ".join(p["notes"])]
                 for n, p in doc["phases"].items()])
    L.append("")

    tests, bench, model, static = doc.get("tests"), doc.get("bench"), doc.get("model"), doc.get("static")
    # per family: what was measured next to the static resources
    fams = ["sift", "aot", "wegeft", "cka", "safe"]
    rows = []
    for fam in fams:
        t = [e for e in (tests or {}).get("entries", []) if e.get("family") == fam]
        b = [r for r in (bench or {}).get("rows", []) if r.get("family") == fam]
        st = ((static or {}).get("families") or {}).get(fam)
        if not (t or b or st):
            continue
        sp = [r["speedup_vs_reference"] for r in b if _finite(r.get("speedup_vs_reference"))]
        roof = [r["percent_of_roofline"] for r in b if _finite(r.get("percent_of_roofline"))]
        rows.append([
            fam,
            "/".join(str(sum(e.get(k, 0) or 0 for e in t)) for k in ("passed", "failed", "error", "skipped")) if t else "-",
            f"{sum(r['status'] == 'ok' for r in b)}/{len(b)}" if b else "-",
            f"{min(sp):.2f}x-{max(sp):.2f}x (median {statistics.median(sp):.2f}x)" if sp else "-",
            f"{statistics.median(roof):.0f}%" if roof else "-",
            f"{st['variants']} ({st['failed']} failed, {st['spilling']} spill)" if st else "-",
            f"{st['max_registers']}" if st and st["max_registers"] is not None else "-",
            f"{st['max_smem_kib']}" if st and st["max_smem_kib"] is not None else "-",
            f"{st['min_warps_per_sm']}" if st and st["min_warps_per_sm"] is not None else "-",
        ])
    if rows:
        L += ["## Per kernel family", ""]
        L += _table(["family", "tests pass/fail/err/skip", "bench cases run", "speedup vs reference",
                     "median % roofline", "static variants", "max regs", "max smem KiB", "min warps/SM"], rows)
        L.append("")

    if tests:
        t = tests.get("totals", {})
        L += ["## Tests", "", f"{t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('error', 0)} errors, "
              f"{t.get('skipped', 0)} skipped, {t.get('not_run', 0)} not run (device {tests.get('device')}, "
              f"{tests.get('jobs')} pytest processes)", ""]
        L += _table(["file", "-k", "status", "passed", "failed", "errors", "skipped", "not run", "s"],
                    [[e["file"], f"`{e['k']}`", e.get("status", "-"), e.get("passed", "-"), e.get("failed", "-"),
                      e.get("error", "-"), e.get("skipped", "-"), e.get("not_run", "-"), _f(e.get("wall_s"), ".0f")]
                     for e in tests.get("entries", [])])
        fails = [f for e in tests.get("entries", []) for f in e.get("failures", [])]
        if fails:
            L += ["", f"### Failures ({len(fails)})", ""]
            for f in fails[:30]:
                first = (f["message"].strip().splitlines() or [""])[0][:200]
                L += [f"- `{f['id']}`: {first}", "", "```", _short(f["traceback"], 1200, 15), "```"]
            if len(fails) > 30:
                L.append(f"- ... {len(fails) - 30} more in gpu_run.json")
        cut = [e for e in tests.get("entries", []) if e.get("running_at_cut")]
        for e in cut:
            L.append(f"- {e['file']}: cut while running `{e['running_at_cut']}`")
        L.append("")

    if bench:
        roof = bench.get("roofline") or {}
        L += ["## Microbenchmarks", ""]
        if _finite(roof.get("copy_bytes_per_s")):
            L += [f"roofline measured in this run: copy {roof['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 GEMM "
                  f"{roof['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s", ""]
        else:
            L += ["no roofline (no GPU): CPU times of the reference vs the peftops CPU path, not kernel figures", ""]
        L += ["times: median us per call over interleaved rounds; speedup: median paired ratio, shown only for "
              "stable rows (UNSTABLE rows claim none; the reason is in the flag column and every sample in "
              "gpu_run.json)", ""]
        L += ["model us: the performance model's prediction for the peftops path on this GPU (H200 if it is "
              "one, else H100; docs/perf-model.md), an estimate; meas/model = measured / predicted", ""]
        L += _table(["case", "shape", "status", "rounds", "reference us", "compiled us", "peftops us", "speedup",
                     "95% CI", "vs compiled", "% roofline", "model us", "meas/model", "flag"],
                    [[r["name"], r["shape"], _bench_status(r), r.get("rounds", "-"),
                      _f(r["times_us"].get("reference")), _f(r["times_us"].get("compiled")),
                      _f(r["times_us"].get("peftops")),
                      _f(r.get("speedup_vs_reference"), ".2f", "x") if r.get("stable") is not False else "UNSTABLE",
                      _ci(r.get("ratio_vs_reference_ci")),
                      _f(r.get("speedup_vs_compiled"), ".2f", "x"), _f(r.get("percent_of_roofline"), ".0f", "%"),
                      _f(_model_us(r, run_device)), _f(r.get("measured_over_model"), ".2f"), _flag(r)]
                     for r in bench.get("rows", [])])
        if bench.get("plot"):
            L += ["", f"![sweeps]({bench['plot']})"]
        L.append("")

    if model:
        st = model.get("settings") or {}
        m = st.get("model") or {}
        L += ["## Whole-model training step", "",
              f"Llama '{st.get('config')}' (hidden {m.get('hidden_size')}, {m.get('num_hidden_layers')} layers), "
              f"{st.get('dtype')}, batch {st.get('batch_size')} x {st.get('seq_len')}, {st.get('steps')} timed steps", ""]
        if model.get("smoke"):
            L += [f"**SMOKE RUN** ({'; '.join(model.get('smoke_reasons') or [])}): it checks that every method "
                  "builds, trains and is measured; its step times say nothing about speed and rank nothing.", ""]
        cuda = (env.get("device_type") == "cuda")
        L += _table(["method", "status", "trainable", "step ms", "tokens/s", "peak MiB" if cuda else "train-state MiB",
                     "time vs full", "mem vs full", "time vs lora", "note"],
                    [[r["method"], r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')[:80]}",
                      f"{r['trainable']:,}" if _finite(r.get("trainable")) else "-", _f(r.get("step_ms")),
                      _f(r.get("tokens_per_s"), ",.0f"), _f(r.get("peak_mib") if cuda else r.get("train_state_mib")),
                      _f(r.get("time_vs_full"), ".2f", "x"), _f(r.get("memory_vs_full"), ".2f", "x"),
                      _f(r.get("time_vs_lora"), ".2f", "x"), r.get("note", "")]
                     for r in model.get("rows", [])])
        L.append("")

    if static:
        L += ["## Static resources (sm_90a, no GPU needed)", "", f"`{static.get('cmd')}` -> rc {static.get('rc')}", ""]
        if static.get("families"):
            L += _table(["family", "variants", "failed", "spilling", "accepted", "max regs", "max smem KiB",
                         "min warps/SM", "lowest occupancy", "compile s (sum)"],
                        [[fam, f["variants"], f["failed"], f["spilling"], f["accepted"], f["max_registers"] or "-",
                          f["max_smem_kib"] or "-", f["min_warps_per_sm"] if f["min_warps_per_sm"] is not None else "-",
                          f["lowest_occupancy"] or "-", f.get("compile_s", "-")]
                         for fam, f in static["families"].items()])
            if static.get("problems"):
                L += ["", f"gate problems ({static.get('problems_total')}):"] + [f"- {p}" for p in static["problems"][:20]]
            if static.get("markdown"):
                L += ["", f"full table: [{static['markdown']}]({static['markdown']})"]
        elif static.get("error"):
            L += ["```", _short(static["error"], 1500, 20), "```"]
        L.append("")

    if doc.get("skipped"):
        L += ["## Skipped or cut", ""] + [f"- {s['what']}: {s['why']}" for s in doc["skipped"]] + [""]
    return "\n".join(L)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
class UsageError(Exception):
    pass


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_run", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Phases: " + ", ".join(PHASES) + ". See the module docstring for the "
                                        "runtime estimate.")
    ap.add_argument("--out", default=default_out_dir("gpu-run"),
                    help="output directory (created; default $PEFTOPS_BENCH_OUT/gpu-run or "
                         "~/.cache/peftops/bench/gpu-run/, outside the source tree)")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help=f"wall-clock budget of the whole run in seconds (default {DEFAULT_BUDGET_S:.0f}, "
                         f"at least {MIN_BUDGET_S:.0f})")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma list of phases to run (default: all)")
    ap.add_argument("--shares", default="",
                    help="budget shares, e.g. 'tests=0.2,bench=0.6' (default tests=0.35,bench=0.40,model=0.25; "
                         "static runs alongside the tests, or gets 0.15 alone)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    ap.add_argument("--quick", action="store_true", help="small bench shapes and the tiny model even on a GPU")
    tg = ap.add_argument_group("tests")
    tg.add_argument("--tests-files", default="", help="comma list of test files instead of TEST_SELECTION")
    tg.add_argument("--tests-k", default=None, help="pytest -k expression for every test file ({dev}: cuda / cpu)")
    tg.add_argument("--test-jobs", type=int, default=0, help="pytest processes at once (default: 4 on a GPU, 1 on CPU)")
    tg.add_argument("--test-timeout-s", type=float, default=180.0,
                    help="per-test limit when pytest-timeout is installed (default 180)")
    bg = ap.add_argument_group("bench and model")
    bg.add_argument("--bench-only", action="append", default=[],
                    help="run bench cases whose name contains this (repeatable)")
    bg.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) column")
    bg.add_argument("--bench-once", action="store_true",
                    help="one warm-up and one timed call per path (a smoke run, not a measurement)")
    bg.add_argument("--case-budget-s", type=float, default=2.0,
                    help="timing budget per bench case, warm-up not counted (default 2; never past the phase's)")
    bg.add_argument("--model-methods", default="", help="comma list of model methods (default: all)")
    bg.add_argument("--static-families", default="", help="comma list of kernel families for the static check")
    ns = ap.parse_args(argv)
    ns.argv = list(argv)

    if not math.isfinite(ns.budget_s) or ns.budget_s < MIN_BUDGET_S:
        raise UsageError(f"--budget-s {ns.budget_s:g} is too small to do anything useful: give at least "
                         f"{MIN_BUDGET_S:.0f} s (the default, {DEFAULT_BUDGET_S:.0f} s, is the full GPU run)")
    if not (math.isfinite(ns.case_budget_s) and ns.case_budget_s > 0):
        raise UsageError(f"--case-budget-s {ns.case_budget_s:g}: give a positive number of seconds")
    ns.phases = _csv(ns.phases)
    unknown = [p for p in ns.phases if p not in PHASES]
    if unknown or not ns.phases:
        raise UsageError(f"--phases: unknown phase {', '.join(unknown) or '(none given)'}; choose from {', '.join(PHASES)}")
    shares = dict(DEFAULT_SHARES)
    for item in _csv(ns.shares):
        name, _, val = item.partition("=")
        try:
            v = float(val)
        except ValueError:
            v = float("nan")
        if name not in PHASES or not (v > 0 and math.isfinite(v)):
            raise UsageError(f"--shares: '{item}' is not PHASE=POSITIVE_NUMBER with PHASE one of {', '.join(PHASES)}")
        shares[name] = v
    ns.shares = shares
    ns.tests_files = _csv(ns.tests_files)
    missing = [f for f in ns.tests_files if not os.path.isfile(os.path.join(ROOT, f))]
    if missing:
        raise UsageError(f"--tests-files: no such file under {ROOT}: {', '.join(missing)}")
    if ns.test_jobs < 0:
        raise UsageError("--test-jobs must be >= 1 (0: automatic)")
    ns.model_methods = _csv(ns.model_methods)
    known_methods = ["full", "lora", "sift", "aot", "wegeft", "wegeft+safe"]  # bench.model.METHODS
    bad = [m for m in ns.model_methods if m not in known_methods]
    if bad:
        raise UsageError(f"--model-methods: unknown {', '.join(bad)}; choose from {', '.join(known_methods)}")
    ns.static_families = _csv(ns.static_families)
    ns.out = os.path.abspath(ns.out)
    if os.path.exists(ns.out) and not os.path.isdir(ns.out):
        raise UsageError(f"--out {ns.out} is a file, not a directory")
    try:
        os.makedirs(ns.out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {ns.out}: cannot create it ({e.strerror or e})") from None
    if not os.access(ns.out, os.W_OK):
        raise UsageError(f"--out {ns.out} is not writable")
    return ns


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def _run_phase(run: Run, name: str, deadline: float, secs: float | None) -> None:
    """Run one phase into run.phases[name]; an exception is recorded there, KeyboardInterrupt propagates."""
    import traceback

    ph = run.phases[name] = Phase(name, status="running", share_s=secs)
    fn = {"env": phase_env, "tests": phase_tests, "bench": phase_bench, "model": phase_model}[name]
    t0 = time.perf_counter()
    try:
        fn(run, ph) if name == "env" else fn(run, ph, deadline)
    except KeyboardInterrupt:
        ph.status = "interrupted"
        raise
    except Exception as e:  # a phase that cannot run at all is recorded; the others still run
        ph.status = "error"
        ph.notes.append(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
        ph.data["error"] = _short(traceback.format_exc())
        log(f"{name}: ERROR {ph.notes[-1]}")
    finally:
        ph.wall_s = time.perf_counter() - t0


def _join_static(run: Run, child: Child, interrupted: bool = False) -> None:
    share = run.phases["static"].share_s
    if interrupted:
        child.stop(grace_s=2.0)
    run.phases["static"] = finish_static(run, child, interrupted)
    run.phases["static"].share_s = share


def execute(run: Run) -> int:
    args = run.args
    selected = [p for p in PHASES if p in args.phases]
    todo = [p for p in ("tests", "bench", "model") if p in selected]
    static_child = None
    try:
        _run_phase(run, "env", 0.0, None)
        if run.phases["env"].status != "ok":
            raise SystemExit  # nothing else can run without torch and a device
        write_outputs(run)
        if "static" in selected:
            if "tests" in selected:  # CPU-only compile work: alongside the tests, on the cores they leave
                deadline, secs = run.budget.slot("tests", todo)
                cores = max(1, (os.cpu_count() or 1) - n_pytest_processes(run))
            else:
                deadline, secs = run.budget.slot("static", ["static"] + todo)
                cores = os.cpu_count() or 1
            run.phases["static"] = Phase("static", status="running", share_s=secs)
            static_child = start_static(run, deadline, cores)
            if "tests" not in selected:
                child, static_child = static_child, None
                _join_static(run, child)
                write_outputs(run)
        for name in todo:
            deadline, secs = run.budget.slot(name, todo[todo.index(name):])
            log(f"{name}: {secs:.0f} s")
            _run_phase(run, name, deadline, secs)
            if name == "tests" and static_child is not None:
                child, static_child = static_child, None
                _join_static(run, child)
            write_outputs(run)
        tests = run.phases.get("tests")
        run.exit_code = 1 if tests is not None and tests.status in ("failed", "error") else 0
        run.status = "complete"
    except SystemExit:
        run.status, run.exit_code = "error", 3
    except KeyboardInterrupt:
        log("interrupted: writing what is done")
        run.status, run.exit_code = "interrupted", 130
        if static_child is not None:
            _join_static(run, static_child, interrupted=True)
    finally:
        for ph in run.phases.values():
            if ph.status == "running":
                ph.status = "interrupted"
        write_outputs(run)
        log(f"wrote {os.path.join(run.out, 'gpu_run.json')} and summary.md ({run.budget.used():.0f} s of "
            f"{run.budget.total_s:.0f} s); exit {run.exit_code}")
    return run.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"python -m bench.gpu_run: error: {e}", file=sys.stderr)
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("python -m bench.gpu_run: error: --device cuda but torch sees no CUDA device "
                  f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})", file=sys.stderr)
            return 2
    budget = Budget(args.budget_s, args.shares)
    run = Run(args=args, out=args.out, budget=budget)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # started in the background by a non-interactive shell: SIGINT is ignored and the children would
        # inherit that, so neither this run nor pytest could be interrupted cleanly
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return execute(run)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
