"""AoT adapters on disk (docs/aot-on-disk.md): save_adapter stores the trained reparameterisation in
every mode (training, compiled, merged); loading a folder saved in serving mode materialises its
tables bit for bit as the saved model did; the [n_tasks, L, V, d] tables are stored only through
save_aot_tables, in the serving dtype. Folders holding tables (save_aot_tables, or written before
this change) still load, in load_adapter and in load_task_tables, mixed with factor folders. Bad
folders raise named errors and leave the model as it was."""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftops
from helpers import force_backend, tiny_ids, tiny_llama
from peftops import aot
from peftops import model as pm
from peftops.aot import AoTConfig
from test_aot_model import V_LLAMA, bert, llama, logits, randomize
from test_all_or_nothing import Boom, assert_unchanged, fingerprint

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REPARAMS = ["kron", "fc", "direct"]


def trained(reparam, make=llama, seed=0, **cfg):
    model = peftops.apply(make(), AoTConfig(reparam=reparam, rank=4, **cfg))
    randomize(model, seed=seed)
    return model


def bits(t):
    """The tensor's bytes, to compare bit for bit (-0.0 and NaN payloads included)."""
    t = t.detach().contiguous().cpu()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(bits(a), bits(b)), f"differ in {(bits(a) != bits(b)).sum().item()} of {a.numel()} elements"


def tables_of(model):
    return aot.get_aot(model).tables


# the file names peftops wrote before this change (a later peftops may write other names and still
# read these ones)
OLD_CONFIG_FILE, OLD_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _file(path, name, old_name):
    return os.path.join(path, name if os.path.exists(os.path.join(path, name)) else old_name)


def meta_of(path):
    return json.load(open(_file(path, pm.CONFIG_FILE, OLD_CONFIG_FILE)))


def weights_of(path):
    return load_file(_file(path, pm.WEIGHTS_FILE, OLD_WEIGHTS_FILE))


