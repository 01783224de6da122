"""A new task head trains with the adapter and is saved with it (PEFT's modules_to_save): a
reloaded classifier equals the trained one, bit for bit."""
import pytest
import torch

import peftops
from helpers import tiny_bert, tiny_llama
from peftops import AoTConfig, SIFTConfig, WeGeFTConfig
from peftops import model as pm
from peftops.sift import sift_calibrate
from test_all_or_nothing import assert_unchanged, fingerprint

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[2, 7, 11, 5, 3, 1], [13, 17, 19, 23, 29, 31]])
LABELS = torch.tensor([0, 2])
CONFIGS = {"sift": lambda **k: SIFTConfig(density=0.05, **k), "wegeft": lambda **k: WeGeFTConfig(r=3, alpha=6.0, **k),
           "aot": lambda **k: AoTConfig(reparam="kron", rank=2, **k)}


pytestmark = pytest.mark.usefixtures("reference_backend")


def _train(model, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=IDS, labels=LABELS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_the_head_trains_and_a_reload_equals_the_trained_model(tmp_path, method):
    model = tiny_bert()
    head0 = model.classifier.weight.detach().clone()
    cfg = CONFIGS[method]()
    peftops.apply(model, cfg)
    assert cfg.modules_to_save == ["classifier"]
    assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
    if method == "sift":
        sift_calibrate(model, [{"input_ids": IDS, "labels": LABELS}], progress=False)
    _train(model)
    assert not torch.equal(model.classifier.weight, head0)
    with torch.no_grad():
        trained = model(input_ids=IDS).logits
    peftops.save_adapter(model, tmp_path)
    fresh = peftops.load_adapter(tiny_bert(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=IDS).logits, trained, atol=0, rtol=0)
    assert fresh.classifier.weight.requires_grad


def test_opting_out_keeps_the_head_frozen_and_unsaved(tmp_path):
    model = tiny_bert()
    peftops.apply(model, WeGeFTConfig(r=2, modules_to_save=[]))
    assert not model.classifier.weight.requires_grad
    peftops.save_adapter(model, tmp_path)
    from safetensors.torch import load_file
    assert not any(k.startswith(pm.MODULES_PREFIX) for k in load_file(tmp_path / pm.WEIGHTS_FILE))


def test_no_head_is_inferred_for_a_causal_lm_and_names_are_checked():
    model = tiny_llama()
    cfg = WeGeFTConfig(r=2)
    peftops.apply(model, cfg)
    assert cfg.modules_to_save == [] and not model.lm_head.weight.requires_grad
    model = tiny_bert()
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"^modules_to_save: no module"):
        peftops.apply(model, WeGeFTConfig(r=2, modules_to_save=["head_that_is_not_there"]))
    with pytest.raises(ValueError, match=r"^modules_to_save: expected a list"):
        peftops.apply(model, SIFTConfig(modules_to_save=[3]))
    assert_unchanged(model, before)
    # PEFT's rule: a module to save is never a target of the same config ...
    query = "bert.encoder.layer.0.attention.self.query"
    peftops.apply(model, SIFTConfig(modules_to_save=["layer.0.attention.self.query"]))
    assert type(model.get_submodule(query)) is torch.nn.Linear and model.get_submodule(query).weight.requires_grad
    # ... but one another method already adapted cannot be trained in full as well
    model = tiny_bert()
    peftops.apply(model, WeGeFTConfig(r=2))
    before = fingerprint(model)
    with pytest.raises(ValueError, match=rf"^modules_to_save: '{query}' holds"):
        peftops.apply(model, SIFTConfig(target_modules=["attention.output.dense"],
                                        modules_to_save=["layer.0.attention.self.query"]))
    assert_unchanged(model, before)


def test_a_second_method_keeps_the_head_trainable():
    model = tiny_bert()
    peftops.apply(model, AoTConfig(reparam="kron", rank=2))
    peftops.apply(model, WeGeFTConfig(r=2, modules_to_save=[]))
    assert model.classifier.weight.requires_grad
    assert [n for n, _ in pm.saved_modules(model)] == ["classifier"]


def test_a_head_of_another_shape_is_refused_on_load(tmp_path):
    model = tiny_bert()
    peftops.apply(model, WeGeFTConfig(r=2))
    peftops.save_adapter(model, tmp_path)
    other = tiny_bert()
    other.classifier = torch.nn.Linear(other.classifier.in_features, 5)
    before = fingerprint(other)
    with pytest.raises(ValueError, match=r"^state: tensor 'classifier.weight' has shape \[3, 24\]"):
        peftops.load_adapter(other, tmp_path)
    assert_unchanged(other, before)
