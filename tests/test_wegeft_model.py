"""WeGeFTLinear and the model-level method: sharing, merge/unmerge, save/load, dropout, tiny HF models,
torch.compile."""
import copy

import pytest
import torch
from torch import nn

import peftops.model as pm
from helpers import assert_close, device_backend_params, force_backend, tiny_bert, tiny_llama
from peftops.kernels import triton_runs_on
from peftops.kernels import wegeft as K
from peftops.wegeft import BERT_TARGETS, LLAMA_TARGETS, WeGeFTConfig, WeGeFTLinear, wegeft_linear


def _linear(d_in, d_out, dtype=torch.float32, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias).to(dtype)


def _perturb(params, seed=1, s=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * s / p.shape[-1] ** 0.5)


def _tiny_llama():
    return tiny_llama(vocab=64, hidden=32, intermediate=48, max_positions=64, pad_token_id=None, attn=None)


def _tiny_bert():
    return tiny_bert(vocab=64, hidden=32, intermediate=48, heads=4, max_positions=None, attn=None)


# ----------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------
def test_module_starts_as_the_base_layer_and_follows_the_formula():
    base = _linear(13, 7, torch.float64)
    layer = WeGeFTLinear(copy.deepcopy(base), r=4, alpha=8)
    x = torch.randn(3, 5, 13, dtype=torch.float64)
    with force_backend("reference"):
        assert torch.equal(layer(x), base(x)), "Φ = 0 must leave the output unchanged"
        _perturb(layer.adapter_parameters())
        expect = base(x) + 2.0 * (x @ layer.psi.t()) @ (layer.phi @ base.weight.t())
        assert_close(layer(x), expect, torch.float64)
    assert layer.peftops_adapter is True
    assert [p.shape for p in layer.adapter_parameters()] == [(4, 13), (4, 13)]
    assert not layer.weight.requires_grad and layer.phi.requires_grad
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "phi", "psi"}
    bound = 13 ** -0.5  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert 0.5 * bound < float(WeGeFTLinear(_linear(13, 7), r=64).psi.detach().abs().max()) <= bound


def test_generators_upcast_for_half_weights():
    layer = WeGeFTLinear(_linear(8, 6, torch.bfloat16), r=2)
    assert layer.phi.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    _perturb(layer.adapter_parameters())
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with force_backend("reference"):
        y = layer(x)
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.phi.grad.dtype == torch.float32
    assert WeGeFTLinear(_linear(8, 6, torch.bfloat16), r=2, upcast_generators=False).phi.dtype == torch.bfloat16


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_shared_generators_receive_the_summed_gradient(device, backend):
    torch.manual_seed(0)
    phi = nn.Parameter(torch.randn(3, 10, dtype=torch.float64) * 0.3)
    psi = nn.Parameter(torch.randn(3, 10, dtype=torch.float64) * 0.3)
    l1 = WeGeFTLinear(_linear(10, 6, torch.float64, 1).to(device), r=3, alpha=6, phi=phi, psi=psi)
    l2 = WeGeFTLinear(_linear(10, 9, torch.float64, 2).to(device), r=3, alpha=6, phi=phi, psi=psi)
    x1, x2 = torch.randn(5, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    with force_backend(backend):
        (l1(x1).sum() + (l2(x2) ** 2).sum()).backward()
        g_shared = phi.grad.clone(), psi.grad.clone()
        grads = []
        for layer, x, f in ((l1, x1, lambda y: y.sum()), (l2, x2, lambda y: (y ** 2).sum())):
            p, q = phi.detach().clone().requires_grad_(), psi.detach().clone().requires_grad_()
            f(wegeft_linear(x, layer.weight, layer.bias, p, q, layer.scaling)).backward()
            grads.append((p.grad, q.grad))
    assert_close(g_shared[0], grads[0][0] + grads[1][0], torch.float64)
    assert_close(g_shared[1], grads[0][1] + grads[1][1], torch.float64)
    assert l1.adapter_parameters()[0] is l2.adapter_parameters()[0]


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backup", ["cpu", "device"])
def test_merge_matches_unmerged_and_unmerge_is_exact(device, backend, dtype, backup):
    layer = WeGeFTLinear(_linear(29, 23, dtype).to(device), r=5, alpha=10, merge_backup=backup, upcast_generators=False)
    _perturb(layer.adapter_parameters())
    original = layer.weight.detach().clone()
    x = torch.randn(6, 29).to(dtype).to(device)
    with force_backend(backend):
        y = layer(x)
        layer.merge()
        layer.merge()  # idempotent
        y_merged = layer(x)
        assert layer.merged and not torch.equal(layer.weight, original)
        layer.unmerge()
        y_after = layer(x)
    assert_close(y_merged, y.double(), dtype, scale=max(1.0, float(y.detach().abs().max())))
    assert torch.equal(layer.weight, original), "unmerge must restore W bit for bit"
    assert torch.equal(y_after, y)
    assert layer._original_weight is None


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_dropout_semantics(device, backend, monkeypatch):
    layer = WeGeFTLinear(_linear(12, 8, torch.float64).to(device), r=3, alpha=3, dropout=0.5)
    x = torch.randn(5, 12, dtype=torch.float64)
    with force_backend(backend):
        layer.train()
        # Φ = 0: the generated branch is zero, so dropout of W (in that branch only) changes nothing
        assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), torch.float64)
        _perturb(layer.adapter_parameters())
        y_train1, y_train2 = layer(x), layer(x)
        assert not torch.allclose(y_train1, y_train2), "a fresh mask per training call"
        layer.eval()
        y_eval = layer(x)
        expect = nn.functional.linear(x, layer.weight, layer.bias) + (x @ layer.psi.t()) @ (layer.phi @ layer.weight.t())
        assert_close(y_eval, expect, torch.float64)

    # p = 0 (or eval): no dropout code runs at all
    def boom(*a, **k):
        raise AssertionError("dropout code ran with p = 0")

    monkeypatch.setattr(K, "dropout_keep_mask", boom)
    monkeypatch.setattr(K, "_dropped", lambda w, p, s: (w, 1.0) if p == 0 else boom())
    layer0 = WeGeFTLinear(_linear(12, 8, torch.float64).to(device), r=3, dropout=0.0).train()
    with force_backend(backend):
        layer0(x).sum().backward()
        layer.eval()
        layer(x).sum().backward()


