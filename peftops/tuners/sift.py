"""SIFT as a PEFT method: ``peft.get_peft_model(model, peftops.SIFTConfig(...))``.

    y = x (W0 + scatter(I_a, δ_a))ᵀ + b      for the active adapter a

Each adapter holds its index set ``sift_indices[a]`` (int64 [k], ascending flat indices into W0,
saved with the adapter) and its trainable increments ``sift_delta[a]`` (fp32 [k]). One active
adapter runs the functional custom op ``peftops::sift_linear`` (SDDMM weight gradient, never a
dense ∇W). Unlike the native ``SIFTLinear``, which keeps W0 + δ merged in the weight in place,
this layer leaves W0 untouched (PEFT's disable/unload/multi-adapter contract) and rebuilds
W0 + δ transiently in forward: one extra weight-sized buffer per call. Several active adapters
(index sets may overlap) add up densely: W0 + Σ_a scatter(I_a, δ_a).

Index sets come from ``peftops.sift_calibrate(peft_model, batches)`` (``init_indices="calibrate"``,
as PEFT's data-driven inits such as EVA) or at random (``init_indices="random"``). Until then a
training forward raises. ``merge`` writes W[I] = round(W0[I] + δ) and keeps W0[I] (k entries per
adapter) so ``unmerge`` is bit-exact.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from torch import Tensor, nn

from ..model import autocast_operands
from ._common import cast_to_base_dtype, linear_base, off
from ..sift import (SIFTConfig, _acc_dtype, _check_density, _check_new_indices, _default_targets,
                    _scatter_merged_op, check_loaded_indices, random_indices, sift_linear)

__all__ = ["SIFTLayer", "Linear", "SIFTModel"]


class SIFTLayer(BaseTunerLayer):
    adapter_layer_names = ("sift_delta",)
    other_param_names = ("sift_indices", "sift_density")
    sift_calibration_target = True  # sift_calibrate selects this layer's active index set

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.sift_delta = nn.ParameterDict({})
        self.sift_indices = BufferDict({}, persistent=True)
        self.sift_density: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._merge_backup: list[tuple[Tensor, Tensor]] = []
        self._calibrating = False
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"target_modules: SIFT adapts nn.Linear modules, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config: SIFTConfig, inference_mode: bool = False) -> None:
        density = _check_density(config.density)
        weight = self.get_base_layer().weight
        acc = _acc_dtype(weight.dtype)
        self.sift_density[adapter_name] = density
        self.sift_delta[adapter_name] = nn.Parameter(torch.zeros(0, dtype=acc, device=weight.device))
        self.sift_indices[adapter_name] = torch.zeros(0, dtype=torch.int64, device=weight.device)
        if config.init_indices == "random":
            self._install(adapter_name, random_indices(weight, density))
            if not config.init_weights and not self.sift_delta[adapter_name].is_meta:
                with torch.no_grad():
                    self.sift_delta[adapter_name].normal_(0.0, 0.02)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _install(self, adapter_name: str, indices: Tensor) -> None:
        """Index set I (sorted here) with δ = 0; δ keeps its Parameter identity (an optimizer built
        before calibration still owns it)."""
        weight = self.get_base_layer().weight
        delta = self.sift_delta[adapter_name]
        if delta.is_meta:  # low_cpu_mem_usage: shapes only, the checkpoint's tensors are assigned later
            # (buffers stay real under PEFT's init_empty_weights: PEFT moves them to the base's device)
            self.sift_indices[adapter_name] = torch.zeros(indices.numel(), dtype=torch.int64, device=weight.device)
            self.sift_delta[adapter_name] = nn.Parameter(torch.empty(indices.numel(), dtype=delta.dtype,
                                                                     device="meta"), requires_grad=delta.requires_grad)
            return
        idx = torch.sort(indices.detach().to(device=weight.device, dtype=torch.int64)).values
        self.sift_indices[adapter_name] = idx
        delta.data = torch.zeros(idx.numel(), dtype=delta.dtype, device=weight.device)
        delta.grad = None

    # -- the calibration protocol of peftops.sift_calibrate ------------------------------------
    @property
    def _calib_adapter(self) -> str:
        names = [a for a in self.active_adapters if a in self.sift_delta]
        if len(names) != 1:
            raise ValueError(f"model: sift_calibrate selects the index set of one active SIFT adapter, this layer has "
                             f"{names} active (peft_model.set_adapter(name) first)")
        return names[0]

    @property
    def density(self) -> float:
        return self.sift_density[self._calib_adapter]

    @property
    def selected(self) -> bool:
        return self.sift_indices[self._calib_adapter].numel() > 0

    def set_indices(self, indices: Tensor) -> None:
        _check_new_indices(indices, self.get_base_layer().weight)
        self._install(self._calib_adapter, indices)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # δ stays fp32 (fp64 for fp64 layers) whatever the base dtype; indices stay int64.
        target = device if device is not None else self.get_base_layer().weight.device
        for d in (self.sift_delta, self.sift_indices):
            if adapter_name in d and d[adapter_name].device != target and d[adapter_name].device.type != "meta":
                t = d[adapter_name]
                d[adapter_name] = nn.Parameter(t.detach().to(target), requires_grad=t.requires_grad) \
                    if isinstance(t, nn.Parameter) else t.to(target)

    def resize_for_load(self, adapter_name: str, indices: Tensor, key: str) -> None:
        """Before a checkpoint loads: check its index set and give this adapter room for it."""
        check_loaded_indices(f"state_dict: {key}", indices, self.get_base_layer().weight)
        if adapter_name in self.sift_delta and self.sift_indices[adapter_name].numel() != indices.numel():
            self._install(adapter_name, torch.zeros(indices.numel(), dtype=torch.int64))


class Linear(nn.Module, SIFTLayer):
    """A frozen nn.Linear with SIFT adapters (PEFT tuner layer)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SIFTConfig, **kwargs) -> None:
        super().__init__()
        SIFTLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, inference_mode=config.inference_mode)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if off(self):
            return self.base_layer(x, *args, **kwargs)
        names = [a for a in self.active_adapters if a in self.sift_delta]
        if self.merged or not names or self._calibrating:
            return self.base_layer(x, *args, **kwargs)
        empty = [a for a in names if self.sift_indices[a].numel() == 0]
        if empty:
            if torch.is_grad_enabled() and any(self.sift_delta[a].requires_grad for a in empty):
                raise RuntimeError(f"SIFT adapter {empty[0]!r} has no index set yet: run peftops.sift_calibrate("
                                   "peft_model, batches) (or load an adapter) before training, or use "
                                   "init_indices='random'; evaluate under torch.no_grad() to use the base weights")
            names = [a for a in names if a not in empty]
            if not names:
                return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        x, weight, bias = autocast_operands(x, base.weight, base.bias)
        if len(names) == 1:
            a = names[0]
            return sift_linear(x, weight, bias, self.sift_indices[a], self.sift_delta[a])
        acc = _acc_dtype(weight.dtype)
        flat = weight.reshape(-1).to(acc)
        for a in names:
            flat = flat.index_add(0, self.sift_indices[a], self.sift_delta[a].to(acc))
        return F.linear(x, flat.to(weight.dtype).view_as(weight), bias)

    @torch.no_grad()
    def get_delta_weight(self, adapter: str) -> Tensor:
        """scatter(I, δ) as a dense fp32 [d_out, d_in] tensor (the increment merge rounds into W)."""
        w = self.get_base_layer().weight
        out = torch.zeros(w.numel(), dtype=_acc_dtype(w.dtype), device=w.device)
        out[self.sift_indices[adapter]] = self.sift_delta[adapter].to(out.dtype)
        return out.view(w.shape)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """W[I] ← round(W[I] + δ) per adapter (k entries each), W[I] kept for the exact unmerge."""
        weight = self.get_base_layer().weight
        for a in check_adapters_to_merge(self, adapter_names):
            if a not in self.sift_delta or self.sift_indices[a].numel() == 0:
                continue
            acc = _acc_dtype(weight.dtype)  # δ may be 16-bit after model.half(): the merge rounds once in acc
            idx, delta = self.sift_indices[a], self.sift_delta[a].detach().to(acc)
            before = weight.view(-1)[idx].clone()
            if safe_merge and not bool(torch.isfinite(before.to(acc) + delta).all()):
                raise ValueError(f"adapter_names: merging {a!r} gives NaN/Inf weights; the adapter seems broken")
            _scatter_merged_op(weight.data, idx, before.to(acc), delta)
            self._merge_backup.append((idx, before))
            self.merged_adapters.append(a)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self._merge_backup:
            idx, before = self._merge_backup.pop()
            weight.view(-1)[idx] = before
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "sift." + super().__repr__()


class SIFTModel(BaseTuner):
    """The PEFT tuner for SIFT (see the module docstring)."""

    prefix: str = "sift_"
    tuner_layer_cls = SIFTLayer
    target_module_mapping: dict = {}  # inferred from the module names instead, as natively

    def _prepare_adapter_config(self, peft_config: SIFTConfig, model_config: dict) -> SIFTConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = list(_default_targets(self.model))
        return peft_config

    def _create_and_replace(self, config: SIFTConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        linear_base(target, current_key, "SIFT")
        if isinstance(target, Linear):
            target.update_layer(adapter_name, config, inference_mode=config.inference_mode)
        else:
            new = Linear(target, adapter_name, config)
            if adapter_name not in self.active_adapters:
                new.requires_grad_(False)
            self._replace_module(parent, target_name, new, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            cast_to_base_dtype(self.model, SIFTLayer, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        out = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        for name, mod in model.named_modules():
            key = f"{name}.sift_indices.{adapter_name}"
            if isinstance(mod, SIFTLayer) and key in out:
                mod.resize_for_load(adapter_name, out[key], key)
        return out
