"""Whole-model training step of every method on a Llama-style model: ``python -m bench --model``.

For each method (full fine-tuning, peft LoRA, SIFT, AoT, WeGeFT, WeGeFT+SAFE) a fresh model is built
from the same seed (random init from a ``transformers.LlamaConfig``, nothing downloaded), adapted,
warmed up, then N training steps (forward + backward + optimizer step + zero_grad on one fixed batch
of random tokens, causal-LM loss) are timed one by one. Per method:

- trainable parameters; median step time and tokens/s;
- CUDA: peak memory (``max_memory_allocated`` over the timed steps, minus what was allocated before
  the model was built), memory held by the weights alone (after building and adapting), and by
  weights + optimizer state (after warm-up);
- every device: the train state of one extra, untimed step: gradients + optimizer state + tensors
  autograd saves for backward (``peftops.SavedTensorMeter``: activations only, saved weights are
  not counted since they cost no memory). On CPU it is the memory figure (no allocator peak).
- ratios to full fine-tuning and to LoRA from the same run.

Configs: ``1b`` = TinyLlama-1.1B's shape (hidden 2048, 22 layers, MLP 5632, 32 heads, 4 KV heads,
vocab 32000, untied), bf16 weights, sdpa attention, batch 4 x 1024 tokens; ``tiny`` (CPU, tests,
``--quick``): hidden 128, 2 layers, 2 timed steps: a SMOKE RUN (it says so in its output and JSON), which
checks that every method builds, trains and is measured, and says nothing about speed; a run of the tiny
model or of fewer than 10 timed steps is one. Results go to ``<out>/model-<device>.json``, <out> being
--out or the default output directory ($PEFTOPS_BENCH_OUT, else ~/.cache/peftops/bench/), outside the
source tree; bench/results/ takes only full-size CUDA runs, and only when named with --out.

What each row is:
  full         every parameter trains (bf16 weights, grads and AdamW state: "pure bf16", the
               smallest full fine-tuning footprint; fp32 master weights would add 12 B/param)
  lora         peft LoraConfig r=16, alpha=32 on q,k,v,o,gate,up,down; peft's default fp32 adapters
  sift         density 0.01 on the same 7 projections; calibration (one batch) outside the timing;
               peftops.SparseAdamW
  aot          AoT P-Tuning, kron reparameterisation, rank 16
  wegeft       r=64, alpha=128, one (Φ, Ψ) per projection type shared over layers, q,k,v,up,down
  wegeft+safe  WeGeFT with per-layer generators (SAFE freezes per-layer units) after SAFE has
               frozen every unit of the lower half of the layers (``SAFE.freeze``): the state its
               schedule reaches when the lower half scores below threshold. Frozen generators get no
               grad and no optimizer state; with the base frozen, nothing below the middle layer is
               recorded by autograd. Deterministic (no measured importances involved).
Every optimizer is AdamW (lr 1e-5 full, 1e-4 adapters, no weight decay), fused on CUDA.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import re
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn

from .harness import RESULTS_DIR, _sync, environment, sample_stats  # noqa: F401  (RESULTS_DIR: the official --out, read by callers)
from .harness import resolve_out_dir as _resolve_out_dir

METHODS = ["full", "lora", "sift", "aot", "wegeft", "wegeft+safe"]
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIN_STEPS_TO_RANK = 10  # fewer timed steps: a smoke run
MAX_STEP_SPREAD = 0.10  # (p90 - p10) / median of the step times above this: the row is UNSTABLE


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A Llama shape plus the default run settings for it."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    batch_size: int
    seq_len: int
    dtype: torch.dtype
    warmup: int
    steps: int
    lora_r: int = 16
    aot_rank: int = 16
    wegeft_r: int = 64

    def llama_config(self, seq_len: int):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            intermediate_size=self.intermediate_size, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, vocab_size=self.vocab_size,
            max_position_embeddings=max(2048, seq_len), tie_word_embeddings=False, use_cache=False,
            attention_dropout=0.0, attn_implementation="sdpa",
        )


SPECS = {
    "1b": ModelSpec("1b", 2048, 22, 5632, 32, 4, 32000, batch_size=4, seq_len=1024, dtype=torch.bfloat16,
                    warmup=3, steps=20),
    # ranks scaled to the width so adapters stay small next to the model, as they are at 1B
    "tiny": ModelSpec("tiny", 128, 2, 256, 4, 2, 512, batch_size=2, seq_len=32, dtype=torch.bfloat16,
                      warmup=1, steps=2, lora_r=4, aot_rank=4, wegeft_r=8),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass
class Settings:
    spec: ModelSpec
    batch_size: int
    seq_len: int
    dtype: torch.dtype
    warmup: int
    steps: int
    grad_ckpt: bool
    seed: int = 0
    sift_density: float = 0.01
    lr_full: float = 1e-5
    lr_adapter: float = 1e-4

    @property
    def lora_r(self) -> int:
        return self.spec.lora_r

    @property
    def aot_rank(self) -> int:
        return self.spec.aot_rank

    @property
    def wegeft_r(self) -> int:
        return self.spec.wegeft_r

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "spec"}
        d["dtype"] = str(self.dtype).replace("torch.", "")
        d["config"] = self.spec.name
        spec = dataclasses.asdict(self.spec)
        d["model"] = {k: spec[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                           "num_attention_heads", "num_key_value_heads", "vocab_size")}
        d.update(lora_r=self.lora_r, aot_rank=self.aot_rank, wegeft_r=self.wegeft_r, attn_implementation="sdpa",
                 tie_word_embeddings=False)
        return d


# ----------------------------------------------------------------------------------------------
# model and methods
# ----------------------------------------------------------------------------------------------
def build_base(s: Settings, device: torch.device) -> nn.Module:
    """A randomly initialised LlamaForCausalLM, same weights for every method (seeded), in train mode."""
    from transformers import LlamaForCausalLM

    cfg = s.spec.llama_config(s.seq_len)
    torch.manual_seed(s.seed)
    # Created on the device (a 1.1B init on the CPU takes tens of seconds) and in the weights' dtype,
    # as from_pretrained(dtype=...) does: parameters bf16, RoPE's inv_freq stays fp32 (built in fp32).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(s.dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    if any(p.dtype != s.dtype for p in model.parameters()):
        raise RuntimeError(f"build_base: parameters are not all {s.dtype} "
                           f"({sorted({str(p.dtype) for p in model.parameters()})})")
    model.config.use_cache = False
    return model.train()


def _adamw(params, lr: float, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=device.type == "cuda")


@dataclasses.dataclass
class Prepared:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    note: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # recorded in the row


def prepare_full(model, s: Settings, batch, device) -> Prepared:
    for p in model.parameters():
        p.requires_grad_(True)
    return Prepared(model, _adamw(model.parameters(), s.lr_full, device), "all parameters, pure bf16 AdamW"
                    if s.dtype == torch.bfloat16 else "all parameters")


def prepare_lora(model, s: Settings, batch, device) -> Prepared:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=s.lora_r, lora_alpha=2 * s.lora_r, lora_dropout=0.0, target_modules=list(LLAMA_LINEARS),
                     bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(model, cfg)  # autocast_adapter_dtype=True: fp32 adapters on a bf16 base
    adapter_dtype = next(p.dtype for p in model.parameters() if p.requires_grad)
    return Prepared(model, _adamw(model.parameters(), s.lr_adapter, device),
                    f"peft r={s.lora_r} a={2 * s.lora_r}, 7 proj, {str(adapter_dtype)[6:]} adapters")


def prepare_sift(model, s: Settings, batch, device) -> Prepared:
    import peftops

    peftops.apply(model, peftops.SIFTConfig(density=s.sift_density, target_modules=list(LLAMA_LINEARS)))
    peftops.sift_calibrate(model, [batch], progress=False)  # one dense ∇W at a time; not timed
    return Prepared(model, peftops.SparseAdamW(model, lr=s.lr_adapter),
                    f"density {s.sift_density}, 7 proj, SparseAdamW")


def prepare_aot(model, s: Settings, batch, device) -> Prepared:
    import peftops

    peftops.apply(model, peftops.AoTConfig(reparam="kron", rank=s.aot_rank))
    return Prepared(model, _adamw(model.parameters(), s.lr_adapter, device), f"kron r={s.aot_rank}")


def prepare_wegeft(model, s: Settings, batch, device, *, per_layer: bool = False) -> Prepared:
    import peftops

    from peftops.kernels.wegeft import choose_path

    # default targets for Llama: q, k, v, up, down (the authors' LLM setting)
    peftops.apply(model, peftops.WeGeFTConfig(r=s.wegeft_r, alpha=2.0 * s.wegeft_r, share_generators=not per_layer))
    # the kernel path each projection takes at this token count (Triton only; CPU runs the reference)
    paths = {m.generator_key: choose_path(s.tokens, m.out_features, m.in_features) if m.path == "auto" else m.path
             for m in model.modules() if isinstance(m, peftops.WeGeFTLinear)}
    kinds = "/".join(sorted(set(paths.values())))
    where = f"{kinds} path at T={s.tokens}" if _kernel_backend(device) == "triton" else "reference ops"
    return Prepared(model, _adamw(model.parameters(), s.lr_adapter, device),
                    f"r={s.wegeft_r} a={2 * s.wegeft_r}, qkv+up+down, "
                    f"{'per-layer' if per_layer else 'shared'}, {where}",
                    extra={"wegeft_paths": paths})


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def lower_half(unit_name: str, n_layers: int) -> bool:
    """Whether an adapter unit named ``...layers.<i>....`` sits in layers 0 .. n_layers/2 - 1."""
    m = _LAYER_INDEX.search(unit_name)
    return m is not None and int(m.group(1)) < n_layers // 2


def prepare_wegeft_safe(model, s: Settings, batch, device) -> Prepared:
    import peftops

    prep = prepare_wegeft(model, s, batch, device, per_layer=True)
    n_layers = s.spec.num_hidden_layers
    # The schedule is irrelevant here (never stepped): freezing is explicit and deterministic.
    safe = peftops.SAFE(prep.model, peftops.SAFEConfig(warmup_steps=1, ramp_end_step=2, final_threshold=0.0),
                        optimizer=prep.optimizer)
    frozen = safe.freeze(lambda name: lower_half(name, n_layers))
    safe.remove()  # no measuring hooks during the timed steps
    if not frozen:
        raise RuntimeError("wegeft+safe: no adapter unit found in the lower half of the layers")
    opt = _adamw(prep.model.parameters(), s.lr_adapter, device)  # only what still trains
    return Prepared(prep.model, opt, prep.note + f"; SAFE froze layers 0-{n_layers // 2 - 1} ({len(frozen)} units)",
                    extra={**prep.extra, "safe_frozen_units": len(frozen)})


PREPARE: dict[str, Callable[..., Prepared]] = {
    "full": prepare_full,
    "lora": prepare_lora,
    "sift": prepare_sift,
    "aot": prepare_aot,
    "wegeft": prepare_wegeft,
    "wegeft+safe": prepare_wegeft_safe,
}


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------
def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in msg)


def _mib(n: float | None) -> float | None:
    return None if n is None else n / 2**20


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def _optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return _tensor_bytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def _enable_checkpointing(model: nn.Module) -> None:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    kw = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    # Non-reentrant checkpointing does not need the embedding output to require grad; transformers
    # turns that on anyway, which would make every frozen layer record a graph (and undo SAFE).
    if hasattr(hf, "disable_input_require_grads"):
        try:
            hf.disable_input_require_grads()
        except Exception:
            pass


def train_step(prep: Prepared, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = prep.model(**batch).loss
    loss.backward()
    prep.optimizer.step()
    prep.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def measure_train_state(prep: Prepared, batch) -> dict[str, int]:
    """One untimed step: bytes of saved activations, gradients and optimizer state."""
    import peftops

    model = prep.model
    with peftops.SavedTensorMeter(model) as meter:
        loss = model(**batch).loss
    loss.backward()
    grads = _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    prep.optimizer.step()
    state = _optimizer_state_bytes(prep.optimizer)
    prep.optimizer.zero_grad(set_to_none=True)
    return {"saved_activation_bytes": meter.activation_bytes, "grad_bytes": grads, "optimizer_state_bytes": state,
            "train_state_bytes": meter.activation_bytes + grads + state}


def run_method(name: str, s: Settings, batch, device: torch.device, log=print) -> dict[str, Any]:
    """Build, adapt, warm up, time, measure one method. Raises on failure (the caller records it)."""
    cuda = device.type == "cuda"
    _sync(device)  # the caller freed the previous method (_cleanup)
    base_alloc = torch.cuda.memory_allocated(device) if cuda else 0
    t_build = time.perf_counter()
    model = build_base(s, device)
    prep = PREPARE[name](model, s, batch, device)
    del model
    if s.grad_ckpt:
        _enable_checkpointing(prep.model)
    if cuda:
        _cleanup(device)  # the init's and calibration's transients leave the cache before anything is measured
    build_s = time.perf_counter() - t_build
    params = list(prep.model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    weight_bytes = _tensor_bytes(list(params) + list(prep.model.buffers()))
    del params
    weights_alloc = (torch.cuda.memory_allocated(device) - base_alloc) if cuda else None
    log(f"{name}: built in {build_s:.1f} s, {trainable:,} trainable; warm-up x{s.warmup}")

    for _ in range(s.warmup):  # first steps create optimizer state, autotune Triton kernels
        train_step(prep, batch)
    _sync(device)
    state_alloc = None
    if cuda:
        gc.collect()
        state_alloc = torch.cuda.memory_allocated(device) - base_alloc
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], None
    for _ in range(s.steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = train_step(prep, batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak_alloc = peak_reserved = None
    if cuda:
        peak_alloc = torch.cuda.max_memory_allocated(device) - base_alloc
        peak_reserved = torch.cuda.max_memory_reserved(device)
    final_loss = float(loss) if loss is not None else float("nan")
    state = measure_train_state(prep, batch)
    step_s = statistics.median(times) if times else float("nan")
    st = sample_stats(times) if times else None
    log(f"{name}: median step {1e3 * step_s:.1f} ms over {len(times)} steps, loss {final_loss:.3f}")
    return {
        "method": name, "status": "ok", "note": prep.note,
        "trainable": trainable, "total_params": total, "trainable_percent": 100.0 * trainable / max(total, 1),
        "step_ms": 1e3 * step_s, "step_ms_all": [1e3 * t for t in times],
        "step_ms_min": 1e3 * min(times) if times else None,
        "step_ms_max": 1e3 * max(times) if times else None,
        "step_spread": st["spread"] if st and len(times) >= 3 else None,  # (p90 - p10) / median
        "tokens_per_s": s.tokens / step_s if step_s > 0 else None,
        "peak_mib": _mib(peak_alloc), "peak_reserved_mib": _mib(peak_reserved),
        "weights_mib": _mib(weights_alloc), "weights_and_optimizer_mib": _mib(state_alloc),
        "model_bytes_mib": _mib(weight_bytes),
        **{k.replace("_bytes", "_mib"): _mib(v) for k, v in state.items()},
        "final_loss": final_loss, "build_s": build_s, **prep.extra,
    }


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.empty_cache()


def add_ratios(rows: list[dict[str, Any]], device: torch.device) -> None:
    """step time and memory of each row relative to full and to lora (same run); None if missing."""
    mem_key = "peak_mib" if device.type == "cuda" else "train_state_mib"
    by = {r["method"]: r for r in rows if r.get("status") == "ok"}
    for r in rows:
        for base in ("full", "lora"):
            b = by.get(base)
            ok = r.get("status") == "ok" and b is not None
            r[f"time_vs_{base}"] = r["step_ms"] / b["step_ms"] if ok and b["step_ms"] else None
            r[f"memory_vs_{base}"] = r[mem_key] / b[mem_key] if ok and b.get(mem_key) else None


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def _fmt(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:{spec}}{suffix}"


def smoke_reasons(s: Settings) -> list[str]:
    """Why a run says nothing about speed (empty: it ranks the methods)."""
    why = []
    if s.spec.name == "tiny":
        sp = s.spec
        why.append(f"tiny Llama (hidden {sp.hidden_size}, {sp.num_hidden_layers} layers, batch {s.batch_size} x "
                   f"{s.seq_len} tokens)")
    if s.steps < MIN_STEPS_TO_RANK:
        why.append(f"{s.steps} timed step{'s' if s.steps != 1 else ''} < {MIN_STEPS_TO_RANK}")
    return why


def smoke_banner(why: list[str], device: torch.device) -> str:
    where = "; CPU: the reference ops, not the Triton kernels" if device.type != "cuda" else ""
    return (f"SMOKE RUN ({'; '.join(why)}{where}): it checks that every method builds, trains and is measured; "
            f"its step times say nothing about speed and rank nothing. For speed: a CUDA GPU, `python -m bench "
            f"--model` (the 1.1B Llama, {SPECS['1b'].steps} timed steps).")


def _step_cell(r: dict[str, Any]) -> str:
    if r.get("step_ms_min") is None or r.get("step_ms_max") is None:
        return _fmt(r["step_ms"], ".1f")
    return f"{_fmt(r['step_ms'], '.1f')} ({_fmt(r['step_ms_min'], '.1f')}-{_fmt(r['step_ms_max'], '.1f')})"


def format_table(rows: list[dict[str, Any]], device: torch.device, *, smoke: bool = False) -> str:
    """The per-method table. ``smoke``: no tokens/s and no time ratios (they would rank nothing)."""
    cuda = device.type == "cuda"
    head = ["method", "trainable", "%", ("step ms" if cuda else "CPU step ms*") + " med (min-max)", "tokens/s",
            "peak MiB" if cuda else "train-state MiB**", "weights MiB", "time vs full", "mem vs full",
            "time vs lora", "mem vs lora", "note"]
    drop = {"tokens/s", "time vs full", "time vs lora"} if smoke else set()
    lines = [head]
    for r in rows:
        if r.get("status") != "ok":
            lines.append([r["method"], r["status"].upper()] + ["-"] * (len(head) - 3) + [r.get("error", "")[:80]])
            continue
        note = r["note"]
        if not smoke and r.get("step_spread") is not None and r["step_spread"] > MAX_STEP_SPREAD:
            note = f"UNSTABLE: step spread {100 * r['step_spread']:.0f}% > {100 * MAX_STEP_SPREAD:.0f}%; " + note
        lines.append([
            r["method"], f"{r['trainable']:,}", _fmt(r["trainable_percent"], ".3f"), _step_cell(r),
            _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["peak_mib"] if cuda else r["train_state_mib"], ",.1f"),
            _fmt(r["weights_mib"] if cuda else r["model_bytes_mib"], ",.1f"),
            _fmt(r["time_vs_full"], ".2f", "x"), _fmt(r["memory_vs_full"], ".2f", "x"),
            _fmt(r["time_vs_lora"], ".2f", "x"), _fmt(r["memory_vs_lora"], ".2f", "x"), note,
        ])
    keep = [i for i, h in enumerate(head) if h not in drop]
    lines = [[line[i] for i in keep] for line in lines]
    w = [max(len(str(row[i])) for row in lines) for i in range(len(keep))]
    out = ["  ".join(str(c).ljust(x) for c, x in zip(row, w)).rstrip() for row in lines]
    out.insert(1, "  ".join("-" * x for x in w))
    if cuda:
        out.append("peak: max_memory_allocated over the timed steps minus what was allocated before the model was "
                   "built; weights: allocated after building and adapting (incl. adapter params and buffers).")
    else:
        out.append("* CPU step times are indicative only (the figures that matter need a CUDA GPU).")
        out.append("** gradients + optimizer state + activations saved for backward in one step (CPU has no "
                   "allocator peak); weights MiB: parameter and buffer bytes.")
    if smoke:
        out.append("smoke run: no tokens/s and no time ratios (step times of a smoke run rank nothing); the memory "
                   "columns are byte counts and hold at any size.")
    return "\n".join(out)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "unknown"


def result_name(env: dict[str, Any], s: Settings, methods: list[str]) -> str:
    tag = f"model-{env['device_type']}-{_slug(env['device'])}"
    spec = s.spec
    if spec.name != "1b":
        tag += f"-{spec.name}"
    if (s.batch_size, s.seq_len) != (spec.batch_size, spec.seq_len):
        tag += f"-b{s.batch_size}x{s.seq_len}"
    if s.dtype != spec.dtype:
        tag += f"-{str(s.dtype)[6:]}"
    if s.grad_ckpt:
        tag += "-ckpt"
    if methods != METHODS:
        tag += "-partial"
    return tag + ".json"


def resolve_out_dir(out_dir: str | None, *, official: bool) -> str:
    """``out_dir``, or the default output directory (outside the source tree) when None; bench/results/ takes
    only full-size CUDA figures (``official``) and only when named: anything else goes to the default."""
    return _resolve_out_dir(out_dir, official=official)


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def _kernel_backend(device: torch.device) -> str:
    from peftops.kernels._dispatch import use_triton

    return "triton" if use_triton(torch.empty(0, device=device)) else "reference"


def main(device: torch.device | str, quick: bool = False, out_dir: str | None = None, *, config: str | None = None,
         methods: list[str] | None = None, batch_size: int | None = None, seq_len: int | None = None,
         steps: int | None = None, warmup: int | None = None, grad_ckpt: bool = False, dtype: str | None = None,
         seed: int = 0) -> int:
    """Run the benchmark, print the table, write the JSON. Returns 0, or 1 if a method failed (OOM
    rows are results, not failures)."""
    device = torch.device(device)
    spec = SPECS[config or ("tiny" if quick else "1b")]
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in PREPARE]
    if unknown:
        print(f"--methods: unknown {unknown}; choose from {list(PREPARE)}", file=sys.stderr)
        return 2
    s = Settings(spec=spec, batch_size=batch_size or spec.batch_size, seq_len=seq_len or spec.seq_len,
                 dtype=DTYPES[dtype] if dtype else spec.dtype,
                 warmup=spec.warmup if warmup is None else warmup, steps=spec.steps if steps is None else steps,
                 grad_ckpt=grad_ckpt, seed=seed)
    if s.steps < 1 or s.warmup < 0:
        print("--steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    out_dir = resolve_out_dir(out_dir, official=device.type == "cuda" and spec.name == "1b")

    env = environment(device)
    env.update(transformers=_package_version("transformers"), peft=_package_version("peft"),
               kernels=_kernel_backend(device))
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  transformers "
          f"{env['transformers']}  peft {env['peft']}  kernels: {env['kernels']}  commit {env['commit']}")
    print(f"Llama '{spec.name}': hidden {spec.hidden_size}, {spec.num_hidden_layers} layers, MLP "
          f"{spec.intermediate_size}, heads {spec.num_attention_heads}/{spec.num_key_value_heads} KV, vocab "
          f"{spec.vocab_size}, {str(s.dtype)[6:]}, sdpa; batch {s.batch_size} x {s.seq_len} tokens; "
          f"{s.warmup} warm-up + {s.steps} timed steps; activation checkpointing {'on' if s.grad_ckpt else 'off'}")
    smoke = smoke_reasons(s)
    if smoke:
        print(smoke_banner(smoke, device))

    g = torch.Generator().manual_seed(s.seed + 1)
    ids = torch.randint(0, spec.vocab_size, (s.batch_size, s.seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids}

    def log(msg):
        print(f"[bench --model] {msg}", file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    _cleanup(device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and spec.name == "tiny":
        torch.set_num_threads(1)  # tiny ops gain nothing from threads; a shared CPU makes them noisy
    try:
        for name in methods:
            try:
                rows.append(run_method(name, s, batch, device, log=log))
            except Exception as e:  # an OOM or a broken method is a row, not the end of the run
                status = "oom" if _is_oom(e) else "error"
                first_line = str(e).splitlines()[0][:300] if str(e) else ""
                rows.append({"method": name, "status": status, "error": f"{type(e).__name__}: {first_line}"})
                log(f"{name}: {status.upper()}: {rows[-1]['error']}")
            _cleanup(device)
            if device.type == "cuda":
                rows[-1]["allocated_after_cleanup_mib"] = _mib(torch.cuda.memory_allocated(device))
    finally:
        env["cpu_threads"] = torch.get_num_threads()
        torch.set_num_threads(threads)
    add_ratios(rows, device)
    print()
    print(format_table(rows, device, smoke=bool(smoke)))
    if smoke:
        print(smoke_banner(smoke, device))

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, result_name(env, s, methods))
    with open(path, "w") as f:
        json.dump({"environment": env, "settings": s.to_json(), "tokens_per_step": s.tokens,
                   "smoke": bool(smoke), "smoke_reasons": smoke,
                   "wall_s": time.perf_counter() - t_all, "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(torch.device("cuda" if torch.cuda.is_available() else "cpu"), quick=not torch.cuda.is_available()))