# ----------------------------------------------------------------------------------------------
# model-level method
# ----------------------------------------------------------------------------------------------
def test_llama_defaults_shared_generators_and_save_load(tmp_path):
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    pm.apply(model, WeGeFTConfig(r=4, alpha=8))
    cfg = pm.applied_configs(model)[0]
    assert cfg.target_modules == LLAMA_TARGETS
    adapted = {n: m for n, m in model.named_modules() if isinstance(m, WeGeFTLinear)}
    assert len(adapted) == 10 and not any("o_proj" in n or "gate_proj" in n for n in adapted)
    with force_backend("reference"), torch.no_grad():
        assert torch.equal(model(ids).logits, ref), "Φ = 0: the adapted model starts unchanged"
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 10  # (Φ, Ψ) × {q, k, v, up, down}, shared over the 2 layers
    assert sum(p.numel() for p in trainable) == 4 * 2 * (32 * 4 + 48)
    assert adapted["model.layers.0.self_attn.q_proj"].phi is adapted["model.layers.1.self_attn.q_proj"].phi
    _perturb(trainable)
    with force_backend("reference"), torch.no_grad():
        out = model(ids).logits
    state = pm.adapter_state_dict(model)
    assert sorted(state) == sorted(f"wegeft::{t}.{g}" for t in LLAMA_TARGETS for g in ("phi", "psi"))
    pm.save_adapter(model, tmp_path)
    fresh = pm.load_adapter(_tiny_llama(), tmp_path)
    with force_backend("reference"), torch.no_grad():
        assert torch.equal(fresh(ids).logits, out)
    # merged whole model ≈ unmerged, and unmerge is exact
    weights = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    with force_backend("reference"), torch.no_grad():
        pm.merge(fresh)
        assert_close(fresh(ids).logits, out, torch.float32, scale=max(1.0, float(out.abs().max())))
        pm.unmerge(fresh)
    assert all(torch.equal(p, weights[n]) for n, p in fresh.named_parameters())


