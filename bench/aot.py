"""AoT P-Tuning benchmarks: the fused gather-add, the table backward, and serving overhead.

GPU targets (docs/design.md#performance-yardsticks, issue): gather-add 16384 tokens x 4096 bf16,
V = 32000: >= 85% of the HBM roofline, not slower than torch.compile(h + P[ids]), >= 1.5x eager; table
backward (Zipf ids) >= 2x the eager dense zero-filled grad + index_add_, and with one id holding half of
16384 tokens within 1.5x of the same batch with uniform ids (aot.table_backward_skew, issue #11); a
SmolLM2-135M-shaped Llama with compiled tables within 3% of the plain model's forward (single and
mixed-task batches).
"""
from __future__ import annotations

import copy

import torch

from peftops import aot

from .harness import Case

GPU_TOKENS = [2048, 4096, 8192, 16384]
ZIPF_S = 1.1


def _zipf_ids(n: int, vocab: int, device, seed: int = 0) -> torch.Tensor:
    """n ids with P(rank k) ~ 1/k^s, ranks shuffled over the vocabulary (a text-like head)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    p = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-ZIPF_S)
    ranks = torch.multinomial(p, n, replacement=True, generator=g)
    return torch.randperm(vocab, generator=g)[ranks].to(device)


def _gather_cases(device, tokens, d, vocab, dtype):
    out = []
    for n in tokens:
        def make(n=n):
            g = torch.Generator(device="cpu").manual_seed(0)
            return {
                "h": torch.randn(n, d, generator=g).to(dtype).to(device),
                "ids": torch.randint(0, vocab, (n,), generator=g).to(device),
                "P": torch.randn(vocab, d, generator=g).to(dtype).to(device),
            }

        elt = torch.finfo(dtype).bits // 8
        moved = n * d * 3 * elt + n * 8  # read h, read the gathered rows, write out; the ids
        shape = f"{n}x{d} {str(dtype)[6:]} V={vocab}"
        out.append(Case(
            name="aot.gather_add", shape=shape, make=make,
            reference=lambda x: x["h"] + x["P"][x["ids"]],
            peftops=lambda x: aot.aot_bias_add(x["h"], x["ids"], x["P"], validate=False),
            bytes=moved, sweep=("tokens", n),
            note="validate=False: the model path (ids checked once per forward by the embedding lookup)",
        ))
        out.append(Case(
            name="aot.gather_add_inplace", shape=shape, make=make,
            reference=lambda x: x["h"].add_(x["P"][x["ids"]]),
            peftops=lambda x: aot.aot_bias_add(x["h"], x["ids"], x["P"], inplace=True, validate=False),
            bytes=moved, sweep=("tokens", n),
            note="serving: h += P[ids] written into h",
        ))
    n = tokens[-1]
    out.append(Case(
        name="aot.gather_add_checked", shape=f"{n}x{d} {str(dtype)[6:]} V={vocab}", make=out[-1].make,
        reference=lambda x: x["h"] + x["P"][x["ids"]],
        peftops=lambda x: aot.aot_bias_add(x["h"], x["ids"], x["P"]),
        bytes=n * d * 3 * (torch.finfo(dtype).bits // 8) + n * 8,
        note="default validate=True: adds the id range check (a host sync)",
    ))
    return out


def _backward_cases(device, tokens, d, vocab, dtype):
    out = []
    for n in tokens:
        def make(n=n):
            g = torch.Generator(device="cpu").manual_seed(1)
            ids = _zipf_ids(n, vocab, device)
            x = {"g": torch.randn(n, d, generator=g).to(dtype).to(device), "ids": ids, "V": vocab}
            x["plan"] = aot.aot_segment_plan(ids, vocab)
            return x

        ids = _zipf_ids(n, vocab, "cpu")
        unique = int(torch.unique(ids).numel())
        elt = torch.finfo(dtype).bits // 8
        moved = n * d * elt + unique * d * 4 + n * 8 * 3  # read grad, write the occurring rows (fp32), ids/plan
        shape = f"{n}x{d} {str(dtype)[6:]} V={vocab} zipf({ZIPF_S}) U={unique}"
        # eager today: a dense fp32 V x d zero-filled gradient, then index_add_ of the token rows
        reference = lambda x: torch.zeros(x["V"], x["g"].shape[1], dtype=torch.float32,  # noqa: E731
                                          device=x["g"].device).index_add_(0, x["ids"], x["g"].float())
        out.append(Case(
            name="aot.table_backward", shape=shape, make=make, reference=reference,
            peftops=lambda x: aot.aot_table_grad(x["g"], x["ids"], x["V"], validate=False),
            bytes=moved, sweep=("tokens", n), measure_memory=True,
            note="returns (rows, fp32 grads of the occurring rows); includes the sort (ids checked by the forward)",
        ))
        out.append(Case(
            name="aot.table_backward_planned", shape=shape, make=make, reference=reference,
            peftops=lambda x: aot.aot_table_grad(x["g"], x["ids"], x["V"], plan=x["plan"], validate=False),
            bytes=moved, sweep=("tokens", n), measure_memory=True,
            note="sort plan shared across layers (the model path): one launch per layer",
        ))
    return out


def _skewed_ids(n: int, vocab: int, share: float, seed: int = 3) -> torch.Tensor:
    """n uniform ids of which round(share * n), at random positions, are id 0 (a pad / BOS id)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (n,), generator=g)
    ids[torch.randperm(n, generator=g)[:round(share * n)]] = 0
    return ids