def data_bytes(path):
    """Bytes of tensor data in the folder's safetensors file (file size - 8 - header length)."""
    w = _file(path, pm.WEIGHTS_FILE, OLD_WEIGHTS_FILE)
    with open(w, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return os.path.getsize(w) - 8 - header


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


# The formats written before this change, byte for byte the same JSON (checked against that code's
# output): a compiled model was saved as its tables; a training model as its reparameterisation.
OLD_CONFIG = {"activation": "relu", "compiled": False, "inplace": True, "kron_factors": None, "method": "aot",
              "modules_to_save": [], "n_tasks": 1, "rank": 4, "reparam": "kron", "sparse_grad": False,
              "table_dtype": None, "target_modules": None}


def write_old_folder(path, state, base_class="LlamaForCausalLM", **config):
    os.makedirs(path)
    state = {f"aot::{k}": v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {"format_version": 1, "peftops_version": "0.1.0", "base_model_class": base_class,
            "adapters": [{**OLD_CONFIG, **config}],
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in state.items()}}
    save_file(state, os.path.join(path, OLD_WEIGHTS_FILE), metadata={"format": "pt", "peftops": "1"})
    with open(os.path.join(path, OLD_CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return path


def write_old_tables_folder(path, model):
    """What the earlier save_adapter wrote for a compiled model: its tables, in the served dtype."""
    t = tables_of(model)
    return write_old_folder(path, {"tables": t}, compiled=True, n_tasks=t.shape[0], table_dtype=str(t.dtype)[6:],
                            reparam=aot.get_aot(model).config.reparam)


# ----------------------------------------------------------------------------------------------
# what save_adapter stores
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["training", "compiled", "merged"])
@pytest.mark.parametrize("reparam", REPARAMS)
def test_save_adapter_stores_the_factors_in_every_mode(tmp_path, reparam, mode):
    model = trained(reparam, table_dtype="float16" if mode == "merged" else None)
    owner = aot.get_aot(model)
    factors = {k: p.detach().clone() for k, p in owner.named_parameters()}
    if mode == "compiled":
        aot.compile_aot_tables(model, torch.bfloat16)
    elif mode == "merged":
        peftops.merge(model)
    peftops.save_adapter(model, tmp_path)
    meta = meta_of(tmp_path)
    stored = weights_of(tmp_path)
    assert sorted(stored) == sorted(f"aot::{k}" for k in factors)
    for k, v in factors.items():
        assert_bits(stored[f"aot::{k}"], v)
    entry = meta["adapters"][0]
    assert entry["compiled"] is (mode != "training")
    assert entry["table_dtype"] == {"training": None, "compiled": "bfloat16", "merged": "float16"}[mode]
    assert data_bytes(tmp_path) == sum(v.numel() * v.element_size() for v in factors.values())
    assert not hasattr(model.peftops_aot.config, "_store_tables")


@pytest.mark.parametrize("reparam", REPARAMS)
def test_folder_sizes_before_and_after(tmp_path, reparam, capsys):
    """The tiny model's folder: tables (what a compiled model stored before; now save_aot_tables)
    against the factors save_adapter stores now. Exact tensor bytes; the JSON and header are small."""
    model = trained(reparam)
    L, V, d = 3, V_LLAMA, 40
    factor_bytes = sum(p.numel() * p.element_size() for p in aot.get_aot(model).parameters())
    aot.compile_aot_tables(model)  # fp32, as the earlier default
    write_old_tables_folder(tmp_path / "before", model)
    peftops.save_adapter(model, tmp_path / "after")
    aot.save_aot_tables(model, tmp_path / "bf16", torch.bfloat16)
    assert data_bytes(tmp_path / "before") == L * V * d * 4
    assert data_bytes(tmp_path / "bf16") == L * V * d * 2
    assert data_bytes(tmp_path / "after") == factor_bytes
    sizes = {k: folder_bytes(tmp_path / k) for k in ("before", "after", "bf16")}
    for k in sizes:  # adapter_config.json and the safetensors header: a few KiB at most
        assert sizes[k] - data_bytes(tmp_path / k) < 4096
    if reparam == "direct":  # its factors are the fp32 table itself: bf16 tables are the small form
        assert data_bytes(tmp_path / "after") == data_bytes(tmp_path / "before")
    else:
        assert sizes["after"] < sizes["bf16"] < sizes["before"]
    with capsys.disabled():
        print(f"\n[aot {reparam}, L={L} V={V} d={d}] folder bytes: fp32 tables {sizes['before']}, "
              f"factors {sizes['after']}, bf16 tables {sizes['bf16']}")


# ----------------------------------------------------------------------------------------------
# materialising on load: bit for bit
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["compiled", "merged"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reparam", REPARAMS)
@force_backend("reference")
def test_load_materialises_the_tables_bit_for_bit(tmp_path, reparam, dtype, mode):
    ids = tiny_ids(V_LLAMA, n=3, seq=5)
    model = trained(reparam, table_dtype=str(dtype)[6:] if mode == "merged" else None)
    want = aot.materialize_aot_tables(model, dtype)  # from the trained model, in the serving dtype
    want64 = aot.materialize_aot_tables(model, torch.float64)
    if mode == "compiled":
        aot.compile_aot_tables(model, dtype)
    else:
        peftops.merge(model)
    assert_bits(tables_of(model)[0], want)
    served = logits(model, ids)
    peftops.save_adapter(model, tmp_path)
    loaded = peftops.load_adapter(llama(), tmp_path)
    assert aot.get_aot(loaded).compiled and not pm.get_method("aot").is_merged(loaded, None)
    assert_bits(tables_of(loaded)[0], want)
    assert_bits(logits(loaded, ids), served)
    stacked = aot.load_task_tables(llama(), [tmp_path])  # the folder's serving dtype
    assert_bits(tables_of(stacked)[0], want)
    again = aot.load_task_tables(llama(), [tmp_path], dtype=torch.float64)  # materialised in fp64 directly
    assert_bits(tables_of(again)[0], want64)


@pytest.mark.parametrize("reparam", REPARAMS)
def test_load_materialises_the_tables_bit_for_bit_on_triton(tmp_path, reparam):
    """The same through the Triton path (the interpreter on a CPU): materialising runs no kernel, the
    served forward runs the gather-add kernel on both sides."""
    ids = tiny_ids(V_LLAMA, n=2, seq=5)
    with force_backend("triton"):
        model = trained(reparam)
        want = aot.materialize_aot_tables(model, torch.bfloat16)
        aot.compile_aot_tables(model, torch.bfloat16)
        served = logits(model, ids)
        peftops.save_adapter(model, tmp_path)
        loaded = peftops.load_adapter(llama(), tmp_path)
        assert_bits(tables_of(loaded)[0], want)
        assert_bits(logits(loaded, ids), served)


GEOMETRIES = {
    # name: (model maker, AoTConfig extras, table dtype)
    "chunks-V4099": (lambda: tiny_llama(vocab=4099, hidden=12, intermediate=27, heads=2, kv_heads=1, max_positions=32,
                                        attn=None), {}, torch.bfloat16),  # materialised in 4096-id chunks
    "kron-7x15-V97": (llama, {"kron_factors": [7, 15]}, torch.float16),
    "fp64-model": (lambda: llama(dtype=torch.float64), {}, torch.float64),
    "bf16-model": (lambda: llama(dtype=torch.bfloat16), {}, None),  # default dtype: the embedding's (bf16)
}


@pytest.mark.parametrize("reparam", ["kron", "fc"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@force_backend("reference")
def test_load_materialises_bit_for_bit_on_odd_shapes_and_dtypes(tmp_path, geometry, reparam):
    make, extra, dtype = GEOMETRIES[geometry]
    if reparam == "fc" and "kron_factors" in extra:
        extra = {}
    model = trained(reparam, make=make, **extra)
    want = aot.materialize_aot_tables(model, dtype)
    aot.compile_aot_tables(model, dtype)
    peftops.save_adapter(model, tmp_path)
    loaded = peftops.load_adapter(make(), tmp_path)
    assert_bits(tables_of(loaded)[0], want)
    ids = tiny_ids(tables_of(model).shape[2], n=2, seq=6)
    assert_bits(logits(loaded, ids), logits(model, ids))


@pytest.mark.parametrize("reparam", ["kron", "fc"])
@force_backend("reference")
def test_factors_in_another_dtype_materialise_in_that_dtype(tmp_path, reparam):
    """Factors cast to bf16 by the user are stored in bf16 and materialised in bf16 arithmetic, as the
    saved model did (materialising their fp32 copies gives other tables)."""
    model = trained(reparam)
    aot.get_aot(model).to(torch.bfloat16)
    factors = {k: p.detach().clone() for k, p in aot.get_aot(model).named_parameters()}
    want = aot.materialize_aot_tables(model, torch.float32)
    aot.compile_aot_tables(model, torch.float32)
    peftops.save_adapter(model, tmp_path)
    assert {v.dtype for v in weights_of(tmp_path).values()} == {torch.bfloat16}
    assert_bits(tables_of(peftops.load_adapter(llama(), tmp_path))[0], want)
    in_fp32 = peftops.apply(llama(), AoTConfig(reparam=reparam, rank=4))
    for k, p in aot.get_aot(in_fp32).named_parameters():
        p.data.copy_(factors[k].float())
    assert not torch.equal(bits(aot.materialize_aot_tables(in_fp32, torch.float32)), bits(want))


@force_backend("reference")
def test_compiled_bert_with_a_head_round_trips(tmp_path):
    model = peftops.apply(bert(), AoTConfig(reparam="kron", rank=3))  # modules_to_save: the classifier
    randomize(model)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
    aot.compile_aot_tables(model, torch.bfloat16)
    peftops.save_adapter(model, tmp_path)
    assert any(k.startswith(pm.MODULES_PREFIX) for k in meta_of(tmp_path)["tensors"])
    loaded = peftops.load_adapter(bert(), tmp_path)
    ids = tiny_ids(89, n=2, seq=6)
    assert_bits(logits(loaded, ids), logits(model, ids))


@force_backend("reference")
def test_compile_keeps_a_copy_of_the_factors(tmp_path):
    """An optimizer step after compile_aot_tables (on the dropped parameters) changes neither the
    served tables nor what is saved: the saved factors are the ones the tables came from."""
    model = trained("kron")
    params = list(aot.get_aot(model).parameters())
    aot.compile_aot_tables(model)
    compiled = tables_of(model).clone()
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    peftops.save_adapter(model, tmp_path)
    assert_bits(tables_of(peftops.load_adapter(llama(), tmp_path)), compiled)
    # compile still drops the parameters for good
    with pytest.raises(ValueError, match=r"^model: AoT cannot be unmerged"):
        peftops.unmerge(model)


@force_backend("reference")
def test_resaving_a_loaded_folder_gives_the_same_folder(tmp_path):
    model = trained("fc")
    aot.compile_aot_tables(model, torch.float16)
    peftops.save_adapter(model, tmp_path / "a")
    loaded = llama()
    rng = torch.get_rng_state()
    peftops.load_adapter(loaded, tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), rng)  # the factors are loaded, never initialised
    peftops.save_adapter(loaded, tmp_path / "b")
    a, b = (weights_of(tmp_path / k) for k in "ab")
    assert a.keys() == b.keys() and all(torch.equal(bits(a[k]), bits(b[k])) for k in a)
    assert meta_of(tmp_path / "a")["adapters"] == meta_of(tmp_path / "b")["adapters"]
    # and loading into the served model again (its own folder, then another task's) works in place
    other = trained("fc", seed=5)
    aot.compile_aot_tables(other, torch.float16)
    peftops.save_adapter(other, tmp_path / "c")
    peftops.load_adapter(loaded, tmp_path / "c")
    assert_bits(tables_of(loaded), tables_of(other))


# ----------------------------------------------------------------------------------------------
# tables only when asked: save_aot_tables
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["training", "compiled-same", "compiled-other", "merged"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16], ids=str)
@force_backend("reference")
def test_save_aot_tables_stores_the_serving_tables(tmp_path, source, dtype):
    model = trained("kron", table_dtype="float16" if source == "merged" else None)
    reference = {dt: aot.materialize_aot_tables(model, dt) for dt in DTYPES}
    serving = {"training": torch.float32, "compiled-same": dtype or torch.bfloat16,
               "compiled-other": torch.bfloat16, "merged": torch.float16}[source]
    if source.startswith("compiled"):
        aot.compile_aot_tables(model, serving)
    elif source == "merged":
        peftops.merge(model)
    before = fingerprint(model)
    config_before = aot.get_aot(model).config.to_dict()
    aot.save_aot_tables(model, tmp_path, dtype)
    assert_unchanged(model, before)
    assert aot.get_aot(model).config.to_dict() == config_before
    stored_dtype = dtype or serving
    meta = meta_of(tmp_path)
    assert meta["tensors"] == {"aot::tables": {"shape": [1, 3, V_LLAMA, 40], "dtype": str(stored_dtype)[6:]}}
    entry = meta["adapters"][0]
    assert (entry["compiled"], entry["n_tasks"], entry["table_dtype"]) == (True, 1, str(stored_dtype)[6:])
    stored = weights_of(tmp_path)["aot::tables"]
    # one rounding from the factors, even when the model serves another dtype (no bf16 -> fp16 twice)
    assert_bits(stored[0], reference[stored_dtype])
    loaded = peftops.load_adapter(llama(), tmp_path)
    assert_bits(tables_of(loaded)[0], reference[stored_dtype])


@force_backend("reference")
def test_save_aot_tables_writes_the_earlier_format(tmp_path):
    model = trained("kron")
    aot.compile_aot_tables(model, torch.bfloat16)
    write_old_tables_folder(tmp_path / "old", model)
    aot.save_aot_tables(model, tmp_path / "new")
    old, new = meta_of(tmp_path / "old"), meta_of(tmp_path / "new")
    old.pop("peftops_version"), new.pop("peftops_version")
    assert old == new
    a, b = (weights_of(tmp_path / k) for k in ("old", "new"))
    assert a.keys() == b.keys() and torch.equal(bits(a["aot::tables"]), bits(b["aot::tables"]))


@force_backend("reference")
def test_save_aot_tables_of_several_tasks_round_trips(tmp_path):
    ids = tiny_ids(V_LLAMA, n=3)
    for k in range(2):
        peftops.save_adapter(trained("kron", seed=k), tmp_path / f"t{k}")
    served = aot.load_task_tables(llama(), [tmp_path / "t0", tmp_path / "t1"], dtype=torch.bfloat16)
    aot.save_aot_tables(served, tmp_path / "both")
    assert meta_of(tmp_path / "both")["adapters"][0]["n_tasks"] == 2
    again = aot.load_task_tables(llama(), [tmp_path / "both", tmp_path / "t1"])  # bf16 tables + fp32 (training)
    assert tables_of(again).shape[0] == 3 and tables_of(again).dtype == torch.float32
    assert_bits(tables_of(again)[:2], tables_of(served).float())
    assert_bits(tables_of(again)[2], tables_of(aot.load_task_tables(llama(), [tmp_path / "t1"]))[0])
    assert_bits(tables_of(aot.load_task_tables(llama(), [tmp_path / "both", tmp_path / "t1"], torch.bfloat16)),
                tables_of(aot.load_task_tables(llama(), [tmp_path / "t0", tmp_path / "t1", tmp_path / "t1"],
                                               torch.bfloat16)))
    loaded = peftops.load_adapter(llama(), tmp_path / "both")
    tasks = torch.tensor([1, 0, 1])
    assert_bits(logits(loaded, ids, aot_task_ids=tasks), logits(served, ids, aot_task_ids=tasks))


# ----------------------------------------------------------------------------------------------
# folders of earlier versions and mixtures
# ----------------------------------------------------------------------------------------------
@force_backend("reference")
def test_folders_written_before_load_as_before(tmp_path):
    ids = tiny_ids(V_LLAMA)
    model = trained("kron")
    factors = dict(aot.get_aot(model).named_parameters())
    write_old_folder(tmp_path / "reparam", factors)
    want = logits(model, ids)
    loaded = peftops.load_adapter(llama(), tmp_path / "reparam")
    assert not aot.get_aot(loaded).compiled  # a training folder loads for training
    assert_bits(logits(loaded, ids), want)
    for dtype in DTYPES:
        served = trained("kron")
        aot.compile_aot_tables(served, dtype)
        path = write_old_tables_folder(tmp_path / f"tables-{str(dtype)[6:]}", served)
        loaded = peftops.load_adapter(llama(), path)
        assert_bits(tables_of(loaded), tables_of(served))
        assert_bits(logits(loaded, ids), logits(served, ids))
        assert_bits(tables_of(aot.load_task_tables(llama(), [path])), tables_of(served))
        with pytest.raises(ValueError, match=r"^model: .*save_aot_tables"):  # nothing small to store
            peftops.save_adapter(loaded, tmp_path / f"refused-{str(dtype)[6:]}")
        assert not os.path.exists(tmp_path / f"refused-{str(dtype)[6:]}")
        aot.save_aot_tables(loaded, tmp_path / "resaved", overwrite=True)
        assert_bits(tables_of(peftops.load_adapter(llama(), tmp_path / "resaved")), tables_of(served))


@force_backend("reference")
def test_load_task_tables_takes_any_mixture(tmp_path):
    """Factors saved compiled (bf16), tables (fp16, save_aot_tables), factors saved while training,
    tables in the earlier format (fp32) and factors saved merged (fp16): every task serves exactly as
    load_adapter of its folder alone."""
    ids = tiny_ids(V_LLAMA, n=5)
    models, direct_bf16 = {}, {}
    m = trained("kron", seed=1)
    direct_bf16["a"] = aot.materialize_aot_tables(m, torch.bfloat16)
    aot.compile_aot_tables(m, torch.bfloat16)
    peftops.save_adapter(m, tmp_path / "a")
    m = trained("fc", seed=2)
    aot.compile_aot_tables(m, torch.float16)
    aot.save_aot_tables(m, tmp_path / "b")
    m = trained("direct", seed=3)
    direct_bf16["c"] = aot.materialize_aot_tables(m, torch.bfloat16)
    peftops.save_adapter(m, tmp_path / "c")
    m = trained("kron", seed=4)
    aot.compile_aot_tables(m)
    write_old_tables_folder(tmp_path / "d", m)
    m = trained("fc", seed=5, table_dtype="float16")
    direct_bf16["e"] = aot.materialize_aot_tables(m, torch.bfloat16)
    peftops.merge(m)
    peftops.save_adapter(m, tmp_path / "e")
    names = list("abcde")
    for k in names:
        models[k] = peftops.load_adapter(llama(), tmp_path / k)
    aot.compile_aot_tables(models["c"])  # the training folder, served alone: compiled in its dtype (fp32)
    singles = {k: tables_of(models[k])[0] for k in names}
    assert [str(singles[k].dtype)[6:] for k in names] == ["bfloat16", "float16", "float32", "float32", "float16"]

    served = aot.load_task_tables(llama(), [tmp_path / k for k in names])
    assert tables_of(served).dtype == torch.float32  # promote_types(bf16, fp16, fp32) holds them all exactly
    for i, k in enumerate(names):
        assert_bits(tables_of(served)[i], singles[k].float())
        assert_bits(logits(served, ids, aot_task_ids=torch.full((5,), i)), logits(models[k], ids))

    in_bf16 = aot.load_task_tables(llama(), [tmp_path / k for k in names], dtype=torch.bfloat16)
    for i, k in enumerate(names):  # factors materialised in bf16 directly; stored tables converted
        assert_bits(tables_of(in_bf16)[i], direct_bf16[k] if k in direct_bf16 else singles[k].to(torch.bfloat16))
    assert aot.load_task_tables(llama(), [tmp_path / "b", tmp_path / "e"]).peftops_aot.tables.dtype == torch.float16


# ----------------------------------------------------------------------------------------------
# errors: named, and nothing changes
# ----------------------------------------------------------------------------------------------
def _tables_only_models(tmp_path):
    peftops.save_adapter(trained("kron"), tmp_path / "f")
    yield "set_aot_tables", aot.set_aot_tables(llama(), torch.zeros(3, V_LLAMA, 40))
    yield "load_task_tables", aot.load_task_tables(llama(), [tmp_path / "f", tmp_path / "f"])
    m = trained("kron")
    aot.compile_aot_tables(m)
    yield "earlier tables folder", peftops.load_adapter(llama(), write_old_tables_folder(tmp_path / "old", m))


@force_backend("reference")
def test_save_adapter_of_tables_without_factors_is_refused(tmp_path):
    for what, model in _tables_only_models(tmp_path):
        with aot.aot_tasks(model, 0):  # the fingerprint's forward: task 0 of the stacked ones
            before = fingerprint(model)
            with pytest.raises(ValueError, match=r"^model: the AoT adapter serves compiled tables .*save_aot_tables"):
                peftops.save_adapter(model, tmp_path / "out")
            assert not os.path.exists(tmp_path / "out"), what
            with pytest.raises(ValueError, match=r"^model: .*save_aot_tables"):
                peftops.adapter_state_dict(model)
            assert_unchanged(model, before)


@force_backend("reference")
def test_save_aot_tables_checks_its_arguments(tmp_path):
    model = trained("kron")
    aot.compile_aot_tables(model, torch.bfloat16)
    config = aot.get_aot(model).config
    before, config_before = fingerprint(model), dict(vars(config))
    with pytest.raises(TypeError, match=r"^dtype:"):
        aot.save_aot_tables(model, tmp_path / "a", torch.int8)
    with pytest.raises(TypeError, match=r"^dtype:"):
        aot.save_aot_tables(model, tmp_path / "a", "bfloat16")
    aot.save_aot_tables(model, tmp_path / "a")
    with pytest.raises(FileExistsError, match=r"^directory:"):  # the save fails: the config is as before
        aot.save_aot_tables(model, tmp_path / "a", torch.float16)
    assert vars(config) == config_before
    assert meta_of(tmp_path / "a")["tensors"]["aot::tables"]["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match=r"^model: no AoT adapter"):
        aot.save_aot_tables(llama(), tmp_path / "b")
    empty = peftops.apply(llama(), AoTConfig(compiled=True))
    with pytest.raises(ValueError, match=r"^model: AoT is in compiled mode but holds no tables"):
        aot.save_aot_tables(empty, tmp_path / "b")
    with pytest.raises(ValueError, match=r"^model: AoT is in compiled mode but holds no tables"):
        peftops.save_adapter(empty, tmp_path / "b")
    assert_unchanged(model, before)


def _edit(path, edit_state=None, edit_meta=None):
    w, c = os.path.join(path, pm.WEIGHTS_FILE), os.path.join(path, pm.CONFIG_FILE)
    state, meta = load_file(w), json.load(open(c))
    if edit_state:
        state = edit_state(state)
        save_file(state, w)
        meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)[6:]} for k, v in state.items()}
    if edit_meta:
        edit_meta(meta)
    json.dump(meta, open(c, "w"))


def _set_adapter_field(field, value):
    def f(meta):
        meta["adapters"][0][field] = value
    return f


BAD_FACTOR_FOLDERS = {
    # what: (edit of the state, edit of the JSON, error, message start)
    "short factor": (lambda s: {**s, "aot::kron_mid": s["aot::kron_mid"][:-1].contiguous()}, None, ValueError,
                     r"state: tensor 'kron_mid' has shape"),
    "missing layer": (lambda s: {k: v for k, v in s.items() if "layers.2." not in k}, None, ValueError,
                      r"state: AoT kron reparameterisation tensors do not fit"),
    "tables next to factors": (lambda s: {**s, "aot::tables": torch.zeros(1, 3, V_LLAMA, 40)}, None, ValueError,
                               r"state: compiled AoT tables are stored alone"),
    "n_tasks 3": (None, _set_adapter_field("n_tasks", 3), ValueError, r"state: a stored AoT reparameterisation is one"),
    "integer table_dtype": (None, _set_adapter_field("table_dtype", "int8"), ValueError, r"table_dtype:"),
    "NaN factor": (lambda s: {**s, "aot::kron_left": torch.full_like(s["aot::kron_left"], float("nan"))}, None,
                   ValueError, r"directory: .*NaN"),
    "other rank": (lambda s: trained_state("kron", rank=3), None, ValueError, r"state: tensor '[\w.]+' has shape"),
}


def trained_state(reparam, **cfg):
    model = peftops.apply(llama(), AoTConfig(reparam=reparam, **cfg))
    return {f"aot::{k}": v.detach().clone() for k, v in aot.get_aot(model).named_parameters()}


@pytest.mark.parametrize("target", ["fresh", "compiled", "compiled-from-folder"])
@pytest.mark.parametrize("bad", list(BAD_FACTOR_FOLDERS))
@force_backend("reference")
def test_bad_factor_folder_leaves_the_model_as_before(tmp_path, bad, target):
    edit_state, edit_meta, err, start = BAD_FACTOR_FOLDERS[bad]
    source = trained("kron")
    aot.compile_aot_tables(source, torch.bfloat16)
    peftops.save_adapter(source, tmp_path / "good")
    peftops.save_adapter(source, tmp_path / "bad")
    _edit(tmp_path / "bad", edit_state, edit_meta)
    if target == "fresh":
        model = llama()
    elif target == "compiled":
        model = trained("kron", seed=9)
        aot.compile_aot_tables(model, torch.bfloat16)
    else:
        model = peftops.load_adapter(llama(), tmp_path / "good")
    owner = getattr(model, "peftops_aot", None)
    kept = None if owner is None else {k: v.clone() for k, v in owner._kept_reparam.items()}
    before = fingerprint(model)
    already_applied = target != "fresh"
    if already_applied and bad == "n_tasks 3":
        # the model's own config wins over the folder's (load_adapter's rule), and the factors fit
        peftops.load_adapter(model, tmp_path / "bad")
        assert_bits(tables_of(model), tables_of(source))
        return
    with pytest.raises(err, match="^" + start):
        peftops.load_adapter(model, tmp_path / "bad")
    assert_unchanged(model, before)
    if kept is not None:
        assert owner._kept_reparam.keys() == kept.keys()
        assert all(torch.equal(bits(owner._kept_reparam[k]), bits(v)) for k, v in kept.items())
    # load_task_tables: the same folder as the second task
    target_model = llama()
    before = fingerprint(target_model)
    with pytest.raises(err, match=r"^(directories\[1\]: .*: )?" + start):
        aot.load_task_tables(target_model, [tmp_path / "good", tmp_path / "bad"])
    assert_unchanged(target_model, before)
    assert not hasattr(target_model, "peftops_aot")


@force_backend("reference")
def test_load_task_tables_names_the_bad_folder(tmp_path):
    peftops.save_adapter(trained("kron"), tmp_path / "good")
    peftops.save_adapter(trained("kron", make=lambda: llama(vocab=101)), tmp_path / "other-vocab")
    aot.save_aot_tables(trained("kron", make=lambda: llama(vocab=101)), tmp_path / "other-vocab-tables")
    model = llama()
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"^directories\[1\]: .*other-vocab: state: .*vocabulary 97"):
        aot.load_task_tables(model, [tmp_path / "good", tmp_path / "other-vocab"])
    with pytest.raises(ValueError, match=r"^directories\[2\]: .*other-vocab-tables: tables: vocabulary 101"):
        aot.load_task_tables(model, [tmp_path / "good", tmp_path / "good", tmp_path / "other-vocab-tables"])
    assert_unchanged(model, before)


@force_backend("reference")
def test_load_failing_after_materialising_leaves_the_served_model_as_before(tmp_path, monkeypatch):
    source = trained("fc")
    aot.compile_aot_tables(source, torch.bfloat16)
    peftops.save_adapter(source, tmp_path / "src")
    model = trained("fc", seed=4)
    aot.compile_aot_tables(model, torch.bfloat16)
    owner = aot.get_aot(model)
    kept, tables = dict(owner._kept_reparam), owner.tables
    before = fingerprint(model)
    real = aot.AoTBias.set_tables

    def broken(self, t):
        real(self, t)
        raise Boom("injected failure")

    monkeypatch.setattr(aot.AoTBias, "set_tables", broken)
    with pytest.raises(Boom):
        peftops.load_adapter(model, tmp_path / "src")
    monkeypatch.undo()
    assert_unchanged(model, before)
    assert owner.tables is tables and owner._kept_reparam.keys() == kept.keys()
    assert all(owner._kept_reparam[k] is v for k, v in kept.items())
    peftops.save_adapter(model, tmp_path / "after")  # still the model's own factors
    saved = weights_of(tmp_path / "after")
    assert all(torch.equal(bits(saved[f"aot::{k}"]), bits(v)) for k, v in kept.items())
