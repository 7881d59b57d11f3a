"""The one-row W8A16 GEMV on dp4a (plugins/triton_gemv_a16.py): x rounded to 16 bits per token.

CPU: the rounding's error bound (torch only); the rounding kernel under the Triton interpreter and the GEMV
compiled for sm_90 (both in a subprocess: TRITON_INTERPRET must be set before triton is imported).
GPU (@gpu): the 9B shapes, a ragged K, bias, a CUDA graph, and the dispatch from layers.quant.w8a16.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _case(n: int, k: int, outlier: float = 0.0, device: str = "cpu", seed: int = 0):
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(1, k, generator=g, device=device)
    if outlier:
        x[0, k // 3] = outlier  # one massive activation: the others get the fewest levels
    w = torch.randn(n, k, generator=g, device=device) * (0.1 + torch.rand(n, 1, generator=g, device=device))
    scale = w.abs().amax(1) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return x.to(torch.bfloat16), q, scale


def _exact(x, q, scale):
    return (x.double() @ q.double().t()) * scale.double()


@pytest.mark.parametrize("k,outlier", [(4096, 0.0), (4096, 300.0), (13696, 0.0), (13696, 2000.0)])
def test_16_bit_rounding_costs_less_than_bf16_rounding(k: int, outlier: float) -> None:
    """The reference's extra error against the exact product stays below what rounding x to bf16 costs."""
    from autoglm_trt.plugins.triton_gemv_a16 import gemv_a16_reference

    x, q, scale = _case(64, k, outlier)
    u = torch.rand(1, k, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x_fine = x.double() * (1 + u * 2 ** -9)  # x moved by up to bf16's smallest half-ulp (2**-9): its rounding cost
    exact = _exact(x, q, scale)
    err_a16 = float((gemv_a16_reference(x.double(), q, scale) - exact).norm())
    err_bf16 = float(((x_fine @ q.double().t()) * scale.double() - exact).norm())
    assert 0 < err_a16 < err_bf16


@needs_triton
def test_rounding_kernel_under_the_interpreter_and_gemv_compiles_for_sm90() -> None:
    code = r"""
import json, os, sys, torch
from autoglm_trt.plugins import triton_gemv_a16 as A
out = {}
if os.environ.get("TRITON_INTERPRET") == "1":
    x = torch.randn(1, 4100).to(torch.bfloat16); x[0, 7] = -55.0
    planes, scale = A.quantize_a16(x)
    q = planes[0].int() + planes[1].view(torch.int8).int() * 256
    ref = torch.round(x.float() / scale)[0]
    out = {"max_diff": float((q - ref).abs().max()), "scale": float(scale), "amax": float(x.float().abs().max())}
else:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = A._gemv_a16_kernel
    sig = {"w_ptr": "*i32", "xp_ptr": "*i32", "xs_ptr": "*fp32", "s_ptr": "*fp32", "b_ptr": "*bf16",
           "y_ptr": "*bf16", "N": "i32", "K4": "i32", "stride_wn": "i32", "HAS_BIAS": "constexpr",
           "BN": "constexpr", "BK4": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a.endswith("_ptr")}
    k = triton.compile(ASTSource(fn, sig, {"HAS_BIAS": True, "BN": A.BLOCK_N, "BK4": A.BLOCK_K4}, attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    sys.path.insert(0, os.path.join(os.getcwd(), "tests", "plugins"))
    from aot_compile import _resources
    regs, stack = _resources(k.asm["cubin"])
    out = {"regs": regs, "stack": stack, "dp4a": k.asm["ptx"].count("dp4a.s32")}
print(json.dumps(out))
"""
    rows = []
    for interp in ("1", "0"):
        env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET=interp, TRITON_DEFAULT_FP_FUSION="1")
        proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    interp, aot = rows
    assert interp["max_diff"] <= 1 and abs(interp["scale"] * 32767 - interp["amax"]) <= 1e-3 * interp["amax"]
    assert aot["stack"] == 0 and aot["dp4a"] >= 2 and aot["regs"] <= 128


# ---- GPU ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("n,k,bias", [(27392, 4096, False), (4096, 13696, False), (4608, 4096, True),
                                      (37, 132, True), (151552, 4096, False)])
def test_gpu_matches_the_reference(n: int, k: int, bias: bool) -> None:
    from autoglm_trt.plugins import triton_gemv_a16 as A

    x, q, scale = _case(n, k, outlier=50.0, device="cuda", seed=n)
    b = torch.randn(n, device="cuda").to(torch.bfloat16) if bias else None
    y = A.gemv_a16(x, q, scale, b)
    ref = A.gemv_a16_reference(x, q, scale, b)
    assert y.shape == (1, n) and y.dtype == x.dtype
    assert float((y.float() - ref.float()).norm() / ref.float().norm()) <= 5e-3  # bf16 output rounding
    exact = _exact(x, q, scale) + (b.double() if bias else 0)
    assert float((y.double() - exact).norm() / exact.norm()) <= 5e-3


@pytest.mark.gpu
@needs_gpu
def test_gpu_graph_replay_and_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    from autoglm_trt.layers import quant as Q
    from autoglm_trt.plugins import triton_gemv_a16 as A

    x, q, scale = _case(4096, 13696, device="cuda")
    Q.w8a16(x, q, scale)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = Q.w8a16(x, q, scale)  # one row, 56 M weights: the a16 GEMV
    for _ in range(2):
        x.normal_()
        graph.replay()
        torch.cuda.synchronize()
        ref = A.gemv_a16_reference(x, q, scale)
        assert float((y.float() - ref.float()).norm() / ref.float().norm()) <= 5e-3
    monkeypatch.setenv("AUTOGLM_TRT_INT8_A16", "0")
    plain = Q.w8a16(x, q, scale)  # the bf16-activation path: close, not bit-equal
    assert float((plain.float() - y.float()).norm() / y.float().norm()) <= 5e-3
