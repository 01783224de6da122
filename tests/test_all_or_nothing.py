"""Model-level calls are all-or-nothing: after any error the model is exactly as before.

"Exactly": every state_dict tensor bit for bit (buffers included), every requires_grad flag and
.grad, module types, hook counts, the applied configs (and the caller's config object), the
merged/compiled flags, and the logits of a forward. Failures are provoked both by bad input
(validation errors) and by an error injected half way through the change (an OOM-like failure
on the second layer), which is what proves the rollback rather than the validation order."""
import json
import os

import pytest
import torch

import peftops
from helpers import tiny_bert, tiny_llama
from peftops import AoTConfig, SAFEConfig, SIFTConfig, WeGeFTConfig
from peftops import model as pm
from peftops.safe import SAFE
from peftops.sift import SIFTLinear, sift_calibrate
from peftops.wegeft import WeGeFTLinear

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402


pytestmark = pytest.mark.usefixtures("reference_backend")


# ids for the helpers' default tiny models (vocabularies 41 and 37)
IDS = torch.tensor([[3, 5, 7, 11, 2, 1], [13, 17, 19, 23, 29, 31]]) % 37


def batch(model):
    if isinstance(model, transformers.BertForSequenceClassification):
        return {"input_ids": IDS, "labels": torch.tensor([0, 2])}
    return {"input_ids": IDS, "labels": IDS}


def configs():
    return {
        "sift": lambda: SIFTConfig(density=0.05),
        "wegeft": lambda: WeGeFTConfig(r=3, alpha=6.0),
        "aot": lambda: AoTConfig(reparam="kron", rank=2),
    }


def fingerprint(model):
    """Everything a model-level call may change, in comparable form."""
    def bits(t):
        t = t.detach().cpu()
        return t.view(torch.uint8).clone() if t.numel() and t.dtype != torch.bool else t.clone()

    with torch.no_grad():  # first: a forward is where SIFT writes a changed δ into its weight
        logits = bits(model(IDS).logits)
    out = {
        "logits": logits,
        "state": {k: (v.dtype, tuple(v.shape), bits(v)) for k, v in model.state_dict(keep_vars=True).items()},
        "params": [(n, p.requires_grad, None if p.grad is None else bits(p.grad)) for n, p in model.named_parameters()],
        "types": [(n, type(m).__name__) for n, m in model.named_modules()],
        "hooks": [(n, len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks))
                  for n, m in model.named_modules()],
        "configs": [c.to_dict() for c in pm.applied_configs(model)],
        "flags": [(n, {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, type(None)))
                       and not k.startswith("_synced")})
                  for n, m in model.named_modules()],
    }
    return out


def assert_unchanged(model, before):
    after = fingerprint(model)
    for key in before:
        if key == "state":
            assert before[key].keys() == after[key].keys(), "state_dict keys changed"
            for k in before[key]:
                b, a = before[key][k], after[key][k]
                assert b[0] == a[0] and b[1] == a[1] and torch.equal(b[2], a[2]), f"state_dict[{k!r}] changed"
        elif key in ("params", "logits"):
            assert str(before[key]) == str(after[key]) or _equal_nested(before[key], after[key]), f"{key} changed"
        else:
            assert before[key] == after[key], f"{key} changed"


def _equal_nested(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_nested(x, y) for x, y in zip(a, b))
    return a == b


def adapted(make, method, *, calibrate=True, perturb=True):
    model = make()
    peftops.apply(model, configs()[method]())
    if method == "sift" and calibrate:
        sift_calibrate(model, [batch(model)], progress=False)
    if perturb:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model


class Boom(RuntimeError):
    pass


def fail_on_call(n):
    """A function that raises Boom on its n-th call (1-based) and wraps ``real`` otherwise."""
    def make(real):
        calls = [0]

        def f(*a, **k):
            calls[0] += 1
            if calls[0] == n:
                raise Boom("injected failure")
            return real(*a, **k)
        return f
    return make


MAKERS = {"bert": tiny_bert, "llama": tiny_llama}


# ----------------------------------------------------------------------------------------------
# apply
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sift", "wegeft"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_apply_matching_nothing_leaves_the_base_trainable(kind, method):
    model = MAKERS[kind]()
    before = fingerprint(model)
    cfg = configs()[method]()
    cfg.target_modules = ["no_such_module"]
    with pytest.raises(ValueError, match=r"^target_modules:"):
        peftops.apply(model, cfg)
    assert_unchanged(model, before)
    assert all(p.requires_grad for p in model.parameters())
    assert cfg.target_modules == ["no_such_module"]


