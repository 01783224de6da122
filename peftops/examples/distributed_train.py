"""Data-parallel training of a peftops adapter, launched by torchrun or accelerate launch.

    # plain PyTorch DDP (init from torchrun's environment; gloo on CPU, nccl on GPU)
    torchrun --standalone --nproc_per_node 2 peftops/examples/distributed_train.py --method sift --out out/sift
    # Hugging Face accelerate (DDP under the hood); on a machine without GPUs add ACCELERATE_USE_CPU=1
    # (--multi_gpu then just means "several processes", run on gloo)
    accelerate launch --multi_gpu --num_processes 2 peftops/examples/distributed_train.py --engine accelerate \\
        --method wegeft --out out/wegeft
    # one process (the reference the distributed runs must equal)
    python peftops/examples/distributed_train.py --method sift --out out/sift-1proc

Builds a small random Llama (or loads ``--model``, any AutoModelForCausalLM), applies ``--method``
(sift | wegeft | aot | lora = peft LoRA), trains ``--steps`` steps on synthetic token batches and writes
the adapter with ``peftops.save_adapter`` (peft's ``save_pretrained`` for LoRA) on rank 0. Every
global batch of ``--global-batch`` rows is split evenly over the ranks, so the result equals one
process training on the whole batch (DDP averages the gradients of the per-rank mean losses).

A DDP comm hook counts what is all-reduced per step: only the trainable tensors. For SIFT that is
δ, Σk fp32 values over the layers, against Σ d_out·d_in for the same weights trained densely.
SIFT's index sets are chosen (``sift_calibrate``) before DDP wraps the model, from the same
calibration batch on every rank, so all ranks train the same index sets (checked).
Replace ``synthetic_batches`` with your data loader (and a DistributedSampler) to use it for real.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch
import torch.distributed as dist

METHODS = ("sift", "wegeft", "aot", "lora")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=METHODS, default="sift")
    p.add_argument("--engine", choices=("ddp", "accelerate"), default="ddp",
                   help="ddp: torch DistributedDataParallel, process group from the launcher's environment; "
                        "accelerate: accelerate.Accelerator.prepare / backward")
    p.add_argument("--model", default=None, help="AutoModelForCausalLM name or directory (default: a tiny random Llama)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=4, help="rows per step over all ranks (divisible by the world size)")
    p.add_argument("--seq-len", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--density", type=float, default=0.05, help="SIFT: fraction of each weight trained")
    p.add_argument("--rank", type=int, default=4, help="WeGeFT / LoRA r, AoT kron rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto",
                   help="peftops kernel backend (auto: Triton on CUDA, PyTorch reference on CPU)")
    p.add_argument("--out", required=True, help="directory for the adapter (rank 0) and rank<r>.json results")
    args = p.parse_args(argv)
    if args.steps < 1 or args.global_batch < 1 or args.seq_len < 2:
        p.error("--steps, --global-batch must be >= 1 and --seq-len >= 2")
    return args


def build_model(args):
    import transformers

    torch.manual_seed(args.seed)  # identical initial model (and adapter init) on every rank
    if args.model:
        return transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(cfg)


def apply_method(model, args):
    import peftops

    if args.method == "lora":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                          target_modules=["q_proj", "v_proj"]))
    config = {
        "sift": lambda: peftops.SIFTConfig(density=args.density),
        "wegeft": lambda: peftops.WeGeFTConfig(r=args.rank, alpha=2.0 * args.rank),
        "aot": lambda: peftops.AoTConfig(reparam="kron", rank=args.rank),
    }[args.method]()
    return peftops.apply(model, config)


def synthetic_batches(args, vocab_size, n):
    """n global batches of random token ids (the same on every rank), causal-LM labels."""
    g = torch.Generator().manual_seed(args.seed + 1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab_size, (args.global_batch, args.seq_len), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _init_distributed():
    """(rank, world size, device) from torchrun's environment; a single process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return rank, world, device


