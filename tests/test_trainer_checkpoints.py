"""Native peftops models (``peftops.apply``) in Hugging Face checkpoints, on a tiny Llama, CPU:

(a) WeGeFT's default generators, shared across layers: ``save_pretrained`` (safetensors) stores each
    shared tensor once and a freshly applied model loads it back bit for bit;
(b) Trainer + default WeGeFT + ``SAFECallback``: a run cut at a checkpoint and resumed by a new
    Trainer ends bit-equal to the uninterrupted run (parameters, logits, SAFE's whole state);
(c) the same with SIFT and ``SIFTCalibrationCallback`` (the index sets come back from the checkpoint);
(d) a checkpoint whose SAFE state does not fit raises "resume_from_checkpoint: ..." and changes nothing.

Bit-equality holds because on CPU every step is deterministic and the Trainer restores the RNG,
the data position, the optimizer and the scheduler; SAFE's part is restored by the callback.
"""
import copy
import json
import os
import shutil

import pytest
import torch

import peftops
import peftops.model as pm
import peftops.safe.callback as safe_callback
from helpers import force_backend
from peftops.safe import SAFE, SAFEConfig
from peftops.sift import sift_layers
from peftops.wegeft import LLAMA_TARGETS, WeGeFTConfig, WeGeFTLinear

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.filterwarnings(
    "ignore:SAFE. threshold:UserWarning", "ignore:SAFE. every adapter unit:UserWarning", "ignore::FutureWarning")

STEPS, SAVE_EVERY, CUT = 6, 2, 4


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _wegeft(seed=0):
    return peftops.apply(_tiny_llama(seed), WeGeFTConfig(r=4, alpha=8))


def _data(n=24, s=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, s), generator=g)
    am = torch.ones(n, s, dtype=torch.long)
    am[::3, -2:] = 0  # some padding: SAFE measures valid tokens only
    return [{"input_ids": ids[i], "attention_mask": am[i], "labels": ids[i]} for i in range(n)]


EVAL_IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


def _logits(model):
    with force_backend("reference"), torch.no_grad():
        return model.eval()(EVAL_IDS).logits


def _safe_config():
    # "current": measuring goes on after the warm-up, so the resumed run also needs the sampling
    # generator's state (max_tokens=8 < 32 tokens per batch); units freeze at steps 3 and 4
    return SAFEConfig(warmup_steps=2, ramp_end_step=5, final_threshold=0.15, score_mode="current",
                      measure_interval=1, max_tokens=8)


