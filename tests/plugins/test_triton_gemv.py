"""The decode GEMV (plugins/triton_gemv.py) against its torch reference.

CPU: configs and the shape-only config choice; the kernel under the Triton interpreter and compiled for
sm_90 (gemv_checks.py in a subprocess: TRITON_INTERPRET must be set before triton is imported).
GPU (@gpu): the 9B decoder's shapes, every sweep candidate, odd shapes, and replay in a CUDA graph.
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

HERE = Path(__file__).resolve().parent
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# name: (N, K, bias, silu_mul): the 9B decoder's linears (TP 1) and the LM head
SHAPES = {"qkv": (4608, 4096, True, False), "o": (4096, 4096, False, False), "gate_up": (27392, 4096, False, False),
          "down": (4096, 13696, False, False), "down_silu": (4096, 13696, False, True),
          "lm_head": (151552, 4096, False, False)}


def _script(mode: str, *extra: str, timeout: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]), TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(HERE / "gemv_checks.py"), mode, *extra], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


# ---- CPU ------------------------------------------------------------------------------------------------
@needs_triton
def test_configs_are_validated_and_chosen_from_shapes() -> None:
    from autoglm_trt.plugins import triton_gemv as G

    for bad in ({"block_n": 3, "block_k": 64}, {"block_n": 4, "block_k": 8}, {"block_n": 4, "block_k": 64, "reduce": "x"},
                {"block_n": 4, "block_k": 64, "i8": "fast"}, {"block_n": 4, "block_k": 64, "num_stages": 0}):
        with pytest.raises(ValueError, match="GemvConfig"):
            G.GemvConfig(**bad)
    for m in range(1, 10):
        for dtype in (torch.bfloat16, torch.int8, torch.float32):
            cfg = G.gemv_config(m, 4608, 4096, dtype)
            assert cfg == G.gemv_config(m, 4608, 4096, dtype)  # shapes only: CUDA-graph safe
            assert cfg.block_k % (16 // torch.empty(0, dtype=dtype).element_size()) == 0
    key = ("int8", 1, 4096, 13696, True)
    G.TABLE[key] = G.GemvConfig(2, 512, 1)
    try:
        assert G.gemv_config(1, 4096, 13696, torch.int8, silu_mul=True) == G.GemvConfig(2, 512, 1)
        assert G.gemv_config(1, 4096, 13696, torch.int8) != G.GemvConfig(2, 512, 1)
    finally:
        del G.TABLE[key]
    for m in (1, 4, 8):
        for kind in ("w16", "int8"):
            cands = G.candidates(m, kind)
            assert len(cands) >= 10 and len({c.tag for c in cands}) == len(cands)


@needs_triton
def test_bad_arguments_say_what_is_wrong() -> None:
    from autoglm_trt.plugins import triton_gemv as G

    x, w = torch.randn(2, 64), torch.randn(8, 64)
    with pytest.raises(ValueError, match="columns"):
        G.gemv(x, w, silu_mul=True)
    with pytest.raises(ValueError, match="scale"):
        G.gemv(x, w.to(torch.int8))
    with pytest.raises(ValueError, match="bias"):
        G.gemv(x, w, bias=torch.randn(7))
    with pytest.raises(ValueError, match="contiguous"):
        G.gemv(x, torch.randn(64, 8).t())


@pytest.mark.triton_interp
@needs_triton
def test_gemv_under_the_triton_interpreter() -> None:
    rows = _script("interp", timeout=400)
    assert len(rows) >= 40
    failed = [r for r in rows if not r["err"] <= r["tol"]]
    assert not failed, "\n".join(json.dumps(r) for r in failed)


@pytest.mark.slow
@pytest.mark.triton_interp
@needs_triton
def test_default_configs_compile_for_sm90_without_spills() -> None:
    rows = _script("aot", timeout=550)
    assert len(rows) == 16, rows
    bad = [r for r in rows if r["error"] or r["stack"] or r["loop_converts"]]
    assert not bad, "\n".join(json.dumps(r) for r in bad)


# ---- GPU ------------------------------------------------------------------------------------------------
def _check(w_dt, x_dt, m, n, k, **kw) -> float:
    sys.path.insert(0, str(HERE))
    from gemv_checks import check

    return check(w_dt, x_dt, m, n, k, device="cuda", **kw)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("w_dt", ["bf16", "int8"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_model_shapes(shape: str, m: int, w_dt: str) -> None:
    n, k, bias, silu = SHAPES[shape]
    assert _check(w_dt, "bf16", m, n, k, bias=bias, silu=silu, seed=m) <= 1e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("w_dt,x_dt,tol", [("fp32", "fp32", 1e-5), ("fp16", "fp16", 1e-2), ("bf16", "bf16", 1e-2),
                                           ("int8", "fp32", 1e-5), ("int8", "fp16", 1e-2)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("n,k", [(37, 131), (5, 40), (300, 1000)])
@pytest.mark.parametrize("silu,bias", [(False, False), (True, True)])
def test_gpu_odd_shapes(w_dt, x_dt, tol, m, n, k, silu, bias) -> None:
    assert _check(w_dt, x_dt, m, n, k, bias=bias, silu=silu, seed=n + m) <= tol


@pytest.mark.slow
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kind", ["w16", "int8"])
@pytest.mark.parametrize("m,silu", [(1, False), (1, True), (4, False), (4, True), (8, False)])
def test_gpu_every_sweep_candidate(kind: str, m: int, silu: bool) -> None:
    """What bench_gemv.py times must be right: every candidate, at a decoder shape with a ragged K step."""
    from autoglm_trt.plugins import triton_gemv as G

    w_dt = "int8" if kind == "int8" else "bf16"
    for cfg in G.candidates(m, kind, silu):
        assert _check(w_dt, "bf16", m, 4096, 13696, bias=True, silu=silu, cfg=cfg, seed=m) <= 1e-2, cfg


@pytest.mark.gpu
@needs_gpu
def test_gpu_replays_in_a_cuda_graph() -> None:
    """Capture once (config from shapes, output allocated in the graph pool); replays follow new inputs."""
    from autoglm_trt.layers import quant as Q
    from autoglm_trt.plugins import triton_gemv as G

    x = torch.randn(3, 2 * 13696, device="cuda", dtype=torch.bfloat16)
    q, s = Q.quantize_weight(torch.randn(4096, 13696, device="cuda") * 0.02)
    G.gemv(x, q, s, silu_mul=True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = G.gemv(x, q, s, silu_mul=True)
    for _ in range(3):
        x.normal_()
        graph.replay()
        torch.cuda.synchronize()
        ref = G.gemv_reference(x, q, s, silu_mul=True)
        assert float((y.float() - ref.float()).norm() / ref.float().norm()) <= 1e-2

