"""The W4A16 Triton kernels (plugins/int4_gemm.py, int4_gemv.py) against layers.int4.int4_reference.

CPU: the kernels under the Triton interpreter and compiled for sm_90 (this file run as a script in a subprocess:
TRITON_INTERPRET must be set before triton is imported). GPU (@gpu): the 9B's shapes at decode and prefill
sizes, every sweep candidate, a CUDA-graph replay, and the linear method's dispatch.
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

from autoglm_trt.layers import int4 as L

HERE = Path(__file__).resolve()
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
SHAPES = {"qkv": (4608, 4096, True), "o": (4096, 4096, False), "gate_up": (27392, 4096, False),
          "down": (4096, 13696, False), "down_tp2": (4096, 6848, False)}  # (N, K, bias); 6848: a short last group


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def case(fn: str, m: int, n: int, k: int, group: int = 128, bias: bool = False, x_dtype=torch.float32,
         scale_dtype=torch.float16, config=None, device: str = "cpu", seed: int = 0, silu: bool = False) -> float:
    """One kernel call (gemv / matmul / w4a16_linear / dequantize) vs the reference; rows of different ranges.
    silu: x is [m, 2k] = [gate | up] and the GEMV feeds silu(gate) * up (rounded to x's dtype) to the weights."""
    from autoglm_trt.plugins import int4_gemm as K

    g = torch.Generator(device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device) * (0.01 + 0.1 * torch.rand(n, 1, generator=g, device=device))
    packed, scale, zero = L.quantize_int4(w, group, scale_dtype=scale_dtype)
    if fn == "dequantize":
        out = K.dequantize(packed, scale, zero, group, torch.float32)
        return rel_err(out, L.dequantize_int4(packed, scale, zero, group))
    x = torch.randn(m, 2 * k if silu else k, generator=g, device=device).to(x_dtype)
    b = torch.randn(n, generator=g, device=device).to(x_dtype) if bias else None
    kw = {"config": config} if config is not None else {}
    y = getattr(K, fn)(x, packed, scale, zero, group, b, **kw, **({"silu_mul": True} if silu else {}))
    assert y.shape == (m, n) and y.dtype == x.dtype
    act = (torch.nn.functional.silu(x[:, :k].float()) * x[:, k:].float()).to(x_dtype) if silu else x
    return rel_err(y, L.int4_reference(act, packed, scale, zero, group, b)) if m else 0.0


def interp_cases() -> list[tuple[str, dict, float]]:
    """(name, case kwargs, tolerance): small shapes, every kind of config, ragged K and N."""
    from autoglm_trt.plugins import int4_gemm as K

    cases = []
    for x_dt, tol in ((torch.float32, 3e-5), (torch.bfloat16, 2e-2)):  # NOTE: the GEMV loses 7 bits (int4_gemv)
        d = str(x_dt)[6:]
        for cfg in (K.GemvConfig(4, 1, 4), K.GemvConfig(2, 2, 1), K.GemvConfig(8, 4, 4), None):
            tag = cfg.tag if cfg else "default"
            cases.append((f"gemv-{tag}-{d}", {"fn": "gemv", "m": 2, "n": 20, "k": 1032, "bias": True,
                                               "x_dtype": x_dt, "config": cfg}, tol))
        for cfg in (K.GemmConfig(16, 16, 32), K.GemmConfig(16, 32, 32, split_k=3),
                    K.GemmConfig(32, 16, 16, 2, 4, 2, True), None):
            tag = cfg.tag if cfg else "default"
            cases.append((f"matmul-{tag}-{d}", {"fn": "matmul", "m": 5, "n": 37, "k": 200, "group": 32, "bias": True,
                                                 "x_dtype": x_dt, "config": cfg}, tol))
    edge = {"gemv-k<step": {"fn": "gemv", "m": 1, "n": 3, "k": 64, "group": 32},
            "gemv-m3-fp32-scales": {"fn": "gemv", "m": 3, "n": 12, "k": 512, "scale_dtype": torch.float32},
            "gemv-bf16-scales": {"fn": "gemv", "m": 1, "n": 9, "k": 256, "scale_dtype": torch.bfloat16},
            "gemv-m0": {"fn": "gemv", "m": 0, "n": 8, "k": 64, "group": 32},
            "gemv-silu-mul": {"fn": "gemv", "m": 2, "n": 20, "k": 392, "group": 64, "bias": True, "silu": True},
            "gemv-silu-mul-bf16": {"fn": "gemv", "m": 1, "n": 20, "k": 512, "x_dtype": torch.bfloat16, "silu": True},
            "matmul-m70-prefill-tile": {"fn": "matmul", "m": 70, "n": 24, "k": 256, "group": 64},
            "linear-dispatch-m1": {"fn": "w4a16_linear", "m": 1, "n": 16, "k": 256},
            "linear-dispatch-m9": {"fn": "w4a16_linear", "m": 9, "n": 16, "k": 256},
            "dequantize-short-group": {"fn": "dequantize", "m": 0, "n": 40, "k": 200, "group": 64}}
    cases += [(name, kw, 2e-2 if kw.get("x_dtype") == torch.bfloat16 else 3e-5) for name, kw in edge.items()]
    return cases


def aot_rows() -> list[dict]:
    """Compile the default configs for sm_90 (no GPU needed): errors, registers, spills, shared-memory traffic."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from autoglm_trt.plugins import int4_gemm as K
    from autoglm_trt.plugins import int4_gemv as V

    sys.path.insert(0, str(HERE.parent))
    from aot_compile import _resources

    def build(name, fn, consts, warps, stages):
        ptrs = {"w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "p_ptr": "*fp32"}
        sig = {a: "constexpr" if a in consts else ptrs.get(a, "*bf16") if a.endswith("_ptr") else "i32"
               for a in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if a not in consts and a not in ("N", "K", "one")}
        kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": warps, "num_stages": stages})
        regs, stack = _resources(kernel.asm["cubin"])
        ptx = kernel.asm["ptx"]
        return {"name": name, "regs": regs, "stack": stack, "smem": kernel.metadata.shared,
                "loop_shared": sum(body.count(".shared") for body in _loops(ptx)),
                "i2f": ptx.count("cvt.rn.f32.s32") + ptx.count("cvt.rn.f32.u32"),
                "mma": "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "none"}

    rows = []
    for m, n, k, silu in ((1, 4608, 4096, False), (1, 4096, 13696, True), (2, 27392, 4096, False)):
        cfg = K.gemv_config(m, n, k)
        rows.append(build(f"gemv-{n}x{k}-{cfg.tag}{'-silu' if silu else ''}", V._gemv_kernel,
                          {"GROUP": 128, "HAS_BIAS": n == 4608, "PRMT": True, "SILU_MUL": silu, "BLOCK_N": cfg.block_n,
                           "UNROLL": cfg.unroll}, cfg.num_warps, 1))
    for m, n, k in ((8, 4608, 4096), (32, 4096, 13696), (3500, 27392, 4096)):
        cfg = K.gemm_config(m, n, k, 128, 132)
        consts = {"GROUP": 128, "HAS_BIAS": False, "SPLIT_K": cfg.split_k, "EVEN_K": True,
                  "DEQUANT_TILE": cfg.dequant_tile, "DOT_F32": False, "PRMT": True, "BLOCK_M": cfg.block_m,
                  "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k}
        rows.append(build(f"matmul-{m}x{n}x{k}-{cfg.tag}", K._matmul_kernel, consts, cfg.num_warps, cfg.num_stages))
    rows.append(build("dequantize", K._dequant_kernel, {"GROUP": 128, "BLOCK_N": 32, "BLOCK_K": 256}, 4, 1))
    return rows


def _loops(ptx: str) -> list[str]:
    """The PTX between each label and a later branch back to it: the bodies of the loops."""
    import re

    bodies = []
    for found in re.finditer(r"^(\$L__BB\d+_\d+):", ptx, re.M):
        back = re.compile(r"bra(?:\.uni)?\s+" + re.escape(found.group(1)) + ";").search(ptx, found.end())
        if back:
            bodies.append(ptx[found.end():back.start()])
    return bodies


def _script(mode: str, timeout: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[2]), TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    if mode == "interp":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, str(HERE), mode], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


# ---- CPU: interpreter and sm_90 compile ---------------------------------------------------------------
@needs_triton
def test_configs_are_validated() -> None:
    from autoglm_trt.plugins import int4_gemm as K

    for bad in ({"block_n": 3}, {"unroll": 0}, {"num_warps": 6}):
        with pytest.raises(ValueError, match="GemvConfig"):
            K.GemvConfig(**bad)
    with pytest.raises(ValueError, match="GemmConfig"):
        K.GemmConfig(8, 32, 32)
    for m in (1, 2, 8, 32, 64, 65, 3500):
        cfg = K.gemm_config(m, 4608, 4096, 128, 132)
        assert cfg == K.gemm_config(m, 4608, 4096, 128, 132) and 128 % cfg.block_k == 0  # shapes only, one group a step
    assert len({c.tag for c in K.gemv_candidates()}) == len(K.gemv_candidates())


@needs_triton
def test_bad_arguments_say_what_is_wrong() -> None:
    from autoglm_trt.plugins import int4_gemm as K

    packed, scale, zero = L.quantize_int4(torch.randn(8, 256), 128)
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match="packed int32"):
        K.gemv(torch.randn(2, 128), packed, scale, zero, 128)
    with pytest.raises(ValueError, match="zero must be float"):
        K.gemv(x, packed, scale, zero[:, :1], 128)
    with pytest.raises(ValueError, match="power of two"):
        K.matmul(x, packed, scale, zero, 96)
    p32, s32, z32 = L.quantize_int4(torch.randn(8, 256), 32)
    with pytest.raises(ValueError, match="divide the group"):
        K.matmul(x, p32, s32, z32, 32, config=K.GemmConfig(16, 16, 64))


def _prmt(a: int, b: int, c: int) -> int:
    """PTX prmt.b32 (default mode): byte k of d is byte c[4k+2:4k] of {b, a} (a = bytes 0..3), sign-fill if c[4k+3]."""
    src = (b << 32) | a
    out = 0
    for k in range(4):
        sel = (c >> (4 * k)) & 15
        byte = (src >> (8 * (sel & 7))) & 0xFF
        out |= ((0xFF if byte & 0x80 else 0) if sel & 8 else byte) << (8 * k)
    return out


@needs_triton
def test_the_gemv_nibble_asm_gives_the_interpreters_floats() -> None:
    """The inline PTX (CUDA only) and the integer path that the interpreter runs must make the same 8 floats."""
    import re
    import struct

    from autoglm_trt.plugins import int4_gemv as V

    asm = V._NIBBLES_ASM.value if hasattr(V._NIBBLES_ASM, "value") else V._NIBBLES_ASM
    g = torch.Generator().manual_seed(0)
    for word in [0, 0xFFFFFFFF, 0x76543210, 0x89ABCDEF] + torch.randint(0, 2**32, (50,), generator=g).tolist():
        regs = {"$8": word, "lo": word & 0x0F0F0F0F, "hi": (word >> 4) & 0x0F0F0F0F}
        for out, src, b, c in re.findall(r"prmt\.b32 (\$\d), (\w+), (0x[0-9A-F]+), (0x[0-9A-F]+);", asm):
            regs[out] = _prmt(regs[src], int(b, 16), int(c, 16))
        for i in range(8):
            q = (word >> (4 * i)) & 15
            got = struct.unpack("<f", struct.pack("<I", regs[f"${i}"]))[0]
            assert got == 0.5 * (1 + q / 128), (hex(word), i)


@pytest.mark.triton_interp
@needs_triton
def test_kernels_under_the_triton_interpreter() -> None:
    rows = _script("interp", 400)
    assert len(rows) >= 24
    failed = [r for r in rows if not r["err"] <= r["tol"]]
    assert not failed, "\n".join(json.dumps(r) for r in failed)


@pytest.mark.triton_interp
@needs_triton
def test_kernels_compile_for_sm90_without_spills() -> None:
    rows = _script("aot", 500)
    assert len(rows) == 7, rows
    assert all(r["stack"] == 0 and r["i2f"] == 0 for r in rows), rows  # nibbles to floats without I2F
    assert all(r["loop_shared"] == 0 for r in rows if r["name"].startswith("gemv")), rows  # no layout shuffles
    assert [r["mma"] for r in rows if r["name"].startswith("matmul")] == ["mma", "mma", "wgmma"], rows


# ---- GPU ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 8, 32, 600])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_kernels_at_9b_shapes(shape: str, m: int) -> None:
    n, k, bias = SHAPES[shape]
    fns = ["w4a16_linear", "matmul"] + (["gemv"] if m <= 8 else [])
    for fn in fns:
        assert case(fn, m, n, k, bias=bias, x_dtype=torch.bfloat16, device="cuda", seed=m) < 1e-2, fn
    assert case("dequantize", 0, n, k, device="cuda") < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2])
def test_gpu_gemv_with_silu_mul_at_down_proj(m: int) -> None:
    assert case("gemv", m, 4096, 13696, x_dtype=torch.bfloat16, device="cuda", silu=True, seed=m) < 1e-2


@pytest.mark.slow
@pytest.mark.gpu
def test_gpu_every_sweep_candidate() -> None:
    from autoglm_trt.plugins import int4_gemm as K

    for cfg in K.gemv_candidates():
        assert case("gemv", 1, 4096, 13696, x_dtype=torch.bfloat16, config=cfg, device="cuda") < 1e-2, cfg
    for m in (8, 32, 300):
        for cfg in K.gemm_candidates(m):
            assert case("matmul", m, 4096, 13696, x_dtype=torch.bfloat16, config=cfg, device="cuda") < 1e-2, cfg


@pytest.mark.gpu
def test_gpu_int4_linear_replays_in_a_cuda_graph() -> None:
    from autoglm_trt.plugins import int4_gemm as K

    packed, scale, zero = L.quantize_int4(torch.randn(4608, 4096, device="cuda") * 0.02)
    for m in (1, 8):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        K.w4a16_linear(x, packed, scale, zero, 128)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = K.w4a16_linear(x, packed, scale, zero, 128)
        for _ in range(2):
            x.normal_()
            graph.replay()
            torch.cuda.synchronize()
            assert rel_err(y, L.int4_reference(x, packed, scale, zero, 128)) < 1e-2


if __name__ == "__main__":  # the subprocess half of the interpreter / sm_90 tests
    if sys.argv[1] == "interp":
        for name, kw, tol in interp_cases():
            print(json.dumps({"name": name, "err": case(**kw), "tol": tol}), flush=True)
    else:
        for row in aot_rows():
            print(json.dumps(row), flush=True)