class _StopAt(transformers.TrainerCallback):
    """Ends the run after step ``at`` (and its checkpoint): the process that is killed there."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            control.should_training_stop = True


def _train(out, model, callbacks, resume=None, **extra):
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=5e-2, report_to=[],
        save_strategy="steps", save_steps=SAVE_EVERY, use_cpu=True, logging_strategy="no", disable_tqdm=True,
        seed=0, dataloader_num_workers=0, **extra)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(), callbacks=callbacks)
    with force_backend("reference"):
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"differ after the resume: {different[:5]}"
    assert torch.equal(_logits(a), _logits(b))


# ----------------------------------------------------------------------------------------------
# (a) save_pretrained of shared generators
# ----------------------------------------------------------------------------------------------
def test_default_wegeft_save_pretrained_stores_shared_generators_once_and_reloads_bit_equal(tmp_path):
    base_bytes = sum(v.numel() * v.element_size() for v in _tiny_llama().state_dict().values())
    model = _wegeft()
    with torch.no_grad():  # trained-looking generators (Φ starts at 0)
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(tmp_path)  # raised "contained shared tensors" when every layer saved Φ, Ψ
    saved = safetensors_torch.load_file(os.path.join(tmp_path, "model.safetensors"))
    gens = sorted(k for k in saved if k.endswith((".phi", ".psi")))
    # one copy per target, under its first layer (the name named_parameters() gives it)
    owner = {t: next(n for n, m in model.named_modules() if n.endswith(t) and isinstance(m, WeGeFTLinear))
             for t in LLAMA_TARGETS}
    assert gens == sorted(f"{owner[t]}.{g}" for t in LLAMA_TARGETS for g in ("phi", "psi"))
    assert gens == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    gen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert sum(v.numel() * v.element_size() for v in saved.values()) == base_bytes + gen_bytes

    fresh = _wegeft(seed=1)  # another seed: every tensor differs before the load
    result = fresh.load_state_dict(saved, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_state(fresh, model)
    layers = fresh.model.layers
    assert layers[1].self_attn.q_proj.phi is layers[0].self_attn.q_proj.phi  # still shared
    assert len([p for p in fresh.parameters() if p.requires_grad]) == 2 * len(LLAMA_TARGETS)
    # the native adapter file's contents are unchanged: <target>.phi/psi
    assert sorted(pm.adapter_state_dict(fresh)) == sorted(f"wegeft::{t}.{g}" for t in LLAMA_TARGETS for g in ("phi", "psi"))

    # assign=True hands the owner new Parameters: the sharers follow them
    other = _wegeft(seed=2)
    other.load_state_dict({k: v.clone() for k, v in saved.items()}, strict=True, assign=True)
    assert other.model.layers[1].mlp.down_proj.psi is other.model.layers[0].mlp.down_proj.psi
    _assert_same_state(other, model)
    # an aliased state dict (torch.save of one with every layer's entry) still loads; the sharer's
    # entries are the owner's tensors, so ignoring them loses nothing
    aliased = dict(saved)
    for n, m in model.named_modules():
        if isinstance(m, WeGeFTLinear) and m.generator_owner is not None:
            aliased[f"{n}.phi"], aliased[f"{n}.psi"] = m.phi.detach(), m.psi.detach()
    again = _wegeft(seed=3)
    result = again.load_state_dict(aliased, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_state(again, model)
    # deepcopy and .to() keep the sharing and the state dict's single copies
    clone = copy.deepcopy(model).to(torch.float64)
    assert clone.model.layers[1].self_attn.v_proj.psi is clone.model.layers[0].self_attn.v_proj.psi
    assert clone.model.layers[1].self_attn.v_proj.generator_owner is clone.model.layers[0].self_attn.v_proj
    assert sorted(k for k in clone.state_dict() if k.endswith((".phi", ".psi"))) == gens


def test_generator_owner_errors():
    a = WeGeFTLinear(torch.nn.Linear(4, 3), r=2, alpha=4)
    b = WeGeFTLinear(torch.nn.Linear(4, 3), r=2, alpha=4, generator_owner=a)
    assert b.phi is a.phi and b.psi is a.psi and b.generator_owner is a and a.generator_owner is None
    with pytest.raises(TypeError, match="^generator_owner: expected a WeGeFTLinear"):
        WeGeFTLinear(torch.nn.Linear(4, 3), r=2, generator_owner=torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="^generator_owner: expected the layer that owns"):
        WeGeFTLinear(torch.nn.Linear(4, 3), r=2, generator_owner=b)
    with pytest.raises(ValueError, match="^generator_owner: phi/psi must be the owner's"):
        WeGeFTLinear(torch.nn.Linear(4, 3), r=2, generator_owner=a, phi=torch.nn.Parameter(torch.zeros(2, 4)))


# ----------------------------------------------------------------------------------------------
# (b) Trainer + WeGeFT + SAFE: resume
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def safe_runs(tmp_path_factory):
    """The uninterrupted run, and the run killed after step CUT (checkpoints every SAVE_EVERY steps)."""
    root = tmp_path_factory.mktemp("safe_runs")
    full = _wegeft()
    full_cb = peftops.SAFECallback(_safe_config())
    _train(root / "full", full, [full_cb])
    _train(root / "cut", _wegeft(), [peftops.SAFECallback(_safe_config()), _StopAt(CUT)])
    assert sorted(os.listdir(root / "cut")) == [f"checkpoint-{s}" for s in range(SAVE_EVERY, CUT + 1, SAVE_EVERY)]
    log = full_cb.safe.log
    # what makes the resume a test: units froze before the cut and at the first resumed step
    assert any(e["newly_frozen"] for e in log if e["step"] < CUT)
    assert any(e["newly_frozen"] for e in log if e["step"] == CUT)
    return {"root": root, "model": full, "callback": full_cb}


def _resumed_callback(trainer):
    found = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "SAFECallback"]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("checkpoint,variant", [
    (CUT, "config"),           # SAFECallback(SAFEConfig): the SAFE is built at train begin
    (CUT, "safe"),             # SAFECallback(SAFE(model, config)) built by the user before the Trainer
    (CUT, "restore-option"),   # restore_callback_states_from_checkpoint=True: transformers rebuilds the callback
    (SAVE_EVERY, "config"),    # cut at the end of the warm-up
])
def test_safe_trainer_resume_is_bit_equal_to_the_uninterrupted_run(safe_runs, checkpoint, variant):
    model = _wegeft()
    cb = peftops.SAFECallback(SAFE(model, _safe_config()) if variant == "safe" else _safe_config())
    trainer = _train(safe_runs["root"] / "cut", model, [cb], resume=safe_runs["root"] / "cut" / f"checkpoint-{checkpoint}",
                     restore_callback_states_from_checkpoint=variant == "restore-option")
    cb = _resumed_callback(trainer)
    full_safe = safe_runs["callback"].safe
    assert cb.safe.frozen == full_safe.frozen and cb.safe.frozen
    assert [u.frozen_at for u in cb.safe.units] == [u.frozen_at for u in full_safe.units]
    assert cb.safe.state_dict() == full_safe.state_dict()  # scores, log, sampling generator
    _assert_same_state(model, safe_runs["model"])
    frozen = [p for u in cb.safe.units if u.frozen for p in u.params if not p.requires_grad]
    assert frozen and all(p not in trainer.optimizer.state for p in frozen)


def test_safe_resume_without_its_state_diverges(safe_runs, monkeypatch):
    """The control: the same resume with SAFE's checkpoint state ignored (what happened before)."""
    monkeypatch.setattr(safe_callback, "_checkpoint_safe_state", lambda state, name: None)
    model = _wegeft()
    cb = peftops.SAFECallback(_safe_config())
    _train(safe_runs["root"] / "cut", model, [cb], resume=safe_runs["root"] / "cut" / f"checkpoint-{CUT}")
    assert cb.safe.frozen != safe_runs["callback"].safe.frozen
    assert not torch.equal(_logits(model), _logits(safe_runs["model"]))


