"""peftops: fused Triton kernels for parameter-efficient fine-tuning (SIFT, AoT P-Tuning, WeGeFT, SAFE)."""
__version__ = "0.1.0"

from . import kernels  # noqa: F401  (peftops.kernels, installed from kernels/)
from .kernels import force_backend
from .model import (
    AdapterConfig,
    adapter_state_dict,
    apply,
    disable_adapters,
    find_target_modules,
    load_adapter,
    merge,
    save_adapter,
    trainable_summary,
    unmerge,
)
from .sift import (
    SIFTConfig,
    SIFTLinear,
    SIFTMethod,
    SparseAdamW,
    sift_calibrate,
    sift_k,
    sift_layers,
    sift_linear,
    sift_select,
)
from .aot import (
    AoTBias,
    AoTConfig,
    AoTLayerBias,
    AoTMethod,
    aot_bias_add,
    aot_disabled,
    aot_segment_plan,
    aot_table_grad,
    aot_tasks,
    compile_aot_tables,
    get_aot,
    load_task_tables,
    materialize_aot_tables,
    save_aot_tables,
    set_aot_tables,
    stack_task_tables,
)
from .wegeft import WeGeFTConfig, WeGeFTLinear, WeGeFTMethod, wegeft_linear
from .kernels.cka import cka_form, linear_cka
from .safe import SAFE, AdapterUnit, SAFEConfig, SavedTensorMeter, find_adapter_units, safe_threshold

from . import tuners  # noqa: E402,F401  (registers WeGeFT and SIFT with Hugging Face PEFT)

from . import model, safe, sift  # noqa: E402  (the lazy attributes below read them)

# the Trainer callbacks are built on first access: importing transformers' Trainer costs seconds
__getattr__ = model.lazy_attributes(__name__, {
    "SIFTCalibrationCallback": lambda: sift.SIFTCalibrationCallback,
    "SAFECallback": lambda: safe.SAFECallback,
})
