"""Dispatch: CPU tensors use the references, the package imports without triton, the env switch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autoglm_trt.plugins as plugins
from autoglm_trt.plugins import reference
from plugin_cases import make_batch

REPO = Path(__file__).resolve().parents[2]


def test_cpu_tensors_use_reference() -> None:
    batch = make_batch([20, 9], [20, 1], heads=4, kv_heads=2, head_dim=16, block_size=16)
    want = reference.paged_attention(*batch.args())
    assert torch.equal(plugins.paged_attention(*batch.args()), want)
    x, w = torch.randn(3, 32), torch.randn(32)
    assert torch.equal(plugins.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
    h, y = plugins.norm_add_norm(x, x, w, w, 1e-5)
    assert torch.equal(y, reference.norm_add_norm(x, x, w, w, 1e-5)[1])


def test_disable_env(monkeypatch) -> None:
    monkeypatch.setenv("AUTOGLM_TRT_DISABLE_TRITON", "1")
    assert plugins.triton_disabled()
    monkeypatch.setenv("AUTOGLM_TRT_DISABLE_TRITON", "0")
    assert not plugins.triton_disabled()
    monkeypatch.delenv("AUTOGLM_TRT_DISABLE_TRITON")
    assert not plugins.triton_disabled()


def test_package_imports_and_runs_without_triton() -> None:
    script = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now raises ImportError
        "import torch, autoglm_trt.plugins as p\n"
        "x = torch.randn(2, 8); p.rms_norm(x, torch.ones(8), 1e-5)\n"
        "assert 'autoglm_trt.plugins.triton_attention' not in sys.modules\n"
        "assert 'autoglm_trt.plugins.triton_norm' not in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_linear_on_cpu_is_f_linear() -> None:
    x, w, b = torch.randn(1, 64), torch.randn(48, 64), torch.randn(48)
    assert torch.equal(plugins.linear(x, w, b), torch.nn.functional.linear(x, w, b))


@pytest.mark.gpu
def test_linear_batch1_uses_gemv_on_gpu(monkeypatch) -> None:
    """One bf16 row goes to the Triton GEMV (within bf16 rounding of cuBLAS); more rows stay cuBLAS."""
    from autoglm_trt.plugins import triton_gemv

    calls = []
    real = triton_gemv.gemv
    monkeypatch.setattr(triton_gemv, "gemv", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    w = torch.randn(4608, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(4608, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    one = plugins.linear(x[:1], w, b)
    ref = torch.nn.functional.linear(x[:1].float(), w.float(), b.float())
    assert calls == [torch.Size([1, 4096])]
    assert (one.float() - ref).abs().max().item() < 2e-2 * ref.abs().max().item()
    assert torch.equal(plugins.linear(x, w, b), torch.nn.functional.linear(x, w, b)) and len(calls) == 1