@pytest.mark.parametrize("method", ["sift", "wegeft"])
def test_apply_failing_half_way_is_rolled_back(monkeypatch, method):
    model = tiny_llama()
    before = fingerprint(model)
    cfg = configs()[method]()
    cfg_before = dict(vars(cfg))
    broken = fail_on_call(3)(pm.replace_module)
    monkeypatch.setattr(pm, "replace_module", broken)  # SIFT calls it as _model.replace_module
    monkeypatch.setattr("peftops.wegeft.replace_module", broken)
    with pytest.raises(Boom):
        peftops.apply(model, cfg)
    assert_unchanged(model, before)
    assert vars(cfg) == cfg_before


def test_apply_aot_failing_half_way_removes_its_hooks(monkeypatch):
    from peftops import aot

    model = tiny_llama()
    before = fingerprint(model)
    monkeypatch.setattr(aot, "_LayerHook", fail_on_call(2)(aot._LayerHook))
    with pytest.raises(Boom):
        peftops.apply(model, AoTConfig(reparam="kron", rank=2))
    assert_unchanged(model, before)
    assert not hasattr(model, aot.ATTR)


def test_apply_second_method_failing_keeps_the_first(monkeypatch):
    model = adapted(tiny_llama, "sift")
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"^target_modules:"):
        peftops.apply(model, WeGeFTConfig(r=2, target_modules=["q_proj"]))  # taken by SIFT
    assert_unchanged(model, before)


def test_apply_flags_are_checked():
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(TypeError, match=r"^freeze_base:"):
        peftops.apply(model, SIFTConfig(), freeze_base="yes")
    with pytest.raises(TypeError, match=r"^model:"):
        peftops.apply("model", SIFTConfig())
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------------
# load_adapter
# ----------------------------------------------------------------------------------------------
def _saved(tmp_path, make, method, name="a"):
    model = adapted(make, method)
    path = tmp_path / name
    peftops.save_adapter(model, path)
    return model, path


def _edit_tensor(path, key_suffix, fn):
    w = os.path.join(path, pm.WEIGHTS_FILE)
    state = load_file(w)
    key = next(k for k in state if k.endswith(key_suffix))
    state[key] = fn(state[key])
    save_file(state, w, metadata={"format": "pt"})
    meta = json.load(open(os.path.join(path, pm.CONFIG_FILE)))
    meta["tensors"][key] = {"shape": list(state[key].shape), "dtype": str(state[key].dtype).replace("torch.", "")}
    json.dump(meta, open(os.path.join(path, pm.CONFIG_FILE), "w"))
    return key


CORRUPTIONS = {
    # method -> [(what, key suffix, edit, error type, message start)]
    "sift": [
        ("index out of range", ".indices", lambda t: torch.cat([t[:-1], t.new_tensor([10 ** 6])]), ValueError, "state:"),
        ("short delta", ".delta", lambda t: t[:-1], ValueError, "state:"),
        ("unsorted indices", ".indices", lambda t: t.flip(0), ValueError, "state:"),
        ("NaN delta", ".delta", lambda t: torch.full_like(t, float("nan")), ValueError, "directory:"),
    ],
    "wegeft": [
        ("wrong generator shape", ".psi", lambda t: t[:, :-1].contiguous(), ValueError, "state:"),
        ("Inf generator", ".phi", lambda t: torch.full_like(t, float("inf")), ValueError, "directory:"),
    ],
    "aot": [
        ("wrong reparam shape", "", lambda t: t.reshape(-1)[:-1].contiguous(), ValueError, "state:"),
    ],
}


@pytest.mark.parametrize("case", [(m, i) for m, cs in CORRUPTIONS.items() for i in range(len(cs))],
                         ids=lambda c: f"{c[0]}-{CORRUPTIONS[c[0]][c[1]][0].replace(' ', '_')}")
@pytest.mark.parametrize("applied", [False, True], ids=["fresh", "applied"])
def test_load_corrupted_adapter_leaves_model_as_before(tmp_path, case, applied):
    method, i = case
    _, suffix, edit, err, start = CORRUPTIONS[method][i]
    _, path = _saved(tmp_path, tiny_llama, method)
    _edit_tensor(path, suffix, edit)
    target = adapted(tiny_llama, method) if applied else tiny_llama()
    before = fingerprint(target)
    with pytest.raises(err, match="^" + start):
        peftops.load_adapter(target, path)
    assert_unchanged(target, before)


