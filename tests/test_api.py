"""One library across methods: the same model-level API for SIFT, AoT, WeGeFT, SAFE over each, and
two methods on one model, on a tiny BERT classifier and a tiny Llama (eager attention, dropout 0).

Per method row: apply + trainable summary; a plain PyTorch loop (loss falls, only adapters move;
SIFT's in-place W[I] equals W0 + scatter(δ)); transformers.Trainer with the peftops callbacks;
save -> load into a fresh base (identical logits, validated metadata, clear errors); merge /
unmerge; torch.compile(fullgraph=True) of the whole adapted model against eager."""
import copy
import json
import os

import pytest
import torch

import peftops
from helpers import WIDE, assert_close, force_backend, tiny_batch, tiny_model
from peftops import AoTConfig, SAFEConfig, SIFTConfig, WeGeFTConfig
from peftops.safe import SAFE
from peftops.sift import SIFTLinear, sift_calibrate, sift_layers

transformers = pytest.importorskip("transformers")

# row -> (configs builder per model kind, SAFE on top)
_MLP = {"bert": ["intermediate.dense"], "llama": ["gate_proj", "up_proj", "down_proj"]}
_ATTN = {"bert": ["query", "key", "value"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def _configs(row: str, kind: str) -> list:
    methods = row.replace("+safe", "").split("+")
    out = []
    for m in methods:
        if m == "sift":
            out.append(SIFTConfig(density=0.05))
        elif m == "sift@mlp":
            out.append(SIFTConfig(density=0.05, target_modules=_MLP[kind]))
        elif m == "aot":
            out.append(AoTConfig(reparam="kron", rank=4))
        elif m == "wegeft":
            out.append(WeGeFTConfig(r=4, alpha=8.0))
        elif m == "wegeft@attn":
            out.append(WeGeFTConfig(r=4, alpha=8.0, target_modules=_ATTN[kind]))
        else:  # pragma: no cover
            raise AssertionError(m)
    return out


ROWS = ["sift", "aot", "wegeft", "sift+safe", "aot+safe", "wegeft+safe", "aot+wegeft", "sift@mlp+wegeft@attn"]
KINDS = ["bert", "llama"]


pytestmark = pytest.mark.usefixtures("reference_backend")


def _base(kind: str, *, hidden: int = 32):
    return tiny_model(kind, **{**WIDE[kind], "hidden": hidden})


def _batch(kind: str, seed: int = 1) -> dict:
    if kind == "bert":
        return tiny_batch("bert", 4, 8, vocab=50, pad={1: 6}, seed=seed)
    return tiny_batch("llama", 2, 9, vocab=64, seed=seed)


def _build(kind: str, row: str, *, calibrate: bool = True, perturb: bool = False):
    """(adapted model, untouched copy of its base)."""
    model = _base(kind)
    base = copy.deepcopy(model)
    for cfg in _configs(row, kind):
        peftops.apply(model, cfg)
    if calibrate and sift_layers(model):
        sift_calibrate(model, [_batch(kind)], progress=False)
    if perturb:  # adapters start as the identity (δ = 0, Φ = 0, W_R = 0): make every one of them act
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in _trainable(model):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model, base


def _trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def _adapter_params(model) -> list:
    """Union of adapter_parameters() over every peftops adapter module (the cross-method protocol)."""
    seen, out = set(), []
    for m in model.modules():
        if getattr(type(m), "peftops_adapter", False):
            for p in m.adapter_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def _head_params(model) -> list:
    return [p for _, mod in peftops.model.saved_modules(model) for p in mod.parameters()]


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _check_base_weights(model, base, msg=""):
    """Every base parameter is unchanged, except SIFT weights: W == round(W0 + scatter(I, δ))."""
    sift_weights = {id(layer.weight): layer for _, layer in sift_layers(model)}
    heads = {id(p) for p in _head_params(model)}  # trained in full
    for name, p0 in base.named_parameters():
        p = model.get_parameter(name)
        if id(p) in heads:
            continue
        layer = sift_weights.get(id(p))
        if layer is None:
            assert torch.equal(p, p0), f"{msg}: base parameter {name} changed"
        else:
            want = p0.detach().clone()
            flat = want.view(-1)
            flat[layer.indices] = (flat[layer.indices].to(layer.delta.dtype) + layer.delta.detach()).to(want.dtype)
            assert torch.equal(p, want), f"{msg}: SIFT weight {name} != W0 + scatter(delta)"
            assert not torch.equal(p, p0) or not layer.delta.detach().any()


def _safe_config(**kw):
    return SAFEConfig(**{"warmup_steps": 2, "ramp_end_step": 3, "final_threshold": 0.0, "measure_interval": 1, **kw})


# ----------------------------------------------------------------------------------------------
# (a) apply + summary, (b) a plain PyTorch loop
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("row", ROWS)
def test_apply_summary_and_plain_loop(row, kind):
    model, base = _build(kind, row)
    methods = [c.method for c in _configs(row, kind)]
    summary = peftops.trainable_summary(model)
    trainable = _trainable(model)
    assert summary["methods"] == methods
    assert summary["trainable"] == sum(p.numel() for p in trainable) > 0
    assert summary["total"] == sum(p.numel() for p in model.parameters())
    assert 0 < summary["percent"] < 100
    assert f"trainable params: {summary['trainable']:,}" in summary["text"]
    # what trains is exactly what the adapter modules declare (SAFE relies on it), plus the new
    # classification head (modules_to_save, resolved by apply) on the BERT classifier
    assert {id(p) for p in trainable} == {id(p) for p in _adapter_params(model)} | {id(p) for p in _head_params(model)}
    assert bool(_head_params(model)) == (kind == "bert")

    batch = _batch(kind)
    opt = torch.optim.AdamW(trainable, lr=2e-2)
    safe = SAFE(model, _safe_config(), optimizer=opt) if "safe" in row else None
    model.train()
    losses, frozen_values = [], {}
    for t in range(5):
        loss = model(**batch).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if safe is not None:
            if t == 2:  # after the warm-up: freeze the less important half at step 3 (threshold = median)
                scores = sorted(s for s in safe.scores().values() if s is not None)
                assert len(scores) == len(safe.units) >= 2
                safe.config.final_threshold = scores[len(scores) // 2]
            newly = safe.step(t + 1)
            if t == 2:
                assert 0 < len(safe.frozen) < len(safe.units), safe.report()
                frozen_values = {id(p): p.detach().clone() for u in safe.units if u.frozen for p in u.params
                                 if not p.requires_grad}
                assert newly and frozen_values
                assert all(id(p) not in {id(q) for q in opt.state} for p in _adapter_params(model)
                           if id(p) in frozen_values)
    model.eval()
    with torch.no_grad():
        final = model(**batch).loss.item()  # also merges the last δ into SIFT's weights
    assert final < losses[0] and final <= min(losses), (row, kind, losses, final)
    _check_base_weights(model, base, f"{row}/{kind}")
    moved = [p for p in _adapter_params(model) if p.requires_grad]
    assert moved
    if safe is not None:
        for p in _adapter_params(model):
            if id(p) in frozen_values:
                assert torch.equal(p, frozen_values[id(p)]), "a frozen adapter parameter moved"


def test_overlapping_weight_methods_raise_clearly():
    """Two weight adapters on one nn.Linear do not compose: the second apply names the conflict."""
    for first, second in [(SIFTConfig(density=0.05), WeGeFTConfig(r=4, alpha=8.0)),
                          (WeGeFTConfig(r=4, alpha=8.0), SIFTConfig(density=0.05, target_modules=["query"]))]:
        model = _base("bert")
        peftops.apply(model, first)
        with pytest.raises(ValueError, match=r"^target_modules: .*already adapted by"):
            peftops.apply(model, second)
    model = _base("bert")
    peftops.apply(model, AoTConfig(reparam="kron", rank=4))
    with pytest.raises(ValueError, match=r"^config: method 'aot' is already applied"):
        peftops.apply(model, AoTConfig(reparam="direct"))


# ----------------------------------------------------------------------------------------------
# (c) transformers.Trainer, loop unchanged
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("row", ROWS)
def test_trainer(row, kind, tmp_path):
    from peftops import SAFECallback, SIFTCalibrationCallback

    model, base = _build(kind, row, calibrate=False)  # SIFT is calibrated by its callback
    batch = _batch(kind)
    data = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
    callbacks = []
    if sift_layers(model):
        callbacks.append(SIFTCalibrationCallback(progress=False))
    safe_cb = SAFECallback(_safe_config(warmup_steps=1, ramp_end_step=2)) if "safe" in row else None
    if safe_cb is not None:
        callbacks.append(safe_cb)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=len(data),
                                          max_steps=2, learning_rate=1e-2, report_to=[], save_strategy="no",
                                          use_cpu=True, logging_strategy="no", disable_tqdm=True, seed=0,
                                          dataloader_num_workers=0)
    before = {id(p): p.detach().clone() for p in _adapter_params(model)}  # SIFT's δ is still empty here
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    assert all(layer.selected for _, layer in sift_layers(model))
    after = _adapter_params(model)
    assert any(id(p) not in before or not torch.equal(p, before[id(p)]) for p in after), "nothing trained"
    _logits(model.eval(), batch)  # the next forward writes W[I] after the Trainer's (fused) AdamW
    _check_base_weights(model, base, f"trainer {row}/{kind}")
    if safe_cb is not None:
        log = safe_cb.safe.log
        assert [e["step"] for e in log] == [0, 1]
        assert set(log[0]["scores"]) == set(safe_cb.safe.unit_names)  # the warm-up step measured every unit


# ----------------------------------------------------------------------------------------------
# (d) save / load, (e) merge / unmerge
# ----------------------------------------------------------------------------------------------
def _copy_dir(src, dst):
    os.makedirs(dst)
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    return dst


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("row", [r for r in ROWS if "safe" not in r])  # SAFE changes no adapter format
def test_save_load_and_errors(row, kind, tmp_path):
    model, _ = _build(kind, row, perturb=True)
    batch = _batch(kind)
    want = _logits(model, batch)
    out = str(tmp_path / "adapter")
    peftops.save_adapter(model, out)
    meta = json.load(open(os.path.join(out, "peftops_adapter.json")))
    assert [a["method"] for a in meta["adapters"]] == [c.method for c in _configs(row, kind)]
    assert meta["peftops_version"] == peftops.__version__ and meta["format_version"] == 1
    state = peftops.adapter_state_dict(model)
    assert meta["tensors"] == {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                               for k, v in state.items()}

    loaded = peftops.load_adapter(_base(kind), out)
    torch.testing.assert_close(_logits(loaded, batch), want, atol=0, rtol=0)
    assert peftops.trainable_summary(loaded)["trainable"] == peftops.trainable_summary(model)["trainable"]

    bad = _copy_dir(out, str(tmp_path / "truncated"))
    path = os.path.join(bad, "peftops_adapter.safetensors")
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"^directory: .*: corrupted or unreadable safetensors file"):
        peftops.load_adapter(_base(kind), bad)

    bad = _copy_dir(out, str(tmp_path / "declared"))
    path = os.path.join(bad, "peftops_adapter.json")
    m = json.load(open(path))
    key = sorted(m["tensors"])[0]
    m["tensors"][key]["dtype"] = "float16"
    json.dump(m, open(path, "w"))
    with pytest.raises(ValueError, match=r"^directory: .*declares"):
        peftops.load_adapter(_base(kind), bad)

    # a base of the same architecture and another width, and a base of the other architecture
    with pytest.raises(ValueError):
        peftops.load_adapter(_base(kind, hidden=48), out)
    with pytest.raises(ValueError):
        peftops.load_adapter(_base("llama" if kind == "bert" else "bert"), out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("row", [r for r in ROWS if "safe" not in r])
def test_merge_unmerge(row, kind):
    model, base = _build(kind, row, perturb=True)
    batch = _batch(kind)
    adapted = _logits(model, batch)
    peftops.merge(model)
    assert_close(_logits(model, batch), adapted, torch.float32, scale=4.0)
    if any(isinstance(m, SIFTLinear) for m in model.modules()):  # pragma: no cover - merge replaces them
        raise AssertionError("SIFTLinear left after merge")
    peftops.unmerge(model)
    heads = {id(p) for p in _head_params(model)}  # trained in full, never merged
    for name, p0 in base.named_parameters():
        if id(model.get_parameter(name)) not in heads:
            assert torch.equal(model.get_parameter(name), p0), f"unmerge did not restore {name}"
    torch.testing.assert_close(_logits(model, batch), adapted, atol=0, rtol=0)  # adapters still active
    # still trainable after unmerge
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is not None for p in _trainable(model))


# ----------------------------------------------------------------------------------------------
# (f) torch.compile(fullgraph=True) of the whole adapted model
# ----------------------------------------------------------------------------------------------
def _grads(params):
    out = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_matches_eager(kind):
    """All three methods in one model (AoT bias before every layer, SIFT on the MLP, WeGeFT on
    attention) with a SAFE measuring step armed: torch.compile(fullgraph=True) of the whole model
    gives eager's logits, the gradient of every trainable parameter and the same SAFE scores.
    (Compiling costs ~10 s per model on the CI CPU: one graph covers every method's ops.)"""
    row = "aot+sift@mlp+wegeft@attn+safe"
    model, _ = _build(kind, row, perturb=True)
    assert [c.method for c in peftops.model.applied_configs(model)] == ["aot", "sift", "wegeft"]
    safe = SAFE(model, _safe_config(warmup_steps=3, ramp_end_step=4))  # steps 0..2 measure
    assert {u.kind for u in safe.units} == {"AoTLayerBias", "SIFTLinear", "WeGeFTLinear"}
    batch = _batch(kind)
    model.train()
    params = _trainable(model)
    out = model(**batch)
    out.loss.backward()
    eager = (out.logits.detach(), _grads(params), safe.end_step(0))
    safe.begin_step(1)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(**batch)
    out.loss.backward()
    got = (out.logits.detach(), _grads(params), safe.end_step(1))
    assert_close(got[0], eager[0], torch.float32, scale=4.0)
    assert len(params) == len(got[1]) > 0
    for _, g, e in zip(params, got[1], eager[1]):
        assert_close(g, e, torch.float32, scale=max(4.0, float(e.abs().max())))
    assert set(eager[2]) == set(got[2]) == set(safe.unit_names)
    for name in eager[2]:
        assert abs(eager[2][name] - got[2][name]) < 1e-4, (name, eager[2][name], got[2][name])


# ----------------------------------------------------------------------------------------------
# WeGeFT output layout: contiguous like nn.Linear's, on every path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("path", ["fused", "merged"])
def test_wegeft_outputs_are_contiguous(backend, path):
    from peftops.wegeft import WeGeFTLinear

    torch.manual_seed(0)
    layer = WeGeFTLinear(torch.nn.Linear(12, 14), r=3, alpha=6.0, path=path)
    with torch.no_grad():
        layer.phi.normal_(0, 0.1)
    x = torch.randn(2, 5, 12, requires_grad=True)
    with force_backend(backend):
        y = layer(x)
        assert y.is_contiguous() and y.view(-1).numel() == 2 * 5 * 14
        y.view(-1).square().sum().backward()
    assert x.grad.is_contiguous() and x.grad.view(-1).numel() == 2 * 5 * 12
    with force_backend("reference"):
        x2 = x.detach().clone().requires_grad_()
        ref = layer(x2)
        ref.square().sum().backward()
    assert_close(y, ref, torch.float32)
    assert_close(x.grad, x2.grad, torch.float32, scale=4.0)
