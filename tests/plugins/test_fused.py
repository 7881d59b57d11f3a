"""Fused rotary + KV store and SiLU-mul: Triton equals the torch reference (GPU, and interpreter on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


@pytest.mark.triton_interp
def test_fused_kernels_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(HERE)}
    out = subprocess.run([sys.executable, str(HERE / "fused_checks.py"), "cpu"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_kernels_on_gpu(dtype, tol):
    sys.path.insert(0, str(HERE))
    from fused_checks import check

    check("cuda", dtype, tol)