def _counting_hook(counts: list[int]):
    """DDP comm hook: record the bytes of each gradient bucket, then DDP's default mean all-reduce."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def hook(state, bucket):
        buf = bucket.buffer()
        counts.append(buf.numel() * buf.element_size())
        return default_hooks.allreduce_hook(state, bucket)
    return hook


def _check_same_sift_selection(model):
    """Every rank must train the same index sets: compare a checksum of them across ranks."""
    from peftops.sift import sift_layers

    sums = torch.tensor([float(layer.indices.sum()) for _, layer in sift_layers(model)], dtype=torch.float64)
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError("SIFT index sets differ across ranks: calibrate on the same batches everywhere")


def _setup(args):
    """(accelerator or None, rank, world size, device) from the launcher's environment."""
    if args.engine == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator()  # set up from the launcher's environment
        rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
        if world == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("accelerate launched several processes but set up no process group: on a machine "
                             "without GPUs set ACCELERATE_USE_CPU=1 (accelerate then runs them on gloo)")
        return accelerator, rank, world, device
    return (None, *_init_distributed())


def _wrap(model, opt, accelerator, world, device, bucket_bytes: list[int], method: str):
    """(wrapped model, optimizer): accelerate's prepare, DDP, or the model itself; DDP's all-reduce counted."""
    if accelerator is not None:
        wrapped, opt = accelerator.prepare(model, opt)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        wrapped = model
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        wrapped.register_comm_hook(None, _counting_hook(bucket_bytes))
        if method == "sift":
            _check_same_sift_selection(model)
    return wrapped, opt


def _report(args, model, rank, world, losses, per_step, seconds, trainable) -> dict:
    result = {
        "rank": rank, "world_size": world, "method": args.method, "engine": args.engine, "losses": losses,
        "allreduce_bytes_per_step": per_step, "seconds": seconds,
        "trainable_params": sum(p.numel() for p in trainable),
        "full_finetune_bytes_per_step": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    if args.method == "sift":
        from peftops.sift import sift_layers

        layers = [layer for _, layer in sift_layers(model)]
        result["sift_sum_k"] = sum(layer.k for layer in layers)
        result["sift_dense_bytes_per_step"] = sum(layer.weight.numel() * 4 for layer in layers)  # fp32 ∇W
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    dense = result.get("sift_dense_bytes_per_step", result["full_finetune_bytes_per_step"])
    what = "dense ∇W of the SIFT weights" if args.method == "sift" else "full fine-tuning"
    print(f"[rank {rank}/{world}] {args.method} ({args.engine}): losses {[round(x, 5) for x in losses]}, "
          f"all-reduced {per_step[-1] if per_step else 0} B/step vs {dense} B/step for {what}, {seconds:.2f} s",
          flush=True)
    return result


def main(argv=None) -> dict:
    import peftops

    args = parse_args(argv)
    accelerator, rank, world, device = _setup(args)
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by the world size {world}")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    with peftops.force_backend(args.backend) if args.backend != "auto" else contextlib.nullcontext():
        model = apply_method(build_model(args), args).to(device)
        vocab = model.get_input_embeddings().num_embeddings
        *train, calib = synthetic_batches(args, vocab, args.steps + 1)
        if args.method == "sift":
            # before DDP wraps the model: its buckets are sized by δ, which has k entries only after this
            peftops.sift_calibrate(model, [{k: v.to(device) for k, v in calib.items()}], progress=False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = peftops.SparseAdamW(trainable, lr=args.lr) if args.method == "sift" \
            else torch.optim.AdamW(trainable, lr=args.lr)
        bucket_bytes: list[int] = []
        wrapped, opt = _wrap(model, opt, accelerator, world, device, bucket_bytes, args.method)

        per_rank = args.global_batch // world
        losses, per_step, t0 = [], [], time.perf_counter()
        for batch in train:
            shard = {k: v[rank * per_rank:(rank + 1) * per_rank].to(device) for k, v in batch.items()}
            seen = len(bucket_bytes)
            loss = wrapped(**shard).loss
            accelerator.backward(loss) if accelerator is not None else loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            per_step.append(sum(bucket_bytes[seen:]))
        seconds = time.perf_counter() - t0

    result = _report(args, model, rank, world, losses, per_step, seconds, trainable)
    if world > 1:
        dist.barrier()
    if rank == 0:
        if args.method == "lora":
            model.save_pretrained(args.out)
        else:
            peftops.save_adapter(model, args.out, overwrite=True)
    if world > 1 and accelerator is None:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
