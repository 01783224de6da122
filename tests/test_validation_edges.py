"""Edge cases of the input validation that no other test pins down (found by a mutation pass).

Every check is exercised on both sides of its boundary: the first refused value (so removing or
weakening the check fails a test) and the last accepted one (so tightening it fails one too).
Errors name the argument first ("name: ..."), matched with ``^name:``. Tiny tensors and modules
only; nothing here runs a kernel (no Triton interpreter)."""
import json
import math
import os

import pytest
import torch
from torch import nn

import peftops
from peftops import AoTConfig, SAFEConfig, SIFTConfig, WeGeFTConfig, WeGeFTLinear
from peftops import model as pm
from peftops.kernels._checks import check_index_range, check_same_device, check_tensor


# ----------------------------------------------------------------------------------------------
# kernels/_checks.py
# ----------------------------------------------------------------------------------------------
def test_check_index_range_single_entry():
    check_index_range("idx", torch.tensor([4]), 5)  # the largest valid index
    check_index_range("idx", torch.tensor([0]), 5)
    check_index_range("idx", torch.tensor([], dtype=torch.int64), 0)  # empty: nothing to check
    with pytest.raises(IndexError, match=r"^idx:"):
        check_index_range("idx", torch.tensor([5]), 5)
    with pytest.raises(IndexError, match=r"^idx:"):
        check_index_range("idx", torch.tensor([-1]), 5)
    with pytest.raises(IndexError, match=r"^idx:"):
        check_index_range("idx", torch.tensor([0, 5]), 5)


def test_check_same_device_mixed():
    cpu, cpu2, meta = torch.zeros(2), torch.ones(2), torch.empty(2, device="meta")
    assert check_same_device(a=cpu, b=cpu2) == torch.device("cpu")
    assert check_same_device(a=cpu, b=None, c=cpu2) == torch.device("cpu")
    assert check_same_device(a=meta, b=torch.empty(1, device="meta")) == torch.device("meta")
    with pytest.raises(ValueError, match=r"^second:"):
        check_same_device(first=cpu, second=meta)
    with pytest.raises(ValueError, match=r"^third:"):
        check_same_device(first=cpu, second=cpu2, third=meta)
    with pytest.raises(ValueError, match=r"^third:"):
        check_same_device(first=cpu, second=None, third=meta)


