"""peftops.disable_adapters(model): inside the block the base model's outputs, bit for bit (merged
adapters unmerged for the block); after it the adapted outputs again, bit for bit; for every method
and for methods combined."""
from __future__ import annotations

import pytest
import torch

import peftops
from peftops import AoTConfig, SIFTConfig, WeGeFTConfig
from helpers import tiny_bert

IDS = torch.randint(0, 41, (2, 9), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        out = model(input_ids=IDS)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).clone()


def trained(configs):
    model = tiny_bert()
    for cfg in configs:
        peftops.apply(model, cfg)
    if any(isinstance(c, SIFTConfig) for c in configs):
        peftops.sift_calibrate(model, [{"input_ids": IDS, "labels": torch.tensor([0, 1])}],
                               loss_fn=lambda m, b: m(input_ids=b["input_ids"]).logits.square().mean(), progress=False)
    with torch.no_grad():  # a non-identity adapter of every kind
        for p in (p for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return model


CASES = {
    "sift": [SIFTConfig(density=0.05, modules_to_save=[])],
    "wegeft": [WeGeFTConfig(r=2, modules_to_save=[])],
    "aot": [AoTConfig(rank=2, modules_to_save=[])],
    "aot+wegeft+sift": [AoTConfig(rank=2, modules_to_save=[]), WeGeFTConfig(r=2, target_modules=["query"], modules_to_save=[]),
                        SIFTConfig(density=0.05, target_modules=["value"], modules_to_save=[])],
}


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_disable_gives_the_base_and_comes_back(case, merged):
    base = logits(tiny_bert())
    model = trained(CASES[case])
    adapted = logits(model)
    assert not torch.equal(adapted, base)
    if merged:
        peftops.merge(model)
    before = logits(model)
    with peftops.disable_adapters(model) as inside:
        assert inside is model
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), before)
    if merged:
        peftops.unmerge(model)
        assert torch.equal(logits(model), adapted)


def test_disable_restores_after_an_error_and_refuses_bad_input():
    model = trained(CASES["wegeft"])
    adapted = logits(model)
    with pytest.raises(RuntimeError, match="boom"):
        with peftops.disable_adapters(model):
            raise RuntimeError("boom")
    assert torch.equal(logits(model), adapted)
    with pytest.raises(ValueError, match=r"^model: no peftops adapter"):
        with peftops.disable_adapters(tiny_bert()):
            pass
    with pytest.raises(TypeError, match=r"^model:"):
        with peftops.disable_adapters("not a model"):
            pass
