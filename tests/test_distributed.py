"""DistributedDataParallel with two CPU processes (gloo) for SIFT, WeGeFT and AoT on a tiny BERT.

Each rank builds the same model (same seed), applies the adapter (SIFT: calibrated on the same batch
on both ranks before DDP wraps it), and trains 3 steps on its half of a fixed global batch. DDP
averages the gradients, so with the loss a per-example mean the result must equal a single process
training on the whole batch: the adapter tensors are compared at fp32 tolerance. A DDP comm hook
counts the gradient elements actually all-reduced per step; it must equal the trainable numel
(for SIFT: Σ k over the layers, far below the dense Σ d_out·d_in). SIFT runs twice: with SparseAdamW
and with torch's fused AdamW (which leaves δ's version counter alone: W[I] then follows δ only through
SIFT's optimizer post-step hook, checked on every rank after training)."""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import WIDE, tiny_batch, tiny_bert, train_steps

pytest.importorskip("transformers")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

WORLD = 2
STEPS = 3
LR = 1e-2
DENSITY = 0.05
GLOBAL_BATCH = 4  # each rank takes GLOBAL_BATCH // WORLD rows
TOL = dict(atol=1e-6, rtol=1e-5)  # fp32: DDP's (g_a + g_b) / 2 vs the full-batch mean differ in rounding only


def _tiny_bert():
    return tiny_bert(**WIDE["bert"])


def _global_batches():
    """STEPS batches of GLOBAL_BATCH sequences (one padded row per half) plus the calibration batch."""
    g = torch.Generator().manual_seed(1)
    out = [tiny_batch("bert", GLOBAL_BATCH, 7, vocab=50, pad={1: 5, 2: 4}, generator=g) for _ in range(STEPS + 1)]
    return out[:STEPS], out[STEPS]


def _config(method):
    import peftops

    # adapters only (modules_to_save=[]): the all-reduce volume checked below is the adapter's
    if method.startswith("sift"):
        return peftops.SIFTConfig(density=DENSITY, modules_to_save=[])
    if method == "wegeft":
        return peftops.WeGeFTConfig(r=4, alpha=8.0, modules_to_save=[])
    return peftops.AoTConfig(reparam="kron", rank=3, modules_to_save=[])


def _build(method, calib):
    """The tiny model with the adapter applied (base frozen); SIFT calibrated on ``calib``."""
    import peftops

    model = peftops.apply(_tiny_bert(), _config(method))
    if method.startswith("sift"):
        peftops.sift_calibrate(model, [calib], progress=False)
    return model


def _optimizer(method, model):
    import peftops

    if method == "sift":
        return peftops.SparseAdamW(model, lr=LR)
    if method == "sift-fused-adamw":
        # torch's fused AdamW leaves δ's version counter alone: W[I] is rewritten only because of
        # SIFT's global optimizer post-step hook, which must work on the DDP-wrapped model too
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, fused=True)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, foreach=False)


def _dense_count(model):
    from peftops.sift import sift_layers

    return sum(layer.weight.numel() for _, layer in sift_layers(model))


def _sift_weight_sync_error(model):
    """max |W[I] - round(W0[I] + δ)| over the SIFT layers: 0 when every layer's merged weight follows δ."""
    from peftops.sift import sift_layers

    err = 0.0
    for _, layer in sift_layers(model):
        want = (layer.w0_sel + layer.delta.detach()).to(layer.weight.dtype)
        err = max(err, float((layer.weight.detach().view(-1)[layer.indices] - want).abs().max()))
    return err


def _worker(rank, method, port, out_dir):
    import peftops
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        with peftops.force_backend("reference"):
            batches, calib = _global_batches()
            model = _build(method, calib)  # identical on both ranks: same seed, same calibration batch
            ddp = DDP(model)
            reduced = []

            def counting_allreduce(state, bucket):
                reduced.append(bucket.buffer().numel())
                return default_hooks.allreduce_hook(None, bucket)  # sum / world size, as DDP's default

            ddp.register_comm_hook(None, counting_allreduce)
            half = GLOBAL_BATCH // WORLD
            shards = [{k: v[rank * half:(rank + 1) * half] for k, v in b.items()} for b in batches]
            opt = _optimizer(method, model)
            losses = train_steps(ddp, opt, shards)
            # the parameters DDP holds and synchronises: everything requiring grad in the wrapped module
            trainable = sum(p.numel() for p in ddp.module.parameters() if p.requires_grad)
            if method.startswith("sift"):
                with torch.no_grad():
                    ddp(**shards[0])  # a forward brings W[I] up to date if the last step left it stale
            w_sync_err = _sift_weight_sync_error(model) if method.startswith("sift") else None
            torch.save({"adapter": peftops.adapter_state_dict(model), "losses": losses, "reduced": reduced,
                        "trainable": trainable, "dense": _dense_count(model) if method.startswith("sift") else None,
                        "w_sync_err": w_sync_err},
                       os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["sift", "sift-fused-adamw", "wegeft", "aot"])
def test_ddp_two_ranks_matches_single_process_full_batch(method, tmp_path):
    import peftops

    mp.spawn(_worker, args=(method, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    with peftops.force_backend("reference"):
        batches, calib = _global_batches()
        model = _build(method, calib)
        opt = _optimizer(method, model)
        losses = train_steps(model, opt, batches)
        single = peftops.adapter_state_dict(model)

    # DDP keeps the replicas identical: both ranks hold bit-equal adapters
    assert ranks[0]["adapter"].keys() == ranks[1]["adapter"].keys() == single.keys()
    for key in single:
        assert torch.equal(ranks[0]["adapter"][key], ranks[1]["adapter"][key]), f"{key}: ranks diverged"
    # and they equal one process trained on the full batch
    for key, ref in single.items():
        got = ranks[0]["adapter"][key]
        if ref.is_floating_point():
            torch.testing.assert_close(got, ref, **TOL, msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert torch.equal(got, ref), f"{key}: the SIFT index sets differ"
    moved = [k for k, v in single.items() if v.is_floating_point() and v.abs().max() > 0]
    assert moved, "no adapter tensor trained"
    # the mean of the ranks' half-batch losses is the full-batch loss of the same step
    torch.testing.assert_close((ranks[0]["losses"] + ranks[1]["losses"]) / 2, losses, **TOL)

    # the gradient traffic: exactly the trainable parameters, every step
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for r in ranks:
        assert r["trainable"] == trainable
        assert sum(r["reduced"]) == STEPS * trainable, (
            f"all-reduced {sum(r['reduced'])} gradient elements over {STEPS} steps, expected {STEPS} x {trainable}")
    if method.startswith("sift"):
        from peftops.sift import sift_layers

        sum_k = sum(layer.k for _, layer in sift_layers(model))
        dense = ranks[0]["dense"]
        # W[I] followed δ on every rank (the fused AdamW case relies on SIFT's optimizer post-step hook)
        assert ranks[0]["w_sync_err"] == ranks[1]["w_sync_err"] == 0.0
        assert trainable == sum_k, f"DDP synchronises {trainable} elements, Σk = {sum_k}"
        assert dense == _dense_count(model) and sum_k < dense // 10
        print(f"\nSIFT DDP all-reduce per step: {sum_k} elements (Σk) vs dense {dense} (Σ d_out·d_in), "
              f"{dense / sum_k:.1f}x fewer")