def test_safe_state_round_trips_through_json(safe_runs):
    path = safe_runs["root"] / "cut" / f"checkpoint-{CUT}" / "trainer_state.json"
    with open(path) as f:
        entry = json.load(f)["stateful_callbacks"]["SAFECallback"]
    assert entry["args"]["config_or_safe"] == json.loads(json.dumps(vars(_safe_config())))
    state = entry["attributes"]["safe_state"]
    assert state["step"] == CUT - 1 and state["frozen"] and set(state["sampling"]) == {"cpu"}
    # a SAFE loading it prepares step CUT as the uninterrupted run did
    model = _wegeft()
    safe = SAFE(model, _safe_config(), start_step=CUT)
    safe.load_state_dict(state)
    want = safe_runs["callback"].safe.state_dict()
    got = safe.state_dict()
    assert got["step"] == CUT and got["log"][:CUT] == want["log"][:CUT] and len(got["log"]) == CUT + 1
    assert got["log"][CUT] == {k: v for k, v in want["log"][CUT].items() if k != "scores"}  # not measured yet
    assert got["armed"] and got["log"][CUT]["measuring"]  # hooks live for step CUT's measurement
    frozen_by_cut = {n: t for n, t in want["frozen"].items() if t <= CUT}
    assert got["frozen"] == frozen_by_cut and len(frozen_by_cut) > len(state["frozen"])
    safe.remove()


# ----------------------------------------------------------------------------------------------
# (c) Trainer + SIFT + SIFTCalibrationCallback: resume
# ----------------------------------------------------------------------------------------------
def _sift():
    return peftops.apply(_tiny_llama(), peftops.SIFTConfig(density=0.05))