def test_check_tensor_device():
    t = torch.zeros(2)
    assert check_tensor("w", t, device="cpu") is t
    assert check_tensor("w", t, device=torch.device("cpu")) is t
    with pytest.raises(ValueError, match=r"^w:"):
        check_tensor("w", t, device="meta")
    with pytest.raises(ValueError, match=r"^w:"):
        check_tensor("w", torch.empty(2, device="meta"), device=torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# peftops/model.py
# ----------------------------------------------------------------------------------------------
def test_from_dict_unknown_field_and_method_mismatch():
    cfg = WeGeFTConfig.from_dict({"method": "wegeft", "r": 2})
    assert isinstance(cfg, WeGeFTConfig) and cfg.r == 2
    assert WeGeFTConfig.from_dict({"r": 3}).r == 3  # no method key: the class's own
    with pytest.raises(ValueError, match=r"^config:"):
        WeGeFTConfig.from_dict({"method": "wegeft", "bogus": 1})
    with pytest.raises(ValueError, match=r"^config:"):
        WeGeFTConfig.from_dict({"method": "sift", "r": 2})
    with pytest.raises(ValueError, match=r"^config:"):
        SIFTConfig.from_dict({"method": "wegeft"})


@pytest.mark.parametrize("field", ["target_modules", "modules_to_save"])
def test_adapter_config_module_lists(field):
    cfg = WeGeFTConfig(**{field: "q_proj"})
    cfg.validate()
    # PEFT's rules: a string target is a regex over the whole name, a string head is one name
    assert getattr(cfg, field) == ("q_proj" if field == "target_modules" else ["q_proj"])
    cfg = WeGeFTConfig(**{field: ("a", "b")})
    cfg.validate()
    assert getattr(cfg, field) == ["a", "b"]
    for bad in ([""], [3], 5, ["ok", ""]):
        with pytest.raises(ValueError, match=rf"^{field}:"):
            WeGeFTConfig(**{field: bad}).validate()


def test_adapter_config_empty_lists():
    with pytest.raises(ValueError, match=r"^target_modules:"):
        WeGeFTConfig(target_modules=[]).validate()
    cfg = WeGeFTConfig(modules_to_save=[])  # [] = no head: allowed
    cfg.validate()
    assert cfg.modules_to_save == []
    WeGeFTConfig(target_modules=None).validate()


def test_apply_type_checks():
    with pytest.raises(TypeError, match=r"^config:"):
        peftops.apply(nn.Linear(2, 2), "not a config")
    with pytest.raises(TypeError, match=r"^model:"):
        peftops.apply("not a model", WeGeFTConfig())


def test_get_method():
    assert pm.get_method("wegeft").name == "wegeft"
    with pytest.raises(ValueError, match=r"^method:"):
        pm.get_method("nope")


def test_adapter_state_dict_without_adapter():
    with pytest.raises(ValueError, match=r"^model:"):
        peftops.adapter_state_dict(nn.Linear(2, 2))


def test_trainable_summary_counts():
    m = nn.Linear(3, 2)  # 6 weights + 2 biases
    m.bias.requires_grad_(False)
    s = peftops.trainable_summary(m)
    assert s["trainable"] == 6 and s["total"] == 8
    assert s["percent"] == pytest.approx(75.0)
    assert s["methods"] == []
    assert s["text"] == "trainable params: 6 || all params: 8 || trainable%: 75.0000"
    empty = peftops.trainable_summary(nn.Module())
    assert empty["total"] == 0 and empty["percent"] == 0.0


class A(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = nn.Linear(4, 3)
        self.other = nn.Linear(3, 3)


class B(A):
    pass


def _saved(tmp_path, cls=A):
    model = peftops.apply(cls(), WeGeFTConfig(r=2, alpha=4.0, target_modules=["q_proj"]))
    with torch.no_grad():
        model.q_proj.phi.normal_()
    path = tmp_path / "adapter"
    peftops.save_adapter(model, path)
    return model, path


def test_load_adapter_freeze_base(tmp_path):
    src, path = _saved(tmp_path)
    free = peftops.load_adapter(A(), path, freeze_base=False)
    # WeGeFT always freezes the W it wraps (by design); the rest of the base stays trainable
    assert not free.q_proj.weight.requires_grad and free.q_proj.bias.requires_grad
    assert free.other.weight.requires_grad and free.other.bias.requires_grad
    assert free.q_proj.phi.requires_grad and free.q_proj.psi.requires_grad
    torch.testing.assert_close(free.q_proj.phi, src.q_proj.phi)

    frozen = peftops.load_adapter(A(), path, freeze_base=True)
    assert not frozen.q_proj.weight.requires_grad and not frozen.q_proj.bias.requires_grad
    assert not frozen.other.weight.requires_grad and not frozen.other.bias.requires_grad
    assert frozen.q_proj.phi.requires_grad and frozen.q_proj.psi.requires_grad
    default = peftops.load_adapter(A(), path)
    assert not default.other.weight.requires_grad
    with pytest.raises(TypeError, match=r"^freeze_base:"):
        peftops.load_adapter(A(), path, freeze_base=1)


def _rewrite_config(path, fn):
    cfg_file = os.path.join(path, pm.CONFIG_FILE)
    with open(cfg_file, encoding="utf-8") as f:
        meta = json.load(f)
    with open(cfg_file, "w", encoding="utf-8") as f:
        out = fn(meta)
        f.write(out if isinstance(out, str) else json.dumps(out))


@pytest.mark.parametrize("case", ["no_adapters", "no_tensors", "invalid_json", "not_a_dict"])
def test_read_adapter_bad_config(tmp_path, case):
    _, path = _saved(tmp_path)
    meta, state = pm._read_adapter(path)  # intact: reads
    assert meta["adapters"][0]["method"] == "wegeft" and state

    def edit(meta):
        if case == "no_adapters":
            del meta["adapters"]
        elif case == "no_tensors":
            del meta["tensors"]
        elif case == "invalid_json":
            return "{not json"
        else:
            return json.dumps([1, 2])
        return meta

    _rewrite_config(path, edit)
    with pytest.raises(ValueError, match=r"^directory:"):
        pm._read_adapter(path)
    with pytest.raises(ValueError, match=r"^directory:"):
        peftops.load_adapter(A(), path)


def test_load_into_compiled_model(tmp_path):
    src, path = _saved(tmp_path)
    compiled = torch.compile(A())
    assert compiled._orig_mod.__class__ is A
    out = peftops.load_adapter(compiled, path)  # loaded, not run
    assert out is compiled
    inner = compiled._orig_mod
    assert isinstance(inner.q_proj, WeGeFTLinear)
    torch.testing.assert_close(inner.q_proj.phi, src.q_proj.phi)


def test_load_base_class_check_uses_inner_class(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(ValueError, match=r"^model: the adapter .* saved from a A, this model is a B "):
        peftops.load_adapter(torch.compile(B()), path)
    with pytest.raises(ValueError, match=r"^model: the adapter .* saved from a A"):
        peftops.load_adapter(B(), path)
    meta, _ = pm._read_adapter(path)
    assert meta["base_model_class"] == "A"


def test_save_from_compiled_model_records_inner_class(tmp_path):
    compiled = torch.compile(A())
    peftops.apply(compiled, WeGeFTConfig(r=2, target_modules=["q_proj"]))
    peftops.save_adapter(compiled, tmp_path / "c")
    meta, _ = pm._read_adapter(tmp_path / "c")
    assert meta["base_model_class"] == "A"
    peftops.load_adapter(A(), tmp_path / "c")  # and a plain A takes it


# ----------------------------------------------------------------------------------------------
# peftops/aot.py
# ----------------------------------------------------------------------------------------------
def test_aot_rank():
    AoTConfig(rank=1).validate()
    AoTConfig(rank=None).validate()
    with pytest.raises(ValueError, match=r"^rank:"):
        AoTConfig(rank=0).validate()
    with pytest.raises(TypeError, match=r"^rank:"):
        AoTConfig(rank=True).validate()
    with pytest.raises(TypeError, match=r"^rank:"):
        AoTConfig(rank=2.0).validate()


def test_aot_kron_factors():
    cfg = AoTConfig(kron_factors=(1, 1))
    cfg.validate()
    assert cfg.kron_factors == [1, 1] and type(cfg.kron_factors) is list
    AoTConfig(kron_factors=[3, 5]).validate()
    with pytest.raises(TypeError, match=r"^kron_factors:"):
        AoTConfig(kron_factors=6).validate()
    with pytest.raises(TypeError, match=r"^kron_factors:"):
        AoTConfig(kron_factors="23").validate()
    with pytest.raises(TypeError, match=r"^kron_factors:"):
        AoTConfig(kron_factors=[2, True]).validate()
    with pytest.raises(TypeError, match=r"^kron_factors:"):
        AoTConfig(kron_factors=[2, 3.0]).validate()
    for bad in ([2], [2, 3, 4], [2, 0], [0, 2], [-1, 4], []):
        with pytest.raises(ValueError, match=r"^kron_factors:"):
            AoTConfig(kron_factors=bad).validate()


def test_aot_choices():
    for act in ("relu", "gelu", "tanh", "silu", "identity"):
        AoTConfig(activation=act).validate()
    with pytest.raises(ValueError, match=r"^activation:"):
        AoTConfig(activation="swish").validate()
    with pytest.raises(TypeError, match=r"^activation:"):
        AoTConfig(activation=None).validate()
    for dt in (None, "float32", "bfloat16", "float16", "float64"):
        AoTConfig(table_dtype=dt).validate()
    with pytest.raises(ValueError, match=r"^table_dtype:"):
        AoTConfig(table_dtype="int8").validate()
    with pytest.raises(TypeError, match=r"^table_dtype:"):
        AoTConfig(table_dtype=torch.float32).validate()
    for rp in ("kron", "fc", "direct"):
        AoTConfig(reparam=rp).validate()
    with pytest.raises(ValueError, match=r"^reparam:"):
        AoTConfig(reparam="lora").validate()


def test_aot_n_tasks_and_flags():
    AoTConfig(n_tasks=1).validate()
    AoTConfig(n_tasks=3).validate()
    with pytest.raises(ValueError, match=r"^n_tasks:"):
        AoTConfig(n_tasks=0).validate()
    with pytest.raises(TypeError, match=r"^n_tasks:"):
        AoTConfig(n_tasks=True).validate()
    for flag in ("sparse_grad", "inplace", "compiled"):
        AoTConfig(**{flag: True}).validate()
        AoTConfig(**{flag: False}).validate()
        with pytest.raises(TypeError, match=rf"^{flag}:"):
            AoTConfig(**{flag: "yes"}).validate()


def test_aot_one_target_module():
    cfg = AoTConfig(target_modules="model.layers")
    cfg.validate()
    assert cfg.target_modules == ["model.layers"]
    AoTConfig(target_modules=["layers"]).validate()
    AoTConfig(target_modules=None).validate()
    with pytest.raises(ValueError, match=r"^target_modules:"):
        AoTConfig(target_modules=["model.layers", "encoder.layer"]).validate()
    with pytest.raises(ValueError, match=r"^target_modules:"):
        AoTConfig(target_modules=[]).validate()


# ----------------------------------------------------------------------------------------------
# peftops/safe/ (validates in __post_init__)
# ----------------------------------------------------------------------------------------------
def safe(**kw):
    args = {"warmup_steps": 1, "ramp_end_step": 2, "final_threshold": 0.5}
    args.update(kw)
    return SAFEConfig(**args)


def test_safe_steps():
    safe()  # t_w = 1, t_f = t_w + 1: the smallest valid schedule
    safe(warmup_steps=5, ramp_end_step=6)
    with pytest.raises(ValueError, match=r"^warmup_steps:"):
        safe(warmup_steps=0)
    with pytest.raises(ValueError, match=r"^warmup_steps:"):
        safe(warmup_steps=True)
    with pytest.raises(ValueError, match=r"^ramp_end_step:"):
        safe(warmup_steps=2, ramp_end_step=2)
    with pytest.raises(ValueError, match=r"^ramp_end_step:"):
        safe(ramp_end_step=2.0)


def test_safe_final_threshold():
    for ok in (0.0, 1.0, 0, 1, 0.5):
        safe(final_threshold=ok)
    for bad in (True, False, 1.0001, -0.0001, float("nan"), "0.5", None):
        with pytest.raises(ValueError, match=r"^final_threshold:"):
            safe(final_threshold=bad)


def test_safe_score_mode():
    for mode in ("last", "mean", "current"):
        safe(score_mode=mode)
    with pytest.raises(ValueError, match=r"^score_mode:"):
        safe(score_mode="max")


def test_safe_measure_interval_and_max_tokens():
    safe(measure_interval=1)
    with pytest.raises(ValueError, match=r"^measure_interval:"):
        safe(measure_interval=0)
    with pytest.raises(ValueError, match=r"^measure_interval:"):
        safe(measure_interval=True)
    safe(max_tokens=2)
    safe(max_tokens=None)
    for bad in (1, 0, True, 2.0):
        with pytest.raises(ValueError, match=r"^max_tokens:"):
            safe(max_tokens=bad)


def test_safe_seed_and_allow_freezing_all():
    safe(seed=0)
    safe(seed=-3)
    for bad in ("x", True, 1.5):
        with pytest.raises(ValueError, match=r"^seed:"):
            safe(seed=bad)
    safe(allow_freezing_all=True)
    safe(allow_freezing_all=False)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=r"^allow_freezing_all:"):
            safe(allow_freezing_all=bad)


# ----------------------------------------------------------------------------------------------
# peftops/sift.py
# ----------------------------------------------------------------------------------------------
def test_sift_density():
    SIFTConfig(density=1.0).validate()
    SIFTConfig(density=1).validate()
    SIFTConfig(density=1e-9).validate()
    for bad in (0, 0.0, 1.0001, -0.1, True, "0.1", float("nan")):
        with pytest.raises(ValueError, match=r"^density:"):
            SIFTConfig(density=bad).validate()


def test_sift_calib_batches():
    SIFTConfig(calib_batches=1).validate()
    for bad in (True, 0, 1.0, "1"):
        with pytest.raises(ValueError, match=r"^calib_batches:"):
            SIFTConfig(calib_batches=bad).validate()


# ----------------------------------------------------------------------------------------------
# peftops/wegeft.py
# ----------------------------------------------------------------------------------------------
def _both(**kw):
    """Validate the hyper-parameters through WeGeFTConfig and WeGeFTLinear alike."""
    WeGeFTConfig(**kw).validate()
    return WeGeFTLinear(nn.Linear(4, 3), **kw)


def _refused(exc, name, **kw):
    with pytest.raises(exc, match=rf"^{name}:"):
        WeGeFTConfig(**kw).validate()
    with pytest.raises(exc, match=rf"^{name}:"):
        WeGeFTLinear(nn.Linear(4, 3), **kw)


def test_wegeft_r():
    layer = _both(r=1)
    assert layer.phi.shape == (1, 4) and layer.r == 1
    for bad in (True, 0, -1, 2.0):
        _refused(ValueError, "r", r=bad)


def test_wegeft_alpha():
    # documented: "a finite number > 0"; the smallest positives are accepted, 0 is not
    layer = _both(r=2, alpha=1e-12)
    assert layer.scaling == pytest.approx(5e-13)
    _both(alpha=math.ulp(0.0))
    _both(alpha=1)
    for bad in (0, 0.0, -1.0, math.inf, -math.inf, math.nan, True, "1"):
        _refused(ValueError, "alpha", alpha=bad)


def test_wegeft_dropout():
    _both(dropout=0.0)
    _both(dropout=0)
    _both(dropout=0.999)
    for bad in (True, 1.0, -0.01, "0.1"):
        _refused(ValueError, "dropout", dropout=bad)


def test_wegeft_path_and_merge_backup():
    for p in ("auto", "fused", "merged"):
        _both(path=p)
    _refused(ValueError, "path", path="triton")
    assert _both(merge_backup="device").merge_backup == "device"
    assert _both(merge_backup="cpu").merge_backup == "cpu"
    for bad in ("gpu", "cuda", None, "CPU"):
        _refused(ValueError, "merge_backup", merge_backup=bad)


def test_wegeft_exclude_modules():
    cfg = WeGeFTConfig(exclude_modules="x")  # a regex over the whole name, as in PEFT
    cfg.validate()
    assert cfg.exclude_modules == "x"
    WeGeFTConfig(exclude_modules=["a", "b.c"]).validate()
    WeGeFTConfig(exclude_modules=None).validate()
    WeGeFTConfig(exclude_modules=[]).validate()
    for bad in ([""], [3], 5, ["a", ""]):
        with pytest.raises(ValueError, match=r"^exclude_modules:"):
            WeGeFTConfig(exclude_modules=bad).validate()


def test_wegeft_bool_flags():
    for name in ("share_generators", "upcast_generators"):
        WeGeFTConfig(**{name: True}).validate()
        WeGeFTConfig(**{name: False}).validate()
        for bad in ("yes", 1, None):
            with pytest.raises(ValueError, match=rf"^{name}:"):
                WeGeFTConfig(**{name: bad}).validate()
    WeGeFTLinear(nn.Linear(4, 3), upcast_generators=False)
    with pytest.raises(TypeError, match=r"^upcast_generators:"):
        WeGeFTLinear(nn.Linear(4, 3), upcast_generators="yes")
    with pytest.raises(TypeError, match=r"^generator_key:"):
        WeGeFTLinear(nn.Linear(4, 3), generator_key=3)
    with pytest.raises(TypeError, match=r"^base:"):
        WeGeFTLinear(nn.Conv1d(4, 3, 1))
