"""SIFT on whole Hugging Face models: apply → calibrate → SparseAdamW equals a dense reference
(full weights trainable, AdamW on the gradient masked to the index set); save/load, merge/unmerge,
bad adapter files, plain AdamW on δ."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftops
from helpers import WIDE, device_backend_params, force_backend, tiny_batch, tiny_llama, tiny_model
from peftops.sift import (BERT_TARGETS, LLAMA_TARGETS, SIFTConfig, SparseAdamW, sift_calibrate, sift_k,
                          sift_layers)

transformers = pytest.importorskip("transformers")

DENSITY = 0.05
LR = 1e-2


def _training_cases():
    """Every model × dtype on the reference; the Triton path (interpreter on CPU: slow) on BERT fp32,
    Llama too where it runs compiled (CUDA)."""
    out = []
    for p in device_backend_params():
        device, backend = p.values
        for kind in ("bert", "llama"):
            for dtype in (torch.float32, torch.float64):
                if backend == "triton" and device == "cpu" and (dtype == torch.float64 or kind == "llama"):
                    continue
                out.append(pytest.param(device, backend, kind, dtype, marks=p.marks,
                                        id=f"{p.id}-{kind}-{str(dtype).replace('torch.', '')}"))
    return out


@pytest.fixture(autouse=True)
def _reference_unless_parametrized(request):
    """Tests of the plumbing (save/load, merge, errors, ...) run the reference kernels; the kernels'
    Triton paths are covered by the backend-parametrized tests."""
    if "backend" in request.fixturenames:
        yield
    else:
        with force_backend("reference"):
            yield


def _tiny(kind):
    return tiny_model(kind, **WIDE[kind])


def _batches(kind, n, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "bert":
        return [tiny_batch("bert", 3, 7, vocab=50, pad={1: 5}, generator=g, device=device) for _ in range(n)]
    return [tiny_batch("llama", 2, 9, vocab=64, generator=g, device=device) for _ in range(n)]


def _build(kind, dtype, device):
    model = _tiny(kind)
    return model.to(device=device, dtype=dtype)


def _head(kind, model):
    """Extra non-SIFT parameters that train (standard AdamW path): BERT's classifier."""
    return list(model.classifier.parameters()) if kind == "bert" else []


def _ref_topk(scores, k):
    order = torch.sort(-scores.detach().abs().flatten().double(), stable=True).indices[:k]
    return torch.sort(order).values


def _sift_model(base, kind, backend, calib):
    model = copy.deepcopy(base)
    peftops.apply(model, SIFTConfig(density=DENSITY))
    for p in _head(kind, model):
        p.requires_grad_(True)
    with force_backend(backend):
        sift_calibrate(model, calib, progress=False)
    return model


