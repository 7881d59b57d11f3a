"""INT8 transforms (layers/quant.py) and kernels (plugins/int8_gemm.py).

CPU: quantizer error bounds, the tiny model quantized vs float, SmoothQuant folding exactness,
state-dict round trips, the Triton kernels under the interpreter (this file run as a script in a
subprocess: TRITON_INTERPRET must be set before triton is imported) and compiled for sm_90.
GPU (@gpu): the kernels at the 9B shapes against the references, under a CUDA graph too.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoglm_trt.layers import parallel
from autoglm_trt.layers import quant as Q
from autoglm_trt.layers.linear import RowParallelLinear

HERE = Path(__file__).resolve()
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


# ---- quantizers and references -------------------------------------------------------------------
def test_weight_round_trip_within_half_a_step() -> None:
    w = torch.randn(64, 96) * torch.logspace(-2, 1, 64)[:, None]  # rows of very different ranges
    q, scale = Q.quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (64,) and int(q.abs().max()) <= 127
    err = (Q.dequantize_weight(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())
    assert torch.equal(q.abs().amax(1), torch.full((64,), 127, dtype=torch.int8))  # full range used


def test_per_token_quant_bounds_and_static_saturation() -> None:
    x = torch.randn(5, 64)
    x[2] = 0.0  # an all-zero row must not divide by zero
    mul = torch.rand(64) + 0.5
    q, s = Q.quantize_per_token_reference(x, mul)
    err = (q.float() * s[:, None] - x * mul).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all()) and bool((q[2] == 0).all())
    q, s = Q.quantize_per_token_reference(x * 10, static_scale=torch.tensor([0.01]))
    assert int(q.max()) == 127 and int(q.min()) == -128 and bool((s == 0.01).all())


def test_reference_gemms_match_float() -> None:
    x, w, b = torch.randn(7, 128), torch.randn(48, 128) * 0.05, torch.randn(48)
    q, s = Q.quantize_weight(w)
    assert rel_err(Q.w8a16_reference(x, q, s, b), x @ w.t() + b) < 0.01
    xq, xs = Q.quantize_per_token_reference(x)
    assert rel_err(Q.w8a8_reference(xq, xs, q, s, b, torch.float32), x @ w.t() + b) < 0.02


# ---- the tiny model ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(our_model):
    return our_model


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 151000, (48,), generator=g), torch.arange(48).expand(3, -1)


def logits(m, batch) -> torch.Tensor:
    ids, pos = batch
    with torch.inference_mode():
        return m.compute_logits(m(m.embed(ids), pos))  # [T, V]


def channel_amax(m, batch) -> dict[str, torch.Tensor]:
    amax, handles = {}, []
    for key, lin in Q.decoder_linears(m):
        def hook(_mod, args, key=key):
            a = args[0].abs().amax(0)
            amax[key] = a if key not in amax else torch.maximum(amax[key], a)
        handles.append(lin.register_forward_pre_hook(hook))
    logits(m, batch)
    for h in handles:
        h.remove()
    return amax


@pytest.mark.parametrize("mode,kw,max_rel,min_top1", [  # NOTE: random weights: near-ties flip a few argmaxes
    ("int8-wo", {}, 0.03, 0.85),
    ("w8a8", {}, 0.05, 0.8),
    ("w8a8", {"smooth": True}, 0.05, 0.8),
    ("w8a8", {"smooth": True, "act_quant": "static"}, 0.06, 0.8),
    ("fp8", {}, 0.09, 0.7),  # e4m3: 3 mantissa bits on weights and activations
])
def test_quantized_tiny_model_close_to_float(model, batch, mode, kw, max_rel, min_top1) -> None:
    ref = logits(model, batch)
    m = copy.deepcopy(model)
    act = channel_amax(model, batch) if kw.pop("smooth", False) else None
    Q.quantize_model(m, mode, act, **kw)
    out = logits(m, batch)
    assert rel_err(out, ref) < max_rel
    assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) >= min_top1
    assert m.quant_config["mode"] == mode
    lin = m.language_model.layers[0].mlp.down_proj
    want = torch.float8_e4m3fn if mode == "fp8" else torch.int8
    assert lin.weight.dtype == want and lin.weight_scale.dtype == torch.float32
    assert m.lm_head.weight.dtype == torch.int8 and m.lm_head.weight_scale.shape == (m.lm_head.weight.shape[0],)
    assert m.visual.blocks[0].attn.qkv.weight.dtype == torch.float32 and m.quant_config["lm_head"] == "int8"


def test_lm_head_can_stay_float(model, batch) -> None:
    m = copy.deepcopy(model)
    Q.quantize_model(m, "int8-wo", lm_head=False)
    assert m.lm_head.weight.dtype == torch.float32 and m.quant_config["lm_head"] is None
    assert torch.equal(m.lm_head.weight, model.lm_head.weight)


def test_int8_lm_head_is_w8a16_of_its_rows(model, batch) -> None:
    m = copy.deepcopy(model)
    Q.quantize_lm_head(m.lm_head)
    h = torch.randn(3, model.lm_head.weight.shape[1])
    want = Q.w8a16_reference(h, m.lm_head.weight, m.lm_head.weight_scale)[:, :model.lm_head.vocab_size]
    assert torch.equal(m.lm_head(h), want)
    assert rel_err(m.lm_head(h), model.lm_head(h)) < 0.01


def test_smoothing_leaves_the_float_function_unchanged(model, batch) -> None:
    ref = logits(model, batch)
    m = copy.deepcopy(model)
    scales = Q.compute_smooth_scales(m, channel_amax(model, batch), alpha=0.5)
    assert set(scales) == {k for k, _ in Q.decoder_linears(m)}
    assert max(float(s.max() / s.min()) for s in scales.values()) > 1.5  # it did migrate something
    Q.apply_smoothing(m, scales)
    assert not torch.equal(m.language_model.layers[0].input_layernorm.weight,
                           model.language_model.layers[0].input_layernorm.weight)
    assert float((logits(m, batch) - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("mode,act_quant", [("int8-wo", "dynamic"), ("w8a8", "dynamic"), ("w8a8", "static"),
                                             ("fp8", "dynamic")])
def test_state_dict_round_trip(model, batch, tiny_model_dir, mode, act_quant) -> None:
    """The transform run on a meta model (what the engine loader does) lays out exactly the quantized state."""
    from autoglm_trt.config import ModelConfig
    from autoglm_trt.models.checkpoint import build_model, materialize

    m = copy.deepcopy(model)
    Q.quantize_model(m, mode, channel_amax(model, batch) if mode == "w8a8" else None, act_quant=act_quant)
    fresh = build_model(ModelConfig.from_dir(tiny_model_dir), torch.float32, "meta")
    Q.quantize_model(fresh, mode, act_quant=act_quant, lm_head=True)
    materialize(fresh, "cpu")
    fresh.load_state_dict(m.state_dict(), strict=True)
    assert torch.equal(logits(fresh, batch), logits(m, batch))
    keys = set(m.state_dict())
    assert "language_model.layers.1.self_attn.qkv_proj.weight_scale" in keys and "lm_head.weight_scale" in keys
    assert ("language_model.layers.1.self_attn.o_proj.smooth_scale" in keys) == (mode == "w8a8")
    assert ("language_model.layers.1.mlp.down_proj.input_scale" in keys) == (act_quant == "static" and mode == "w8a8")


def test_bad_arguments_say_what_is_wrong(model) -> None:
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="mode must be one of"):
        Q.quantize_model(m, "int4")
    with pytest.raises(ValueError, match="per-input-channel amax"):
        Q.quantize_model(m, "w8a8", {"layers.0.mlp.down_proj": torch.tensor(3.0)})
    with pytest.raises(ValueError, match="needs calibration"):
        Q.quantize_model(m, "w8a8", act_quant="static")


def test_row_parallel_layers_take_their_slice_of_full_vectors() -> None:
    parallel.set_parallel_state(1, 2)
    try:
        lin = RowParallelLinear(8, 4)
        assert torch.equal(Q.local_slice(torch.arange(8.0), lin), torch.arange(4.0, 8.0))
        with pytest.raises(ValueError, match="does not fit"):
            Q.local_slice(torch.arange(6.0), lin)
    finally:
        parallel.set_parallel_state(0, 1)


def test_keys_are_canonical() -> None:
    assert Q.canonical_key("model.language_model.layers.3.mlp.down_proj") == "layers.3.mlp.down_proj"
    assert Q.linear_key(3, "self_attn.o_proj") == "layers.3.self_attn.o_proj"


# ---- Triton: interpreter on the CPU, and an sm_90 compile ---------------------------------------------
def interp_cases():
    """(name, fn() -> error, tolerance): each kernel variant vs its torch reference, small shapes."""
    from autoglm_trt.plugins import int8_gemm as G

    def w8a16(m, n, k, dtype, cfg):
        x, w, b = torch.randn(m, k).to(dtype), torch.randn(n, k), torch.randn(n).to(dtype)
        q, s = Q.quantize_weight(w)
        return rel_err(G.w8a16_matmul(x, q, s, b, config=cfg), Q.w8a16_reference(x, q, s, b))

    def w8a8(m, n, k, dtype, cfg):
        x, w, b = torch.randn(m, k).to(dtype), torch.randn(n, k), torch.randn(n).to(dtype)
        q, s = Q.quantize_weight(w)
        xq, xs = Q.quantize_per_token_reference(x)
        return rel_err(G.w8a8_matmul(xq, xs, q, s, b, dtype, cfg), Q.w8a8_reference(xq, xs, q, s, b, dtype))

    def quant(m, k, dtype, mul, static):
        x = torch.randn(m, k).to(dtype) * 3
        mul = torch.rand(k) + 0.5 if mul else None
        static = torch.tensor([0.02]) if static else None
        (q, s), (rq, rs) = G.quantize_per_token(x, mul, static), Q.quantize_per_token_reference(x, mul, static)
        return float((q.int() - rq.int()).abs().max()) + float((s - rs).abs().max())

    cases = []
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        d = str(dtype)[6:]
        for cfg in (None, G.GemmConfig(16, 32, 64, split_k=3), G.GemmConfig(16, 16, 32, split_k=2)):
            tag = f"s{cfg.split_k}" if cfg else "default"
            cases.append((f"w8a16-m1-{tag}-{d}", lambda c=cfg, dt=dtype: w8a16(1, 40, 200, dt, c), tol))
        for m in (3, 17, 70):
            cases.append((f"w8a16-m{m}-{d}", lambda m=m, dt=dtype: w8a16(m, 80, 320, dt, None), tol))
            cases.append((f"w8a8-m{m}-{d}", lambda m=m, dt=dtype: w8a8(m, 80, 320, dt, None), tol))
        cases.append((f"w8a8-splitk-{d}", lambda dt=dtype: w8a8(5, 48, 256, dt, G.GemmConfig(16, 32, 64, 2)), tol))
        for mul, static in ((False, False), (True, False), (True, True)):
            cases.append((f"quant-mul{int(mul)}-static{int(static)}-{d}",
                          lambda dt=dtype, a=mul, b=static: quant(6, 300, dt, a, b), 0.0))
    return cases


def _script(mode: str, timeout: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[2]), TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    if mode == "interp":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, str(HERE), mode], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@needs_triton
def test_kernels_under_the_triton_interpreter() -> None:
    rows = _script("interp", 300)
    assert len(rows) >= 20
    failed = [r for r in rows if not r["err"] <= r["tol"]]
    assert not failed, "\n".join(json.dumps(r) for r in failed)


def aot_rows() -> list[dict]:
    """Compile the decode / prefill variants for sm_90 (no GPU needed): errors, registers, spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from autoglm_trt.plugins import int8_gemm as G

    rows = []
    for m, n, k, act in ((1, 4608, 4096, False), (8, 4096, 13696, False), (64, 27392, 4096, False),
                         (512, 4096, 4096, False), (1, 4096, 4096, True), (64, 4096, 13696, True),
                         (512, 27392, 4096, True)):
        cfg = G.default_config(m, n, k, 132, int8_act=act)
        fn = G._int8_dot_kernel
        consts = {"HAS_BIAS": True, "SPLIT_K": cfg.split_k, "EVEN_K": k % cfg.block_k == 0, "BLOCK_N": cfg.block_n,
                      "BLOCK_K": cfg.block_k, "INT8_ACT": act, "DOT_F32": False, "BLOCK_M": cfg.block_m}
        ptrs = {"x_ptr": "*i8" if act else "*bf16", "w_ptr": "*i8", "b_ptr": "*bf16", "y_ptr": "*bf16"}
        sig = {a: "constexpr" if a in consts else ptrs.get(a, "*fp32") if a.endswith("_ptr") else "i32"
               for a in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if a.endswith("_ptr") or a in ("K", "stride_wn", "stride_xm", "stride_ym", "k_per_split")}
        kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        ptx = kernel.asm["ptx"]
        rows.append({"name": f"{'w8a8' if act else 'w8a16'}-{m}x{n}x{k}",
                     "stack": _stack_bytes(kernel.asm["cubin"]), "smem": kernel.metadata.shared,
                     "mma": "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "none"})
    return rows + fp8_aot_rows()


def fp8_aot_rows() -> list[dict]:
    """The fp8 mode's own kernels for sm_90: the per-token e4m3 quantizer and the GEMV on e4m3 weights."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from autoglm_trt.plugins import int8_gemm as G
    from autoglm_trt.plugins import triton_gemv as V

    def build(fn, consts, ptrs, warps):
        sig = {a: "constexpr" if a in consts else ptrs.get(a, "*bf16") if a.endswith("_ptr") else "i32"
               for a in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a not in consts}
        return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": 1})

    quant = build(G._quant_rows_kernel, {"HAS_MUL": False, "STATIC": False, "BLOCK": 16384, "FP8": True},
                  {"q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "mul_ptr": "*fp32", "static_ptr": "*fp32"}, 16)
    cfg = V.gemv_config(1, 4096, 13696, torch.float8_e4m3fn)
    gemv = build(V._gemv_kernel, {"HAS_SCALE": True, "HAS_BIAS": False, "SILU_MUL": False, "W_CVT": 0, "REDUCE":
                                  V.REDUCE.index(cfg.reduce), "BLOCK_M": 1, "BLOCK_N": cfg.block_n, "BLOCK_K":
                                  cfg.block_k, "VEC": 16, "NUM_STAGES": 1, "M": 1},
                 {"w_ptr": "*fp8e4nv", "s_ptr": "*fp32"}, cfg.num_warps)
    return [{"name": name, "stack": _stack_bytes(k.asm["cubin"]), "smem": k.metadata.shared,
             "cvt": "cvt.rn.satfinite.e4m3x2" in k.asm["ptx"] or "e4m3x2" in k.asm["ptx"]}
            for name, k in (("fp8-quant-rows", quant), ("fp8-gemv", gemv))]


def _stack_bytes(cubin: bytes) -> int:
    """Stack (= spill) bytes per thread, from the cuobjdump bundled with triton; -1 if unknown."""
    import re
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=False).stdout
    found = re.search(r"STACK:(\d+)", out)
    return int(found.group(1)) if found else -1


@needs_triton
def test_kernels_compile_for_sm90_without_spills() -> None:
    rows = _script("aot", 500)
    assert len(rows) == 9 and all(r["stack"] == 0 for r in rows), rows
    assert all(r["cvt"] for r in rows if r["name"].startswith("fp8")), rows  # e4m3 converted in hardware
    assert all(r["mma"] == "wgmma" for r in rows if "-512x" in r["name"]), rows


# ---- GPU -------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 8, 33, 64, 300])
@pytest.mark.parametrize("n,k", [(4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696)])
def test_gpu_kernels_at_9b_shapes(m, n, k) -> None:
    from autoglm_trt.plugins import int8_gemm as G

    torch.manual_seed(0)
    x, w = torch.randn(m, k, device="cuda").bfloat16(), torch.randn(n, k, device="cuda") * 0.02
    b = torch.randn(n, device="cuda").bfloat16()
    q, s = Q.quantize_weight(w)
    assert rel_err(G.w8a16_matmul(x, q, s, b), Q.w8a16_reference(x, q, s, b)) < 1e-2
    mul = torch.rand(k, device="cuda") + 0.5
    xq, xs = G.quantize_per_token(x, mul)
    rq, rs = Q.quantize_per_token_reference(x, mul)
    assert int((xq.int() - rq.int()).abs().max()) <= 1 and float((xs - rs).abs().max()) < 1e-6
    assert rel_err(G.w8a8_matmul(rq, rs, q, s, b), Q.w8a8_reference(rq, rs, q, s, b, torch.bfloat16)) < 1e-2


@pytest.mark.gpu
def test_gpu_quantized_linears_replay_in_a_cuda_graph(our_model, batch) -> None:
    m = copy.deepcopy(our_model).cuda().to(torch.bfloat16)
    ref_model = copy.deepcopy(m)
    Q.quantize_model(m, "w8a8", channel_amax(ref_model, (batch[0].cuda(), batch[1].cuda())))
    lin = m.language_model.layers[0].mlp.down_proj
    x = torch.randn(8, lin.in_features, device="cuda", dtype=torch.bfloat16)
    eager = lin(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lin(x)
    x.copy_(x * 0.5)
    graph.replay()
    assert rel_err(out, lin(x)) < 1e-3 and rel_err(eager, lin(x * 2)) < 2e-2


if __name__ == "__main__":  # the subprocess half of the interpreter / sm_90 tests
    if sys.argv[1] == "interp":
        torch.manual_seed(0)
        for name, fn, tol in interp_cases():
            print(json.dumps({"name": name, "err": fn(), "tol": tol}), flush=True)
    else:
        for row in aot_rows():
            print(json.dumps(row), flush=True)
