"""The main job's real model and data load from their PyPI packages, and every method runs end to end."""
import json

import pytest
import torch

from peftops import data, demo, force_backend


def test_rotten_tomatoes_split_by_movie():
    train, test = data.load_rotten_tomatoes()
    assert len(train) > 8000 and len(test) > 1500
    assert not set(train.movies) & set(test.movies)
    assert set(train.labels) == {0, 1}
    assert all(t for t in train.texts[:100])


def test_minilm_loads_real_weights():
    model, tok = demo.load_classifier(seed=0, device=torch.device("cpu"))
    enc = tok(["a gripping, beautifully shot film"], return_tensors="pt")
    h = model.encoder(**enc).last_hidden_state
    assert h.shape[-1] == 384 and torch.isfinite(h).all()
    # pretrained, not random: the word embeddings of a real checkpoint are far from N(0, 0.02)
    assert model.encoder.embeddings.word_embeddings.weight.std() > 0.03


def test_demo_runs_every_method(tmp_path, capsys):
    # the CPU path a user gets (references); the kernels are checked against them in their own tests,
    # and the interpreter is far too slow for a real 22M-parameter model
    with force_backend("reference"):
        rc = demo.main(["--steps", "3", "--eval-size", "16", "--batch-size", "4", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = json.load(open(tmp_path / "results.json"))["rows"]
    assert [r["method"] for r in rows] == demo.DEFAULT_METHODS
    errors = {r["method"]: r["error"] for r in rows if "error" in r}
    assert rc == 0 and not errors, errors
    for r in rows:
        assert r["trainable"] > 0 and r["adapter_mib"] > 0 and r["step_ms"] > 0
    assert "method" in out and "acc after" in out
