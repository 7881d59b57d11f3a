"""Probe: is the batch-1 INT8 GEMV bound by its arithmetic or by its memory traffic? (H100, 9B shapes)

    python benchmarks/probe_dp4a.py [--json out.json]

The GEMV of plugins/triton_gemv spends ~4 instructions per weight (int8 -> fp32, the activation's
bf16 -> fp32, an FMA) and reads int8 weights at ~2.6 TB/s where the same kernel reads bf16 ones at
~3.1. This probe times, at the decoder's shapes, in CUDA graphs with weights rotated past L2:
  gemv      the shipped GEMV (its default config)
  dp4a-3    the activation as a 24-bit fixed-point integer per token (3 byte planes, exact against the bf16
            values down to max|x| / 2**23), weights and planes multiplied by dp4a (4 products per
            instruction, int32 sums): ~1 instruction per weight
  dp4a-2    the same with 16 bits (2 planes): what the third plane costs
  read      the same tiling reading the weights only (XOR of the words): this tiling's memory ceiling
The activation planes are made by torch on the host side of the probe; a product would have to make
them somewhere: in a launch of their own, or in the kernels that write x. Both were built and timed in the
engine (commit 9bd5915) and came out flat or slower (docs/benchmarks.md, session 7), so this stays a probe.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemv import time_call  # noqa: E402

SHAPES = {"qkv": (4608, 4096), "o": (4096, 4096), "gate_up": (27392, 4096), "down": (4096, 13696)}
_DP4A_U = tl.constexpr("dp4a.s32.u32 $0, $1, $2, $3;")  # signed weight bytes . unsigned plane bytes
_DP4A_S = tl.constexpr("dp4a.s32.s32 $0, $1, $2, $3;")  # signed . signed (the top plane)


@triton.jit
def _dp(acc, w, x, SIGNED: tl.constexpr):
    asm: tl.constexpr = _DP4A_S if SIGNED else _DP4A_U
    return tl.inline_asm_elementwise(asm, "=r,r,r,r", [w, x, acc], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _probe_kernel(w_ptr, xp_ptr, s_ptr, y_ptr, sx, N, K4, stride_wn, MODE: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K4: tl.constexpr):
    """w: int32 words [N, K4] (4 int8 each); xp: planes [3, K4] words (lo, mid: unsigned bytes; hi: signed).
    MODE 3 / 2: dp4a with 3 / 2 planes; MODE 0: XOR of the weight words (the read alone)."""
    pid = tl.program_id(0)
    rows = tl.minimum(pid * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)  # [BN]
    kw = tl.arange(0, BLOCK_K4)[None, :] + tl.zeros((BLOCK_N, 1), tl.int32)  # [BN, BK4]: x gets W's layout
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + kw
    a0 = tl.zeros((BLOCK_N, BLOCK_K4), tl.int32)
    a1, a2 = a0, a0
    for k0 in range(0, K4, BLOCK_K4):
        live = kw < K4 - k0  # the ragged last step reads zeros
        w = tl.load(w_ptrs + k0, mask=live, other=0, eviction_policy="evict_first")
        if MODE == 0:
            a0 = a0 ^ w
        else:
            a0 = _dp(a0, w, tl.load(xp_ptr + 2 * K4 + k0 + kw, mask=live, other=0), True)  # hi plane, signed
            a1 = _dp(a1, w, tl.load(xp_ptr + K4 + k0 + kw, mask=live, other=0), False)  # mid
            if MODE == 3:
                a2 = _dp(a2, w, tl.load(xp_ptr + k0 + kw, mask=live, other=0), False)
    if MODE == 0:
        y = tl.sum(a0, axis=1).to(tl.float32)
    else:
        top = tl.sum(a0, axis=1).to(tl.float32) * 256.0 + tl.sum(a1, axis=1).to(tl.float32)
        y = top * 256.0 + tl.sum(a2, axis=1).to(tl.float32) if MODE == 3 else top
        y = y * tl.load(s_ptr + rows) * sx
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=offs < N)


def planes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    """x [1, K] -> (int32 words [3, K/4] of the byte planes lo, mid, hi; the scale). 16 bits: hi, mid hold
    the value (q = hi * 256 + mid), lo is zero and unread."""
    sx = float(x.float().abs().max()) / (2 ** (bits - 1) - 1)
    q = torch.round(x.float() / sx).to(torch.int32)[0]  # [K]
    if bits == 16:
        q = q * 256
    lo, mid, hi = q & 255, (q >> 8) & 255, q >> 16  # [K] each; hi in [-128, 127]
    b = torch.stack([lo.to(torch.uint8), mid.to(torch.uint8), hi.to(torch.int8).view(torch.uint8)])  # [3, K]
    return b.contiguous().view(torch.int32), sx


def probe(mode: int, x_planes, sx, wq, ws, n, k, bn, bk4) -> torch.Tensor:
    y = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    _probe_kernel[(triton.cdiv(n, bn),)](wq.view(torch.int32), x_planes, ws, y, sx, n, k // 4, k // 4, mode, bn, bk4,
                                         num_warps=4)
    return y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiles", default="4x128,2x256,4x256,8x128", help="BLOCK_N x BLOCK_K4 (words) tilings")
    args = ap.parse_args()
    from autoglm_trt.layers import quant as Q
    from autoglm_trt.plugins import triton_gemv as G

    rows = []
    print(torch.cuda.get_device_name(), flush=True)
    for name, (n, k) in SHAPES.items():
        copies = max(2, min(8, -(-150_000_000 // (n * k))))
        ws = [Q.quantize_weight(torch.randn(n, k, device="cuda") * 0.02) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
        ref = G.gemv_reference(x, *ws[0])[0].float()
        t_gemv = time_call([lambda w=w: G.gemv(x, *w) for w in ws], 20, 10)[0]
        rows.append({"shape": name, "impl": "gemv", "us": t_gemv})
        print(f"{name:>8} gemv (default) {t_gemv:7.2f} us {n * k / t_gemv / 1e6:5.2f} TB/s", flush=True)
        for tile in args.tiles.split(","):
            bn, bk4 = (int(v) for v in tile.split("x"))
            for mode, label in ((3, "dp4a-3"), (2, "dp4a-2"), (0, "read")):
                xp, sx = planes(x, 24 if mode == 3 else 16)
                out = probe(mode, xp, sx, *ws[0], n, k, bn, bk4).float()
                err = float((out - ref).norm() / ref.norm()) if mode else float("nan")
                us = time_call([lambda w=w, xp=xp: probe(mode, xp, sx, *w, n, k, bn, bk4) for w in ws], 20, 10)[0]
                rows.append({"shape": name, "impl": label, "tile": tile, "us": us, "rel_err": err})
                print(f"{name:>8} {label:<7} {tile:>6} {us:7.2f} us {n * k / us / 1e6:5.2f} TB/s  rel err {err:.1e}",
                      flush=True)
        del ws
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
