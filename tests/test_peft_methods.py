"""WeGeFT and SIFT through Hugging Face PEFT: get_peft_model, save_pretrained / from_pretrained,
merge_and_unload, unload, disable_adapter, several named adapters, modules_to_save / task_type,
PEFT's target rules, inference_mode, bf16 autocast; and the bad inputs of the PEFT path.

The generic matrix of peft's own test-suite runs in tests/test_peft_generic.py; these are the
method-specific properties it cannot see (shared generators stored once, merges from the original
W, calibration, bit-exact round trips)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
import peftops  # noqa: E402
from peftops import _peft  # noqa: E402
from peftops.tuners import PEFT_UNAVAILABLE  # noqa: E402
from helpers import tiny_batch, tiny_bert, tiny_llama  # noqa: E402

pytestmark = pytest.mark.skipif(PEFT_UNAVAILABLE is not None, reason=str(PEFT_UNAVAILABLE))

VOCAB = 61


def llama(seed: int = 0, hidden: int = 32):
    """A tiny LlamaForCausalLM in training mode, transformers' default attention and positions."""
    return tiny_llama(vocab=VOCAB, hidden=hidden, intermediate=48, layers=3, max_positions=None, pad_token_id=None,
                      attn=None, seed=seed, train=True)


def bert_classifier(seed: int = 0):
    """A tiny BertForSequenceClassification in training mode with BERT's default dropout (0.1)."""
    return tiny_bert(vocab=VOCAB, hidden=32, intermediate=40, heads=4, max_positions=None, dropout=None, attn=None,
                     seed=seed, train=True)


def batch(seed: int = 0, n: int = 2, t: int = 7):
    return tiny_batch("llama", n, t, vocab=VOCAB, seed=seed)


def configs(**kw):
    return {
        "wegeft": peftops.WeGeFTConfig(r=4, init_weights=False, **kw),
        "sift": peftops.SIFTConfig(density=0.05, init_indices="random", init_weights=False, **kw),
    }


METHODS = ["wegeft", "sift"]


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    with peftops.force_backend(request.param):
        yield request.param


def train(model, steps: int = 2, lr: float = 1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        model(**batch(i)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


def adapted(method: str, seed: int = 0, **kw):
    return peft.get_peft_model(llama(seed), configs(**kw)[method])


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------
def test_configs_are_registered_peft_configs():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.peft_types import PeftType

    from peftops.tuners.sift import SIFTModel
    from peftops.tuners.wegeft import WeGeFTModel

    for cls, tuner, name in ((peftops.WeGeFTConfig, WeGeFTModel, "WEGEFT"), (peftops.SIFTConfig, SIFTModel, "SIFT")):
        cfg = cls()
        assert isinstance(cfg, peft.PeftConfig)
        assert cfg.peft_type is PeftType[name] and PeftType(name) is PeftType[name]
        assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType[name]] is cls
        assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType[name]] is tuner


def test_config_validated_at_construction_with_help():
    import dataclasses

    with pytest.raises(ValueError, match=r"^density:"):
        peftops.SIFTConfig(density=2.0)
    with pytest.raises(ValueError, match=r"^r:"):
        peftops.WeGeFTConfig(r=0)
    with pytest.raises(ValueError, match=r"^target_modules:"):
        peftops.WeGeFTConfig(target_modules="(")
    with pytest.raises(ValueError, match=r"^bias:"):
        peftops.WeGeFTConfig(bias="all")
    with pytest.raises(ValueError, match=r"^layers_to_transform:"):
        peftops.SIFTConfig(layers_to_transform=[-1])
    with pytest.raises(ValueError, match=r"^init_indices:"):
        peftops.SIFTConfig(init_indices="topk")
    for cls in (peftops.WeGeFTConfig, peftops.SIFTConfig):
        own = [f for f in dataclasses.fields(cls) if f.name not in {f.name for f in dataclasses.fields(peft.PeftConfig)}]
        assert own and all(f.metadata.get("help") for f in own), cls


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_save_pretrained_from_pretrained_bit_equal(method, backend, tmp_path):
    model = train(adapted(method))
    b = batch(9)
    with torch.no_grad():
        want = model(**b).logits
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] == method.upper()
    loaded = peft.PeftModel.from_pretrained(llama(), tmp_path)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, want)
    mine = peft.get_peft_model_state_dict(model)
    theirs = peft.get_peft_model_state_dict(loaded)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not any(p.requires_grad for p in loaded.parameters())  # from_pretrained: inference mode


