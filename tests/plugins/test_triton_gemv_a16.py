"""int8-wo at one token on dp4a (plugins/triton_gemv_a16.py): the producers' 16-bit planes and the GEMV.

CPU: the rounding's error bound (torch only); the producers (RMSNorm, norm_add_norm, silu_mul) writing their
planes under the Triton interpreter, and the GEMV compiled for sm_90 (both in a subprocess: TRITON_INTERPRET
must be set before triton is imported); the int8-wo model marks its producers.
GPU (@gpu): the 9B shapes, a ragged K, bias, a CUDA graph, and the int8-wo linear taking the planes.
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


@needs_triton
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


_SCRIPT = r"""
import json, os, sys, torch
from autoglm_trt.plugins import triton_gemv_a16 as A
out = {}
if os.environ.get("TRITON_INTERPRET") == "1":
    from autoglm_trt.plugins import triton_fused, triton_norm
    def diff(y, a):  # planes -> integers, against the reference rounding of y
        q = a.planes[0].int() + a.planes[1].view(torch.int8).int() * 256
        ref, scale = A.a16_reference(y)
        return max(float((q - ref[0]).abs().max()), abs(float(a.scale) - float(scale)) / float(scale) * 1e6)
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(1, 4096, generator=g).to(torch.bfloat16) for _ in range(2))
    w1, w2 = (torch.rand(4096, generator=g).to(torch.bfloat16) + 0.5 for _ in range(2))
    x[0, 9] = 40.0
    a = A.new_a16(4096, x.device); y = triton_norm.rms_norm(x, w1, 1e-5, a16=a); out["rms_norm"] = diff(y, a)
    a = A.new_a16(4096, x.device); _, y = triton_norm.norm_add_norm(x, r, w1, w2, 1e-5, a16=a)
    out["norm_add_norm"] = diff(y, a)
    gu = torch.randn(1, 2 * 1000, generator=g).to(torch.bfloat16) * 3
    a = A.new_a16(1000, x.device); y = triton_fused.silu_mul(gu, a16=a); out["silu_mul"] = diff(y, a)
    ref = torch.nn.functional.silu(gu[:, :1000].float()) * gu[:, 1000:].float()
    out["silu_mul_value"] = float((y.float() - ref).abs().max() / ref.abs().max())
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


@pytest.mark.triton_interp
@needs_triton
def test_producers_write_planes_and_gemv_compiles_for_sm90() -> None:
    rows = []
    for interp in ("1", "0"):
        env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET=interp, TRITON_DEFAULT_FP_FUSION="1")
        proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    interp, aot = rows
    for name in ("rms_norm", "norm_add_norm", "silu_mul"):
        assert interp[name] <= 1.0, interp  # one integer step (division rounding) and the same scale
    assert interp["silu_mul_value"] <= 2 ** -7, interp  # one bf16 step (the interpreter truncates)
    assert aot["stack"] == 0 and aot["dp4a"] >= 2 and aot["regs"] <= 128, aot


def test_int8_wo_marks_its_producers_and_cpu_ignores_the_flag(tiny_model_dir) -> None:
    """quantize_model('int8-wo') flags the norms and MLPs before qkv/gate_up/down; on the CPU nothing changes."""
    from autoglm_trt.layers import quant as Q
    from autoglm_trt.models.loader import load_model

    model = load_model(tiny_model_dir, dtype="float32", device="cpu")
    Q.quantize_model(model, "int8-wo")
    layers = Q.decoder_layers(model)
    assert all(lay.input_layernorm.a16 and lay.post_attention_layernorm.a16 and lay.mlp.a16 for lay in layers)
    assert not any(lay.post_self_attn_layernorm.a16 or lay.post_mlp_layernorm.a16 for lay in layers)
    y = layers[0].input_layernorm(torch.randn(1, layers[0].input_layernorm.weight.numel()))
    assert getattr(y, "a16", None) is None  # the torch reference path writes no planes


# ---- GPU ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("n,k,bias", [(27392, 4096, False), (4096, 13696, False), (4608, 4096, True),
                                      (37, 132, True), (151552, 4096, False)])
def test_gpu_matches_the_reference(n: int, k: int, bias: bool) -> None:
    from autoglm_trt.plugins import triton_gemv_a16 as A

    x, q, scale = _case(n, k, outlier=50.0, device="cuda", seed=n)
    b = torch.randn(n, device="cuda").to(torch.bfloat16) if bias else None
    y = A.gemv_a16(A.quantize_a16(x), q, scale, b)
    ref = A.gemv_a16_reference(x, q, scale, b)
    assert y.shape == (1, n) and y.dtype == x.dtype
    assert float((y.float() - ref.float()).norm() / ref.float().norm()) <= 5e-3  # bf16 output rounding
    exact = _exact(x, q, scale) + (b.double() if bias else 0)
    assert float((y.double() - exact).norm() / exact.norm()) <= 5e-3


@pytest.mark.gpu
@needs_gpu
def test_gpu_int8_wo_linear_takes_the_planes_in_a_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    from autoglm_trt import plugins
    from autoglm_trt.layers import quant as Q
    from autoglm_trt.layers.linear import RowParallelLinear

    lin = RowParallelLinear(13696, 4096).cuda()
    lin.weight.data = torch.randn_like(lin.weight) * 0.02
    q, s = Q.quantize_weight(lin.weight.data)
    lin.weight, lin.weight_scale = torch.nn.Parameter(q, requires_grad=False), torch.nn.Parameter(s, requires_grad=False)
    lin.quant_method = Q.Int8WeightOnlyMethod()
    gu = torch.randn(1, 2 * 13696, device="cuda").to(torch.bfloat16)
    lin(plugins.silu_mul(gu, a16=True))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h = plugins.silu_mul(gu, a16=True)
        y = lin(h)
    assert h.a16 is not None
    for _ in range(2):
        gu.normal_()
        graph.replay()
        torch.cuda.synchronize()
        ref = Q.w8a16_reference(h, q, s)
        assert float((y.float() - ref.float()).norm() / ref.float().norm()) <= 5e-3
    monkeypatch.setenv("AUTOGLM_TRT_INT8_A16", "0")
    assert getattr(plugins.silu_mul(gu, a16=True), "a16", None) is None
