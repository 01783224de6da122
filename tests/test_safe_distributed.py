"""SAFE under DistributedDataParallel: two CPU processes (gloo), WeGeFT with per-layer generators.

Each rank trains the same tiny BERT (tests/test_distributed.py) on DIFFERENT data, so the ranks'
own importance scores differ. SAFE all-reduces them: both ranks must record the same scores (the
mean of the two ranks' local scores), freeze the same units at the same steps, train to the end,
leave frozen parameters untouched, and end with equal adapters. Freezing needs
DDP(find_unused_parameters=True); with find_unused_parameters=False or static_graph=True DDP would
skip the gradient all-reduce of the step (measured: nothing is reduced) and fail at the next forward,
so SAFE must raise first, with the fix in the message. Ranks whose SAFE setups differ are refused."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_distributed import WORLD, _free_port, _tiny_bert

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

STEPS = 8
WARMUP, RAMP_END, FINAL_THRESHOLD = 2, 8, 0.13  # scores ~0.08-0.16: some units freeze, at several steps


def _model():
    import peftops

    model = peftops.apply(_tiny_bert(), peftops.WeGeFTConfig(r=4, alpha=8.0, share_generators=False))
    with torch.no_grad():  # Φ starts at 0: make every adapter's generated update non-trivial
        g = torch.Generator().manual_seed(2)  # the same on every rank
        for u in peftops.find_adapter_units(model):
            u.module.phi.normal_(0, 0.1, generator=g)
    return model.train()


def _rank_batches(rank, n):
    """Rank-specific data (seeded by rank): the ranks' CKA scores differ."""
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 50, (2, 9), generator=g)
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (2,), generator=g)})
    return out


def _init(rank, port):
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))


def _train_worker(rank, port, out_dir):
    import peftops
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, port)
    try:
        with peftops.force_backend("reference"):
            model = _model()
            ddp = DDP(model, find_unused_parameters=True)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=False)
            cfg = peftops.SAFEConfig(warmup_steps=WARMUP, ramp_end_step=RAMP_END, final_threshold=FINAL_THRESHOLD,
                                     measure_interval=1, max_tokens=None)
            # the inner model, as the Trainer callback gets it: SAFE finds the DDP wrapper itself
            safe = peftops.SAFE(model, cfg, optimizer=opt)
            local = {}  # this rank's own scores per step, before the cross-rank mean
            collect = safe._collect

            def spy():
                scores = collect()
                local[safe.step_index] = dict(scores)
                return scores

            safe._collect = spy
            snapshots = {}  # unit -> its parameters right after it froze
            for t, batch in enumerate(_rank_batches(rank, STEPS)):
                for u in safe.units:
                    if u.frozen and u.name not in snapshots:
                        snapshots[u.name] = [p.detach().clone() for p in u.params]
                ddp(**batch).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                safe.step(t + 1)
            frozen_unchanged = all(torch.equal(a, p) for u in safe.units if u.name in snapshots
                                   for a, p in zip(snapshots[u.name], u.params))
            frozen_no_grad_state = all(p.grad is None and p not in opt.state and not p.requires_grad
                                       for u in safe.units if u.frozen for p in u.params)
            torch.save({"adapter": peftops.adapter_state_dict(model), "local": local,
                        "history": {u.name: list(u.history) for u in safe.units},
                        "frozen_at": {u.name: u.frozen_at for u in safe.units},
                        "frozen_unchanged": frozen_unchanged, "frozen_no_grad_state": frozen_no_grad_state},
                       os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_take_identical_freeze_decisions_from_mean_scores(tmp_path):
    mp.spawn(_train_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))

    # the ranks measured different things on their own data ...
    steps = sorted(r0["local"])
    assert steps == sorted(r1["local"]) and [t for t in steps if r0["local"][t]] == list(range(WARMUP))
    assert any(abs(r0["local"][t][n] - r1["local"][t][n]) > 1e-3 for t in steps for n in r0["local"][t])
    # ... and both recorded the mean of the two
    assert r0["history"] == r1["history"]
    for name, hist in r0["history"].items():
        assert [t for t, _ in hist] == list(range(WARMUP))
        for t, s in hist:
            assert s == pytest.approx((r0["local"][t][name] + r1["local"][t][name]) / 2, abs=1e-12)

    # the same units froze at the same steps, some but not all, at more than one step
    assert r0["frozen_at"] == r1["frozen_at"]
    frozen_steps = [t for t in r0["frozen_at"].values() if t is not None]
    assert 0 < len(frozen_steps) < len(r0["frozen_at"]), r0["frozen_at"]
    assert len(set(frozen_steps)) >= 2, r0["frozen_at"]
    for r in (r0, r1):
        assert r["frozen_unchanged"] and r["frozen_no_grad_state"]

    # the replicas stayed in sync
    assert r0["adapter"].keys() == r1["adapter"].keys()
    for key in r0["adapter"]:
        torch.testing.assert_close(r0["adapter"][key], r1["adapter"][key], atol=1e-6, rtol=0,
                                   msg=lambda m, key=key: f"{key}: {m}")


def _error_worker(rank, port, out_dir):
    import peftops
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, port)
    result = {}
    try:
        with peftops.force_backend("reference"):
            cfg = peftops.SAFEConfig(warmup_steps=1, ramp_end_step=2, final_threshold=1.0, max_tokens=None,
                                     allow_freezing_all=True)
            # (0) ranks with different configs would decide differently: refused on every rank
            try:
                peftops.SAFE(_model(), peftops.SAFEConfig(warmup_steps=1, ramp_end_step=2 + rank, final_threshold=0.0))
            except RuntimeError as e:
                result["disagree"] = str(e)
            # (a) the wrapper given, static_graph=True: refused at construction
            model = _model()
            ddp = DDP(model, static_graph=True)
            try:
                peftops.SAFE(ddp, cfg)
            except RuntimeError as e:
                result["static"] = str(e)
            del ddp
            # (b) SAFE built before the wrap (plain loop), DDP(find_unused_parameters=False): refused
            # at the first freeze, before anything is frozen
            model = _model()
            safe = peftops.SAFE(model, cfg)
            ddp = DDP(model)
            for t, batch in enumerate(_rank_batches(rank, 2)):
                ddp(**batch).loss.backward()
                model.zero_grad(set_to_none=True)
                try:
                    safe.step(t + 1)  # T(1) = 0 freezes nothing; T(2) = 1.0 freezes every unit
                except RuntimeError as e:
                    result["unused"], result["raised_at"] = str(e), t + 1
                    break
            result["still_trainable"] = all(p.requires_grad for u in safe.units for p in u.params)
            result["none_frozen"] = safe.frozen == []
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_freezing_under_ddp_without_unused_parameter_detection_raises_with_the_fix(tmp_path):
    mp.spawn(_error_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for r in range(WORLD):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert "disagree" in res["disagree"]
        assert "static_graph=True" in res["static"] and "find_unused_parameters=True" in res["static"]
        assert "find_unused_parameters=False" in res["unused"]
        assert "ddp_find_unused_parameters=True" in res["unused"] and res["raised_at"] == 2
        assert res["still_trainable"] and res["none_frozen"]
