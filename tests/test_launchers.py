"""peftops/examples/distributed_train.py under the real launchers: torchrun (``python -m torch.distributed.run``)
with plain DDP and ``accelerate launch`` with accelerate's Accelerator, 2 CPU processes on gloo.

The adapter rank 0 saves must equal the one a single process saves after training on the combined
batch (fp32, the tolerance of tests/test_distributed.py), the per-rank losses must average to the
single-process losses, and the bytes DDP all-reduces per step must be exactly the trainable tensors:
for SIFT 4·Σk (fp32 δ), far below the 4·Σ d_out·d_in of the dense weight gradients. One launch per
launcher (SIFT under torchrun, WeGeFT under accelerate) keeps the process start-ups affordable;
tests/test_distributed.py covers every method x DDP in-process.

accelerate is run config-file free (HF_HOME points at an empty directory): ``--multi_gpu
--num_processes 2`` starts the processes through torch.distributed.run, and ACCELERATE_USE_CPU=1 makes
Accelerator set up a MULTI_CPU (gloo) process group on a machine without GPUs (``--cpu`` alone would
start one process: accelerate runs several CPU processes only through mpirun)."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "peftops" / "examples" / "distributed_train.py"
WORLD = 2
TIMEOUT_S = 240  # one launch takes ~10 s of CPU; generous for a loaded 2-core CI machine
TOL = dict(atol=1e-6, rtol=1e-5)
COMMON = ["--steps", "3", "--global-batch", "4", "--backend", "reference"]


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf_home"), TOKENIZERS_PARALLELISM="false")
    return env


def _launch(cmd, env, what):
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what} did not finish within {TIMEOUT_S} s:\n{(e.stdout or '')[-3000:]}\n{(e.stderr or '')[-3000:]}")
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("distributed_train", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _single_process(example, method, out):
    threads = torch.get_num_threads()
    try:
        return example.main(["--method", method, "--out", str(out), *COMMON])
    finally:
        torch.set_num_threads(threads)


def _check_against_single_process(example, method, dist_out, tmp_path):
    from safetensors.torch import load_file

    ref = _single_process(example, method, tmp_path / "single")
    ranks = [json.loads((dist_out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["world_size"] for r in ranks] == [WORLD, WORLD], "the launcher did not start a 2-process group"
    got = load_file(dist_out / "peftops_adapter.safetensors")
    want = load_file(tmp_path / "single" / "peftops_adapter.safetensors")
    assert got.keys() == want.keys()
    for key, w in want.items():
        if w.is_floating_point():
            torch.testing.assert_close(got[key], w, **TOL, msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert torch.equal(got[key], w), f"{key}: the SIFT index sets differ"
    assert any(w.is_floating_point() and w.abs().max() > 0 for w in want.values()), "no adapter tensor trained"
    mean_losses = torch.tensor([(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])])
    torch.testing.assert_close(mean_losses, torch.tensor(ref["losses"]), **TOL)
    return ref, ranks


def test_torchrun_ddp_sift_matches_single_process(example, tmp_path):
    out = tmp_path / "torchrun"
    stdout = _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--standalone",
                      str(SCRIPT), "--method", "sift", "--out", str(out), *COMMON], _env(tmp_path), "torchrun")
    ref, ranks = _check_against_single_process(example, "sift", out, tmp_path)
    sum_k = ref["sift_sum_k"]
    for r in ranks:
        assert r["sift_sum_k"] == sum_k
        # only δ crosses the wire: 4·Σk bytes every step, against 4·Σ d_out·d_in for dense ∇W
        assert r["allreduce_bytes_per_step"] == [4 * sum_k] * 3
        assert r["sift_dense_bytes_per_step"] > 10 * 4 * sum_k
    assert "all-reduced" in stdout
    print(f"\ntorchrun SIFT: {4 * sum_k} B all-reduced per step vs {ranks[0]['sift_dense_bytes_per_step']} B dense")


def test_accelerate_launch_wegeft_matches_single_process(example, tmp_path):
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("accelerate is not installed")
    env = _env(tmp_path)
    env["ACCELERATE_USE_CPU"] = "1"
    out = tmp_path / "accelerate"
    _launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
             "--main_process_port", str(_free_port()),
             str(SCRIPT), "--engine", "accelerate", "--method", "wegeft", "--out", str(out), *COMMON],
            env, "accelerate launch")
    ref, ranks = _check_against_single_process(example, "wegeft", out, tmp_path)
    for r in ranks:
        assert r["engine"] == "accelerate"
        assert r["allreduce_bytes_per_step"] == [4 * ref["trainable_params"]] * 3  # the shared generators only