@pytest.mark.parametrize("device,backend,kind,dtype", _training_cases())
def test_training_matches_masked_dense_adamw(device, backend, kind, dtype):
    base = _build(kind, dtype, device)
    batches = _batches(kind, 4, device)
    targets = LLAMA_TARGETS if kind == "llama" else BERT_TARGETS
    target_names = [n for n, _ in peftops.find_target_modules(base, targets)]
    assert len(target_names) == (14 if kind == "llama" else 8)

    # --- dense reference: selection from the dense |grad| of batch 0, then masked AdamW ----------
    ref = copy.deepcopy(base)
    for p in ref.parameters():
        p.requires_grad_(False)
    weights = {n: ref.get_submodule(n).weight for n in target_names}
    for w in weights.values():
        w.requires_grad_(True)
    ref(**batches[0]).loss.backward()
    indices = {n: _ref_topk(w.grad, sift_k(w.numel(), DENSITY)) for n, w in weights.items()}
    masks = {}
    for n, w in weights.items():
        m = torch.zeros(w.numel(), dtype=w.dtype, device=device)
        m[indices[n].to(device)] = 1
        masks[n] = m.view_as(w)
        w.grad = None
    for p in _head(kind, ref):
        p.requires_grad_(True)
    ref_opt = torch.optim.AdamW(list(weights.values()) + _head(kind, ref), lr=LR, weight_decay=0.0, foreach=False)

    # --- SIFT ------------------------------------------------------------------------------------
    model = _sift_model(base, kind, backend, batches[:1])
    layers = dict(sift_layers(model))
    assert sorted(layers) == sorted(target_names)
    for n, layer in layers.items():
        assert torch.equal(layer.indices.cpu(), indices[n]), f"{n}: selection differs from the dense top-k"
    opt = SparseAdamW(model, lr=LR, weight_decay=0.0)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(l.delta) for l in layers.values()} | {id(p) for p in _head(kind, model)}

    for step in range(3):
        batch = batches[step]
        ref_loss = ref(**batch).loss
        ref_loss.backward()
        for n, w in weights.items():
            w.grad.mul_(masks[n])
        ref_opt.step()
        ref_opt.zero_grad()
        with force_backend(backend):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
        opt.zero_grad()
        # the same loss at every step: each update is seen by the next forward, none lags or is lost
        torch.testing.assert_close(loss.detach(), ref_loss.detach(), atol=2e-6 if dtype == torch.float32 else 1e-12,
                                   rtol=2e-6 if dtype == torch.float32 else 1e-12)
    with torch.no_grad(), force_backend(backend):
        out = model(**batches[3]).logits
        ref_out = ref(**batches[3]).logits
    torch.testing.assert_close(out, ref_out, atol=2e-6 if dtype == torch.float32 else 1e-12,
                               rtol=2e-5 if dtype == torch.float32 else 1e-12)
    w_tol = dict(atol=1e-7, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-15, rtol=1e-13)
    for n, layer in layers.items():
        base_w = base.get_submodule(n).weight
        assert layer.delta.abs().min() > 0, f"{n}: a selected entry did not train"
        torch.testing.assert_close(layer.weight, weights[n], **w_tol)
        untouched = masks[n] == 0
        assert torch.equal(layer.weight[untouched], base_w[untouched]), f"{n}: an unselected entry moved"
        assert torch.equal(weights[n][untouched], base_w[untouched])
    for a, b in zip(_head(kind, model), _head(kind, ref)):
        torch.testing.assert_close(a, b, **w_tol)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_plain_adamw_on_delta_matches_sparse_adamw(kind):
    base = _build(kind, torch.float32, "cpu")
    batches = _batches(kind, 3, "cpu")
    model_a = _sift_model(base, kind, "reference", batches[:1])
    model_b = copy.deepcopy(model_a)
    opt_a = SparseAdamW(model_a, lr=LR, weight_decay=0.1)
    opt_b = torch.optim.AdamW([p for p in model_b.parameters() if p.requires_grad], lr=LR, weight_decay=0.1)
    for batch in batches:
        la = model_a(**batch).loss
        la.backward()
        opt_a.step()
        opt_a.zero_grad()
        lb = model_b(**batch).loss
        lb.backward()
        opt_b.step()
        opt_b.zero_grad()
        # the reference SparseAdamW step is torch's single-tensor AdamW math on δ, op for op: bit-exact
        torch.testing.assert_close(la, lb, atol=0, rtol=0)
    with torch.no_grad():
        model_b(**batches[0])  # plain AdamW changed δ only: the layers rewrite W at this forward
    for (_, a), (_, b) in zip(sift_layers(model_a), sift_layers(model_b)):
        torch.testing.assert_close(a.delta, b.delta, atol=0, rtol=0)
        torch.testing.assert_close(a.weight, b.weight, atol=0, rtol=0)


