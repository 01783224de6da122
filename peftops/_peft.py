"""The one module that reaches into Hugging Face PEFT's internals.

PEFT's method registry (``peft.utils.peft_types.register_peft_method``) only accepts names that are
already members of its closed ``PeftType`` enum, so a third-party method has to add its member
first. That, the supported-version check and the config base class live here and nowhere else.

- ``PeftConfigBase``: ``peft.PeftConfig`` when peft is importable, else a stand-in dataclass with
  the same generic fields (the native ``peftops.apply`` path works without peft).
- ``unsupported_reason()``: None when the installed peft can host peftops' methods, else why not.
- ``add_peft_type(name)`` / ``register(...)``: the enum member and the registry entry.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Optional

PEFT_MIN = "0.21.0"    # the oldest peft the PEFT-native methods are tested on (0.21.2)
PEFT_BELOW = "0.23.0"  # the first minor version not tested yet (BaseTuner's hooks change between minors)

try:
    import peft as _peft
    from peft import PeftConfig as PeftConfigBase
except ImportError:  # pragma: no cover - peft is an install requirement; --no-deps installs may lack it
    _peft = None

    @dataclasses.dataclass
    class PeftConfigBase:  # type: ignore[no-redef]
        """peft.PeftConfig's generic fields, so a config reads the same with and without peft."""

        task_type: Optional[str] = None
        peft_type: Optional[str] = None
        auto_mapping: Optional[dict] = None
        peft_version: Optional[str] = None
        base_model_name_or_path: Optional[str] = None
        revision: Optional[str] = None
        inference_mode: bool = False

        def __post_init__(self):
            pass

HAS_PEFT = _peft is not None


def peft_version() -> Optional[str]:
    return getattr(_peft, "__version__", None)


def unsupported_reason() -> Optional[str]:
    """Why the installed peft cannot host peftops' methods (None: it can)."""
    if _peft is None:
        return "peft is not installed (pip install 'peft>=%s,<%s')" % (PEFT_MIN, PEFT_BELOW)
    from packaging.version import Version

    v = Version(peft_version())
    if not Version(PEFT_MIN) <= Version(v.base_version) < Version(PEFT_BELOW):
        return (f"peft {v} is installed; peftops' PEFT methods (get_peft_model, PeftModel.from_pretrained) are "
                f"built for {PEFT_MIN} <= peft < {PEFT_BELOW}: pip install 'peft>={PEFT_MIN},<{PEFT_BELOW}' "
                "(peftops.apply works with any)")
    try:
        from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer  # noqa: F401
        from peft.utils.peft_types import PeftType, register_peft_method  # noqa: F401
    except ImportError as e:
        return f"peft {v} lacks an API peftops needs ({e})"
    return None


def add_peft_type(name: str):
    """The ``PeftType`` member ``name`` (upper case), added to the closed enum if absent."""
    from peft.utils.peft_types import PeftType

    if name in PeftType.__members__:
        return PeftType[name]
    if name in PeftType._value2member_map_:
        raise ValueError(f"peft_type: PeftType already has a member with value {name!r} under another name")
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ only refuses existing member names
    if PeftType(name) is not member or PeftType[name] is not member or member not in list(PeftType):
        raise RuntimeError(f"peftops: could not add {name!r} to peft's PeftType enum on this Python "
                           f"({enum.__file__}); the PEFT-native path is unavailable, peftops.apply still works")
    return member


def register(name: str, config_cls: type, model_cls: type, prefix: str) -> None:
    """Register a peftops method in PEFT's mappings (``name`` lower case, as PEFT wants). Registering
    the same classes again is a no-op; a name another package registered raises naming both."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.peft_types import register_peft_method

    member = add_peft_type(name.upper())
    known = PEFT_TYPE_TO_CONFIG_MAPPING.get(member)
    if known is config_cls and PEFT_TYPE_TO_TUNER_MAPPING.get(member) is model_cls:
        return
    if known is not None:
        raise ValueError(f"peft_type: PEFT already has a method {member.value!r} ({known.__module__}."
                         f"{known.__qualname__}); peftops cannot register its {config_cls.__name__} under that name")
    for other, p in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if p == prefix and other != member:
            raise ValueError(f"prefix: PEFT method {other!r} already uses the parameter prefix {prefix!r}")
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)


def peft_type_or_name(name: str):
    """The PeftType member when the method could be registered, else the plain upper-case name."""
    if _peft is not None:
        from peft.utils.peft_types import PeftType

        if name in PeftType.__members__:
            return PeftType[name]
    return name
