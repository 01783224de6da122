"""Model-level API shared by every method, shaped like Hugging Face PEFT.

    cfg = peftops.SIFTConfig(density=0.01)
    model = peftops.apply(model, cfg)          # injects adapter modules, freezes the base
    ...train...
    peftops.save_adapter(model, "out/")         # adapter_config.json + adapter_model.safetensors
    model2 = peftops.load_adapter(base, "out/") # validated: method, names, shapes, dtypes
    peftops.merge(model2)                       # fold adapters into the base weights

A method is a class registered with ``@register_method`` that knows how to inject itself into a
model, list its adapter tensors, load them back and merge/unmerge. Several methods can be
applied to one model (their adapter tensors are saved under ``<method>::<name>`` keys).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

__all__ = [
    "AdapterConfig", "Method", "register_method", "get_method", "apply", "save_adapter", "load_adapter",
    "merge", "unmerge", "adapter_state_dict", "trainable_summary", "find_target_modules",
    "replace_module", "applied_configs", "check_state_matches",
]

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclasses.dataclass
class AdapterConfig:
    """Base of every method's config. ``target_modules``: module-name suffixes to adapt."""

    method: ClassVar[str] = ""
    target_modules: list[str] | None = None

    def validate(self) -> None:
        """Raise ValueError naming the field on a bad setting (subclasses extend)."""
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            if not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"target_modules: expected a list of non-empty strings, got {self.target_modules!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        d = dict(d)
        method = d.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"config: method {method!r} does not match {cls.__name__} ({cls.method!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown} for {cls.__name__}")
        cfg = cls(**d)
        cfg.validate()
        return cfg


