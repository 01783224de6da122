"""Adapter units: what SAFE scores and freezes (one peftops adapter module or one Hugging Face PEFT tuner
layer, with the trainable parameters it owns) and how they are found in a model."""
from __future__ import annotations

import dataclasses
import sys

from torch import nn


@dataclasses.dataclass(eq=False)
class AdapterUnit:
    """One freezable adapter: a module, the trainable parameters it owns, its score history."""

    name: str
    module: nn.Module
    kind: str
    params: list[nn.Parameter]
    history: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (step, importance)
    frozen_at: int | None = None

    @property
    def frozen(self) -> bool:
        return self.frozen_at is not None

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def _peft_tuner_layer_class():
    if "peft" not in sys.modules:
        try:
            import peft  # noqa: F401
        except Exception:
            return None
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:
        return None
    return BaseTunerLayer


def _peft_params(layer) -> list[nn.Parameter]:
    out = []
    for attr in getattr(layer, "adapter_layer_names", ()):
        container = getattr(layer, attr, None)
        if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            continue
        for adapter in layer.active_adapters:
            if adapter not in container:
                continue
            entry = container[adapter]
            out.extend(entry.parameters() if isinstance(entry, nn.Module) else [entry])
    return out


def find_adapter_units(model: nn.Module) -> list[AdapterUnit]:
    """Every peftops adapter module and PEFT tuner layer of ``model`` (outermost match, module
    order) with its trainable parameters; units with none are left out."""
    tuner_cls = _peft_tuner_layer_class()
    units: list[AdapterUnit] = []
    taken: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        if getattr(type(mod), "peftops_adapter", False):
            params, kind = list(mod.adapter_parameters()), type(mod).__name__
        elif tuner_cls is not None and isinstance(mod, tuner_cls):
            params = _peft_params(mod)
            kind = f"{type(mod).__module__.split('.')[-2]}.{type(mod).__name__}"  # e.g. lora.Linear
        else:
            continue
        taken.append(name)
        seen, uniq = set(), []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                uniq.append(p)
        if uniq:
            units.append(AdapterUnit(name or type(mod).__name__, mod, kind, uniq))
    return units
