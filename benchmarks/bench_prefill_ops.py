"""The screenshot request's GPU building blocks, alone, on one GPU: where a first token's time can still go.

    python benchmarks/bench_prefill_ops.py [--patches 12432] [--tokens 3814] [--json out.json]

1. GEMMs at the vision tower's shapes (M = patches) and the decoder prefill's (M = prompt tokens):
   bf16 `F.linear` (cuBLAS) against FP8 e4m3 `torch._scaled_mm` alone (x quantized beforehand) and against
   the fp8 mode's whole linear (layers/fp8.fp8_linear: x quantized per row by the Triton pass, then the GEMM);
   TFLOP/s of each and the speed-up. (Session 4's recorded run quantized x with torch ops instead.)
2. The tower's attention [1, 12, N, 128] under each SDPA backend (flash, cuDNN, memory-efficient).
3. The decoder prefill's causal GQA attention (32 query heads over 2 KV heads, head 128): our paged
   Triton kernel (plugins.paged_attention over a 16-token-page cache) against SDPA's backends on the
   contiguous K/V of the same prompt.
No checkpoint needed; random tensors of the 9B shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import median_event_ms  # noqa: E402

# (name, K, N): the tower's (hidden 1536, MLP 4096) and the decoder's (hidden 4096, FFN 13696) linears
TOWER = [("v.qkv", 1536, 4608), ("v.proj", 1536, 1536), ("v.gate_up", 1536, 8192), ("v.down", 4096, 1536)]
DECODER = [("t.qkv", 4096, 4608), ("t.o", 4096, 4096), ("t.gate_up", 4096, 27392), ("t.down", 13696, 4096)]
BACKENDS = (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION))


def timed(fn, iters: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    return median_event_ms(fn, iters)


def gemm_row(name: str, m: int, k: int, n: int) -> dict:
    from autoglm_trt.layers import fp8
    from autoglm_trt.plugins import int8_gemm as G

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    flop = 2 * m * k * n
    bf16 = timed(lambda: F.linear(x, w))
    row = {"gemm": name, "m": m, "k": k, "n": n, "bf16_ms": bf16, "bf16_tflops": flop / bf16 / 1e9}
    try:
        wq, ws = fp8.quantize_weight(w)  # [N, K] e4m3, [N]
        xq, xs = G.quantize_per_token(x, fp8=True)  # [M, K] e4m3, [M]
        gemm_only = timed(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs[:, None], scale_b=ws[None, :],
                                                   out_dtype=torch.bfloat16))
        total = timed(lambda: fp8.fp8_linear(x, wq, ws, None, G))  # the engine's fp8 linear: quantize x + GEMM
        ref = F.linear(x.float(), w.float())
        err = ((fp8.fp8_linear(x, wq, ws, None, G).float() - ref).norm() / ref.norm()).item()
        row.update(fp8_gemm_ms=gemm_only, fp8_linear_ms=total, fp8_tflops=flop / gemm_only / 1e9,
                   speedup=bf16 / total, fp8_rel_err=err)
    except Exception as exc:  # noqa: BLE001 - a GEMM torch refuses is the finding
        row["fp8_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def sdpa_backends(q, k, v, flop: float, **kw) -> dict:
    out = {}
    for name, be in BACKENDS:
        try:
            with sdpa_kernel([be]):
                ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, **kw))
            out[name] = {"ms": ms, "tflops": flop / ms / 1e9}
        except Exception as exc:  # noqa: BLE001
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    return out


def tower_attention(n: int, heads: int = 12, dim: int = 128) -> dict:
    q, k, v = (torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return sdpa_backends(q, k, v, 4 * n * n * heads * dim)


def prefill_attention(t: int, heads: int = 32, kv_heads: int = 2, dim: int = 128, page: int = 16) -> dict:
    from autoglm_trt import plugins

    q = torch.randn(t, heads, dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(t, kv_heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flop = 2 * t * t * heads * dim  # causal: half of 4 * t^2 * H * D
    blocks = (t + page - 1) // page
    k_cache = torch.zeros(blocks, page, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    k_cache.view(-1, kv_heads, dim)[:t] = k
    v_cache.view(-1, kv_heads, dim)[:t] = v
    cu = torch.tensor([0, t], device="cuda", dtype=torch.int32)
    lens = torch.tensor([t], device="cuda", dtype=torch.int32)
    table = torch.arange(blocks, device="cuda", dtype=torch.int32)[None]
    ours = timed(lambda: plugins.paged_attention(q, k_cache, v_cache, cu, lens, table, t, t, dim ** -0.5))
    res = {"paged_triton": {"ms": ours, "tflops": flop / ours / 1e9}}
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, H, T, D]
    res["sdpa_gqa"] = sdpa_backends(qh, kh, vh, flop, is_causal=True, enable_gqa=True)
    rep = heads // kv_heads
    ke, ve = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
    res["sdpa_expanded_kv"] = sdpa_backends(qh, ke, ve, flop, is_causal=True)
    ref = F.scaled_dot_product_attention(qh.float(), ke.float(), ve.float(), is_causal=True)[0].transpose(0, 1)
    got = plugins.paged_attention(q, k_cache, v_cache, cu, lens, table, t, t, dim ** -0.5)
    res["paged_triton"]["max_err"] = (got.float() - ref).abs().max().item()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, default=12432, help="vision patches of one 1080x2400 screenshot")
    ap.add_argument("--tokens", type=int, default=3814, help="prompt tokens of the screenshot request")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "cudnn": torch.backends.cudnn.version()}
    res["gemms"] = [gemm_row(nm, args.patches, k, n) for nm, k, n in TOWER]
    res["gemms"] += [gemm_row(nm, args.tokens, k, n) for nm, k, n in DECODER]
    res["tower_attention"] = tower_attention(args.patches)
    res["prefill_attention"] = prefill_attention(args.tokens)
    for tag, rows in (("tower", TOWER), ("decoder", DECODER)):
        mine = [r for r in res["gemms"] if r["gemm"].startswith(tag[0] + ".")]
        layers = 24 if tag == "tower" else 40
        res[f"{tag}_gemm_ms_per_forward"] = {
            "bf16": layers * sum(r["bf16_ms"] for r in mine),
            "fp8": layers * sum(r.get("fp8_linear_ms", float("nan")) for r in mine)}
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
