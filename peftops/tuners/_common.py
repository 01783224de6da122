"""What the WeGeFT and SIFT tuners share."""
from __future__ import annotations

from torch import nn


def cast_to_base_dtype(model: nn.Module, layer_cls: type, adapter_name: str) -> None:
    """PEFT's ``autocast_adapter_dtype=False``: the adapter's float Parameters take their base
    layer's dtype (peftops creates fp32 masters for 16-bit layers, PEFT's default)."""
    for mod in model.modules():
        if not isinstance(mod, layer_cls):
            continue
        dtype = mod.get_base_layer().weight.dtype
        for attr in mod.adapter_layer_names:
            d = getattr(mod, attr)
            p = d[adapter_name] if adapter_name in d else None
            if p is not None and p.is_floating_point() and p.dtype != dtype and not p.is_meta:
                d[adapter_name] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)


def off(layer) -> bool:
    """PEFT's disable_adapter(): True when the layer must compute as its base (a merged adapter is
    unmerged first, as PEFT's own layers do)."""
    if layer.disable_adapters:
        if layer.merged:
            layer.unmerge()
        return True
    return False


def linear_base(target: nn.Module, current_key: str, method: str) -> nn.Linear:
    """The nn.Linear a target is (or wraps, for a layer that already holds another adapter)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if current_key is None:
        raise ValueError("current_key: PEFT passed no module name")
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, nn.Linear):
        raise TypeError(f"target_modules: {current_key!r} is a {type(base).__name__}; {method} adapts nn.Linear "
                        "modules only")
    return base
