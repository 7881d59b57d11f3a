"""Launch chosen decode GEMVs once each at the 9B shapes, for Nsight Compute to read their counters.

    ncu --clock-control none --kernel-name regex:_gemv_kernel --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section MemoryWorkloadAnalysis python benchmarks/ncu_gemv.py \\
        int8:gate_up:n2k512w1s1-vec bf16:gate_up:n2k1024w4s1-vec int8:qkv:n4k512w4s1-vec

Each argument is KIND:SHAPE:TAG (KIND bf16 or int8, SHAPE a key of bench_gemv.SHAPES, TAG a GemvConfig tag).
Every kernel is compiled by a first launch on other weights, so the profiled launch reads cold weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemv import SHAPES  # noqa: E402


def main() -> None:
    from autoglm_trt.layers import quant as Q
    from autoglm_trt.plugins import triton_gemv as G

    for spec in sys.argv[1:]:
        kind, shape, tag = spec.split(":")
        n, k, _, silu = SHAPES[shape]
        cfg = G.GemvConfig.from_tag(tag)
        x = torch.randn(1, 2 * k if silu else k, device="cuda", dtype=torch.bfloat16)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(2)]
        args = [(w,) if kind == "bf16" else Q.quantize_weight(w) for w in ws]
        for a in args:  # the first compiles (and warms the caches with the wrong weights), the second is read
            G.gemv(x, *a, silu_mul=silu, config=cfg)
        torch.cuda.synchronize()
        print(f"launched {spec}", flush=True)


if __name__ == "__main__":
    main()
