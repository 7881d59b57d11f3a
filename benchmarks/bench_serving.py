"""Serving benchmark over the OpenAI streaming API (same as `autoglm-trt bench`).

    python benchmarks/bench_serving.py http://localhost:8000 --concurrency 1,8,32,128 \
        --prompt-len 467 --gen-len 256 [--image screenshot.png] [--json out.json]

Reports TTFT and inter-token latency p50/p99, requests/s and output tokens/s per concurrency level.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autoglm_trt.errors import UserError
from autoglm_trt.serve.bench import run_bench


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", help="server base URL, e.g. http://localhost:8000")
    ap.add_argument("--concurrency", default="1,8,32,128", help="comma-separated client counts")
    ap.add_argument("--prompt-len", type=int, default=467)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--image", type=Path, default=None, help="PNG/JPEG sent with every request")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    ap.add_argument("--num-requests", type=int, default=None, help="per level (default 4 x concurrency, >= 16)")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="time limit per level")
    ap.add_argument("--model", default=None, help="model name (default: the server's first)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--logprobs", action="store_true", help="time every token via logprobs")
    ap.add_argument("--unique-images", action="store_true", help="a distinct copy of --image per request (cold caches)")
    args = ap.parse_args(argv)
    try:
        run_bench(args.url, [int(c) for c in args.concurrency.split(",") if c.strip()], args.prompt_len,
                  args.gen_len, args.image, args.json, num_requests=args.num_requests,
                  max_seconds=args.max_seconds, model=args.model, api_key=args.api_key,
                  logprobs=args.logprobs, unique_images=args.unique_images)
    except (UserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