def _skew_cases(device, n, d, vocab, dtype):
    """The planned table backward of one batch shape with uniform ids and with one id holding half
    the tokens: the two peftops times side by side are the skew target (issue #11: the skewed
    batch within 1.5x of the uniform one; a per-segment loop made it 10-20x the bandwidth bound)."""
    out = []
    for share in (0.0, 0.5):
        def make(share=share):
            g = torch.Generator(device="cpu").manual_seed(4)
            ids = _skewed_ids(n, vocab, share).to(device)
            x = {"g": torch.randn(n, d, generator=g).to(dtype).to(device), "ids": ids, "V": vocab}
            x["plan"] = aot.aot_segment_plan(ids, vocab)
            return x

        unique = int(torch.unique(_skewed_ids(n, vocab, share)).numel())
        elt = torch.finfo(dtype).bits // 8
        what = "uniform ids" if share == 0 else f"one id holding {share:.0%} of the tokens"
        out.append(Case(
            name="aot.table_backward_skew", shape=f"{n}x{d} {str(dtype)[6:]} V={vocab} {what} U={unique}", make=make,
            reference=lambda x: torch.zeros(x["V"], x["g"].shape[1], dtype=torch.float32,
                                            device=x["g"].device).index_add_(0, x["ids"], x["g"].float()),
            peftops=lambda x: aot.aot_table_grad(x["g"], x["ids"], x["V"], plan=x["plan"], validate=False),
            bytes=n * d * elt + unique * d * 4 + n * 8 * 2, sweep=("heavy id share", share),
            note="planned (the model path); the pair's peftops ratio is the skew target (<= 1.5)",
        ))
    return out


def _serving_cases(device, quick):
    from transformers import LlamaConfig, LlamaForCausalLM

    if quick:
        cfg_kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=256)
        batch, seq, dtype = 2, 16, torch.float32
    else:  # SmolLM2-135M
        cfg_kw = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=49152)
        batch, seq, dtype = 32, 512, torch.bfloat16
    n_tasks = 4
    cfg = LlamaConfig(max_position_embeddings=max(seq, 64), tie_word_embeddings=True, **cfg_kw)
    L, V, d = cfg.num_hidden_layers, cfg.vocab_size, cfg.hidden_size

    def make(multitask: bool):
        torch.manual_seed(0)
        plain = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
        served = copy.deepcopy(plain)
        g = torch.Generator(device=device).manual_seed(2)
        tasks = n_tasks if multitask else 1
        tables = torch.randn(tasks, L, V, d, generator=g, device=device, dtype=dtype).mul_(0.02)
        aot.set_aot_tables(served, tables)
        ids = torch.randint(0, V, (batch, seq), generator=g, device=device)
        task_ids = torch.arange(batch, device=device) % n_tasks if multitask else None
        return {"plain": plain, "served": served, "ids": ids, "task_ids": task_ids}

    def reference(x):
        with torch.inference_mode():
            return x["plain"](x["ids"], use_cache=False, logits_to_keep=1).logits

    def ours(x):
        with torch.inference_mode():
            kw = {} if x["task_ids"] is None else {"aot_task_ids": x["task_ids"]}
            return x["served"](x["ids"], use_cache=False, logits_to_keep=1, **kw).logits

    name = "SmolLM2-135M-shaped" if not quick else "tiny Llama"
    shape = f"{name} L={L} d={d} V={V} batch={batch} seq={seq} {str(dtype)[6:]}"
    return [
        Case(name="aot.serving", shape=shape + " 1 task", make=lambda: make(False), reference=reference,
             peftops=ours, compile_reference=False,
             note="plain model forward vs the same model with compiled AoT tables (target: within 3%)"),
        Case(name="aot.serving_multitask", shape=shape + f" {n_tasks} tasks mixed", make=lambda: make(True),
             reference=reference, peftops=ours, compile_reference=False,
             note="one batch, a task id per sample, tables stacked [tasks, L, V, d] (target: within 3%)"),
    ]


def cases(device, quick):
    device = torch.device(device)
    if quick:
        tokens, d, vocab, dtype = [64, 256], 64, 100, torch.float32
    else:
        tokens, d, vocab, dtype = GPU_TOKENS, 4096, 32000, torch.bfloat16
    return (_gather_cases(device, tokens, d, vocab, dtype)
            + _backward_cases(device, tokens, d, vocab, dtype)
            + _skew_cases(device, tokens[-1], d, vocab, dtype)
            + _serving_cases(device, quick))