class Method:
    """What a method implements to take part in apply/save/load/merge."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig

    def apply(self, model: nn.Module, config: AdapterConfig) -> None:
        raise NotImplementedError

    def adapter_state_dict(self, model: nn.Module, config: AdapterConfig) -> dict[str, torch.Tensor]:
        """The tensors that define the adapter (everything needed to rebuild it on a fresh base)."""
        raise NotImplementedError

    def load_adapter_state_dict(self, model: nn.Module, config: AdapterConfig, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def merge(self, model: nn.Module, config: AdapterConfig) -> None:
        raise NotImplementedError

    def unmerge(self, model: nn.Module, config: AdapterConfig) -> None:
        raise NotImplementedError


_METHODS: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a Method needs a non-empty name")
    _METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"method: unknown peftops method {name!r}; known: {sorted(_METHODS)}") from None


def applied_configs(model: nn.Module) -> list[AdapterConfig]:
    return list(getattr(model, "_peftops_configs", []))


# ----------------------------------------------------------------------------------------------
# Module surgery
# ----------------------------------------------------------------------------------------------
def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_target_modules(
    model: nn.Module, targets: Iterable[str], types: tuple[type, ...] = (nn.Linear,)
) -> list[tuple[str, nn.Module]]:
    """Modules of ``types`` whose dotted name equals a target or ends with ``.<target>``."""
    targets = list(targets)
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if name and isinstance(mod, types) and any(_matches(name, t) for t in targets)
    ]
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_state_matches(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str,
                        hint: str = "") -> None:
    """Raise ValueError unless ``state`` has exactly ``expected``'s names, each with its shape.
    ``what`` names the adapter in the message; ``hint`` says what the shapes depend on."""
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"state: {what} tensors do not fit this model (missing {missing[:5]}, unexpected {extra[:5]})")
    for k, ref in expected.items():
        if tuple(state[k].shape) != tuple(ref.shape):
            raise ValueError(f"state: tensor {k!r} has shape {list(state[k].shape)}, this model needs "
                             f"{list(ref.shape)}{f' ({hint})' if hint else ''}")


# ----------------------------------------------------------------------------------------------
# apply / merge
# ----------------------------------------------------------------------------------------------
def apply(model: nn.Module, config: AdapterConfig, *, freeze_base: bool = True) -> nn.Module:
    """Inject ``config``'s method into ``model`` in place (and return it).

    With ``freeze_base`` every parameter that exists before the call stops requiring grad, so
    only the adapter's own parameters train (the PEFT convention; classifier heads can be
    re-enabled with ``modules_to_save``-style code by the caller)."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config: expected a peftops AdapterConfig, got {type(config).__name__}")
    config.validate()
    method = get_method(config.method)
    if any(c.method == config.method for c in applied_configs(model)):
        raise ValueError(f"config: method {config.method!r} is already applied to this model")
    if freeze_base:  # the base, not the adapters of methods applied before this one
        adapters = {id(p) for m in model.modules() if getattr(type(m), "peftops_adapter", False)
                    for p in m.adapter_parameters()}
        for p in model.parameters():
            if id(p) not in adapters:
                p.requires_grad_(False)
    method.apply(model, config)
    model._peftops_configs = applied_configs(model) + [config]
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every applied adapter into the base weights (outputs unchanged within dtype tolerance)."""
    for cfg in applied_configs(model):
        get_method(cfg.method).merge(model, cfg)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for cfg in reversed(applied_configs(model)):
        get_method(cfg.method).unmerge(model, cfg)
    return model


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All adapter tensors of all applied methods, keyed ``<method>::<name>``."""
    cfgs = applied_configs(model)
    if not cfgs:
        raise ValueError("model: no peftops adapter is applied (call peftops.apply first)")
    out: dict[str, torch.Tensor] = {}
    for cfg in cfgs:
        for k, v in get_method(cfg.method).adapter_state_dict(model, cfg).items():
            out[f"{cfg.method}::{k}"] = v.detach().contiguous().cpu()
    return out


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``adapter_config.json`` (method, version, configs, tensor shapes/dtypes) and
    ``adapter_model.safetensors`` into ``directory``."""
    from safetensors.torch import save_file

    from . import __version__

    state = adapter_state_dict(model)
    os.makedirs(directory, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "peftops_version": __version__,
        "base_model_class": type(getattr(model, "_orig_mod", model)).__name__,  # torch.compile'd: the model
        "adapters": [c.to_dict() for c in applied_configs(model)],
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in state.items()},
    }
    save_file(state, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt", "peftops": "1"})
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def _read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path = os.path.join(directory, CONFIG_FILE)
    w_path = os.path.join(directory, WEIGHTS_FILE)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"directory: no {os.path.basename(p)} in {directory!s}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "adapters" not in meta or "tensors" not in meta:
        raise ValueError(f"{cfg_path}: not a peftops adapter config (missing 'adapters' or 'tensors')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    try:
        state = load_file(w_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{w_path}: corrupted or unreadable safetensors file ({e})") from None
    declared = meta["tensors"]
    if set(declared) != set(state):
        missing, extra = sorted(set(declared) - set(state)), sorted(set(state) - set(declared))
        raise ValueError(f"{w_path}: tensors do not match {CONFIG_FILE} (missing {missing[:5]}, unexpected {extra[:5]})")
    for k, v in state.items():
        d = declared[k]
        if list(v.shape) != list(d["shape"]) or str(v.dtype).replace("torch.", "") != d["dtype"]:
            raise ValueError(
                f"{w_path}: tensor {k!r} is {list(v.shape)} {v.dtype}, {CONFIG_FILE} declares {d['shape']} {d['dtype']}"
            )
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{w_path}: tensor {k!r} holds NaN/Inf values")
    return meta, state


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, freeze_base: bool = True) -> nn.Module:
    """Apply the saved methods to ``model`` (a fresh base) and load their tensors.

    Every tensor is checked against the config and against the model: a name the model does not
    have, a shape that does not fit, or a corrupted file raises ValueError naming what is wrong."""
    meta, state = _read_adapter(directory)
    for entry in meta["adapters"]:
        method = get_method(entry.get("method", ""))
        cfg = method.config_class.from_dict(entry)
        already = [c for c in applied_configs(model) if c.method == cfg.method]
        if not already:
            apply(model, cfg, freeze_base=freeze_base)
        else:
            cfg = already[0]
        prefix = f"{cfg.method}::"
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        method.load_adapter_state_dict(model, cfg, sub)
    # Last, so a method's own (more specific) check speaks first; shapes can coincide across models.
    saved_cls, cls = meta.get("base_model_class"), type(getattr(model, "_orig_mod", model)).__name__
    if saved_cls and saved_cls != cls:
        raise ValueError(f"model: the adapter in {directory!s} was saved from a {saved_cls}, this model is a {cls} "
                         "(a different base model)")
    return model


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------
def trainable_summary(model: nn.Module) -> dict[str, Any]:
    """Trainable vs total parameters (adapter-only parameters of frozen-base models included)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    methods = [c.method for c in applied_configs(model)]
    return {
        "trainable": trainable,
        "total": total,
        "percent": 100.0 * trainable / max(total, 1),
        "methods": methods,
        "text": f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100.0 * trainable / max(total, 1):.4f}",
    }
