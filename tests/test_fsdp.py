"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with a frozen base and trainable adapters, two CPU
processes on gloo, on a tiny Llama: one FSDP group per decoder layer plus the root, as accelerate's
FSDP2 plugin and torchtitan wrap a model.

Each rank builds the same model (same seed), shards it, and trains 3 steps on its half of a fixed
global batch; the adapter (all-gathered) must equal one process training on the whole batch (fp32,
the tolerance of tests/test_distributed.py). All cases run in one pair of processes (start-up costs
more than the training). What the test establishes, per method:

- peft LoRA (the reference point), WeGeFT with per-layer generators, AoT (its tables' factors live in
  the root group): plain per-layer + root sharding works.
- WeGeFT with generators shared across layers (the default): FSDP2 refuses a Parameter shared by two
  groups (its error is checked); keeping the shared generators out of the groups (``ignored_params``,
  replicated, gradient all-reduced in a post-accumulate hook) works.
- SIFT: sharding its layers raises SIFTLinear's error at the first forward (FSDP re-gathers the
  weight from shards that never saw δ; it would otherwise train silently on W0). SIFT layers kept out
  of the groups (weight and δ replicated, δ's gradient all-reduced) train correctly with SparseAdamW
  while the embeddings, norms and LM head are sharded.

Bytes per step are counted by wrapping the collectives FSDP2 calls (all_gather_single,
reduce_scatter_single) and all_reduce."""
import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import FSDPModule, fully_shard
except ImportError:  # pragma: no cover
    pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available in this torch", allow_module_level=True)

from helpers import tiny_batch, tiny_llama, train_steps  # noqa: E402

WORLD = 2
STEPS = 3
LR = 1e-2
GLOBAL_BATCH = 4
TOL = dict(atol=1e-6, rtol=1e-5)
WORKING = ["lora", "wegeft-per-layer", "wegeft-replicated", "aot", "sift-replicated"]
FAILING = ["wegeft-shared", "sift-sharded"]  # last: they raise inside a forward


def _tiny_llama():
    return tiny_llama(vocab=50, hidden=32, heads=2, intermediate=37, max_positions=32, pad_token_id=None,
                      tie_word_embeddings=False, train=True)


def _global_batches():
    g = torch.Generator().manual_seed(1)
    out = [tiny_batch("llama", GLOBAL_BATCH, 7, vocab=50, low=1, generator=g) for _ in range(STEPS + 1)]
    return out[:STEPS], out[STEPS]


def _build(case, calib):
    import peftops

    model = _tiny_llama()
    if case == "lora":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          lora_dropout=0.0))
    if case.startswith("sift"):
        model = peftops.apply(model, peftops.SIFTConfig(density=0.05))
        peftops.sift_calibrate(model, [calib], progress=False)
        return model
    if case.startswith("wegeft"):
        return peftops.apply(model, peftops.WeGeFTConfig(r=4, alpha=8.0, share_generators=case != "wegeft-per-layer"))
    return peftops.apply(model, peftops.AoTConfig(reparam="kron", rank=3))


def _optimizer(case, model):
    import peftops

    if case.startswith("sift"):
        return peftops.SparseAdamW(model, lr=LR)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, foreach=False)


def _adapter(case, model):
    import peftops

    if case == "lora":
        return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    return peftops.adapter_state_dict(model)


def _replicated_params(case, model, layers):
    """Parameters kept out of every FSDP group: those used by more than one decoder layer (shared
    WeGeFT generators) and, for SIFT, every SIFT layer's weight and δ."""
    if case == "wegeft-replicated":
        owners = {}
        for i, layer in enumerate(layers):
            for p in layer.parameters():
                owners.setdefault(p, set()).add(i)
        return {p for p, used_by in owners.items() if len(used_by) > 1}
    if case == "sift-replicated":
        from peftops.sift import sift_layers

        return {p for _, layer in sift_layers(model) for p in (layer.weight, layer.delta)}
    return set()


def _shard(model, replicated):
    """fully_shard per decoder layer, then the root; ``replicated`` stay plain tensors whose
    gradients are averaged over the ranks as soon as they are accumulated."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    for layer in layers:
        fully_shard(layer, ignored_params=replicated)
    fully_shard(model, ignored_params=replicated)

    def average_grad(p):
        dist.all_reduce(p.grad)
        p.grad.div_(WORLD)

    for p in replicated:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(average_grad)


class _CommCounter:
    """Bytes moved per collective kind, counted at the torch.distributed calls FSDP2 makes."""

    def __init__(self):
        self.bytes = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0}
        self._orig = {}

    def __enter__(self):
        def wrap(name, kind, tensor_of):
            orig = getattr(dist, name)
            self._orig[name] = orig

            def counted(*args, **kwargs):
                t = tensor_of(args, kwargs)
                self.bytes[kind] += t.numel() * t.element_size()
                return orig(*args, **kwargs)
            setattr(dist, name, counted)

        wrap("all_gather_single", "all_gather", lambda a, k: k.get("output_tensor", a[0] if a else None))
        wrap("reduce_scatter_single", "reduce_scatter", lambda a, k: k.get("input", a[1] if len(a) > 1 else None))
        wrap("all_reduce", "all_reduce", lambda a, k: k.get("tensor", a[0] if a else None))
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def _run_case(case, rank):
    from torch.distributed.tensor import DTensor
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    batches, calib = _global_batches()
    model = _build(case, calib)
    layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    _shard(model, _replicated_params(case, model, layers))
    opt = _optimizer(case, model)
    half = GLOBAL_BATCH // WORLD
    losses, per_step = [], []
    for batch in batches:
        shard = {k: v[rank * half:(rank + 1) * half] for k, v in batch.items()}
        with _CommCounter() as comm:
            loss = model(**shard).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        per_step.append(comm.bytes)
    # all-gather every group, read the adapter, reshard: how a rank saves a peftops adapter under FSDP2
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:
        m.unshard()
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
             for k, v in _adapter(case, model).items()}
    for m in fsdp_modules:
        m.reshard()
    return {"adapter": state, "losses": torch.stack(losses), "bytes": per_step[-1]}


def _worker(rank, port, out_dir):
    import peftops

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        with peftops.force_backend("reference"):
            for case in WORKING + FAILING:
                try:
                    results[case] = _run_case(case, rank)
                except Exception as e:  # noqa: BLE001  (the parent asserts on the text)
                    results[case] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _single_process(case):
    import peftops

    with peftops.force_backend("reference"):
        batches, calib = _global_batches()
        model = _build(case, calib)
        opt = _optimizer(case, model)
        losses = train_steps(model, opt, batches)
        return model, {k: v.detach().clone() for k, v in _adapter(case, model).items()}, losses


@pytest.mark.parametrize("case", WORKING)
def test_fsdp2_two_ranks_matches_single_process_full_batch(case, fsdp_results):
    ranks = [r[case] for r in fsdp_results]
    for r in ranks:
        assert "error" not in r, f"{case} failed under FSDP2:\n{r.get('trace')}"
    model, single, losses = _single_process(case)
    assert ranks[0]["adapter"].keys() == ranks[1]["adapter"].keys() == single.keys()
    for key, ref in single.items():
        assert torch.equal(ranks[0]["adapter"][key], ranks[1]["adapter"][key]), f"{key}: ranks diverged"
        if ref.is_floating_point():
            torch.testing.assert_close(ranks[0]["adapter"][key], ref, **TOL, msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert torch.equal(ranks[0]["adapter"][key], ref), f"{key}: the SIFT index sets differ"
    assert any(v.is_floating_point() and v.abs().max() > 0 for v in single.values()), "no adapter tensor trained"
    torch.testing.assert_close((ranks[0]["losses"] + ranks[1]["losses"]) / 2, losses, **TOL)

    comm = ranks[0]["bytes"]
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if case == "sift-replicated":
        from peftops.sift import sift_layers

        sum_k = sum(layer.k for _, layer in sift_layers(model))
        assert comm["all_reduce"] == 4 * sum_k  # δ's gradients, fp32, nothing dense
        assert comm["reduce_scatter"] == 0  # no trainable parameter is sharded
    elif case == "wegeft-replicated":
        assert comm["all_reduce"] == trainable_bytes  # all generators are shared, hence replicated
    else:
        assert comm["all_reduce"] == 0
        # the gradient traffic: exactly the trainable parameters, each padded to WORLD equal dim-0 shards
        padded = sum(-(-p.shape[0] // WORLD) * WORLD * (p.numel() // p.shape[0]) * p.element_size()
                     for p in model.parameters() if p.requires_grad)
        assert comm["reduce_scatter"] == padded
    print(f"\nFSDP2 {case}: per step all-gather {comm['all_gather']} B, reduce-scatter {comm['reduce_scatter']} B, "
          f"all-reduce {comm['all_reduce']} B; frozen base {base_bytes} B, trainable {trainable_bytes} B")


def test_fsdp2_shared_wegeft_generators_across_groups_rejected_by_fsdp(fsdp_results):
    for r in fsdp_results:
        err = r["wegeft-shared"].get("error", "")
        assert "shared with a parameter already managed by another FSDP group" in err, err or "no error raised"


def test_fsdp2_sharded_sift_layers_fail_loudly(fsdp_results):
    for r in fsdp_results:
        err = r["sift-sharded"].get("error", "")
        assert err.startswith("RuntimeError: SIFTLinear: its weight/delta Parameters were replaced"), \
            err or "SIFT trained under FSDP2 sharding without an error (it would silently use W0)"
