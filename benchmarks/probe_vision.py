"""Where the vision tower's and a screenshot prefill's GPU time goes, on one GPU.

    python benchmarks/probe_vision.py --model-dir /tmp/phone-9b [--size 1080x2400] [--json out.json]

1. SDPA backends (flash, cuDNN, memory-efficient) on one screenshot's vision attention shape
   [1, 12, N, 128] bf16: median ms and TFLOP/s.
2. torch.profiler over the vision tower and over the decoder prefill of the same prompt: the top
   kernels by GPU time (names shortened), so the next change goes where the time is.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import median_event_ms  # noqa: E402


def _median_ms(fn, iters: int = 10) -> float:
    fn()  # warm-up: compile, autotune, allocate
    torch.cuda.synchronize()
    return median_event_ms(fn, iters)


def attention_backends(n: int, heads: int = 12, dim: int = 128) -> dict:
    q, k, v = (torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flop = 4 * n * n * heads * dim
    out = {}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                ms = _median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
            out[name] = {"ms": ms, "tflops": flop / ms / 1e9}
        except Exception as exc:  # noqa: BLE001 - a backend that refuses the shape is a finding
            out[name] = {"error": str(exc)[:200]}
    return out


def top_kernels(fn, n: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": e.key[:90], "calls": e.count, "ms": t / 1000})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    return [{"total_ms": total}] + rows[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="/tmp/phone-9b")
    ap.add_argument("--size", default="1080x2400")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from autoglm_trt.calibration.screens import draw_screen
    from autoglm_trt.engine.llm import LLM
    from autoglm_trt.engine.sampling_params import SamplingParams

    w, h = (int(v) for v in args.size.split("x"))
    llm = LLM(args.model_dir, dtype="bfloat16", max_model_len=8192, max_num_seqs=8)
    eng = llm.engine
    shots = [draw_screen("chat", s, (w, h)) for s in range(3)]
    prompts = [eng.processor.process_chat([{"role": "user", "content": [
        {"type": "image", "image": im}, {"type": "text", "text": "tap the search box " * 75}]}]) for im in shots]
    img = prompts[0].images[0]
    from autoglm_trt.processing.pixels import cpu_pixels

    cpu = _median_ms(lambda: cpu_pixels(img.rgb, img.resized, img.spec).to("cuda", torch.bfloat16), 3)
    gpu = _median_ms(lambda: img.pixels_on(torch.device("cuda"), torch.bfloat16), 10)
    res = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "patches": img.num_patches,
           "prompt_tokens": len(prompts[0].prompt_token_ids)}
    res["pixels_ms"] = {"cpu_exact": cpu, "gpu": gpu}
    res["sdpa"] = attention_backends(img.num_patches)
    pixels = torch.as_tensor(img.pixel_values).to("cuda")
    visual = eng.model.visual

    def tower():
        with torch.inference_mode():
            visual(pixels, [img.grid_thw])

    res["tower_ms"] = _median_ms(tower, 5)
    res["tower_kernels"] = top_kernels(tower)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    it = iter(prompts[1:] * 4)

    def first_token():
        llm.generate(next(it), params)  # a new screenshot each time: tower + prefill, no cache answers

    res["tower_plus_prefill_kernels"] = top_kernels(first_token, 20)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
