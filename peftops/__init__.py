"""peftops: fused Triton kernels for parameter-efficient fine-tuning (SIFT, AoT P-Tuning, WeGeFT, SAFE)."""
__version__ = "0.1.0"

from . import kernels  # noqa: F401  (peftops.kernels, installed from kernels/)
from .kernels import force_backend
from .model import (
    AdapterConfig,
    adapter_state_dict,
    apply,
    find_target_modules,
    load_adapter,
    merge,
    save_adapter,
    trainable_summary,
    unmerge,
)