def _trained(kind="llama", steps=2, dtype=torch.float32):
    base = _build(kind, dtype, "cpu")
    batches = _batches(kind, 3, "cpu")
    model = _sift_model(base, kind, "reference", batches[:1])
    opt = SparseAdamW(model, lr=LR)
    for batch in batches[:steps]:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return base, model, batches


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_save_load_merge_unmerge(kind, tmp_path):
    base, model, batches = _trained(kind)
    with torch.no_grad():
        expected = model(**batches[2]).logits
    peftops.save_adapter(model, tmp_path)
    meta = json.load(open(os.path.join(tmp_path, "peftops_adapter.json")))
    assert meta["adapters"][0]["method"] == "sift" and meta["adapters"][0]["density"] == DENSITY
    state = load_file(os.path.join(tmp_path, "peftops_adapter.safetensors"))
    layers = dict(sift_layers(model))
    heads = {f"modules::classifier.{f}" for f in ("weight", "bias")} if kind == "bert" else set()  # the new head
    assert set(state) == {f"sift::{n}.{f}" for n in layers for f in ("indices", "delta", "weight_shape")} | heads
    for n in layers:
        assert state[f"sift::{n}.indices"].dtype == torch.int64 and state[f"sift::{n}.delta"].dtype == torch.float32

    fresh = copy.deepcopy(base)
    peftops.load_adapter(fresh, tmp_path)  # the trained head comes back with it (modules_to_save)
    with torch.no_grad():
        assert torch.equal(fresh(**batches[2]).logits, expected)
    for n, layer in sift_layers(fresh):
        assert torch.equal(layer.indices, layers[n].indices) and torch.equal(layer.delta, layers[n].delta)
        assert torch.equal(layer.weight, layers[n].weight)

    peftops.merge(model)
    assert not sift_layers(model)
    for n in layers:
        assert type(model.get_submodule(n)) is nn.Linear
    with torch.no_grad():
        assert torch.equal(model(**batches[2]).logits, expected)
    peftops.save_adapter(model, tmp_path / "merged")  # a merged model still knows its adapter
    assert load_file(os.path.join(tmp_path, "merged", "peftops_adapter.safetensors")).keys() == state.keys()

    peftops.unmerge(model)
    for n, layer in sift_layers(model):
        assert torch.equal(layer.weight, base.get_submodule(n).weight), f"{n}: unmerge is not bit-exact"
    assert sorted(dict(sift_layers(model))) == sorted(layers)
    with torch.no_grad():  # δ is kept: the next forward applies it again
        assert torch.equal(model(**batches[2]).logits, expected)

    peftops.unmerge(fresh)  # unmerge of a never-merged model also restores W0 bit for bit
    for n, layer in sift_layers(fresh):
        assert torch.equal(layer.weight, base.get_submodule(n).weight)


def test_bfloat16_model_unmerge_bit_exact_and_small_updates_survive():
    base = _build("llama", torch.bfloat16, "cpu")
    batches = _batches("llama", 2, "cpu")
    model = _sift_model(base, "llama", "reference", batches[:1])
    opt = SparseAdamW(model, lr=1e-5)  # updates far below bf16 resolution of the weights
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    for _, layer in sift_layers(model):
        assert layer.delta.dtype == torch.float32 and layer.delta.abs().max() > 0
        assert torch.equal(layer.weight.view(-1)[layer.indices], (layer.w0_sel + layer.delta).to(torch.bfloat16))
    peftops.unmerge(model)
    for n, layer in sift_layers(model):
        assert torch.equal(layer.weight, base.get_submodule(n).weight)


def _rewrite(directory, fn):
    """Apply fn(state) -> state to a saved adapter and keep peftops_adapter.json consistent with it."""
    wpath = os.path.join(directory, "peftops_adapter.safetensors")
    cpath = os.path.join(directory, "peftops_adapter.json")
    state = fn(dict(load_file(wpath)))
    save_file(state, wpath)
    meta = json.load(open(cpath))
    meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in state.items()}
    json.dump(meta, open(cpath, "w"))


