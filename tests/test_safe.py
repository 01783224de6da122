"""SAFE: schedule and decisions (table-driven), measurement hooks, real freezing (grads, optimizer
state, saved activations), PEFT LoRA, peftops adapters (the protocol), transformers.Trainer."""
import math
import warnings

import pytest
import torch
from torch import nn

from helpers import force_backend

import peftops.safe as safe_mod
from peftops.kernels.cka import linear_cka_reference
from peftops.safe import SAFE, SAFEConfig, SavedTensorMeter, find_adapter_units, safe_threshold

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:SAFE. every adapter unit:UserWarning")

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
class StandInAdapter(nn.Module):
    """Follows the cross-method protocol: peftops_adapter, adapter_parameters(), X = first tensor
    argument, Y = output. A frozen linear plus a trainable low-rank update (and an optional
    parameter shared with other units)."""

    peftops_adapter = True

    def __init__(self, d_in, d_out, shared=None, inplace=False):
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.a = nn.Parameter(torch.randn(2, d_in) * 0.3)
        self.b = nn.Parameter(torch.randn(d_out, 2) * 0.3)
        self.shared = shared
        self.inplace = inplace

    def adapter_parameters(self):
        return [self.a, self.b] + ([self.shared] if self.shared is not None else [])

    def forward(self, x, extra=None):
        if self.inplace:  # like AoT's bias add when autograd allows: the input is updated in place
            return x.add_((x @ self.a.T) @ self.b.T)
        y = self.base(x) + (x @ self.a.T) @ self.b.T
        return y + self.shared if self.shared is not None else y


