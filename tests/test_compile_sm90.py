"""Every Triton kernel compiles for Hopper (sm_90), checked without a GPU.

The interpreter runs kernels the real compiler would reject (non-power-of-two blocks, bad
casts); compiling each kernel's SM90_COMPILE_SPECS to a cubin catches that in CPU-only CI.
"""
import os
import subprocess
import sys

import pytest

from peftops.kernels import HAS_TRITON
from peftops.kernels._compile_check import FAMILIES


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_compile_for_sm90(family):
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-m", "peftops.kernels._compile_check", family],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