@pytest.mark.parametrize("method", ["sift", "wegeft", "aot"])
def test_load_from_another_model_class_leaves_model_as_before(tmp_path, method):
    _, path = _saved(tmp_path, tiny_llama, method)
    other = tiny_llama(head=transformers.LlamaForSequenceClassification)  # same layer names and shapes
    before = {k: v.clone() for k, v in other.state_dict().items()}
    flags = [p.requires_grad for p in other.parameters()]
    types = [type(m) for m in other.modules()]
    with pytest.raises(ValueError, match=r"^model: the adapter .* LlamaForCausalLM"):
        peftops.load_adapter(other, path)
    assert {k: v for k, v in other.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    assert [p.requires_grad for p in other.parameters()] == flags
    assert [type(m) for m in other.modules()] == types
    assert not pm.applied_configs(other)


def test_load_failing_half_way_restores_loaded_sift_layers(tmp_path, monkeypatch):
    """The write phase itself fails on the third layer: the layers already loaded go back."""
    _, path = _saved(tmp_path, tiny_llama, "sift")
    target = adapted(tiny_llama, "sift")  # calibrated and trained already: its weights hold W0 + δ
    before = fingerprint(target)
    monkeypatch.setattr(SIFTLinear, "resync_", fail_on_call(3)(SIFTLinear.resync_))
    with pytest.raises(Boom):
        peftops.load_adapter(target, path)
    monkeypatch.undo()
    assert_unchanged(target, before)


def test_load_failing_half_way_restores_wegeft_generators(tmp_path, monkeypatch):
    _, path = _saved(tmp_path, tiny_llama, "wegeft")
    target = adapted(tiny_llama, "wegeft")
    before = fingerprint(target)
    real_copy = torch.Tensor.copy_
    calls = [0]

    def copy_(self, src, *a, **k):
        calls[0] += 1
        if calls[0] == 5:
            raise Boom("injected failure")
        return real_copy(self, src, *a, **k)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    with pytest.raises(Boom):
        peftops.load_adapter(target, path)
    monkeypatch.undo()
    assert calls[0] >= 5
    assert_unchanged(target, before)


@pytest.mark.parametrize("method", ["wegeft", "sift", "aot"])
def test_load_onto_merged_model_is_refused(tmp_path, method):
    _, path = _saved(tmp_path, tiny_llama, method)
    target = adapted(tiny_llama, method)
    peftops.merge(target)
    before = fingerprint(target)
    with pytest.raises(ValueError, match=r"^model: .*merged"):
        peftops.load_adapter(target, path)
    assert_unchanged(target, before)


@pytest.mark.parametrize("version", [2, True, 1.0, "1", None])
def test_load_refuses_other_format_versions(tmp_path, version):
    _, path = _saved(tmp_path, tiny_llama, "wegeft")
    cfg = os.path.join(path, pm.CONFIG_FILE)
    meta = json.load(open(cfg))
    meta["format_version"] = version
    json.dump(meta, open(cfg, "w"))
    target = tiny_llama()
    before = fingerprint(target)
    match = r"^directory: .*newer peftops" if version == 2 else r"^directory: .*format_version: expected"
    with pytest.raises(ValueError, match=match):
        peftops.load_adapter(target, path)
    assert_unchanged(target, before)


@pytest.mark.parametrize("edit", ["truncate_json", "truncate_weights", "tensors_not_a_dict", "bad_shape_entry",
                                  "dtype_not_a_string",
                                  "duplicate_method", "foreign_key", "not_a_dir"])
def test_load_refuses_corrupted_files(tmp_path, edit):
    _, path = _saved(tmp_path, tiny_llama, "wegeft")
    cfg, w = os.path.join(path, pm.CONFIG_FILE), os.path.join(path, pm.WEIGHTS_FILE)
    meta = json.load(open(cfg))
    if edit == "truncate_json":
        open(cfg, "w").write(json.dumps(meta)[:-7])
    elif edit == "truncate_weights":
        data = open(w, "rb").read()
        open(w, "wb").write(data[: len(data) // 2])
    elif edit == "tensors_not_a_dict":
        meta["tensors"] = list(meta["tensors"])
    elif edit == "bad_shape_entry":
        k = next(iter(meta["tensors"]))
        meta["tensors"][k]["shape"] = [-1, True]
    elif edit == "dtype_not_a_string":  # found by the property suite: an unhashable dtype gave a raw TypeError
        k = next(iter(meta["tensors"]))
        meta["tensors"][k]["dtype"] = []
    elif edit == "duplicate_method":
        meta["adapters"] = meta["adapters"] * 2
    elif edit == "foreign_key":
        state = load_file(w)
        state["sift::x.indices"] = torch.zeros(1, dtype=torch.int64)
        save_file(state, w)
        meta["tensors"]["sift::x.indices"] = {"shape": [1], "dtype": "int64"}
    if edit not in ("truncate_json", "truncate_weights"):
        json.dump(meta, open(cfg, "w"))
    target = tiny_llama()
    before = fingerprint(target)
    if edit == "not_a_dir":
        with pytest.raises(FileNotFoundError, match=r"^directory:"):
            peftops.load_adapter(target, os.path.join(path, pm.CONFIG_FILE))
    else:
        with pytest.raises(ValueError, match=r"^directory:"):
            peftops.load_adapter(target, path)
    assert_unchanged(target, before)


# ----------------------------------------------------------------------------------------------
# save_adapter
# ----------------------------------------------------------------------------------------------
def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    model = adapted(tiny_llama, "wegeft")
    peftops.save_adapter(model, tmp_path / "a")
    first = open(tmp_path / "a" / pm.WEIGHTS_FILE, "rb").read()
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(FileExistsError, match=r"^directory: .*overwrite=True"):
        peftops.save_adapter(model, tmp_path / "a")
    assert open(tmp_path / "a" / pm.WEIGHTS_FILE, "rb").read() == first
    peftops.save_adapter(model, tmp_path / "a", overwrite=True)
    assert open(tmp_path / "a" / pm.WEIGHTS_FILE, "rb").read() != first
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"^directory:"):
        peftops.save_adapter(model, tmp_path / "file")
    with pytest.raises(TypeError, match=r"^directory:"):
        peftops.save_adapter(model, 3)


def test_save_into_a_folder_with_other_files_keeps_them(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{}")
    peftops.save_adapter(adapted(tiny_llama, "aot"), tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(["trainer_state.json", pm.CONFIG_FILE, pm.WEIGHTS_FILE])


def test_failed_save_leaves_no_half_written_adapter(tmp_path, monkeypatch):
    import safetensors.torch

    model = adapted(tiny_llama, "wegeft")

    def broken(*a, **k):
        open(a[1], "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        peftops.save_adapter(model, tmp_path / "a")
    assert os.listdir(tmp_path / "a") == []


# ----------------------------------------------------------------------------------------------
# merge / unmerge
# ----------------------------------------------------------------------------------------------
def test_merge_failing_half_way_restores_the_weights(monkeypatch):
    model = adapted(tiny_llama, "wegeft")
    before = fingerprint(model)
    monkeypatch.setattr(WeGeFTLinear, "merge", fail_on_call(3)(WeGeFTLinear.merge))
    with pytest.raises(Boom):
        peftops.merge(model)
    monkeypatch.undo()
    assert_unchanged(model, before)
    assert not any(m.merged for m in model.modules() if isinstance(m, WeGeFTLinear))


def test_unmerge_failing_half_way_keeps_the_model_merged(monkeypatch):
    model = adapted(tiny_llama, "wegeft")
    peftops.merge(model)
    before = fingerprint(model)
    monkeypatch.setattr(WeGeFTLinear, "unmerge", fail_on_call(4)(WeGeFTLinear.unmerge))
    with pytest.raises(Boom):
        peftops.unmerge(model)
    monkeypatch.undo()
    assert_unchanged(model, before)
    assert all(m.merged for m in model.modules() if isinstance(m, WeGeFTLinear))
    peftops.unmerge(model)  # and it still unmerges to the exact base weights afterwards
    assert not any(m.merged for m in model.modules() if isinstance(m, WeGeFTLinear))


def test_sift_unmerge_failing_half_way_restores_the_weights(monkeypatch):
    model = adapted(tiny_llama, "sift")
    peftops.merge(model)
    before = fingerprint(model)
    monkeypatch.setattr(SIFTLinear, "restore_base_", fail_on_call(3)(SIFTLinear.restore_base_))
    with pytest.raises(Boom):
        peftops.unmerge(model)
    monkeypatch.undo()
    assert_unchanged(model, before)


def test_merge_without_adapter_is_an_error():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"^model: no peftops adapter"):
        peftops.merge(model)
    with pytest.raises(ValueError, match=r"^model: no peftops adapter"):
        peftops.unmerge(model)


# ----------------------------------------------------------------------------------------------
# SIFT calibration
# ----------------------------------------------------------------------------------------------
def test_recalibration_failing_half_way_restores_the_index_sets(monkeypatch):
    model = adapted(tiny_llama, "sift")
    before = fingerprint(model)
    monkeypatch.setattr(SIFTLinear, "set_indices", fail_on_call(4)(SIFTLinear.set_indices))
    with pytest.raises(Boom):
        sift_calibrate(model, [batch(model)], progress=False)
    monkeypatch.undo()
    assert_unchanged(model, before)


def test_calibration_with_a_bad_batch_leaves_the_model_as_before():
    model = adapted(tiny_llama, "sift")
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"^batches:"):
        sift_calibrate(model, [batch(model)], calib_batches=2, progress=False)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------------
# AoT compile / task tables
# ----------------------------------------------------------------------------------------------
def test_compile_aot_tables_refuses_integer_dtype():
    model = adapted(tiny_llama, "aot")
    before = fingerprint(model)
    with pytest.raises(TypeError, match=r"^dtype:"):
        peftops.compile_aot_tables(model, torch.int32)
    assert_unchanged(model, before)


def test_compile_aot_tables_failing_late_keeps_the_reparameterisation(monkeypatch):
    from peftops import aot

    model = adapted(tiny_llama, "aot")
    before = fingerprint(model)

    def broken(self, tables):
        self._drop_reparam()
        raise Boom("injected failure")

    monkeypatch.setattr(aot.AoTBias, "set_tables", broken)
    with pytest.raises(Boom):
        peftops.compile_aot_tables(model)
    monkeypatch.undo()
    assert_unchanged(model, before)


def test_load_task_tables_checks_its_arguments_and_the_base_class(tmp_path):
    _, a = _saved(tmp_path, tiny_llama, "aot", "a")
    _, b = _saved(tmp_path, tiny_llama, "aot", "b")
    target = tiny_llama()
    before = fingerprint(target)
    with pytest.raises(TypeError, match=r"^directories: .*\[directory\]"):
        peftops.load_task_tables(target, str(a))
    with pytest.raises(ValueError, match=r"^directories:"):
        peftops.load_task_tables(target, [])
    with pytest.raises(TypeError, match=r"^dtype:"):
        peftops.load_task_tables(target, [a], dtype=torch.int64)
    os.remove(os.path.join(b, pm.WEIGHTS_FILE))  # the second task is broken: nothing may change
    with pytest.raises(FileNotFoundError, match=r"^directory:"):
        peftops.load_task_tables(target, [a, b])
    assert_unchanged(target, before)
    other = tiny_llama(head=transformers.LlamaForSequenceClassification)
    with pytest.raises(ValueError, match=r"^model: the adapter"):
        peftops.load_task_tables(other, [a])
    assert not hasattr(other, "peftops_aot")
    assert len(peftops.load_task_tables(target, [a, a]).peftops_aot.tables) == 2


# ----------------------------------------------------------------------------------------------
# SAFE
# ----------------------------------------------------------------------------------------------
def _safe_cfg():
    return SAFEConfig(warmup_steps=2, ramp_end_step=4, final_threshold=0.5, measure_interval=1)


def test_second_safe_on_one_model_is_refused_until_the_first_is_removed():
    model = adapted(tiny_llama, "wegeft")
    first = SAFE(model, _safe_cfg())
    with pytest.raises(ValueError, match=r"^model: another SAFE"):
        SAFE(model, _safe_cfg())
    first.remove()
    second = SAFE(model, _safe_cfg())
    with pytest.raises(ValueError, match=r"^model: another SAFE"):
        first.begin_step(1)
    second.remove()


def test_safe_steps_only_move_forward():
    model = adapted(tiny_llama, "wegeft")
    safe = SAFE(model, _safe_cfg())
    safe.step(3)
    log = list(safe.log)
    with pytest.raises(ValueError, match=r"^step: expected a step >= 3"):
        safe.begin_step(1)
    assert safe.log == log and safe.step_index == 3
    safe.remove()


def test_safe_load_state_dict_is_parsed_before_anything_changes():
    model = adapted(tiny_llama, "wegeft")
    safe = SAFE(model, _safe_cfg())
    name = safe.unit_names[0]
    with pytest.raises(ValueError, match=r"^state:"):
        safe.load_state_dict({"history": {name: [(0, 0.5)], safe.unit_names[1]: [("x", "y")]}})
    assert all(not u.history for u in safe.units)
    safe.remove()
