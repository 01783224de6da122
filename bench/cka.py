"""Benchmarks of the CKA kernel and of SAFE's freezing (docs/design.md#safe).

Cases:
  cka.linear            linear CKA of x [T, 4096], y [T, 4096] bf16 with a padding mask, swept over T
                        (the T x T form below T = dx + dy, the d x d form above): eager PyTorch as a
                        user writes it today (fp32 upcast + Gram matmuls) vs peftops.linear_cka.
  safe.freeze_half.*    one training step (forward, backward, AdamW) of a model with PEFT LoRA on every
                        linear layer: all adapters training (reference) vs the lower half frozen by
                        SAFE (peftops). Models: a MiniLM-L6-like BERT and a SmolLM2-135M-sized Llama,
                        random init. The saved-for-backward bytes are in ``saved_bytes_report``.
  safe.measure_step.*   one training step without SAFE (reference) vs a warm-up step in which SAFE
                        measures every adapter (peftops): the cost of one measurement.
  safe.warmup.*         ``measure_interval`` (10) warm-up steps on SAFE's default schedule (one of
                        them measures) vs as many plain steps: the <= 3% overhead target.

``saved_bytes_report(quick)`` returns (and ``python -m bench.cka`` prints) the bytes autograd keeps
for backward with and without the frozen lower half (target: >= 35% fewer on the GPU shapes).
"""
from __future__ import annotations

import re
import sys

import torch

from .harness import Case

D_CKA = 4096
T_SWEEP = (1024, 4096, 16384)


