"""Model-level API shared by every method, shaped like Hugging Face PEFT.

    cfg = peftops.SIFTConfig(density=0.01)
    model = peftops.apply(model, cfg)          # injects adapter modules, freezes the base
    ...train...
    peftops.save_adapter(model, "out/")         # peftops_adapter.json + peftops_adapter.safetensors
    model2 = peftops.load_adapter(base, "out/") # validated: method, names, shapes, dtypes
    peftops.merge(model2)                       # fold adapters into the base weights

A method is a class registered with ``@register_method`` that knows how to inject itself into a
model, list its adapter tensors, load them back and merge/unmerge. Several methods can be
applied to one model (their adapter tensors are saved under ``<method>::<name>`` keys).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import threading
from typing import Any, ClassVar, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from ._peft import PeftConfigBase, peft_type_or_name

__all__ = [
    "AdapterConfig", "Method", "register_method", "get_method", "apply", "save_adapter", "load_adapter",
    "merge", "unmerge", "adapter_state_dict", "trainable_summary", "find_target_modules",
    "replace_module", "applied_configs", "check_state_matches", "load_checked_state", "disable_adapters",
]

FORMAT_VERSION = 1
# Not PEFT's names: a native folder can't be mistaken for a PEFT one (peft.PeftModel.from_pretrained
# reads adapter_config.json / adapter_model.safetensors). Folders of earlier peftops versions used
# PEFT's names with peftops' schema; they still load.
CONFIG_FILE = "peftops_adapter.json"
WEIGHTS_FILE = "peftops_adapter.safetensors"
LEGACY_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclasses.dataclass
class AdapterConfig:
    """Base of every method's config. ``target_modules``: module-name suffixes to adapt.
    ``modules_to_save``: modules trained in full and saved with the adapter (a new task head), as
    in PEFT; None = the head a transformers ``*ForSequenceClassification`` / ``*ForTokenClassification``
    / ``*ForQuestionAnswering`` / ``*ForMultipleChoice`` model adds (``classifier``, ``score``,
    ``qa_outputs``), resolved at ``apply``; ``[]`` = none."""

    method: ClassVar[str] = ""
    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        """Raise ValueError naming the field on a bad setting (subclasses extend)."""
        for field in ("target_modules", "modules_to_save"):
            setattr(self, field, _name_list(field, getattr(self, field)))
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules: expected at least one module name (None: the method's defaults)")

    def __post_init__(self):
        self.validate()  # a bad setting fails where it is written

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


ALL_LINEAR = "all-linear"


def _name_list(field: str, value, alternatives: str = ""):
    """None, or ``value`` (one name, or a list / tuple / set of non-empty names) as a list."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (set, frozenset)):
        value = sorted(value, key=str)
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) and t for t in value):
        raise ValueError(f"{field}: expected {alternatives}a list of non-empty strings, got {value!r}")
    return list(value)


def _help(text: str, default=None, **kw):
    """A dataclass field with PEFT-style help text."""
    if "default_factory" in kw:
        return dataclasses.field(metadata={"help": text}, **kw)
    return dataclasses.field(default=default, metadata={"help": text})