def test_bert_defaults_per_layer_and_load_errors(tmp_path):
    model = _tiny_bert()
    pm.apply(model, WeGeFTConfig(r=2, alpha=4, share_generators=False))
    cfg = pm.applied_configs(model)[0]
    assert cfg.target_modules == BERT_TARGETS and "attention.output.dense" in cfg.exclude_modules
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, WeGeFTLinear))
    assert len(adapted) == 10 and not any("attention.output" in n or "pooler" in n for n in adapted)
    state = pm.adapter_state_dict(model)
    assert "wegeft::bert.encoder.layer.1.output.dense.psi" in state
    assert len([k for k in state if k.startswith("wegeft::")]) == 20
    assert sorted(k for k in state if k.startswith("modules::")) == ["modules::classifier.bias", "modules::classifier.weight"]
    _perturb([p for p in model.parameters() if p.requires_grad])
    pm.save_adapter(model, tmp_path)
    # a model whose layers have another width cannot take these generators
    other = tiny_bert(vocab=64, hidden=16, intermediate=48, heads=4, max_positions=None, dropout=None, attn=None,
                      seed=None, train=True)
    with pytest.raises(ValueError, match=r"^state: tensor .* has shape .*, this model needs"):
        pm.load_adapter(other, tmp_path)
    with pytest.raises(ValueError, match=r"^state: WeGeFT generator tensors do not fit this model \(missing"):
        pm.get_method("wegeft").load_adapter_state_dict(model, cfg, {})


def test_config_and_apply_errors():
    with pytest.raises(ValueError, match=r"^r: expected"):
        WeGeFTConfig(r=0).validate()
    with pytest.raises(ValueError, match=r"^dropout: expected a probability"):
        WeGeFTConfig(dropout=1.0).validate()
    with pytest.raises(ValueError, match=r"^path: expected one of"):
        WeGeFTConfig(path="x").validate()
    with pytest.raises(ValueError, match=r"^target_modules: cannot infer"):
        pm.apply(nn.Sequential(nn.Linear(4, 4)), WeGeFTConfig())
    # shared generators need one d_in per projection type
    model = nn.ModuleDict({"a": nn.ModuleDict({"proj": nn.Linear(4, 4)}), "b": nn.ModuleDict({"proj": nn.Linear(6, 4)})})
    with pytest.raises(ValueError, match=r"^target_modules: shared generators of 'proj' need one in_features"):
        pm.apply(model, WeGeFTConfig(target_modules=["proj"]))
    pm.apply(model, WeGeFTConfig(target_modules=["proj"], share_generators=False))
    assert isinstance(model["b"]["proj"], WeGeFTLinear)
    with pytest.raises(ValueError, match=r"^phi: expected shape"):
        WeGeFTLinear(nn.Linear(4, 3), r=2, phi=nn.Parameter(torch.zeros(3, 4)))


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_tiny_transformer_trains(which):
    model = _tiny_llama() if which == "llama" else _tiny_bert()
    pm.apply(model, WeGeFTConfig(r=4, alpha=8, dropout=0.1 if which == "bert" else 0.0))
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 12), generator=g)
    labels = torch.randint(0, 3, (4,), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    torch.manual_seed(0)  # dropout masks
    with force_backend("reference"):
        for _ in range(8):
            out = model(input_ids=ids, labels=ids if which == "llama" else labels)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
    assert losses[-1] < 0.98 * losses[0] and losses[-1] == min(losses), losses
    if triton_runs_on(ids.device):  # the trained model on the Triton path agrees with the reference path
        model.eval()
        with torch.no_grad():
            with force_backend("reference"):
                ref = model(input_ids=ids).logits
            with force_backend("triton"):
                tri = model(input_ids=ids).logits
        assert_close(tri, ref, torch.float32, scale=max(1.0, float(ref.abs().max())))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_torch_compile_fullgraph_matches_eager(device, backend):
    torch._dynamo.reset()
    layer = WeGeFTLinear(_linear(24, 20).to(device), r=4, alpha=8)
    _perturb(layer.adapter_parameters())
    x = torch.randn(2, 5, 24, device=device)
    with force_backend(backend):
        for path in ("fused", "merged") if backend == "triton" else ("auto",):
            layer.path = path
            torch._dynamo.reset()
            compiled = torch.compile(layer, fullgraph=True)
            xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
            ye = layer(xe)
            ye.square().sum().backward()
            ge = (xe.grad, layer.phi.grad.clone(), layer.psi.grad.clone())
            layer.phi.grad = layer.psi.grad = None
            yc = compiled(xc)
            yc.square().sum().backward()
            gc = (xc.grad, layer.phi.grad.clone(), layer.psi.grad.clone())
            layer.phi.grad = layer.psi.grad = None
            assert_close(yc, ye, torch.float32)
            for a, e in zip(gc, ge):
                assert_close(a, e, torch.float32, scale=max(1.0, float(e.abs().max())))
