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
