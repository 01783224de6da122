"""peftops.kernels: Triton kernels, their launch functions and PyTorch references, one module per op family.

This folder (kernels/ at the top of the repository) *is* the package ``peftops.kernels``: setup.py maps it
there (``package_dir={"peftops.kernels": "kernels"}``; the top-level name ``kernels`` belongs to Hugging
Face's package). Import it as ``peftops.kernels`` (``from peftops.kernels import sift``), never as
``kernels``; its modules import one another relatively (``from ._checks import check_tensor``).

  sift.py aot.py wegeft.py cka.py   one op family each: Triton kernels, launchers, PyTorch references, public ops
  _checks.py                        input validation (tensors and scalars) and its TypeError/ValueError rule
  _common.py                        what the families share: accumulation dtype, SM count, dtype map, bf16 rounding
  _dispatch.py                      Triton or the reference, per call (force_backend)
  _compile_check.py, _variants.py   the sm_90a compile check and the drivers that say what it compiles
"""
from ._dispatch import HAS_TRITON, force_backend, interpreting, triton_runs_on, use_triton

__all__ = ["HAS_TRITON", "force_backend", "interpreting", "triton_runs_on", "use_triton"]