def test_shared_generators_stored_once_and_shared_after_load(tmp_path):
    from safetensors.torch import load_file

    model = train(peft.get_peft_model(llama(), peftops.WeGeFTConfig(r=4, init_weights=False)))
    model.save_pretrained(tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert len(keys) == 10  # (Φ, Ψ) for q, k, v, up, down: one copy each, not one per layer
    assert all(".layers.0." in k for k in keys)
    loaded = peft.PeftModel.from_pretrained(llama(), tmp_path, is_trainable=True)
    layers = loaded.base_model.model.model.layers
    for proj in ("q_proj", "k_proj", "v_proj"):
        first = getattr(layers[0].self_attn, proj).wegeft_phi["default"]
        assert all(getattr(layer.self_attn, proj).wegeft_phi["default"] is first for layer in layers)
    with torch.no_grad():
        assert torch.equal(loaded(**batch(3)).logits, model(**batch(3)).logits)


def test_shared_generators_survive_peft_upcast():
    """autocast_adapter_dtype re-creates 16-bit adapter Parameters; the groups are tied again."""
    base = llama().to(torch.bfloat16)
    model = peft.get_peft_model(base, peftops.WeGeFTConfig(r=4, upcast_generators=False))
    layers = model.base_model.model.model.layers
    first = layers[0].self_attn.q_proj.wegeft_phi["default"]
    assert first.dtype == torch.float32
    assert all(layer.self_attn.q_proj.wegeft_phi["default"] is first for layer in layers)


@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_bit_exact_and_merge_and_unload(method, backend):
    model = train(adapted(method))
    base_w = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    b = batch(5)
    with torch.no_grad():
        want = model(**b).logits
        model.merge_adapter()
        assert torch.allclose(model(**b).logits, want, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
    assert all(torch.equal(p, base_w[n]) for n, p in model.named_parameters() if n in base_w)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in plain.modules())
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(**b).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_unload_and_disable_adapter_give_the_base(method):
    base_logits = llama()(**batch(4)).logits.detach()
    model = train(adapted(method))
    with torch.no_grad():
        assert not torch.equal(model(**batch(4)).logits, base_logits)
        with model.disable_adapter():
            assert torch.equal(model(**batch(4)).logits, base_logits)
        model.merge_adapter()
        with model.disable_adapter():  # disabling a merged adapter unmerges it
            assert torch.equal(model(**batch(4)).logits, base_logits)
    plain = model.unload()
    with torch.no_grad():
        assert torch.equal(plain(**batch(4)).logits, base_logits)


# ---------------------------------------------------------------------------------------------
# several named adapters
# ---------------------------------------------------------------------------------------------
def test_wegeft_two_adapters_merge_from_the_original_weight():
    model = adapted("wegeft")
    model.add_adapter("other", peftops.WeGeFTConfig(r=3, alpha=6.0, init_weights=False))
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    w0 = layer.get_base_layer().weight.detach().double().clone()

    def delta(a):
        phi, psi = layer.wegeft_phi[a].detach().double(), layer.wegeft_psi[a].detach().double()
        return (w0 @ phi.t()) @ psi * layer.wegeft_scaling[a]

    b = batch(2)
    with torch.no_grad():
        model.base_model.set_adapter(["default", "other"])
        both = model(**b).logits
        layer.merge(adapter_names=["default"])
        layer.merge(adapter_names=["other"])  # the second update is also computed from W0
        torch.testing.assert_close(layer.get_base_layer().weight.double(), w0 + delta("default") + delta("other"),
                                   atol=1e-6, rtol=1e-6)
        layer.unmerge()
        assert torch.equal(layer.get_base_layer().weight.double(), w0)
        model.set_adapter("default")
        one = model(**b).logits
        assert not torch.equal(one, both)
        model.delete_adapter("other")
        assert torch.equal(model(**b).logits, one)
    assert "other" not in layer.wegeft_phi and "other" not in layer.wegeft_group


def test_sift_two_adapters_active_together_add_up(backend):
    model = adapted("sift")
    model.add_adapter("other", peftops.SIFTConfig(density=0.05, init_indices="random", init_weights=False))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(5, layer.in_features)
    w0 = layer.get_base_layer().weight.detach()
    eff = w0.clone().view(-1)
    for a in ("default", "other"):
        eff.index_add_(0, layer.sift_indices[a], layer.sift_delta[a].detach())
    model.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(layer(x), x @ eff.view_as(w0).t() + layer.get_base_layer().bias
                               if layer.get_base_layer().bias is not None else x @ eff.view_as(w0).t(),
                               atol=1e-5, rtol=1e-5)
    model.set_adapter("other")
    assert layer.sift_delta["other"].requires_grad and not layer.sift_delta["default"].requires_grad


# ---------------------------------------------------------------------------------------------
# heads, targets, modes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_task_head_trains_and_is_saved(method, tmp_path):
    cfg = configs(task_type="SEQ_CLS")[method]
    model = peft.get_peft_model(bert_classifier(), cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable)
    ids = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(2):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(bert_classifier(), tmp_path)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("targets, expect", [
    (r".*layers\.[02]\.self_attn\.(q|v)_proj", {"0.self_attn.q_proj", "0.self_attn.v_proj", "2.self_attn.q_proj",
                                                "2.self_attn.v_proj"}),
    ("all-linear", None),
])
def test_regex_and_all_linear_targets(method, targets, expect):
    model = peft.get_peft_model(llama(), configs(target_modules=targets)[method])
    names = {n.split("layers.", 1)[1] for n in model.base_model.targeted_module_names}
    if expect is None:  # every linear of the blocks, never the output head
        assert len(names) == 3 * 7 and not any("lm_head" in n for n in model.base_model.targeted_module_names)
    else:
        assert names == expect


@pytest.mark.parametrize("method", METHODS)
def test_layers_to_transform_and_exclude(method):
    model = peft.get_peft_model(llama(), configs(target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                                      exclude_modules=["v_proj"])[method])
    assert model.base_model.targeted_module_names == ["model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("method", METHODS)
def test_native_apply_uses_the_same_target_rules(method):
    cfg = configs(target_modules=r".*layers\.1\.mlp\.(up|down)_proj")[method]
    model = peftops.apply(llama(), cfg)
    kinds = (peftops.WeGeFTLinear, peftops.SIFTLinear)
    adapted_names = sorted(n for n, m in model.named_modules() if isinstance(m, kinds))
    assert adapted_names == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_forward_backward(method):
    model = adapted(method)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch(1))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# SIFT calibration on the PEFT model
# ---------------------------------------------------------------------------------------------
def test_sift_calibrate_on_peft_model_matches_native():
    b = batch(0)
    native = peftops.apply(llama(), peftops.SIFTConfig(density=0.05))
    peftops.sift_calibrate(native, [b], progress=False)
    model = peft.get_peft_model(llama(), peftops.SIFTConfig(density=0.05))
    with pytest.raises(RuntimeError, match="sift_calibrate"):
        model(**b).loss.backward()
    got = peftops.sift_calibrate(model, [b], progress=False)
    want = {n: m.indices for n, m in peftops.sift_layers(native)}
    assert {n.removeprefix("base_model.model.") for n in got} == set(want)
    for n, idx in got.items():
        assert torch.equal(torch.sort(idx).values, torch.sort(want[n.removeprefix("base_model.model.")]).values), n
    assert all(p.grad is None for p in model.parameters())
    train(model, steps=1)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_adapter_from_another_base_is_refused_by_name(tmp_path):
    train(adapted("wegeft")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^state_dict: .*wegeft_phi.* has shape"):
        peft.PeftModel.from_pretrained(llama(hidden=48), tmp_path)


def test_sift_checkpoint_indices_out_of_range_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    train(adapted("sift")).save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("sift_indices"))
    state[key] = state[key].clone()
    state[key][-1] = 10**9
    save_file(state, tmp_path / "adapter_model.safetensors")
    with pytest.raises(IndexError, match=r"^state_dict: .*sift_indices.*must lie in \[0, "):
        peft.PeftModel.from_pretrained(llama(), tmp_path)


def test_peft_type_clash_names_both():
    from peftops.tuners.wegeft import WeGeFTModel

    class Other(peftops.WeGeFTConfig):
        pass

    with pytest.raises(ValueError, match=r"^peft_type: PEFT already has a method 'WEGEFT'"):
        _peft.register("wegeft", Other, WeGeFTModel, prefix="wegeft_")
    _peft.register("wegeft", peftops.WeGeFTConfig, WeGeFTModel, prefix="wegeft_")  # the same again: a no-op


def test_unsupported_peft_version_says_what_to_install(monkeypatch):
    monkeypatch.setattr(_peft, "peft_version", lambda: "0.13.2")
    reason = _peft.unsupported_reason()
    assert "peft 0.13.2 is installed" in reason and _peft.PEFT_MIN in reason
    monkeypatch.setattr(_peft, "peft_version", lambda: "9.0.0")
    assert "peft 9.0.0 is installed" in _peft.unsupported_reason()


def test_native_load_of_a_peft_folder_is_explained(tmp_path):
    model = adapted("wegeft")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^directory: .*PeftModel\.from_pretrained"):
        peftops.load_adapter(llama(), tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["peft_type"] = "NOT_A_METHOD"
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"^directory: .*a PEFT adapter of method 'NOT_A_METHOD'"):
        peftops.load_adapter(llama(), tmp_path)


def test_native_files_have_their_own_names_and_old_folders_load(tmp_path):
    from peftops import model as pm

    model = peftops.apply(llama(), peftops.WeGeFTConfig(r=4, init_weights=False))
    peftops.save_adapter(model, tmp_path / "new")
    assert sorted(os.listdir(tmp_path / "new")) == sorted([pm.CONFIG_FILE, pm.WEIGHTS_FILE])
    assert not set(os.listdir(tmp_path / "new")) & set(pm.LEGACY_FILES)
    old = tmp_path / "old"  # a folder written by peftops before the rename: PEFT's names, peftops' schema
    old.mkdir()
    for new_name, old_name in zip((pm.CONFIG_FILE, pm.WEIGHTS_FILE), pm.LEGACY_FILES):
        (old / old_name).write_bytes((tmp_path / "new" / new_name).read_bytes())
    b = batch(1)
    with torch.no_grad():
        assert torch.equal(peftops.load_adapter(llama(), old)(**b).logits, model(**b).logits)
