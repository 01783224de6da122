"""`python -m bench --model` on the tiny Llama config, CPU, reference kernels: every method gives a row
with the right trainable count, finite step times and train-state bytes below full fine-tuning; an
out-of-memory method becomes an "oom" row and its model is freed; the JSON is written where asked."""
import glob
import json
import math
import os
import weakref

import pytest
import torch

from helpers import load_bench

load_bench()
import bench.__main__ as bench_cli  # noqa: E402
import bench.model as bm  # noqa: E402
from peftops.kernels import force_backend  # noqa: E402


def _expected_trainable(spec: bm.ModelSpec) -> dict[str, int]:
    from peftops.sift import sift_k

    h, inter, L, V = spec.hidden_size, spec.intermediate_size, spec.num_hidden_layers, spec.vocab_size
    kv = spec.num_key_value_heads * (h // spec.num_attention_heads)
    # (in, out) of q, k, v, o, gate, up, down
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    per_layer = sum(i * o for i, o in shapes) + 2 * h  # + two RMSNorm weights
    full = 2 * V * h + L * per_layer + h  # untied embedding and head, final norm
    lora = L * sum(spec.lora_r * (i + o) for i, o in shapes)
    sift = L * sum(sift_k(i * o, 0.01) for i, o in shapes)
    ab = math.isqrt(V - 1) + 1
    r = spec.aot_rank
    aot = 2 * ab * r + L * r * r * h
    wegeft_unit = 2 * spec.wegeft_r * (4 * h + inter)  # Φ, Ψ [r, d_in] for q, k, v, up (d_in = h), down (d_in = I)
    return {"full": full, "lora": lora, "sift": sift, "aot": aot, "wegeft": wegeft_unit,
            "wegeft+safe": (L - L // 2) * wegeft_unit}


def test_model_bench_tiny_cpu_all_methods(tmp_path, monkeypatch, capsys):
    built: list[weakref.ref] = []
    alive_before_build: list[int] = []
    real_build = bm.build_base

    def tracking_build(s, device):
        alive_before_build.append(sum(r() is not None for r in built))
        model = real_build(s, device)
        built.append(weakref.ref(model))
        return model

    def oom_probe(model, s, batch, device):
        prep = bm.prepare_lora(model, s, batch, device)

        def step(*a, **k):  # fails mid-warm-up, with the model, grads and activations alive
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")

        prep.optimizer.step = step
        return prep

    monkeypatch.setattr(bm, "build_base", tracking_build)
    monkeypatch.setitem(bm.PREPARE, "oom-probe", oom_probe)
    methods = bm.METHODS + ["oom-probe"]
    argv = ["--model", "--quick", "--device", "cpu", "--steps", "2", "--warmup", "1",
            "--methods", ",".join(methods), "--out", str(tmp_path)]
    with force_backend("reference"):
        rc = bench_cli.main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out  # an OOM row is a result, not a failure
    # the tiny model's 2 steps say nothing about speed: the output says so, and shows no time ratio
    assert out.count("SMOKE RUN (tiny Llama") == 2 and "say nothing about speed" in out
    (head,) = [ln for ln in out.splitlines() if ln.startswith("method ") and "trainable" in ln]
    assert "time vs" not in head and "tokens/s" not in head and "mem vs full" in head

    files = glob.glob(os.path.join(tmp_path, "model-cpu-*.json"))
    assert len(files) == 1, files
    with open(files[0]) as f:
        res = json.load(f)
    assert res["settings"]["config"] == "tiny" and res["settings"]["dtype"] == "bfloat16"
    assert res["smoke"] is True and any("tiny Llama" in w for w in res["smoke_reasons"])
    assert any("2 timed steps < 10" == w for w in res["smoke_reasons"])
    assert res["environment"]["kernels"] == "reference" and res["environment"]["peft"]
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == methods

    probe = rows.pop("oom-probe")
    assert probe["status"] == "oom" and "OutOfMemoryError" in probe["error"]
    assert probe["time_vs_full"] is None and probe["memory_vs_full"] is None
    assert "OOM" in out

    spec = bm.SPECS["tiny"]
    expected = _expected_trainable(spec)
    for name, r in rows.items():
        assert r["status"] == "ok", r
        assert r["trainable"] == expected[name], (name, r["trainable"], expected[name])
        assert len(r["step_ms_all"]) == 2 and all(math.isfinite(t) and t > 0 for t in r["step_ms_all"]), r
        assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"] and r["step_spread"] is None  # < 3 steps
        assert r["tokens_per_s"] > 0 and math.isfinite(r["final_loss"])
        assert r["peak_mib"] is None  # CPU: no allocator peak
        assert r["train_state_mib"] == pytest.approx(
            r["saved_activation_mib"] + r["grad_mib"] + r["optimizer_state_mib"])
        assert name in out
    assert rows["full"]["trainable"] == rows["full"]["total_params"]
    full_state = rows["full"]["train_state_mib"]
    for name in ("lora", "sift", "wegeft", "aot"):
        assert rows[name]["train_state_mib"] < full_state, (name, rows[name]["train_state_mib"], full_state)
        assert rows[name]["memory_vs_full"] == pytest.approx(rows[name]["train_state_mib"] / full_state)
    # SIFT keeps optimizer state for its k entries only: 2 fp32 moments per trainable entry
    assert rows["sift"]["optimizer_state_mib"] * 2**20 == pytest.approx(8 * expected["sift"], abs=64 * 4 * 7 * 2)
    # SAFE with the lower half frozen: nothing below the middle layer is saved for backward
    assert rows["wegeft+safe"]["saved_activation_mib"] < rows["wegeft"]["saved_activation_mib"]
    assert rows["lora"]["time_vs_lora"] == pytest.approx(1.0)

    # every model was freed after its method (the OOM one included) before the next was built
    assert len(built) == len(methods)
    assert alive_before_build == [0] * len(methods), alive_before_build
    assert all(r() is None for r in built)


def test_results_dir_only_for_full_size_cuda_runs_and_only_when_asked(tmp_path, monkeypatch):
    """By default every run, a full-size CUDA one too, writes outside the source tree; bench/results/ only
    when named, and only for official (full-size CUDA) figures."""
    monkeypatch.setenv("PEFTOPS_BENCH_OUT", str(tmp_path / "default"))
    default = str(tmp_path / "default")
    assert bm.resolve_out_dir(None, official=True) == default
    assert bm.resolve_out_dir(None, official=False) == default
    assert bm.resolve_out_dir(bm.RESULTS_DIR, official=True) == bm.RESULTS_DIR
    assert bm.resolve_out_dir(bm.RESULTS_DIR, official=False) == default
    assert bm.resolve_out_dir(str(tmp_path), official=False) == str(tmp_path)
    monkeypatch.delenv("PEFTOPS_BENCH_OUT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert bm.resolve_out_dir(None, official=True) == str(tmp_path / "cache" / "peftops" / "bench")
    env = {"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3"}
    s = bm.Settings(spec=bm.SPECS["1b"], batch_size=4, seq_len=1024, dtype=torch.bfloat16, warmup=3, steps=20,
                    grad_ckpt=False)
    assert bm.result_name(env, s, bm.METHODS) == "model-cuda-NVIDIA_H100_80GB_HBM3.json"
    s.grad_ckpt = True
    assert bm.result_name(env, s, ["sift"]) == "model-cuda-NVIDIA_H100_80GB_HBM3-ckpt-partial.json"


def test_smoke_is_decided_by_size_and_steps():
    big = bm.SPECS["1b"]
    s = bm.Settings(spec=big, batch_size=4, seq_len=1024, dtype=torch.bfloat16, warmup=3, steps=20, grad_ckpt=False)
    assert bm.smoke_reasons(s) == []
    s.steps = 3
    assert bm.smoke_reasons(s) == ["3 timed steps < 10"]
    table = bm.format_table([{"method": "lora", "status": "ok", "note": "n", "trainable": 1, "trainable_percent": 1.0,
                              "step_ms": 10.0, "step_ms_min": 5.0, "step_ms_max": 30.0, "step_spread": 0.9,
                              "tokens_per_s": 1.0, "train_state_mib": 1.0, "model_bytes_mib": 1.0,
                              "time_vs_full": None, "memory_vs_full": None, "time_vs_lora": 1.0,
                              "memory_vs_lora": 1.0}], torch.device("cpu"))
    assert "10.0 (5.0-30.0)" in table and "UNSTABLE: step spread 90% > 10%" in table and "time vs lora" in table


def test_oom_detection():
    assert bm._is_oom(torch.cuda.OutOfMemoryError("x"))
    assert bm._is_oom(RuntimeError("CUDA error: out of memory"))
    assert not bm._is_oom(ValueError("shape mismatch"))
    assert bm.lower_half("base_model.model.model.layers.10.self_attn.q_proj", 22)
    assert not bm.lower_half("model.layers.11.mlp.up_proj", 22)


@pytest.mark.parametrize("method", ["lora", "wegeft+safe"])
def test_activation_checkpointing_rows(method):
    spec = bm.SPECS["tiny"]
    s = bm.Settings(spec=spec, batch_size=2, seq_len=16, dtype=torch.bfloat16, warmup=1, steps=1, grad_ckpt=True)
    ids = torch.randint(0, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with force_backend("reference"):
        row = bm.run_method(method, s, {"input_ids": ids, "labels": ids}, torch.device("cpu"), log=lambda m: None)
    assert row["trainable"] == _expected_trainable(spec)[method]
    assert math.isfinite(row["step_ms"]) and row["step_ms"] > 0 and math.isfinite(row["final_loss"])
    assert row["grad_mib"] > 0 and row["optimizer_state_mib"] > 0
