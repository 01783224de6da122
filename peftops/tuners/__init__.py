"""peftops' methods inside Hugging Face PEFT: ``peft.get_peft_model(model, peftops.WeGeFTConfig())``,
``peft.PeftModel.from_pretrained``, TRL's ``SFTTrainer(peft_config=...)``.

Importing peftops registers WeGeFT and SIFT with PEFT (``peftops._peft`` holds the one piece that
touches PEFT's internals). When the installed peft is outside the supported range the native
``peftops.apply`` path still works and ``PEFT_UNAVAILABLE`` says why the PEFT path does not.
AoT stays native (docs/peft.md says why); SAFE is a training controller over any adapter.
"""
from __future__ import annotations

import warnings

from .. import _peft

PEFT_UNAVAILABLE = _peft.unsupported_reason()
REGISTERED: list[str] = []

if PEFT_UNAVAILABLE is None:
    from ..sift import SIFTConfig
    from ..wegeft import WeGeFTConfig
    from .sift import SIFTModel
    from .wegeft import WeGeFTModel

    _peft.register("wegeft", WeGeFTConfig, WeGeFTModel, prefix=WeGeFTModel.prefix)
    _peft.register("sift", SIFTConfig, SIFTModel, prefix=SIFTModel.prefix)
    REGISTERED += ["wegeft", "sift"]
elif _peft.HAS_PEFT:
    warnings.warn(f"peftops: {PEFT_UNAVAILABLE}", stacklevel=2)
