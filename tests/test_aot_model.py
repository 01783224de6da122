"""AoT P-Tuning on whole models: reparameterisations, hooks into BERT- and Llama-style
transformers (tiny random configs, no downloads), ahead-of-time tables, multi-task serving,
generation with a KV cache, save/load/merge through the model-level API (what is stored on disk,
and loading it back bit for bit: tests/test_aot_save.py)."""
import json
import os
from contextlib import nullcontext

import pytest
import torch

import peftops
from helpers import assert_close, force_backend, tiny_bert, tiny_ids, tiny_llama
from peftops import aot
from peftops.aot import AoTConfig

BACKENDS = ["reference", "triton"]
V_LLAMA, V_BERT = 97, 89


def llama(seed=0, vocab=V_LLAMA, dtype=torch.float32):
    model = tiny_llama(vocab=vocab, hidden=40, intermediate=56, layers=3, max_positions=64, attn=None, seed=seed,
                       dtype=dtype)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens tokens
    return model


def bert(seed=0):
    return tiny_bert(vocab=V_BERT, hidden=36, intermediate=48, heads=4, max_positions=32, attn=None, seed=seed)


def randomize(model, std=0.3, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in aot.get_aot(model).parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


# ----------------------------------------------------------------------------------------------
# reparameterisations
# ----------------------------------------------------------------------------------------------
def test_kron_rows_equal_torch_kron():
    model = peftops.apply(llama(), AoTConfig(reparam="kron", rank=3))
    randomize(model)
    owner = aot.get_aot(model)
    a_b = owner.kron_b
    assert owner.kron_left.shape == (10, 3) and a_b == 10  # ceil(sqrt(97)) = 10
    ids = torch.tensor([0, 9, 10, 11, 55, 96, 96])
    w_r = torch.cat([u.right for u in owner.layers], dim=1).double()  # [r², L·d], layer-major
    kron = [torch.kron(owner.kron_left[v // a_b].double(), owner.kron_mid[v % a_b].double()) for v in ids]
    want = torch.stack(kron) @ w_r
    got = owner.reparam_rows(ids)
    assert got.shape == (7, 3 * 40)
    assert_close(got, want, scale=3.0)


def test_fc_and_direct_rows():
    model = peftops.apply(llama(), AoTConfig(reparam="fc", rank=5, activation="tanh"))
    randomize(model)
    owner = aot.get_aot(model)
    ids = torch.tensor([3, 3, 50, 96])
    e = model.get_input_embeddings().weight[ids].double()
    hid = torch.tanh(e @ owner.fc_weight.double() + owner.fc_bias.double())
    want = torch.cat([hid @ u.out_weight.double() + u.out_bias.double() for u in owner.layers], dim=1)
    assert_close(owner.reparam_rows(ids), want, scale=3.0)

    model = peftops.apply(llama(), AoTConfig(reparam="direct"))
    randomize(model)
    owner = aot.get_aot(model)
    want = torch.cat([u.table[ids] for u in owner.layers], dim=1)
    torch.testing.assert_close(owner.reparam_rows(ids), want, atol=0, rtol=0)


def test_config_validation():
    with pytest.raises(ValueError, match=r"^reparam: expected one of"):
        AoTConfig(reparam="lora").validate()
    with pytest.raises(ValueError, match=r"^rank: expected an int >= 1"):
        AoTConfig(rank=0).validate()
    with pytest.raises(ValueError, match=r"^kron_factors: .* must cover the vocabulary"):
        peftops.apply(llama(), AoTConfig(kron_factors=[5, 5]))  # 25 < V = 97
    with pytest.raises(ValueError, match=r"^target_modules: no nn.ModuleList named"):
        peftops.apply(llama(), AoTConfig(target_modules=["model.nothing"]))


# ----------------------------------------------------------------------------------------------
# exactness and training
# ----------------------------------------------------------------------------------------------
# every reparameterisation on both backends would repeat the same hook path: four combinations
REPARAM_BACKENDS = [("kron", "triton"), ("kron", "reference"), ("fc", "reference"), ("direct", "triton")]


@pytest.mark.parametrize("reparam,backend", REPARAM_BACKENDS)
def test_zero_init_reproduces_plain_model_exactly(reparam, backend):
    for make, ids in ((llama, tiny_ids(V_LLAMA)), (bert, tiny_ids(V_BERT))):
        model = make()
        plain = logits(model, ids)
        peftops.apply(model, AoTConfig(reparam=reparam, rank=4))
        with force_backend(backend):
            torch.testing.assert_close(logits(model, ids), plain, atol=0, rtol=0)
            out = model(ids).logits  # grad enabled: the out-of-place path
        torch.testing.assert_close(out.detach(), plain, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_tables_reproduce_plain_bf16_model_exactly(backend):
    model = llama(dtype=torch.bfloat16)
    ids = tiny_ids(V_LLAMA)
    plain = logits(model, ids)
    aot.set_aot_tables(model, torch.zeros(2, 3, V_LLAMA, 40, dtype=torch.bfloat16))
    with force_backend(backend):
        got = logits(model, ids, aot_task_ids=torch.tensor([1, 0]))
    torch.testing.assert_close(got, plain, atol=0, rtol=0)


@pytest.mark.parametrize("make,reparam", [(llama, "kron"), (bert, "fc"), (llama, "direct")])
def test_training_a_few_steps_lowers_the_loss(make, reparam):
    model = make()
    vocab = model.config.vocab_size
    ids = tiny_ids(vocab, n=4, seq=6)
    labels = ids if make is llama else torch.tensor([0, 2, 1, 2])
    peftops.apply(model, AoTConfig(reparam=reparam, rank=4))
    params = [p for p in model.parameters() if p.requires_grad]
    # the AoT parameters, and BERT's new classifier head (modules_to_save)
    assert params and all(n.startswith(("peftops_aot.", "classifier.")) for n, p in model.named_parameters()
                          if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=3e-2)
    model.train()
    losses = []
    with force_backend("reference"):  # the kernels' gradients are checked op by op; keep this short
        for _ in range(4):
            loss = model(ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("reparam,backend", REPARAM_BACKENDS)
def test_compiled_tables_match_reparameterisation(reparam, backend):
    model = peftops.apply(llama(), AoTConfig(reparam=reparam, rank=4))
    randomize(model)
    ids = tiny_ids(V_LLAMA)
    with force_backend(backend):
        trained = model(ids).logits.detach()   # training-mode path (out of place, per-batch table)
        served = logits(model, ids)            # autograd off: in place
        torch.testing.assert_close(served, trained, atol=0, rtol=0)
        aot.compile_aot_tables(model, dtype=torch.float32)
        compiled = logits(model, ids)
    owner = aot.get_aot(model)
    assert owner.compiled and owner.tables.shape == (1, 3, V_LLAMA, 40)
    assert list(owner.parameters()) == [] and all(u.adapter_parameters() == [] for u in owner.layers)
    assert_close(compiled, trained, scale=10.0)


@force_backend("reference")  # hook/recompute logic only; the kernels' gradients are checked op by op
def test_gradient_checkpointing_and_sparse_direct_grads():
    model = peftops.apply(llama(), AoTConfig(reparam="kron", rank=4))
    randomize(model)
    ids = tiny_ids(V_LLAMA)
    model.train()
    model(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5, msg=n)

    model = peftops.apply(llama(), AoTConfig(reparam="direct", sparse_grad=True))
    model.train()
    model(ids, labels=ids).loss.backward()
    grads = [u.table.grad for u in aot.get_aot(model).layers]
    assert all(g is not None and g.is_sparse for g in grads)
    assert grads[0].coalesce().indices().numel() == torch.unique(ids).numel()


# ----------------------------------------------------------------------------------------------
# hooks: generation, errors, hidden states
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compiled,backend", [(False, "reference"), (True, "triton")])
def test_generation_with_kv_cache(compiled, backend):
    """Each cached decoding step (new tokens' ids only) gives the logits of a full forward pass."""
    model = peftops.apply(llama(), AoTConfig(reparam="kron", rank=4))
    randomize(model, std=0.5)
    ids = tiny_ids(V_LLAMA, n=3, seq=5)
    kw = {}
    if compiled:
        tables = aot.materialize_aot_tables(model, torch.float32)
        aot.set_aot_tables(model, [tables, torch.zeros_like(tables), -tables])
        kw = {"aot_task_ids": torch.tensor([0, 2, 1])}
    with force_backend(backend), aot.aot_tasks(model, kw["aot_task_ids"]) if compiled else nullcontext():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    seq = out.sequences
    assert seq.shape == (3, 8)
    full = logits(model, seq, use_cache=False, **kw)
    for i, step in enumerate(out.logits):
        assert_close(step, full[:, 4 + i], scale=10.0)
    with aot.aot_disabled(model):
        plain = logits(model, seq, use_cache=False, **kw)
    assert (plain - full).abs().max() > 1e-2, "the AoT bias should change the logits here"


def test_inputs_embeds_only_raises_clear_error():
    model = peftops.apply(llama(), AoTConfig())
    ids = tiny_ids(V_LLAMA)
    model(ids)  # a previous call's ids must not be reused
    embeds = model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="needs the input_ids"):
        model(inputs_embeds=embeds)
    with pytest.raises(ValueError, match="needs the input_ids"):
        model.model(inputs_embeds=embeds)
    b = peftops.apply(bert(), AoTConfig(reparam="fc"))
    with pytest.raises(ValueError, match="needs the input_ids"):
        b(inputs_embeds=torch.randn(2, 5, 36))


def test_output_hidden_states_are_the_same_with_and_without_autograd():
    model = peftops.apply(llama(), AoTConfig(reparam="kron", rank=4))
    randomize(model)
    aot.compile_aot_tables(model, torch.float32)
    ids = tiny_ids(V_LLAMA)
    with torch.no_grad():
        a = model(ids, output_hidden_states=True).hidden_states
    b = model(ids, output_hidden_states=True).hidden_states
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y.detach(), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# multi-task serving
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [llama, bert])
def test_mixed_task_batch_equals_per_task_runs(backend, make):
    model = make()
    V, d, L = model.config.vocab_size, model.config.hidden_size, model.config.num_hidden_layers
    g = torch.Generator().manual_seed(3)
    tables = [torch.randn(L, V, d, generator=g) * 0.5 for _ in range(3)]
    aot.set_aot_tables(model, aot.stack_task_tables(tables))
    ids = tiny_ids(V, n=5, seq=6)
    tasks = torch.tensor([2, 0, 1, 2, 0])
    with force_backend(backend):
        mixed = logits(model, ids, aot_task_ids=tasks)
        with aot.aot_tasks(model, tasks):
            ctx_mixed = logits(model, ids)
        per_task = [logits(model, ids, aot_task_ids=k) for k in range(3)]
    torch.testing.assert_close(ctx_mixed, mixed, atol=0, rtol=0)
    for k in range(3):
        sel = tasks == k
        torch.testing.assert_close(mixed[sel], per_task[k][sel], atol=0, rtol=0)
    assert not torch.allclose(per_task[0], per_task[1])


def test_bad_tables_and_task_ids_raise():
    model = llama()
    with pytest.raises(ValueError, match=r"^tables: vocabulary 96 does not match the model's 97"):
        aot.set_aot_tables(model, torch.zeros(3, 96, 40))
    model = llama()
    with pytest.raises(ValueError, match=r"^tables: hidden size 41"):
        aot.set_aot_tables(model, torch.zeros(3, 97, 41))
    with pytest.raises(ValueError, match=r"^tables: 2 layers"):
        aot.set_aot_tables(llama(), torch.zeros(2, 97, 40))
    with pytest.raises(ValueError, match=r"^tables\[1\]: .*differs from tables\[0\]'s"):
        aot.stack_task_tables([torch.zeros(3, 97, 40), torch.zeros(3, 97, 41)])
    model = aot.set_aot_tables(llama(), torch.zeros(2, 3, 97, 40))
    ids = tiny_ids(V_LLAMA)
    with pytest.raises(IndexError, match=r"^task_ids: task ids"):
        model(ids, aot_task_ids=torch.tensor([0, 2]))
    with pytest.raises(IndexError, match=r"^task_ids: task 5"):
        model(ids, aot_task_ids=5)
    with pytest.raises(ValueError, match=r"^task_ids: the model serves 2 stacked tasks"):
        model(ids)
    with pytest.raises(ValueError, match=r"^task_ids: 3 task ids for a batch of 2"):
        model(ids, aot_task_ids=torch.tensor([0, 1, 1]))
    trainable = peftops.apply(llama(), AoTConfig())
    with pytest.raises(ValueError, match=r"^task_ids: multi-task batches need compiled tables"):
        trainable(ids, aot_task_ids=torch.tensor([0, 0]))


# ----------------------------------------------------------------------------------------------
# save / load / merge
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reparam", ["kron", "fc", "direct"])
def test_save_load_roundtrip(tmp_path, reparam):
    ids = tiny_ids(V_LLAMA)
    model = peftops.apply(llama(), AoTConfig(reparam=reparam, rank=4))
    randomize(model)
    want = logits(model, ids)
    params = {k: p.detach().clone() for k, p in aot.get_aot(model).named_parameters()}
    peftops.save_adapter(model, tmp_path / "reparam")
    loaded = peftops.load_adapter(llama(), tmp_path / "reparam")
    assert not aot.get_aot(loaded).compiled
    torch.testing.assert_close(logits(loaded, ids), want, atol=0, rtol=0)

    aot.compile_aot_tables(model, torch.bfloat16)
    served = logits(model, ids)
    # compiled: save_adapter still stores the factors; loading materialises the bf16 tables again
    peftops.save_adapter(model, tmp_path / "compiled")
    meta = json.load(open(os.path.join(tmp_path / "compiled", peftops.model.CONFIG_FILE)))
    assert meta["adapters"][0]["compiled"] is True and meta["adapters"][0]["table_dtype"] == "bfloat16"
    assert sorted(meta["tensors"]) == sorted(f"aot::{k}" for k in params)
    loaded = peftops.load_adapter(llama(), tmp_path / "compiled")
    assert aot.get_aot(loaded).compiled and aot.get_aot(loaded).tables.dtype == torch.bfloat16
    torch.testing.assert_close(logits(loaded, ids), served, atol=0, rtol=0)
    # the tables only when asked, in the serving dtype
    aot.save_aot_tables(model, tmp_path / "tables")
    meta = json.load(open(os.path.join(tmp_path / "tables", peftops.model.CONFIG_FILE)))
    assert meta["adapters"][0]["method"] == "aot" and meta["adapters"][0]["compiled"] is True
    assert meta["tensors"] == {"aot::tables": {"shape": [1, 3, V_LLAMA, 40], "dtype": "bfloat16"}}
    loaded = peftops.load_adapter(llama(), tmp_path / "tables")
    torch.testing.assert_close(logits(loaded, ids), served, atol=0, rtol=0)
    assert_close(served, want, dtype=torch.bfloat16, scale=4.0)


def test_load_into_mismatched_model_raises(tmp_path):
    model = peftops.apply(llama(), AoTConfig(reparam="direct"))
    peftops.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match=r"^state: .*vocabulary 101"):
        peftops.load_adapter(llama(vocab=101), tmp_path / "a")
    aot.compile_aot_tables(model)
    peftops.save_adapter(model, tmp_path / "b")  # the factors, to be materialised on load
    with pytest.raises(ValueError, match=r"^state: .*vocabulary 101"):
        peftops.load_adapter(llama(vocab=101), tmp_path / "b")
    aot.save_aot_tables(model, tmp_path / "c")
    with pytest.raises(ValueError, match=r"^tables: vocabulary 97 does not match the model's 101"):
        peftops.load_adapter(llama(vocab=101), tmp_path / "c")


def test_load_task_tables_from_saved_adapters(tmp_path):
    ids = tiny_ids(V_LLAMA, n=4)
    singles = []
    for k, reparam in enumerate(["kron", "fc"]):
        model = peftops.apply(llama(), AoTConfig(reparam=reparam, rank=4))
        randomize(model, seed=k)
        if k == 1:
            aot.compile_aot_tables(model, torch.float32)  # one saved compiled, one saved as reparam
        peftops.save_adapter(model, tmp_path / f"t{k}")
        singles.append(logits(model, ids))
    served = aot.load_task_tables(llama(), [tmp_path / "t0", tmp_path / "t1"], dtype=torch.float32)
    assert aot.get_aot(served).tables.shape == (2, 3, V_LLAMA, 40)
    tasks = torch.tensor([1, 0, 0, 1])
    mixed = logits(served, ids, aot_task_ids=tasks)
    for k in range(2):
        assert_close(mixed[tasks == k], singles[k][tasks == k], scale=10.0)


def test_merge_compiles_and_unmerge_returns_to_the_reparameterisation():
    ids = tiny_ids(V_LLAMA)
    model = peftops.apply(llama(), AoTConfig(reparam="kron", rank=4, table_dtype="float32"))
    randomize(model)
    want = logits(model, ids)
    params = dict(aot.get_aot(model).named_parameters())
    peftops.merge(model)
    owner = aot.get_aot(model)
    assert owner.compiled and owner.tables.dtype == torch.float32
    assert_close(logits(model, ids), want, scale=10.0)
    peftops.unmerge(model)  # the same Parameter objects train again
    assert not owner.compiled and owner.tables is None
    assert {k: id(p) for k, p in owner.named_parameters()} == {k: id(p) for k, p in params.items()}
    torch.testing.assert_close(logits(model, ids), want, atol=0, rtol=0)
    aot.compile_aot_tables(model)  # drops the reparameterisation for good
    with pytest.raises(ValueError, match=r"^model: AoT cannot be unmerged"):
        peftops.unmerge(model)


def test_safe_protocol_units():
    # each unit owns its layer's part, plus the factors shared by every layer (SAFE freezes those
    # only with their last owner, so a fully frozen AoT adapter trains nothing)
    expected = {"kron": (["right"], ["kron_left", "kron_mid"]), "fc": (["out_weight", "out_bias"], ["fc_weight", "fc_bias"]),
                "direct": (["table"], [])}
    for reparam, (names, shared) in expected.items():
        model = peftops.apply(llama(), AoTConfig(reparam=reparam, rank=4))
        units = [m for m in model.modules() if getattr(m, "peftops_adapter", False)]
        assert len(units) == 3
        owner = model.peftops_aot
        for u in units:
            want = [getattr(u, n) for n in names] + [getattr(owner, n) for n in shared]
            assert [id(p) for p in u.adapter_parameters()] == [id(p) for p in want]
            assert all(p.requires_grad for p in u.adapter_parameters())
        # the unit's first argument and its output are the representations entering and leaving it
        seen = []
        units[1].register_forward_hook(lambda m, args, out, seen=seen: seen.append((args[0].shape, out.shape)))
        model(tiny_ids(V_LLAMA))
        assert seen == [(torch.Size([2, 7, 40]), torch.Size([2, 7, 40]))]