class StackModel(nn.Module):
    """Embedding (frozen) -> n blocks of (adapter, tanh) -> mean-pool head; HF-style call."""

    def __init__(self, n=4, d=12, vocab=30, shared=False, inplace_first=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d).requires_grad_(False)
        sh = nn.Parameter(torch.zeros(d)) if shared else None
        self.blocks = nn.ModuleList(StandInAdapter(d, d, sh, inplace=inplace_first and i == 0) for i in range(n))
        self.head = nn.Linear(d, 2).requires_grad_(False)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.emb(input_ids)
        for blk in self.blocks:
            h = torch.tanh(blk(h))
        logits = self.head(h.mean(1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def _batch(vocab=30, b=3, s=7, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    am = torch.ones(b, s, dtype=torch.long)
    if pad:
        am[1:, s - 3:] = 0
    return {"input_ids": ids, "attention_mask": am, "labels": torch.randint(0, 2, (b,), generator=g)}


def _tiny_bert(n_layers=4, embedding_lora=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=2,
                                  intermediate_size=48, vocab_size=50, max_position_embeddings=64, num_labels=2,
                                  attn_implementation="eager")
    model = transformers.BertForSequenceClassification(cfg)
    targets = ["query", "key", "value", "dense"] + (["word_embeddings"] if embedding_lora else [])
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets, task_type="SEQ_CLS",
                                                       init_lora_weights=False))
    return model.train()


def _cfg(**kw):
    # the freezing mechanics tests freeze every unit on purpose; the default cap is tested on its own
    base = dict(warmup_steps=3, ramp_end_step=7, final_threshold=0.8, max_tokens=None, allow_freezing_all=True)
    base.update(kw)
    return SAFEConfig(**base)


# ----------------------------------------------------------------------------------------------
# Config and schedule
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,field", [
    (dict(warmup_steps=5, ramp_end_step=5, final_threshold=0.5), "ramp_end_step"),
    (dict(warmup_steps=5, ramp_end_step=3, final_threshold=0.5), "ramp_end_step"),
    (dict(warmup_steps=0, ramp_end_step=3, final_threshold=0.5), "warmup_steps"),
    (dict(warmup_steps=2.5, ramp_end_step=3, final_threshold=0.5), "warmup_steps"),
    (dict(warmup_steps=2, ramp_end_step=3, final_threshold=1.5), "final_threshold"),
    (dict(warmup_steps=2, ramp_end_step=3, final_threshold=-0.1), "final_threshold"),
    (dict(warmup_steps=2, ramp_end_step=3, final_threshold=float("nan")), "final_threshold"),
    (dict(warmup_steps=2, ramp_end_step=3, final_threshold=0.5, score_mode="max"), "score_mode"),
    (dict(warmup_steps=2, ramp_end_step=3, final_threshold=0.5, measure_interval=0), "measure_interval"),
    (dict(warmup_steps=2, ramp_end_step=3, final_threshold=0.5, max_tokens=1), "max_tokens"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SAFEConfig(**kwargs)


def test_threshold_schedule_table():
    cfg = SAFEConfig(warmup_steps=4, ramp_end_step=8, final_threshold=0.5)
    want = {0: 0.0, 3: 0.0, 4: 0.0, 5: 0.5 * (1 - 0.75 ** 3), 6: 0.5 * (1 - 0.5 ** 3), 7: 0.5 * (1 - 0.25 ** 3),
            8: 0.5, 100: 0.5}
    for t, v in want.items():
        assert cfg.threshold(t) == pytest.approx(v, abs=1e-15), t
        assert safe_threshold(t, 4, 8, 0.5) == pytest.approx(v, abs=1e-15)


@pytest.mark.parametrize("t_w,interval,mode,want", [
    (7, 3, "last", [0, 3, 6]),
    (8, 3, "last", [0, 3, 6, 7]),            # the last warm-up step always measures
    (4, 1, "mean", [0, 1, 2, 3]),
    (4, 2, "current", [0, 2, 3, 4, 6, 8]),   # current: on until t_f = 10
])
def test_measuring_steps_table(t_w, interval, mode, want):
    cfg = SAFEConfig(warmup_steps=t_w, ramp_end_step=10, final_threshold=0.5, score_mode=mode,
                     measure_interval=interval)
    assert [t for t in range(20) if cfg.measures(t)] == want


# score of each stand-in unit at the warm-up steps 0, 1, 2 (t_w = 3, t_f = 7, T_f = 0.8), and the
# step at which it must freeze per mode. T(4) = 0.4625, T(5) = 0.7, T(6) = 0.7875, T(>=7) = 0.8.
WARMUP_SCORES = [
    [0.9, 0.5, 0.1],          # last 0.1 -> 4;  mean 0.5 -> 5
    [0.1, 0.2, 0.95],         # last 0.95 never; mean 0.4167 -> 4
    [0.6, 0.6, 0.6],          # 5 / 5
    [0.3, 0.9, 0.75],         # last 0.75 -> 6; mean 0.65 -> 5
    [float("nan")] * 3,       # never scored: never frozen
    [0.85, 0.82, 0.81],       # above T_f in both modes: never
]
LATER_SCORES = {3: {1: 0.3}, 4: {2: 0.9, 3: 0.2}, 6: {5: 0.79}}  # step -> {unit: score} ("current")
FREEZE_AT = {
    "last": [4, None, 5, 6, None, None],
    "mean": [5, 4, 5, 5, None, None],
    "current": [4, 4, None, 5, None, 7],  # the latest score counts: 2 recovers (0.9), 5 drops to 0.79
}


@pytest.mark.parametrize("mode", ["last", "mean", "current"])
def test_freeze_decisions_follow_the_schedule(mode):
    model = StackModel(n=6)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    safe = SAFE(model, _cfg(score_mode=mode), optimizer=opt)
    names = safe.unit_names
    assert names == [f"blocks.{i}" for i in range(6)]
    frozen_per_step = []
    for t in range(12):
        if t < 3:
            safe.record_scores(t, {names[i]: s[t] for i, s in enumerate(WARMUP_SCORES)})
        elif mode == "current" and t in LATER_SCORES:
            safe.record_scores(t, {names[i]: s for i, s in LATER_SCORES[t].items()})
        safe.step(t + 1)
        frozen_per_step.append(set(safe.frozen))
    assert [u.frozen_at for u in safe.units] == FREEZE_AT[mode]
    for prev, cur in zip(frozen_per_step, frozen_per_step[1:]):
        assert prev <= cur  # monotone
    for u in safe.units:
        for p in u.params:
            assert p.requires_grad == (not u.frozen)
    by_step = {e["step"]: e["newly_frozen"] for e in safe.log}
    for i, t in enumerate(FREEZE_AT[mode]):
        if t is not None:
            assert names[i] in by_step[t]
    assert [e["step"] for e in safe.log] == list(range(13))
    assert safe.log[5]["threshold"] == pytest.approx(0.7)


def test_monotone_freezing_and_real_release_under_random_scores():
    torch.manual_seed(0)
    model = StackModel(n=5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    safe = SAFE(model, _cfg(score_mode="current", warmup_steps=2, ramp_end_step=9, final_threshold=0.6,
                            measure_interval=1), optimizer=opt)
    g = torch.Generator().manual_seed(1)
    batch = _batch()
    prev = set()
    with force_backend("reference"):
        for t in range(12):
            loss = model(**batch)["loss"]
            if loss.requires_grad:  # False once every unit is frozen (nothing else trains here)
                loss.backward()
            opt.step()
            opt.zero_grad()
            safe.end_step(t)
            safe.record_scores(t, {n: float(torch.rand((), generator=g)) for n in safe.unit_names
                                   if n not in safe.frozen})
            safe.begin_step(t + 1)
            cur = set(safe.frozen)
            assert prev <= cur
            prev = cur
            for u in safe.units:
                if u.frozen:
                    for p in u.params:
                        assert not p.requires_grad and p.grad is None and p not in opt.state
    assert prev, "random scores in [0, 1) against T_f = 0.6 must freeze something"


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------
def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_exist_only_on_measuring_steps():
    model = StackModel()
    before = _hook_count(model)
    safe = SAFE(model, _cfg(warmup_steps=4, ramp_end_step=6, measure_interval=2))  # measures 0, 2, 3
    armed = []
    for t in range(8):
        armed.append(_hook_count(model) - before)
        safe.step(t + 1)
    assert armed == [9, 0, 9, 9, 0, 0, 0, 0]  # model pre-hook + (pre, post) per unit
    safe.remove()
    assert _hook_count(model) == before


def _capture_xy(model, names):
    """X (input) and Y (output) of the named modules in the next forward."""
    got, handles = {}, []
    for n in names:
        mod = model.get_submodule(n)
        handles.append(mod.register_forward_hook(
            lambda m, a, o, n=n: got.__setitem__(n, (a[0].detach().clone(), o.detach().clone()))))
    return got, handles


def test_lora_importance_is_one_minus_masked_cka_of_input_and_output():
    model = _tiny_bert(embedding_lora=True)
    safe = SAFE(model, _cfg())
    kinds = {u.kind for u in safe.units}
    assert kinds == {"lora.Linear", "lora.Embedding"}
    lin = [u for u in safe.units if u.kind == "lora.Linear"]
    assert len(lin) == 4 * 6 + 1  # q, k, v, attn-out, intermediate, output per layer + pooler
    for u in lin:  # parameters: the active adapter's lora_A / lora_B
        assert {id(p) for p in u.params} == {id(u.module.lora_A["default"].weight), id(u.module.lora_B["default"].weight)}
    batch = _batch(vocab=50, b=3, s=9)
    probe = [lin[0].name, lin[7].name, lin[-1].name]
    got, handles = _capture_xy(model, probe)
    with force_backend("reference"):
        model(**batch)
    for h in handles:
        h.remove()
    scores = safe.end_step(0)
    keep = batch["attention_mask"].reshape(-1).bool()
    for n in probe[:2]:  # token-level units: padding excluded
        x, y = got[n]
        want = 1 - float(linear_cka_reference(x.reshape(-1, x.shape[-1])[keep].double(),
                                              y.reshape(-1, y.shape[-1])[keep].double()))
        assert scores[n] == pytest.approx(want, abs=1e-5)
    x, y = got[probe[2]]  # the pooler sees [batch, d]: no token mask applies
    assert scores[probe[2]] == pytest.approx(1 - float(linear_cka_reference(x.double(), y.double())), abs=1e-5)
    emb = [u for u in safe.units if u.kind == "lora.Embedding"][0]
    assert emb.name not in scores  # its input are token ids: never scored, never frozen
    assert all(0.0 <= s <= 1.0 for s in scores.values())


def test_token_sampling_keeps_valid_tokens_only():
    """With max_tokens < valid tokens, padding rows (here Inf) are never sampled."""
    model = StackModel(n=2)
    safe = SAFE(model, _cfg(max_tokens=5))
    batch = _batch(vocab=29, b=4, s=9)
    with torch.no_grad():  # make padded positions poison: their embeddings are Inf
        pad_id = 29
        model.emb.weight[pad_id] = float("inf")
    batch["input_ids"][batch["attention_mask"] == 0] = pad_id
    with force_backend("reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(**batch)
    scores = safe.end_step(0)
    assert set(scores) == set(safe.unit_names)
    assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores.values())


def test_micro_batches_are_averaged_and_eval_is_not_measured():
    model = StackModel(n=2)
    safe = SAFE(model, _cfg())
    b1, b2 = _batch(seed=1, pad=False), _batch(seed=2, pad=False)
    name = safe.unit_names[1]
    got, handles = _capture_xy(model, [name])
    per = []
    with force_backend("reference"):
        for b in (b1, b2):
            model(**b)
            x, y = got[name]
            per.append(1 - float(linear_cka_reference(x.reshape(-1, 12).double(), y.reshape(-1, 12).double())))
        model.eval()
        model(**_batch(seed=3))  # eval forward: not measured
        with torch.no_grad():
            model(**_batch(seed=4))
        model.train()
    for h in handles:
        h.remove()
    scores = safe.end_step(0)
    assert scores[name] == pytest.approx(sum(per) / 2, abs=1e-6)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_measures_each_forward_once(reentrant):
    """HF gradient checkpointing: the recomputation inside backward is not measured again, and the
    reentrant variant (its forward runs under no_grad) is measured like a plain forward."""
    batch = _batch(vocab=50, b=2, s=8)
    scores = {}
    for ckpt in (False, True):
        model = _tiny_bert(n_layers=2)
        model.base_model.model.config.hidden_dropout_prob = 0.0
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        if ckpt:
            model.base_model.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.base_model.model.enable_input_require_grads()
        safe = SAFE(model, _cfg())
        with force_backend("reference"):
            model(**batch).loss.backward()
        assert all(len(v) == 1 for v in safe._pending.values())
        scores[ckpt] = safe.end_step(0)
    assert set(scores[True]) == set(scores[False]) == set(safe.unit_names)
    for n, v in scores[False].items():
        assert scores[True][n] == pytest.approx(v, abs=1e-6)


def test_inplace_adapter_is_measured_on_its_input():
    model = StackModel(n=2, inplace_first=True)
    safe = SAFE(model, _cfg())
    batch = _batch(pad=False)
    h = model.emb(batch["input_ids"]).detach()
    blk = model.blocks[0]
    want_y = h + (h @ blk.a.T) @ blk.b.T
    want = 1 - float(linear_cka_reference(h.reshape(-1, 12).double(), want_y.detach().reshape(-1, 12).double()))
    with force_backend("reference"):
        model(**batch)
    assert safe.end_step(0)["blocks.0"] == pytest.approx(want, abs=1e-6)


def test_measurement_through_the_triton_kernels():
    model = StackModel(n=2, d=16)
    batch = _batch(b=2, s=6)
    results = {}
    for backend in ("reference", "triton"):
        safe = SAFE(model, _cfg())
        with force_backend(backend):
            model(**batch)
        results[backend] = safe.end_step(0)
        safe.remove()
    for n, v in results["reference"].items():
        assert results["triton"][n] == pytest.approx(v, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Freezing is real
# ----------------------------------------------------------------------------------------------
class _LayerSavedBytes:
    """Activation bytes saved for backward while each encoder layer runs (-1: before layer 0)."""

    def __init__(self, model, layers):
        self.current = -1
        self.bytes = {}
        self.meter = SavedTensorMeter(model)
        pack = self.meter._pack

        def counting_pack(t):
            before = self.meter.activation_bytes
            out = pack(t)
            self.bytes[self.current] = self.bytes.get(self.current, 0) + self.meter.activation_bytes - before
            return out

        self.meter._pack = counting_pack
        self.handles = []
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: setattr(self, "current", i)))
            self.handles.append(layer.register_forward_hook(lambda m, a, o: setattr(self, "current", 10**6)))

    def __enter__(self):
        self.meter.__enter__()
        return self

    def __exit__(self, *exc):
        self.meter.__exit__(*exc)
        for h in self.handles:
            h.remove()


def _bert_layers(model):
    return model.base_model.model.bert.encoder.layer


def test_frozen_lower_half_keeps_no_activation_and_gets_no_grad_or_optimizer_state():
    model = _tiny_bert(n_layers=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    safe = SAFE(model, _cfg(), optimizer=opt)
    safe.end_step(0)
    batch = _batch(vocab=50, b=4, s=10)
    with force_backend("reference"):
        with _LayerSavedBytes(model, _bert_layers(model)) as full:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    lower = [u for u in safe.units if ".layer.0." in u.name or ".layer.1." in u.name]
    assert all(p in opt.state for u in lower for p in u.params)
    frozen = safe.freeze([u.name for u in lower])
    assert len(frozen) == 12
    for u in lower:
        for p in u.params:
            assert not p.requires_grad and p.grad is None and p not in opt.state
    with force_backend("reference"):
        with _LayerSavedBytes(model, _bert_layers(model)) as half:
            loss = model(**batch).loss
        loss.backward()
    assert full.bytes.get(0, 0) > 0 and full.bytes.get(1, 0) > 0
    assert half.bytes.get(-1, 0) == 0 and half.bytes.get(0, 0) == 0 and half.bytes.get(1, 0) == 0
    assert half.bytes[2] > 0 and half.bytes[3] > 0
    total_full, total_half = full.meter.activation_bytes, half.meter.activation_bytes
    assert total_half < 0.65 * total_full, (total_half, total_full)
    for u in safe.units:
        for p in u.params:
            assert (p.grad is None) == u.frozen


def test_frozen_stays_frozen_when_peft_reenables_adapters():
    model = _tiny_bert(n_layers=2)
    safe = SAFE(model, _cfg())
    name = safe.unit_names[0]
    safe.freeze([name])
    model.base_model.set_adapter("default")  # PEFT turns requires_grad back on for the active adapter
    assert any(p.requires_grad for p in safe.units[0].params)
    safe.step(1)
    assert not any(p.requires_grad for p in safe.units[0].params)


def test_shared_parameters_freeze_only_with_their_last_owner():
    model = StackModel(n=3, shared=True)
    safe = SAFE(model, _cfg())
    shared = model.blocks[0].shared
    assert all(shared is u.params[-1] for u in safe.units)
    safe.freeze(["blocks.0", "blocks.1"])
    assert shared.requires_grad and not model.blocks[0].a.requires_grad
    safe.freeze(["blocks.2"])
    assert not shared.requires_grad
    if "wegeft-per-layer" in ADAPTER_MODELS:  # WeGeFT generators shared by all layers of a projection
        model = _wegeft_model(shared=True)
        safe = SAFE(model, _cfg())
        queries = [u.name for u in safe.units if u.name.endswith("query")]
        assert len(queries) == 3 and len({id(safe._by_name[n].params[0]) for n in queries}) == 1
        phi = safe._by_name[queries[0]].params[0]
        safe.freeze(queries[:2])
        assert phi.requires_grad
        safe.freeze(queries[2:])
        assert not phi.requires_grad


# ----------------------------------------------------------------------------------------------
# peftops adapters (the cross-method protocol)
# ----------------------------------------------------------------------------------------------
def _protocol_modules(model):
    return [m for m in model.modules() if getattr(type(m), "peftops_adapter", False)]


def _bert_base():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24,
                                  vocab_size=40, max_position_embeddings=32, num_labels=2, attn_implementation="eager")
    return transformers.BertForSequenceClassification(cfg)


def _aot_model(reparam="direct"):
    import peftops
    from peftops.aot import AoTConfig

    return peftops.apply(_bert_base(), AoTConfig(reparam=reparam, rank=4, modules_to_save=[])).train()


def _sift_model():
    import peftops
    from peftops.sift import SIFTConfig, sift_calibrate

    model = peftops.apply(_bert_base(), SIFTConfig(density=0.05, modules_to_save=[]))  # adapters only
    with force_backend("reference"):
        sift_calibrate(model, [_batch(vocab=30, b=2, s=6, seed=9)], progress=False)
    return model.train()


def _wegeft_model(shared=False):
    import peftops
    from peftops.wegeft import WeGeFTConfig

    model = peftops.apply(_bert_base(), WeGeFTConfig(r=4, alpha=8.0, share_generators=shared, modules_to_save=[]))
    for u in find_adapter_units(model):  # Φ starts at 0: make the generated branch non-trivial
        with torch.no_grad():
            u.module.phi.normal_(0, 0.1)
    return model.train()


def _stand_in_model():
    return StackModel(n=3)


def _protocol_class(module_name, class_name):
    """The real adapter class if its module exists and follows the protocol (else None: the
    stand-in covers the protocol until it does)."""
    import importlib

    try:
        cls = getattr(importlib.import_module(module_name), class_name, None)
    except ImportError:  # pragma: no cover - another engineer's module not there yet
        return None
    if cls is None or not getattr(cls, "peftops_adapter", False) or not hasattr(cls, "adapter_parameters"):
        return None
    return cls


ADAPTER_MODELS = {"stand-in": _stand_in_model}
if _protocol_class("peftops.aot", "AoTLayerBias"):
    ADAPTER_MODELS["aot-direct"] = _aot_model
    ADAPTER_MODELS["aot-kron"] = lambda: _aot_model("kron")  # shared factors freeze with the last layer
if _protocol_class("peftops.sift", "SIFTLinear"):
    ADAPTER_MODELS["sift"] = _sift_model
if _protocol_class("peftops.wegeft", "WeGeFTLinear"):
    ADAPTER_MODELS["wegeft-per-layer"] = _wegeft_model


@pytest.mark.parametrize("which", sorted(ADAPTER_MODELS))
def test_peftops_adapters_are_measured_and_frozen(which):
    model = ADAPTER_MODELS[which]()
    mods = _protocol_modules(model)
    safe = SAFE(model, _cfg(warmup_steps=1, ramp_end_step=2, final_threshold=1.0))
    assert [u.module for u in safe.units] == mods
    for u in safe.units:
        assert {id(p) for p in u.params} == {id(p) for p in u.module.adapter_parameters()}
    batch = _batch(vocab=30, b=2, s=6)
    with force_backend("reference"):
        model(**batch)
    scores = safe.end_step(0)
    assert set(scores) == set(safe.unit_names)
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    safe.begin_step(2)  # T(2) = 1.0 > every importance: all frozen
    assert len(safe.frozen) == len(safe.units)
    assert not any(p.requires_grad for u in safe.units for p in u.params)
    assert not any(p.requires_grad for p in model.parameters()), "an adapter parameter outside every unit still trains"


@pytest.mark.parametrize("which", sorted(ADAPTER_MODELS) + ["peft-lora"])
def test_frozen_top_unit_saves_nothing(which):
    """The top unit frozen while the units below train (its input still requires grad): inside
    its forward nothing is saved beyond what other ops already keep (ctx.needs_input_grad)."""
    model = _tiny_bert(n_layers=2) if which == "peft-lora" else ADAPTER_MODELS[which]()
    safe = SAFE(model, _cfg())
    safe.end_step(0)
    top = safe.units[-1]
    batch = _batch(vocab=30, b=2, s=6)

    def inside_bytes():
        with force_backend("reference"), _LayerSavedBytes(model, [top.module]) as meter:
            model(**batch)
        return meter.bytes.get(0, 0)

    live = inside_bytes()
    safe.freeze([top.name])
    assert inside_bytes() == 0, f"{which}: frozen unit {top.name} still saves tensors for backward"
    if not which.startswith("aot-"):  # AoT's saved ids/plan are shared by every layer (saved once, lower down)
        assert live > 0


# ----------------------------------------------------------------------------------------------
# transformers.Trainer, report, state, errors
# ----------------------------------------------------------------------------------------------
def test_callback_in_a_real_trainer_run(tmp_path):
    model = _tiny_bert(n_layers=2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (16, 8), generator=g)
    am = torch.ones(16, 8, dtype=torch.long)
    am[::2, 6:] = 0
    labels = torch.randint(0, 2, (16,), generator=g)
    data = [{"input_ids": ids[i], "attention_mask": am[i], "labels": labels[i]} for i in range(16)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    callback = safe_mod.SAFECallback(SAFEConfig(warmup_steps=2, ramp_end_step=4, final_threshold=1.0, max_tokens=16,
                                                allow_freezing_all=True))
    assert isinstance(callback, transformers.TrainerCallback)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    before = _hook_count(model)
    with force_backend("reference"):
        trainer.train()
    safe = callback.safe
    assert [e["step"] for e in safe.log] == list(range(6))
    assert all(len(e["scores"]) == len(safe.units) for e in safe.log[:2])  # warm-up steps measured
    assert not any("scores" in e for e in safe.log[2:])
    assert all(u.frozen for u in safe.units) and {u.frozen_at for u in safe.units} <= {3, 4}
    assert all(p not in trainer.optimizer.state for u in safe.units for p in u.params)
    assert _hook_count(model) <= before  # hooks removed at train end
    text = safe.report()
    assert safe.units[0].name in text and "freezing decisions" in text


def test_report_state_dict_and_errors():
    model = StackModel(n=3)
    safe = SAFE(model, _cfg())
    for t in range(3):
        safe.record_scores(t, {"blocks.0": 0.1, "blocks.1": 0.9, "blocks.2": 0.5})
        safe.step(t + 1)
    safe.step(4)  # T(4) = 0.4625: blocks.0
    assert safe.frozen == ["blocks.0"]
    text = safe.report()
    assert "blocks.2" in text and "step 4" in text and "1/3 units frozen" in text
    state = safe.state_dict()
    model2 = StackModel(n=3)
    safe2 = SAFE(model2, _cfg())
    safe2.load_state_dict(state)
    assert safe2.frozen == ["blocks.0"] and not model2.blocks[0].a.requires_grad
    assert safe2.scores() == safe.scores()
    with pytest.raises(ValueError, match="model: found no trainable adapter"):
        SAFE(nn.Linear(2, 2), _cfg())
    with pytest.raises(TypeError, match="config: expected a peftops.SAFEConfig"):
        SAFE(model, {"warmup_steps": 1})
    with pytest.raises(KeyError, match="unknown adapter units"):
        safe.freeze(["nope"])
    with pytest.raises(ValueError, match="global_step: expected an integer >= 1"):
        safe.step(0)
    with pytest.raises(TypeError, match="config_or_safe"):
        safe_mod.SAFECallback(3)
    assert find_adapter_units(nn.Linear(2, 2)) == []


def test_default_keeps_the_most_important_unit_training_instead_of_freezing_everything():
    model = StackModel(n=3)
    safe = SAFE(model, SAFEConfig(warmup_steps=1, ramp_end_step=2, final_threshold=1.0, max_tokens=None))
    safe.record_scores(0, {"blocks.0": 0.2, "blocks.1": 0.7, "blocks.2": 0.4})
    with pytest.warns(UserWarning, match=r"would freeze every adapter unit .* 'blocks.1'"):
        newly = safe.begin_step(2)
    assert sorted(newly) == ["blocks.0", "blocks.2"] and safe.frozen == ["blocks.0", "blocks.2"]
    assert any(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, 30, (2, 5))
    model(ids, labels=torch.tensor([0, 1]))["loss"].backward()  # still trains: no "does not require grad"
    with pytest.raises(ValueError, match=r"^names: freezing \['blocks.1'\] would leave nothing"):
        safe.freeze(["blocks.1"])
    assert safe.frozen == ["blocks.0", "blocks.2"]


def test_freezing_all_adapters_is_fine_when_something_else_trains():
    model = StackModel(n=2)
    head = model.head.requires_grad_(True)  # trains on: the adapters may all freeze without a warning
    safe = SAFE(model, SAFEConfig(warmup_steps=1, ramp_end_step=2, final_threshold=1.0, max_tokens=None))
    safe.record_scores(0, {"blocks.0": 0.2, "blocks.1": 0.7})
    safe.begin_step(2)
    assert sorted(safe.frozen) == ["blocks.0", "blocks.1"] and head.weight.requires_grad