def test_sift_trainer_resume_restores_the_index_sets_and_is_bit_equal(tmp_path, monkeypatch):
    import peftops.sift as sift_mod

    full = _sift()
    _train(tmp_path / "full", full, [peftops.SIFTCalibrationCallback(progress=False)])
    _train(tmp_path / "cut", _sift(), [peftops.SIFTCalibrationCallback(progress=False), _StopAt(CUT)])
    calls = []
    real = sift_mod.sift_calibrate
    monkeypatch.setattr(sift_mod, "sift_calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _sift()
    _train(tmp_path / "cut", model, [peftops.SIFTCalibrationCallback(progress=False)],
           resume=tmp_path / "cut" / f"checkpoint-{CUT}")
    assert not calls, "the resumed run calibrated again instead of loading the checkpoint's index sets"
    pairs = list(zip(sift_layers(model), sift_layers(full)))
    assert pairs and all(a.selected and torch.equal(a.indices, b.indices) for (_, a), (_, b) in pairs)
    _assert_same_state(model, full)


# ----------------------------------------------------------------------------------------------
# (d) a checkpoint's SAFE state that does not fit
# ----------------------------------------------------------------------------------------------
def _corrupt_frozen(s):
    s["frozen"]["model.layers.9.nope"] = 3


def _corrupt_history(s):
    s["history"][next(iter(s["history"]))].append(["x", 0.5])


def _corrupt_units(s):
    s["units"] = s["units"][1:]


def _corrupt_sampling(s):
    s["sampling"]["cpu"] = "zz"


def _corrupt_log(s):
    s["log"][-1]["newly_frozen"] = ["model.layers.9.nope"]


def _corrupt_step(s):
    s["step"] = "three"


@pytest.mark.parametrize("corrupt,what", [
    (_corrupt_frozen, r"state: frozen: unknown adapter unit 'model.layers.9.nope'"),
    (_corrupt_history, r"state: history\[.*\]\[\d+\]: expected an integer step >= 0"),
    (_corrupt_units, r"state: units: the state's adapter units are not this SAFE's \(missing \['model.layers.0"),
    (_corrupt_sampling, r"state: sampling\['cpu'\]: not a torch.Generator state"),
    (_corrupt_log, r"state: log\[\d+\]\['newly_frozen'\]: unknown adapter unit"),
    (_corrupt_step, r"state: step: expected an integer step >= 0 or None, got 'three'"),
])
def test_resume_with_a_corrupted_safe_state_raises_and_changes_nothing(safe_runs, tmp_path, corrupt, what):
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(safe_runs["root"] / "cut" / f"checkpoint-{CUT}", ckpt)
    with open(ckpt / "trainer_state.json") as f:
        trainer_state = json.load(f)
    corrupt(trainer_state["stateful_callbacks"]["SAFECallback"]["attributes"]["safe_state"])
    with open(ckpt / "trainer_state.json", "w") as f:
        json.dump(trainer_state, f)
    model = _wegeft()
    cb = peftops.SAFECallback(_safe_config())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(ValueError, match=r"^resume_from_checkpoint: the checkpoint's SAFE state \(trainer_state.json, "
                                         r"stateful_callbacks\['SAFECallback'\]\) does not fit this run: " + what):
        _train(tmp_path / "out", model, [cb], resume=ckpt)
    # SAFE changed nothing: no SAFE kept, nothing frozen, no hook left, the model free for another SAFE
    assert cb.safe is None
    assert all(p.requires_grad for p in model.parameters() if p.dtype.is_floating_point and
               any(p is q for m in model.modules() if isinstance(m, WeGeFTLinear) for q in m.adapter_parameters()))
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    SAFE(model, _safe_config()).remove()


def test_resume_from_a_checkpoint_without_safe_state_warns(safe_runs, tmp_path):
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(safe_runs["root"] / "cut" / f"checkpoint-{CUT}", ckpt)
    with open(ckpt / "trainer_state.json") as f:
        trainer_state = json.load(f)
    del trainer_state["stateful_callbacks"]["SAFECallback"]  # written without SAFECallback
    with open(ckpt / "trainer_state.json", "w") as f:
        json.dump(trainer_state, f)
    cb = peftops.SAFECallback(_safe_config())
    with pytest.warns(UserWarning, match=f"^SAFE: resuming at step {CUT} from a checkpoint without SAFE state"):
        _train(tmp_path / "out", _wegeft(), [cb], resume=ckpt)
    assert cb.safe.log[0]["step"] == CUT


def test_load_state_dict_is_all_or_nothing():
    model = _wegeft()
    safe = SAFE(model, _safe_config())
    names = safe.unit_names
    state = safe.state_dict()
    state["frozen"] = {names[0]: 0}
    state["history"][names[0]] = [[0, 0.01]]
    state["log"] = [{"step": 0, "threshold": 0.0, "measuring": True, "newly_frozen": [], "scores": {"nope": 0.5}}]
    before = safe.state_dict()
    with pytest.raises(ValueError, match=r"^state: log\[0\]\['scores'\]: unknown adapter unit 'nope'"):
        safe.load_state_dict(state)
    assert safe.state_dict() == before and not safe.frozen
    assert all(p.requires_grad for u in safe.units for p in u.params)
    with pytest.raises(TypeError, match="^state: expected the dict of SAFE.state_dict()"):
        safe.load_state_dict([])
    with pytest.raises(ValueError, match=r"^state: unknown fields \['bogus'\]"):
        safe.load_state_dict({**before, "bogus": 1})
    with pytest.raises(ValueError, match=r"^state: version: expected 1, got True"):
        safe.load_state_dict({**before, "version": True})
    with pytest.raises(ValueError, match="^config_or_safe: expected a SAFEConfig's fields"):
        peftops.SAFECallback({"warmup_steps": 1, "nope": 2})
    safe.remove()