# ----------------------------------------------------------------------------------------------
# cka.linear
# ----------------------------------------------------------------------------------------------
def eager_linear_cka(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Linear CKA the way it is written today: fp32 copies, masked centring, three d x d Grams."""
    w = mask.float()
    n = w.sum()
    xf, yf = x.float(), y.float()
    xc = (xf - (w @ xf) / n) * w[:, None]
    yc = (yf - (w @ yf) / n) * w[:, None]
    return (yc.T @ xc).square().sum() / ((xc.T @ xc).norm() * (yc.T @ yc).norm())


def _cka_case(T: int, d: int, device: torch.device, dtype: torch.dtype) -> Case:
    from peftops.kernels.cka import cka_form, linear_cka

    def make():
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(T, d, device=device, dtype=dtype, generator=g)
        y = (x.float() @ torch.randn(d, d, device=device, generator=g) / d ** 0.5).to(dtype)
        mask = torch.ones(T, dtype=torch.bool, device=device)
        mask[-T // 10:] = False  # 10% padding
        return {"x": x, "y": y, "mask": mask}

    form = cka_form(T, d, d)
    macs = T * T / 2 * (2 * d) if form == "tokens" else T * (d * d / 2 + d * d / 2 + d * d)
    return Case(
        name="cka.linear", shape=f"T={T} d={d} {str(dtype)[6:]} ({form} form)", make=make,
        reference=lambda a: eager_linear_cka(a["x"], a["y"], a["mask"]),
        peftops=lambda a: linear_cka(a["x"], a["y"], a["mask"]),
        bytes=2 * T * d * torch.tensor([], dtype=dtype).element_size(), flops=2 * macs,
        sweep=("T", T), measure_memory=True,
        note="reference: fp32 upcast + d x d Gram matmuls; peftops: fused Gram-Frobenius kernels, cheaper form",
    )


# ----------------------------------------------------------------------------------------------
# Models with LoRA on every linear layer
# ----------------------------------------------------------------------------------------------
def model_spec(kind: str, quick: bool) -> dict:
    """Config and batch shape of the benchmark models (random init, nothing downloaded)."""
    if kind == "bert":  # all-MiniLM-L6-v2's shape
        if quick:
            return dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                        vocab_size=1000, batch=4, seq=32)
        return dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                    vocab_size=30522, batch=32, seq=128)
    if kind == "llama":  # SmolLM2-135M's shape
        if quick:
            return dict(hidden_size=576, num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3,
                        intermediate_size=1536, vocab_size=4096, batch=2, seq=64)
        return dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, batch=8, seq=512)
    raise ValueError(f"kind: expected 'bert' or 'llama', got {kind!r}")


def build_lora_model(kind: str, quick: bool, device: torch.device, seed: int = 0):
    """(PEFT LoRA model on every linear layer, batch dict, number of transformer layers)."""
    import peft
    import transformers

    spec = dict(model_spec(kind, quick))
    batch, seq = spec.pop("batch"), spec.pop("seq")
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = transformers.BertConfig(**spec, num_labels=2, attn_implementation="sdpa")
        model = transformers.BertForSequenceClassification(cfg)
        task = "SEQ_CLS"
    else:
        cfg = transformers.LlamaConfig(**spec, tie_word_embeddings=True, attn_implementation="sdpa")
        model = transformers.LlamaForCausalLM(cfg)
        task = "CAUSAL_LM"
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type=task)
    model = peft.get_peft_model(model, lora).to(device)
    model.train()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, spec["vocab_size"], (batch, seq), generator=g)
    am = torch.ones(batch, seq, dtype=torch.long)
    am[batch // 2:, seq - seq // 4:] = 0  # some padding
    inputs = {"input_ids": ids.to(device), "attention_mask": am.to(device)}
    if kind == "bert":
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=g).to(device)
    else:
        inputs["labels"] = ids.masked_fill(am == 0, -100).to(device)
    return model, inputs, spec["num_hidden_layers"]


def layer_index(name: str) -> int | None:
    m = re.search(r"\.layers?\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def freeze_lower_half(safe, n_layers: int) -> list[str]:
    """Freeze every adapter unit in transformer layers 0 .. n_layers/2 - 1."""
    return safe.freeze(lambda n: (layer_index(n) is not None and layer_index(n) < n_layers // 2))


def _train_step(model, inputs, opt, device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _controlled(kind: str, quick: bool, device: torch.device, frozen_half: bool):
    from peftops.safe import SAFE, SAFEConfig

    model, inputs, n_layers = build_lora_model(kind, quick, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    safe = SAFE(model, SAFEConfig(warmup_steps=1, ramp_end_step=2, final_threshold=0.0), optimizer=opt)
    safe.end_step()  # no measuring here: freezing only
    if frozen_half:
        freeze_lower_half(safe, n_layers)
    return model, inputs, opt, safe


def _freeze_case(kind: str, device: torch.device, quick: bool) -> Case:
    spec = model_spec(kind, quick)

    def make():
        full = _controlled(kind, quick, device, frozen_half=False)
        half = _controlled(kind, quick, device, frozen_half=True)
        return {"full": full, "half": half}

    return Case(
        name=f"safe.freeze_half.{kind}",
        shape=f"{spec['num_hidden_layers']}L h{spec['hidden_size']} b{spec['batch']}x{spec['seq']} LoRA r8 all-linear",
        make=make,
        reference=lambda a: _train_step(a["full"][0], a["full"][1], a["full"][2], device),
        peftops=lambda a: _train_step(a["half"][0], a["half"][1], a["half"][2], device),
        compile_reference=False, measure_memory=True,
        note="train step: all adapters training vs lower half frozen; saved bytes: bench.cka.saved_bytes_report",
    )


def _measure_case(kind: str, device: torch.device, quick: bool, every_step: bool) -> Case:
    """every_step: one step, measured (the worst case); else ``measure_interval`` steps of a warm-up
    on SAFE's default schedule (one measures) against as many plain steps: the amortised overhead."""
    from peftops.safe import SAFE, SAFEConfig

    spec = model_spec(kind, quick)
    default = SAFEConfig(warmup_steps=10**9, ramp_end_step=10**9 + 1, final_threshold=0.5)  # endless warm-up
    cfg = SAFEConfig(warmup_steps=10**9, ramp_end_step=10**9 + 1, final_threshold=0.5,
                     measure_interval=1 if every_step else default.measure_interval)
    steps = 1 if every_step else default.measure_interval

    def make():
        plain_model, inputs, _ = build_lora_model(kind, quick, device)
        model, _, _ = build_lora_model(kind, quick, device)  # same seed: the same model, SAFE attached
        plain_opt = torch.optim.AdamW([p for p in plain_model.parameters() if p.requires_grad], lr=1e-4)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        return {"plain": (plain_model, plain_opt), "safe": (model, opt, SAFE(model, cfg, optimizer=opt)),
                "inputs": inputs}

    def plain(a):
        model, opt = a["plain"]
        for _ in range(steps):
            loss = _train_step(model, a["inputs"], opt, device)
        return loss

    def with_safe(a):
        model, opt, safe = a["safe"]
        for _ in range(steps):
            loss = _train_step(model, a["inputs"], opt, device)
            safe.step()  # collects the scores of a measuring step (one sync), arms the next one
        return loss

    name = "safe.measure_step" if every_step else "safe.warmup"
    return Case(
        name=f"{name}.{kind}",
        shape=(f"{spec['num_hidden_layers']}L h{spec['hidden_size']} b{spec['batch']}x{spec['seq']} "
               f"{steps} step(s), <= {cfg.max_tokens} tokens"),
        make=make, reference=plain, peftops=with_safe, compile_reference=False,
        note=("one measuring step vs a plain step (worst case)" if every_step else
              f"{steps} warm-up steps on the default schedule (1 measures) vs {steps} plain steps: target <= 3% slower"),
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    out = []
    if quick:
        for T in (64, 256):
            out.append(_cka_case(T, 96, device, torch.float32))
    else:
        for T in T_SWEEP:
            out.append(_cka_case(T, D_CKA, device, torch.bfloat16))
    for kind in ("bert", "llama"):
        out.append(_freeze_case(kind, device, quick))
        out.append(_measure_case(kind, device, quick, every_step=True))
        out.append(_measure_case(kind, device, quick, every_step=False))
    return out


# ----------------------------------------------------------------------------------------------
# Saved-for-backward bytes
# ----------------------------------------------------------------------------------------------
def saved_bytes_report(quick: bool, device: torch.device | None = None) -> list[dict]:
    """Bytes autograd keeps for backward in one forward, all adapters training vs the lower half
    frozen, per benchmark model. ``activation`` excludes saved tensors that are parameters."""
    from peftops.safe import SavedTensorMeter

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for kind in ("bert", "llama"):
        figures = {}
        for frozen in (False, True):
            model, inputs, opt, safe = _controlled(kind, quick, device, frozen_half=frozen)
            with SavedTensorMeter(model) as meter:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = model(**inputs).loss
            figures[frozen] = (meter.activation_bytes, meter.total_bytes)
            del loss, model, opt, safe
        (a0, t0), (a1, t1) = figures[False], figures[True]
        spec = model_spec(kind, quick)
        rows.append({
            "model": kind, "layers": spec["num_hidden_layers"], "tokens": spec["batch"] * spec["seq"],
            "activation_bytes_full": a0, "activation_bytes_half_frozen": a1,
            "activation_saving_percent": 100.0 * (a0 - a1) / max(a0, 1),
            "total_bytes_full": t0, "total_bytes_half_frozen": t1,
            "total_saving_percent": 100.0 * (t0 - t1) / max(t0, 1),
        })
    return rows


def format_saved_bytes(rows: list[dict]) -> str:
    lines = ["saved for backward (one forward), all adapters vs lower half frozen:"]
    for r in rows:
        lines.append(
            f"  {r['model']:6s} {r['layers']:2d} layers, {r['tokens']} tokens: activations "
            f"{r['activation_bytes_full'] / 2**20:.1f} -> {r['activation_bytes_half_frozen'] / 2**20:.1f} MiB "
            f"(-{r['activation_saving_percent']:.1f}%), incl. saved weights {r['total_bytes_full'] / 2**20:.1f} -> "
            f"{r['total_bytes_half_frozen'] / 2**20:.1f} MiB (-{r['total_saving_percent']:.1f}%)")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m bench.cka [--quick]
    quick = "--quick" in sys.argv or not torch.cuda.is_available()
    print(format_saved_bytes(saved_bytes_report(quick)))
