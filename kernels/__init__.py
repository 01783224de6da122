"""peftops.kernels: Triton kernels, their launch functions and PyTorch references, one module per op family."""
from ._dispatch import HAS_TRITON, force_backend, interpreting, triton_runs_on, use_triton

__all__ = ["HAS_TRITON", "force_backend", "interpreting", "triton_runs_on", "use_triton"]