def test_bad_adapter_files(tmp_path):
    base, model, _ = _trained("llama", steps=1)
    peftops.save_adapter(model, tmp_path / "good")
    name = next(n for n, _ in sift_layers(model))
    key = f"sift::{name}.indices"

    def case(label, fn):
        d = tmp_path / label
        d.mkdir()
        for f in os.listdir(tmp_path / "good"):
            (d / f).write_bytes((tmp_path / "good" / f).read_bytes())
        _rewrite(d, fn)
        return d

    def swap_first_two(s):
        s[key] = s[key].clone()
        s[key][[0, 1]] = s[key][[1, 0]]
        return s

    def out_of_range(s):
        s[key] = s[key].clone()
        s[key][-1] = 10**6
        return s

    def shorter_delta(s):
        s[f"sift::{name}.delta"] = s[f"sift::{name}.delta"][:-1]
        return s

    def float_indices(s):
        s[key] = s[key].float()
        return s

    def drop_module(s):
        del s[key], s[f"sift::{name}.delta"]
        return s

    def extra_module(s):
        s["sift::model.layers.7.self_attn.q_proj.indices"] = s[key].clone()
        s["sift::model.layers.7.self_attn.q_proj.delta"] = s[f"sift::{name}.delta"].clone()
        return s

    for label, fn, match in [("unsorted", swap_first_two, "ascending"), ("range", out_of_range, "outside"),
                             ("length", shorter_delta, "entries"), ("dtype", float_indices, "int64"),
                             ("missing", drop_module, "no tensors"), ("extra", extra_module, "has no SIFT layer")]:
        with pytest.raises(ValueError, match=rf"^state: .*{match}"):
            peftops.load_adapter(copy.deepcopy(base), case(label, fn))

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in os.listdir(tmp_path / "good"):
        (corrupt / f).write_bytes((tmp_path / "good" / f).read_bytes())
    raw = (corrupt / "peftops_adapter.safetensors").read_bytes()
    (corrupt / "peftops_adapter.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"^directory: .*: corrupted or unreadable safetensors file"):
        peftops.load_adapter(copy.deepcopy(base), corrupt)

    # same architecture, other sizes / depth: the adapter does not fit
    wider = tiny_llama(**{**WIDE["llama"], "hidden": 16, "intermediate": 24})
    with pytest.raises(ValueError, match=r"^state: .*(outside|entries)"):
        peftops.load_adapter(wider, tmp_path / "good")
    deeper = tiny_llama(**WIDE["llama"], layers=3)
    with pytest.raises(ValueError, match=r"^state: the adapter has no tensors"):
        peftops.load_adapter(deeper, tmp_path / "good")
    with pytest.raises(ValueError, match=r"^target_modules: no nn.Linear in BertForSequenceClassification"):
        peftops.load_adapter(_tiny("bert"), tmp_path / "good")  # Llama projection names on a BERT


def test_config_and_apply():
    with pytest.raises(ValueError, match=r"^density: expected"):
        SIFTConfig(density=0.0).validate()
    with pytest.raises(ValueError, match=r"^calib_batches: expected"):
        SIFTConfig(calib_batches=0).validate()
    bert = peftops.apply(_tiny("bert"), SIFTConfig())
    names = [n for n, _ in sift_layers(bert)]
    assert len(names) == 8 and all(n.endswith(("query", "key", "value", "attention.output.dense")) for n in names)
    assert bert._peftops_configs[0].target_modules == BERT_TARGETS
    trainable = [n for n, p in bert.named_parameters() if p.requires_grad]
    # the deltas, and the classifier's new head (modules_to_save, inferred for *ForSequenceClassification)
    assert trainable and all(n.endswith(".delta") or n.startswith("classifier.") for n in trainable)
    assert {n for n in trainable if n.startswith("classifier.")} == {"classifier.weight", "classifier.bias"}
    llama = peftops.apply(_tiny("llama"), SIFTConfig(target_modules=["q_proj", "v_proj"], density=0.5))
    assert len(sift_layers(llama)) == 4 and all(m.density == 0.5 for _, m in sift_layers(llama))
    with pytest.raises(ValueError, match=r"^target_modules: no nn.Linear in LlamaForCausalLM matches"):
        peftops.apply(_tiny("llama"), SIFTConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match=r"^model: SIFT layer .* has no index set yet; run sift_calibrate"):
        peftops.save_adapter(llama, "/nonexistent/never-written")
    # before calibration a training forward asks for it; inference runs the base model
    batch = _batches("llama", 1, "cpu")[0]
    with pytest.raises(RuntimeError, match="sift_calibrate"):
        llama(**batch)
    with torch.no_grad():
        torch.testing.assert_close(llama(**batch).logits, _tiny("llama")(**batch).logits, atol=0, rtol=0)
    # calib_batches comes from the config when not given
    cfg_model = peftops.apply(_tiny("llama"), SIFTConfig(calib_batches=2, density=0.1))
    with pytest.raises(ValueError, match=r"^batches: calib_batches=2 but only 1"):
        sift_calibrate(cfg_model, _batches("llama", 1, "cpu"), progress=False)
    sift_calibrate(cfg_model, _batches("llama", 2, "cpu"), progress=False)
    for _, layer in sift_layers(cfg_model):
        assert layer.k == sift_k(layer.weight.numel(), 0.1)


def test_trainer_callback_calibrates_at_train_begin(tmp_path):
    """An unchanged HF Trainer loop: the callback calibrates from the train dataloader, then training
    moves only the selected entries."""
    from peftops.sift import SIFTCalibrationCallback

    model = _tiny("bert")
    base = copy.deepcopy(model)
    peftops.apply(model, SIFTConfig(density=DENSITY))
    data = [{k: v[i] for k, v in b.items()} for b in _batches("bert", 2, "cpu") for i in range(3)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=2,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[SIFTCalibrationCallback(progress=False)])
    trainer.train()
    for n, layer in sift_layers(model):
        assert layer.selected and layer.k == sift_k(layer.weight.numel(), DENSITY)
        moved = layer.weight != base.get_submodule(n).weight
        assert moved.any(), f"{n} did not train"
        assert torch.isin(moved.view(-1).nonzero().view(-1), layer.indices).all(), f"{n}: an unselected entry moved"
