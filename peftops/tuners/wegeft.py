"""WeGeFT as a PEFT method: ``peft.get_peft_model(model, peftops.WeGeFTConfig(...))``.

    y = x Wᵀ + b + Σ_a s_a (x Ψ_aᵀ)(Φ_a Wᵀ)      over the active adapters a, s_a = α_a / r_a

The layer calls the same custom op as the native ``WeGeFTLinear`` (``peftops::wegeft_linear``), so
the fused kernels, ``torch.compile`` and the backward are shared. Several active adapters go through
one call: Σ_a s_a (x Ψ_aᵀ)(Φ_a Wᵀ) = (x [Ψ_1; Ψ_2 ...]ᵀ)([s_1Φ_1; s_2Φ_2 ...] Wᵀ).

Shared generators (``share_generators=True``, the default): every layer of a projection type holds
the same Φ, Ψ Parameters of an adapter in its ``wegeft_phi`` / ``wegeft_psi`` dicts. The file keeps
one copy per group (the first layer's key); loading fills the group back in. PEFT code that
re-creates adapter Parameters (dtype casts) is followed by a re-tie of the groups.

Merging computes every adapter's update from the original W: W' = W + Σ_merged s_a (W Φ_aᵀ) Ψ_a,
and unmerge restores W bit for bit from a copy taken at the first merge.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from torch import Tensor, nn

from ..kernels import wegeft as K
from ..model import autocast_operands
from ._common import cast_to_base_dtype, linear_base, off
from ..wegeft import WeGeFTConfig, _check_hparams, _resolve_targets, generator_key, new_generators, wegeft_linear

__all__ = ["WeGeFTLayer", "Linear", "WeGeFTModel"]


class WeGeFTLayer(BaseTunerLayer):
    adapter_layer_names = ("wegeft_phi", "wegeft_psi")
    other_param_names = ("wegeft_r", "wegeft_scaling", "wegeft_dropout", "wegeft_group", "wegeft_path",
                         "wegeft_backup")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.wegeft_phi = nn.ParameterDict({})
        self.wegeft_psi = nn.ParameterDict({})
        self.wegeft_r: dict[str, int] = {}
        self.wegeft_scaling: dict[str, float] = {}
        self.wegeft_dropout: dict[str, float] = {}
        self.wegeft_group: dict[str, str] = {}
        self.wegeft_path: dict[str, str] = {}
        self.wegeft_backup: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._original_weight: Optional[Tensor] = None
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"target_modules: WeGeFT adapts nn.Linear modules, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config: WeGeFTConfig, group: str,
                     phi: Optional[nn.Parameter] = None, psi: Optional[nn.Parameter] = None,
                     inference_mode: bool = False) -> None:
        _check_hparams(config.r, config.alpha, config.dropout, config.path, config.merge_backup)
        weight = self.get_base_layer().weight
        shape = (config.r, self.in_features)
        if phi is None:
            phi, psi = new_generators(shape, weight, config.upcast_generators, config.init_weights)
        self.wegeft_phi[adapter_name] = phi
        self.wegeft_psi[adapter_name] = psi
        self.wegeft_r[adapter_name] = int(config.r)
        self.wegeft_scaling[adapter_name] = float(config.alpha) / int(config.r)
        self.wegeft_dropout[adapter_name] = float(config.dropout)
        self.wegeft_group[adapter_name] = group
        self.wegeft_path[adapter_name] = config.path
        self.wegeft_backup[adapter_name] = config.merge_backup
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # Generators keep their own dtype (fp32 masters for 16-bit layers) and, when shared, their
        # identity: only a device move (which PEFT's re-tie then follows) creates new Parameters.
        target = device if device is not None else self.get_base_layer().weight.device
        for name in self.adapter_layer_names:
            d = getattr(self, name)
            if adapter_name in d and d[adapter_name].device != target and d[adapter_name].device.type != "meta":
                d[adapter_name] = nn.Parameter(d[adapter_name].detach().to(target),
                                               requires_grad=d[adapter_name].requires_grad)


class Linear(nn.Module, WeGeFTLayer):
    """A frozen nn.Linear with WeGeFT adapters (PEFT tuner layer)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: WeGeFTConfig, group: str,
                 phi: Optional[nn.Parameter] = None, psi: Optional[nn.Parameter] = None, **kwargs) -> None:
        super().__init__()
        WeGeFTLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, group, phi, psi, inference_mode=config.inference_mode)

    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.wegeft_phi]

    def _stacked(self, names: list[str], dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
        """(Φ, Ψ, s) for one call over ``names``: one adapter as is, several stacked with s_a in Φ."""
        if len(names) == 1:
            a = names[0]
            return self.wegeft_phi[a].to(dtype), self.wegeft_psi[a].to(dtype), self.wegeft_scaling[a]
        phi = torch.cat([self.wegeft_phi[a] * self.wegeft_scaling[a] for a in names]).to(dtype)
        psi = torch.cat([self.wegeft_psi[a] for a in names]).to(dtype)
        return phi, psi, 1.0

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if off(self):
            return self.base_layer(x, *args, **kwargs)
        names = self._active()
        if self.merged or not names:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        x, weight, bias = autocast_operands(x, base.weight, base.bias)
        phi, psi, scaling = self._stacked(names, weight.dtype)
        p = max(self.wegeft_dropout[a] for a in names) if self.training else 0.0
        return wegeft_linear(x, weight, bias, phi, psi, scaling, dropout_p=p, path=self.wegeft_path[names[0]])

    @torch.no_grad()
    def get_delta_weight(self, adapter: str) -> Tensor:
        """s (W Φᵀ) Ψ from the original W, in W's dtype (accumulated in fp32, fp64 for fp64)."""
        w0 = self._original_weight.to(self.weight.device) if self._original_weight is not None else self.weight
        acc = torch.float64 if w0.dtype == torch.float64 else torch.float32
        phi, psi = self.wegeft_phi[adapter].to(acc), self.wegeft_psi[adapter].to(acc)
        return ((w0.to(acc) @ phi.t()) @ psi * self.wegeft_scaling[adapter]).to(w0.dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """W ← W0 + Σ s_a (W0 Φ_aᵀ) Ψ_a over the merged adapters (each from the original W0)."""
        names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.wegeft_phi]
        if not names:
            return
        weight = self.get_base_layer().weight
        if self._original_weight is None:
            where = "cpu" if self.wegeft_backup[names[0]] == "cpu" else weight.device
            self._original_weight = weight.detach().to(where, copy=True)
        w0 = self._original_weight.to(weight.device)
        merged = self.merged_adapters + names
        phi, psi, scaling = self._stacked(merged, w0.dtype)
        new = K.wegeft_merge(w0, phi.detach(), psi.detach(), scaling)
        if safe_merge and not bool(torch.isfinite(new).all()):
            raise ValueError(f"adapter_names: merging {names} gives NaN/Inf weights; the adapter seems broken")
        weight.data.copy_(new)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original W bit for bit."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.get_base_layer().weight.data.copy_(self._original_weight)
        self._original_weight = None
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "wegeft." + super().__repr__()


class WeGeFTModel(BaseTuner):
    """The PEFT tuner for WeGeFT (see the module docstring)."""

    prefix: str = "wegeft_"
    tuner_layer_cls = WeGeFTLayer
    target_module_mapping: dict = {}  # inferred from the module names instead (q_proj / query), as natively

    def _prepare_adapter_config(self, peft_config: WeGeFTConfig, model_config: dict) -> WeGeFTConfig:
        if peft_config.target_modules is None:
            _resolve_targets(self.model, peft_config)
        return peft_config

    def _bank(self, adapter_name: str, config: WeGeFTConfig) -> dict:
        banks = self.__dict__.setdefault("_wegeft_banks", {})
        bank = banks.get(adapter_name)
        if bank is None or bank["config"] is not config:
            bank = banks[adapter_name] = {"config": config, "groups": {}}
        return bank["groups"]

    def _create_and_replace(self, config: WeGeFTConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        base = linear_base(target, current_key, "WeGeFT")
        group = generator_key(current_key, config.target_modules) if config.share_generators else current_key
        phi = psi = None
        if config.share_generators:
            groups = self._bank(adapter_name, config)
            if group in groups:
                phi, psi, first = groups[group]
                if phi.shape[1] != base.in_features:
                    raise ValueError(f"target_modules: shared generators of {group!r} need one in_features across its "
                                     f"layers, {first!r} has {phi.shape[1]} and {current_key!r} {base.in_features}; "
                                     "use share_generators=False")
            else:
                phi, psi = new_generators((config.r, base.in_features), base.weight, config.upcast_generators,
                                          config.init_weights)
                groups[group] = (phi, psi, current_key)
        if isinstance(target, Linear):
            target.update_layer(adapter_name, config, group, phi, psi, inference_mode=config.inference_mode)
        else:
            new = Linear(target, adapter_name, config, group, phi, psi)
            if adapter_name not in self.active_adapters:
                new.requires_grad_(False)  # an added adapter is not trainable until set_adapter
            self._replace_module(parent, target_name, new, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            cast_to_base_dtype(self.model, WeGeFTLayer, adapter_name)
        tie_shared_generators(self.model, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.__dict__.get("_wegeft_banks", {}).pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        seen: set[tuple] = set()
        for key in list(out):  # one copy of each shared generator: the first layer's key
            t = out[key]
            ident = (t.device, t.data_ptr(), tuple(t.shape), t.dtype)
            if t.data_ptr() and ident in seen:
                del out[key]
            seen.add(ident)
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        out = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        own = {k: v for k, v in model.state_dict(keep_vars=True).items() if ".wegeft_" in k}
        for key, t in out.items():  # before anything loads (PEFT's load_state_dict is strict=False)
            if key in own and tuple(t.shape) != tuple(own[key].shape):
                raise ValueError(f"state_dict: {key} has shape {list(t.shape)}, this model's is {list(own[key].shape)} "
                                 "(an adapter saved from another base model, or another r?)")
        for members in shared_groups(model, adapter_name).values():
            for attr in ("wegeft_phi", "wegeft_psi"):
                first = f"{members[0]}.{attr}.{adapter_name}"
                if first in out:
                    for name in members[1:]:
                        out.setdefault(f"{name}.{attr}.{adapter_name}", out[first])
        return out


def shared_groups(model: nn.Module, adapter_name: str) -> dict[int, list[str]]:
    """id(Φ) -> names of the WeGeFT layers holding that Φ for ``adapter_name`` (model order)."""
    groups: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, WeGeFTLayer) and adapter_name in mod.wegeft_phi:
            groups.setdefault(id(mod.wegeft_phi[adapter_name]), []).append(name)
    return groups


def tie_shared_generators(model: nn.Module, adapter_name: str) -> None:
    """Give every layer of a shared group the group's first Φ, Ψ again (after PEFT re-created them)."""
    first: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    for _, mod in model.named_modules():
        if not (isinstance(mod, WeGeFTLayer) and adapter_name in mod.wegeft_phi):
            continue
        group = mod.wegeft_group[adapter_name]
        if group not in first:
            first[group] = (mod.wegeft_phi[adapter_name], mod.wegeft_psi[adapter_name])
        else:
            mod.wegeft_phi[adapter_name], mod.wegeft_psi[adapter_name] = first[group]