@dataclasses.dataclass
class PeftMethodConfig(AdapterConfig, PeftConfigBase):
    """Base of the configs that work both ways: ``peftops.apply(model, cfg)`` and
    ``peft.get_peft_model(model, cfg)`` (a ``peft.PeftConfig`` whenever peft is installed).

    Target selection follows PEFT's rules on both paths: a list of names matches a module whose
    dotted name equals an entry or ends with ``.<entry>``; a string is a regular expression matched
    against the whole name, or ``"all-linear"`` (every nn.Linear but the output / task head);
    ``exclude_modules`` the same way; ``layers_to_transform`` keeps only the given layer indices
    (the number after ``layers_pattern``, e.g. ``layers``, or the first numbered component)."""

    target_modules: Optional[Union[list[str], str]] = _help(
        "Modules to adapt: a list of names (exact, or the last components of the dotted name), a regex matched "
        "against the whole name, or 'all-linear'. None: the method's defaults for the architecture.")
    exclude_modules: Optional[Union[list[str], str]] = _help(
        "Modules never adapted, given like target_modules.")
    layers_to_transform: Optional[Union[list[int], int]] = _help(
        "Adapt only these layer indices (the number after layers_pattern in the module name).")
    layers_pattern: Optional[Union[list[str], str]] = _help(
        "Name of the layer container whose index layers_to_transform reads, e.g. 'layers' or 'h'; None: the first "
        "numbered component.")
    modules_to_save: Optional[list[str]] = _help(
        "Modules trained in full and saved with the adapter (a new task head). None: the head a transformers "
        "*ForSequenceClassification / *ForTokenClassification / *ForQuestionAnswering model adds.")
    bias: str = _help("Which biases train: only 'none' (biases stay frozen) is supported.", "none")
    target_parameters: Optional[list[str]] = _help(
        "PEFT's parameter targeting; peftops adapts nn.Linear modules only, so this must stay None.")
    init_weights: bool = _help(
        "True: the adapter starts as the identity (outputs equal the base model's). False: a random, non-identity "
        "start (for tests).", True)

    def __post_init__(self):
        PeftConfigBase.__post_init__(self)
        self.peft_type = peft_type_or_name(self.method.upper())
        AdapterConfig.__post_init__(self)

    def validate(self) -> None:
        for field in ("target_modules", "exclude_modules"):
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, str):
                if not value:
                    raise ValueError(f"{field}: expected a non-empty regex, 'all-linear' or a list of names, got ''")
                if value != ALL_LINEAR:
                    try:
                        re.compile(value)
                    except re.error as e:
                        raise ValueError(f"{field}: {value!r} is not a valid regular expression ({e})") from None
                continue
            setattr(self, field, _name_list(field, value, "a regex, 'all-linear' or "))
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules: expected at least one module name (None: the method's defaults)")
        self.modules_to_save = _name_list("modules_to_save", self.modules_to_save)
        layers = self.layers_to_transform
        if layers is not None:
            items = [layers] if not isinstance(layers, (list, tuple)) else list(layers)
            if not all(type(i) is int and i >= 0 for i in items):
                raise ValueError(f"layers_to_transform: expected a layer index or a list of them (ints >= 0), got "
                                 f"{layers!r}")
            if isinstance(self.target_modules, str):
                raise ValueError("layers_to_transform: only works with a list of target_modules (as in PEFT); put the "
                                 "layer indices into the target_modules regex instead")
            self.layers_to_transform = items
        pattern = self.layers_pattern
        if pattern is not None:
            items = [pattern] if isinstance(pattern, str) else pattern
            if not isinstance(items, (list, tuple)) or not all(isinstance(t, str) and t for t in items):
                raise ValueError(f"layers_pattern: expected a name or a list of names, got {pattern!r}")
        if self.bias != "none":
            raise ValueError(f"bias: expected 'none' (peftops keeps biases frozen), got {self.bias!r}")
        if self.target_parameters is not None:
            raise ValueError(f"target_parameters: peftops adapts nn.Linear modules (target_modules), got "
                             f"{self.target_parameters!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights: expected True or False, got {self.init_weights!r}")
        if not isinstance(self.inference_mode, bool):
            raise ValueError(f"inference_mode: expected True or False, got {self.inference_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        # PEFT's shape (save_pretrained writes it as adapter_config.json); save_adapter adds the method
        return dataclasses.asdict(self)

    def matches(self, name: str) -> bool:
        """Whether the module called ``name`` is a target (PEFT's rules, see the class docstring);
        "all-linear" is resolved by ``select_targets``."""
        if _name_in(name, self.exclude_modules) or _name_in(name, self.modules_to_save, prefix_ok=True):
            return False
        if not _name_in(name, self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        index = layer_index(name, self.layers_pattern)
        return index is not None and index in self.layers_to_transform


def _name_in(name: str, targets, prefix_ok: bool = False) -> bool:
    if not targets:
        return False
    if isinstance(targets, str):
        return targets == ALL_LINEAR or re.fullmatch(targets, name) is not None
    if prefix_ok:  # modules_to_save: the module or anything inside it
        return any(re.match(rf"(^|.*\.){re.escape(t)}($|\..*)", name) for t in targets)
    return any(_matches(name, t) for t in targets)


def layer_index(name: str, pattern=None) -> Optional[int]:
    """The layer number in a module name: after ``pattern`` (``layers.<i>.``), or the first numbered
    component when ``pattern`` is None."""
    patterns = [pattern] if isinstance(pattern, str) else (pattern or [None])
    for p in patterns:
        m = re.match(r".*?\.[^.]*\.(\d+)\." if p is None else rf"(?:^|.*?\.){re.escape(p)}\.(\d+)\.", name)
        if m:
            return int(m.group(1))
    return None


def output_heads(model: nn.Module) -> set[str]:
    """Names of the modules "all-linear" leaves out: the output embedding and task heads."""
    root = getattr(model, "_orig_mod", model)
    heads = set()
    get_out = getattr(root, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for n, m in root.named_modules():
        if (out is not None and m is out) or n in HEAD_MODULES or n == "lm_head":
            heads.add(n)
    return heads


def refuse_adapted_targets(model: nn.Module, config: "PeftMethodConfig", method: str) -> None:
    """Two weight adapters on one linear do not compose: refuse targets another method adapted."""
    taken = [(n, type(m).__name__) for n, m in model.named_modules()
             if n and getattr(type(m), "peftops_adapter", False) and config.matches(n)]
    if taken:
        raise ValueError(f"target_modules: {[n for n, _ in taken[:3]]} already adapted by another peftops method "
                         f"({taken[0][1]}); two weight adapters on one linear do not compose: give {method} "
                         "target_modules disjoint from the other method's")


def select_targets(model: nn.Module, config: "PeftMethodConfig", types: tuple[type, ...] = (nn.Linear,)
                   ) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module of ``types`` that ``config`` targets, in model order."""
    heads = output_heads(model) if config.target_modules == ALL_LINEAR else set()
    return [(n, m) for n, m in model.named_modules()
            if n and isinstance(m, types) and n not in heads and config.matches(n)]


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

    def is_merged(self, model: nn.Module, config: AdapterConfig) -> bool:
        """Whether the adapter is folded into the base (then loading new tensors must wait for unmerge)."""
        return False

    @contextlib.contextmanager
    def disabled(self, model: nn.Module, config: AdapterConfig) -> Iterator[None]:
        """Inside the block the model computes as if this method were not applied."""
        raise NotImplementedError
        yield


@contextlib.contextmanager
def disabled_layers(layers: Iterable[nn.Module], prepare=None) -> Iterator[None]:
    """Set each layer's ``_disabled`` flag for the block (after ``prepare(layer)``), clear it after."""
    layers = list(layers)
    for m in layers:
        if prepare is not None:
            prepare(m)
        m._disabled = True
    try:
        yield
    finally:
        for m in layers:
            m.__dict__.pop("_disabled", None)


@contextlib.contextmanager
def unmerged_for_block(method: "Method", model: nn.Module, config: AdapterConfig) -> Iterator[None]:
    """A merged adapter is unmerged for the block (bit-exact for every method) and merged back after."""
    merged = method.is_merged(model, config)
    if merged:
        method.unmerge(model, config)
    try:
        yield
    finally:
        if merged:
            method.merge(model, config)


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


def autocast_operands(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """(x, W, b) in the autocast dtype when autocast is on for x's device (the adapters' custom ops
    are not on autocast's op lists), else unchanged."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        return x.to(dt), weight.to(dt), (bias.to(dt) if bias is not None else None)
    return x, weight, bias


def lazy_attributes(module_name: str, factories: dict[str, Any]):
    """A module-level ``__getattr__`` that builds each named attribute on first access and keeps it
    in the module (for the Trainer callbacks: importing transformers' Trainer costs seconds)."""
    import sys

    def __getattr__(name: str):
        factory = factories.get(name)
        if factory is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        value = factory()
        setattr(sys.modules[module_name], name, value)
        return value

    return __getattr__


def applied_configs(model: nn.Module) -> list[AdapterConfig]:
    return list(getattr(model, "_peftops_configs", []))


# ----------------------------------------------------------------------------------------------
# All-or-nothing model-level calls
# ----------------------------------------------------------------------------------------------
_CONTAINERS = (dict, list, set)


def _shallow(value):
    """(object, copy of its contents) for the containers a Module keeps in its __dict__ (parameter,
    buffer, module and hook dicts, ...), restored in place so outside references (hook handles)
    keep pointing at the live object."""
    if isinstance(value, _CONTAINERS):
        return (value, value.copy())
    return None


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset()
            and (a.is_meta or a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()))


class ModelSnapshot:
    """What a model-level call can change, captured before it runs, so ``restore`` puts it back.

    Captured without copying tensor data: every reachable module's ``__dict__`` (its parameter,
    buffer, submodule and hook containers, flags and attributes), every parameter's and buffer's
    ``requires_grad``, ``.grad`` and ``.data`` (by reference), and the ``__dict__`` of any extra
    objects (the caller's config). Tensor *data* changed in place is restored only where the call
    declared it first: ``protect`` (a copy of the whole tensor, for small tensors), ``protect_entries``
    (a copy of some flat entries, e.g. the k entries SIFT writes into a large weight) and
    ``on_rollback`` (an exact inverse, e.g. WeGeFT's unmerge from its backup)."""

    def __init__(self, model: nn.Module, objects: Iterable[Any] = ()):
        self.model = model
        self._modules = []
        tensors: dict[int, torch.Tensor] = {}
        for m in model.modules():
            saved = {}
            for k, v in m.__dict__.items():
                saved[k] = _shallow(v) or (v, None)
            self._modules.append((m, saved))
            for t in list(m._parameters.values()) + list(m._buffers.values()):
                if t is not None:
                    tensors[id(t)] = t
        configs = {id(c): c for _, saved in self._modules for v, contents in saved.values()
                   for c in (contents if isinstance(v, list) else [v]) if isinstance(c, AdapterConfig)}
        self._tensors = [(t, t.requires_grad, t.grad, t.data) for t in tensors.values()]
        self._known = set(tensors)
        self._objects = [(o, dict(o.__dict__)) for o in [*objects, *configs.values()] if hasattr(o, "__dict__")]
        self._protected: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._undo: list = []

    def protect(self, *tensors: torch.Tensor | None) -> None:
        """Copy these tensors' data now (the first call wins); tensors made during the call need none."""
        for t in tensors:
            if t is not None and id(t) in self._known and id(t) not in self._protected:
                self._protected[id(t)] = (t, t.detach().clone())

    def protect_entries(self, tensor: torch.Tensor, flat_idx: torch.Tensor) -> None:
        """Copy ``tensor``'s entries at these flat indices now (restored in reverse call order)."""
        if id(tensor) not in self._known:
            return
        idx = flat_idx.detach().to(device=tensor.device, dtype=torch.int64).reshape(-1)
        self._entries.append((tensor, idx, tensor.detach().reshape(-1)[idx].clone()))

    def on_rollback(self, fn) -> None:
        self._undo.append(fn)

    @torch.no_grad()
    def restore(self) -> None:
        errors = []
        for fn in reversed(self._undo):  # inverses first, while the modules are as the call left them
            try:
                fn()
            except Exception as e:  # keep restoring the rest; reported below
                errors.append(e)
        for m, saved in self._modules:
            for k in [k for k in m.__dict__ if k not in saved]:
                del m.__dict__[k]
            for k, (v, contents) in saved.items():
                if contents is not None:
                    v.clear()
                    (v.update if isinstance(v, (dict, set)) else v.extend)(contents)
                m.__dict__[k] = v
        for t, flag, grad, data in self._tensors:
            if not _same_view(t, data):
                t.data = data
            t.requires_grad_(flag)
            t.grad = grad
        for tensor, idx, values in reversed(self._entries):
            tensor.detach().reshape(-1)[idx] = values
        for t, saved in self._protected.values():
            t.detach().copy_(saved)
        for o, d in self._objects:
            o.__dict__.clear()
            o.__dict__.update(d)
        if errors:
            raise RuntimeError(f"model: restoring the model after an error failed too ({errors[0]!r})")


_LOCAL = threading.local()  # the snapshots of the model-level calls running in this thread


def _active() -> list[ModelSnapshot]:
    if not hasattr(_LOCAL, "stack"):
        _LOCAL.stack = []
    return _LOCAL.stack


@contextlib.contextmanager
def all_or_nothing(model: nn.Module, *objects: Any) -> Iterator[ModelSnapshot]:
    """Run a model-level call so that on any exception ``model`` (and ``objects``) is exactly as it
    was before. A nested call on the same model joins the outer snapshot (restored once, by it)."""
    stack = _active()
    outer = next((s for s in stack if s.model is model), None)
    if outer is not None:
        outer._objects += [(o, dict(o.__dict__)) for o in objects if hasattr(o, "__dict__")]
        yield outer
        return
    snap = ModelSnapshot(model, objects)
    stack.append(snap)
    try:
        yield snap
    except BaseException as error:
        try:
            snap.restore()
        except RuntimeError as restore_error:
            raise restore_error from error
        raise
    finally:
        stack.pop()


def transaction() -> ModelSnapshot | None:
    """The snapshot of the model-level call running now (innermost), or None: nothing to protect."""
    stack = _active()
    return stack[-1] if stack else None


def atomic(fn):
    """Decorator: ``fn(model, ...)`` runs under ``all_or_nothing(model)``."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        with all_or_nothing(model, *[a for a in args if isinstance(a, AdapterConfig)]):
            return fn(model, *args, **kwargs)
    return wrapper


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


def load_checked_state(targets: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str,
                       hint: str = "") -> None:
    """``check_state_matches``, then copy each ``state[k]`` into ``targets[k]`` in place (converted to its
    device and dtype); inside an all-or-nothing call the targets are protected first."""
    check_state_matches(targets, state, what, hint)
    snap = transaction()
    if snap is not None:
        snap.protect(*targets.values())
    with torch.no_grad():
        for k, t in targets.items():
            t.copy_(state[k].to(device=t.device, dtype=t.dtype))


# ----------------------------------------------------------------------------------------------
# apply / merge
# ----------------------------------------------------------------------------------------------
def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


HEAD_MODULES = ("classifier", "score", "qa_outputs")
_HEAD_MODEL_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                        "ForMultipleChoice")
MODULES_PREFIX = "modules::"  # saved keys of modules_to_save tensors: modules::<module name>.<tensor>


def _resolve_modules_to_save(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The module names ``config.modules_to_save`` means in ``model`` (exact dotted names)."""
    root = getattr(model, "_orig_mod", model)
    if config.modules_to_save is None:
        if not type(root).__name__.endswith(_HEAD_MODEL_SUFFIXES):
            return []
        return [n for n, _ in root.named_children() if n in HEAD_MODULES][:1]
    names = []
    for want in config.modules_to_save:
        found = [n for n, _ in root.named_modules() if n and _matches(n, want)]
        if not found:
            raise ValueError(f"modules_to_save: no module of {type(root).__name__} is named {want!r}")
        names += [n for n in found if n not in names]
    return names


def _check_saved_modules_not_adapted(model: nn.Module) -> None:
    for n, mod in saved_modules(model):
        if any(getattr(type(m), "peftops_adapter", False) for m in mod.modules()):
            raise ValueError(f"modules_to_save: {n!r} holds a peftops adapter; a module is either adapted or "
                             "trained in full, not both")


def saved_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module trained in full and saved with the adapters."""
    root = getattr(model, "_orig_mod", model)
    names: list[str] = []
    for cfg in applied_configs(model):
        names += [n for n in (cfg.modules_to_save or []) if n not in names]
    return [(n, root.get_submodule(n)) for n in names]


@atomic
def apply(model: nn.Module, config: AdapterConfig, *, freeze_base: bool = True) -> nn.Module:
    """Inject ``config``'s method into ``model`` in place (and return it); all-or-nothing: on an
    error the model (and ``config``) are as before.

    With ``freeze_base`` every parameter that exists before the call stops requiring grad, so
    only the adapter's own parameters train (the PEFT convention; classifier heads can be
    re-enabled with ``modules_to_save``-style code by the caller)."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config: expected a peftops AdapterConfig, got {type(config).__name__}")
    _check_flag("freeze_base", freeze_base)
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
    config.modules_to_save = _resolve_modules_to_save(model, config)
    method.apply(model, config)
    model._peftops_configs = applied_configs(model) + [config]
    _check_saved_modules_not_adapted(model)  # after the injection: the adapter modules exist now
    for _, mod in saved_modules(model):  # heads stay trainable under every method's freeze
        mod.requires_grad_(True)
    return model


@atomic
def merge(model: nn.Module) -> nn.Module:
    """Fold every applied adapter into the base weights (outputs unchanged within dtype tolerance);
    all-or-nothing."""
    cfgs = applied_configs(model)
    if not cfgs:
        raise ValueError("model: no peftops adapter is applied (call peftops.apply first)")
    for cfg in cfgs:
        get_method(cfg.method).merge(model, cfg)
    return model


@atomic
def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge`` (the base weights come back bit for bit); all-or-nothing."""
    cfgs = applied_configs(model)
    if not cfgs:
        raise ValueError("model: no peftops adapter is applied (call peftops.apply first)")
    for cfg in reversed(cfgs):
        get_method(cfg.method).unmerge(model, cfg)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """``with peftops.disable_adapters(model):`` the base model (every applied method off; merged
    adapters are unmerged for the block), like PEFT's ``disable_adapter()``. After the block the
    model computes as before, bit for bit. Task heads (``modules_to_save``) stay as trained."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    cfgs = applied_configs(model)
    if not cfgs:
        raise ValueError("model: no peftops adapter is applied (call peftops.apply first)")
    with contextlib.ExitStack() as stack:
        for cfg in reversed(cfgs):
            stack.enter_context(get_method(cfg.method).disabled(model, cfg))
        yield model


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
    for name, mod in saved_modules(model):
        for k, v in mod.state_dict().items():
            out[f"{MODULES_PREFIX}{name}.{k}"] = v.detach().contiguous().cpu()
    return out


def _check_directory(directory) -> str:
    if isinstance(directory, bytes) or not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a path (str or os.PathLike), got {type(directory).__name__}")
    path = os.fspath(directory)
    if not path:
        raise ValueError("directory: expected a path, got ''")
    return path


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write ``peftops_adapter.json`` (method, version, configs, tensor shapes/dtypes) and
    ``peftops_adapter.safetensors`` into ``directory`` (created if needed; other files in it are
    left alone). An adapter already there is replaced only with ``overwrite=True``. Both files
    are written under temporary names and renamed into place: a failed save leaves no
    half-written adapter."""
    from safetensors.torch import save_file

    from . import __version__

    path = _check_directory(directory)
    _check_flag("overwrite", overwrite)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"directory: {path} exists and is not a directory")
    present = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if os.path.exists(os.path.join(path, f))]
    if present and not overwrite:
        raise FileExistsError(f"directory: {path} already holds {present}; pass overwrite=True to replace "
                              "that adapter, or save into another directory")
    state = adapter_state_dict(model)
    meta = {
        "format_version": FORMAT_VERSION,
        "peftops_version": __version__,
        "base_model_class": type(getattr(model, "_orig_mod", model)).__name__,  # torch.compile'd: the model
        "adapters": [{**c.to_dict(), "method": c.method} for c in applied_configs(model)],
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in state.items()},
    }
    os.makedirs(path, exist_ok=True)
    tmp = {f: os.path.join(path, f".{f}.tmp-{os.getpid()}") for f in (CONFIG_FILE, WEIGHTS_FILE)}
    try:
        save_file(state, tmp[WEIGHTS_FILE], metadata={"format": "pt", "peftops": "1"})
        with open(tmp[CONFIG_FILE], "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        # weights first: a reader that finds the new config also finds the weights it describes
        os.replace(tmp[WEIGHTS_FILE], os.path.join(path, WEIGHTS_FILE))
        os.replace(tmp[CONFIG_FILE], os.path.join(path, CONFIG_FILE))
    finally:
        for t in tmp.values():
            if os.path.exists(t):
                os.remove(t)


_JSON_DTYPES = {"float16", "bfloat16", "float32", "float64", "int32", "int64", "int8", "uint8", "bool", "int16"}


def _peft_folder_hint(peft_type) -> str:
    """What to do with a folder Hugging Face PEFT's save_pretrained wrote."""
    from .tuners import REGISTERED

    if isinstance(peft_type, str) and peft_type.lower() in REGISTERED:
        return (f"a PEFT adapter (peft_type {peft_type!r}, written by save_pretrained), not a native peftops one: "
                "load it with peft.PeftModel.from_pretrained(model, directory) (import peftops first)")
    try:
        from peft.utils.peft_types import PeftType

        known = peft_type in PeftType.__members__
    except ImportError:
        known = False
    if known:
        return (f"a PEFT adapter of PEFT's own method {peft_type!r}: load it with "
                "peft.PeftModel.from_pretrained(model, directory)")
    return (f"a PEFT adapter of method {peft_type!r}, which neither peftops ({sorted(REGISTERED)}) nor the installed "
            "peft knows")


def _read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter's metadata and tensors, every field checked (errors begin "directory: <file>")."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _check_directory(directory)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"directory: {path} is not a directory")
    cfg_path = os.path.join(path, CONFIG_FILE)
    w_path = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(cfg_path) and os.path.isfile(os.path.join(path, LEGACY_FILES[0])):
        cfg_path, w_path = (os.path.join(path, f) for f in LEGACY_FILES)  # PEFT's folder, or an old peftops one
        try:
            with open(cfg_path, encoding="utf-8") as f:
                legacy = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            legacy = None
        if isinstance(legacy, dict) and "peft_type" in legacy and "adapters" not in legacy:
            raise ValueError(f"directory: {cfg_path}: {_peft_folder_hint(legacy.get('peft_type'))}")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"directory: no {os.path.basename(p)} in {path}")

    def bad(what: str) -> ValueError:
        return ValueError(f"directory: {cfg_path}: {what}")

    try:
        with open(cfg_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "adapters" not in meta or "tensors" not in meta:
        raise bad("not a peftops adapter config (missing 'adapters' or 'tensors')")
    version = meta.get("format_version")
    if type(version) is not int:
        raise bad(f"format_version: expected the integer {FORMAT_VERSION}, got {version!r}")
    if version > FORMAT_VERSION:
        raise bad(f"format_version {version} was written by a newer peftops; this one ({FORMAT_VERSION}) cannot "
                  "read it: upgrade peftops")
    if version != FORMAT_VERSION:
        raise bad(f"format_version: expected {FORMAT_VERSION}, got {version}")
    adapters, declared = meta["adapters"], meta["tensors"]
    if not isinstance(adapters, list) or not adapters or not all(isinstance(a, dict) for a in adapters):
        raise bad(f"'adapters': expected a non-empty list of method configs, got {adapters!r:.80}")
    methods = [a.get("method") for a in adapters]
    if len(set(map(str, methods))) != len(methods):
        raise bad(f"'adapters': each method may appear once, got {methods}")
    cls = meta.get("base_model_class")
    if cls is not None and not isinstance(cls, str):
        raise bad(f"'base_model_class': expected a class name, got {cls!r}")
    if not isinstance(declared, dict):
        raise bad(f"'tensors': expected a mapping name -> {{shape, dtype}}, got {type(declared).__name__}")
    for k, d in declared.items():
        ok = (isinstance(d, dict) and isinstance(d.get("shape"), list) and isinstance(d.get("dtype"), str)
              and d["dtype"] in _JSON_DTYPES
              and all(type(n) is int and n >= 0 for n in d["shape"]))
        if not ok:
            raise bad(f"'tensors'[{k!r}]: expected {{'shape': [non-negative ints], 'dtype': a dtype name}}, got {d!r}")
    try:
        state = load_file(w_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"directory: {w_path}: corrupted or unreadable safetensors file ({e})") from None
    if set(declared) != set(state):
        missing, extra = sorted(set(declared) - set(state)), sorted(set(state) - set(declared))
        raise ValueError(f"directory: {w_path}: tensors do not match {CONFIG_FILE} (missing {missing[:5]}, "
                         f"unexpected {extra[:5]})")
    prefixes = {f"{m}::" for m in methods} | {MODULES_PREFIX}
    for k, v in state.items():
        d = declared[k]
        if not any(k.startswith(p) for p in prefixes):
            raise ValueError(f"directory: {w_path}: tensor {k!r} belongs to none of the adapters {methods}")
        if list(v.shape) != list(d["shape"]) or str(v.dtype).replace("torch.", "") != d["dtype"]:
            raise ValueError(f"directory: {w_path}: tensor {k!r} is {list(v.shape)} {v.dtype}, {CONFIG_FILE} "
                             f"declares {d['shape']} {d['dtype']}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"directory: {w_path}: tensor {k!r} holds NaN/Inf values")
    return meta, state


def _load_saved_modules(model: nn.Module, heads: dict[str, torch.Tensor]) -> None:
    own = {f"{n}.{k}": v for n, mod in saved_modules(model) for k, v in mod.state_dict(keep_vars=True).items()}
    load_checked_state(own, heads, "modules_to_save", "the saved task head must have this model's shape")


def _check_base_class(model: nn.Module, meta: dict, path) -> None:
    saved_cls, cls = meta.get("base_model_class"), type(getattr(model, "_orig_mod", model)).__name__
    if saved_cls and saved_cls != cls:
        raise ValueError(f"model: the adapter in {path!s} was saved from a {saved_cls}, this model is a {cls} "
                         "(a different base model)")


@atomic
def load_adapter(model: nn.Module, directory: str | os.PathLike, *, freeze_base: bool = True) -> nn.Module:
    """Apply the saved methods to ``model`` (a fresh base, or one with these methods applied and
    not merged) and load their tensors; all-or-nothing.

    Every tensor is checked against the config and against the model: a name the model does not
    have, a shape that does not fit, or a corrupted file raises naming what is wrong, and leaves
    the model as it was."""
    _check_flag("freeze_base", freeze_base)
    meta, state = _read_adapter(directory)
    configs = []
    for entry in meta["adapters"]:
        method = get_method(entry.get("method", ""))
        # files written before modules_to_save existed hold no head: do not infer one for them
        configs.append((method, method.config_class.from_dict({"modules_to_save": [], **entry})))
    heads = {k[len(MODULES_PREFIX):]: v for k, v in state.items() if k.startswith(MODULES_PREFIX)}
    for method, cfg in configs:
        already = [c for c in applied_configs(model) if c.method == cfg.method]
        if already and method.is_merged(model, already[0]):
            raise ValueError(f"model: {cfg.method} is merged into the base weights; peftops.unmerge(model) before "
                             "loading an adapter (loading would serve the merged, stale weights)")
    for method, cfg in configs:
        already = [c for c in applied_configs(model) if c.method == cfg.method]
        if not already:
            apply(model, cfg, freeze_base=freeze_base)
        else:
            cfg = already[0]
        prefix = f"{cfg.method}::"
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        method.load_adapter_state_dict(model, cfg, sub)
    _load_saved_modules(model, heads)
    # After the methods' own (more specific) checks; shapes can coincide across models, so this
    # one catches the rest. Nothing stays changed when it fails: the call is all-or-nothing.
    _check_base_class(model, meta, directory)
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
