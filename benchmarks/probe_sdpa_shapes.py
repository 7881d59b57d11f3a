"""What a new prompt length costs SDPA: the first call at a shape (cuDNN builds an execution plan for it) vs
the next call at the same shape, for causal GQA at the 9B decoder's heads (32 query, 2 kv, dim 128).

    python benchmarks/probe_sdpa_shapes.py [--lengths 3000,3001,3002,3072] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from autoglm_trt.layers.attention import SDPA_BACKENDS


def timed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="3000,3001,3002,3072,3072")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for t in (int(x) for x in args.lengths.split(",")):
        q = torch.randn(1, 32, t, 128, device="cuda", dtype=torch.bfloat16)  # [1, H, T, D]
        k, v = (torch.randn(1, 2, t, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))  # [1, kvH, T, D]
        first, second = timed(q, k, v), timed(q, k, v)
        rows.append({"tokens": t, "first_ms": first, "second_ms": second})
        print(f"T={t}: first call {first:.1f} ms, second {second:.2f} ms")
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
           "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
