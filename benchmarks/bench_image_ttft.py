"""Where a screenshot request's time to first token goes, offline on one GPU: image preprocessing on the
CPU, the vision tower, and the decoder prefill (each image distinct, so no cache answers).

    python benchmarks/bench_image_ttft.py --model-dir /tmp/phone-9b [--size 1080x2400] [--quant none,fp8] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch


def _screens(n: int, size: tuple[int, int]):
    from autoglm_trt.calibration.screens import draw_screen

    return [draw_screen("chat", seed, size) for seed in range(n)]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _ms(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return 1000 * (time.perf_counter() - t0)


def measure(llm, images, text: str) -> dict:
    from autoglm_trt.engine.sampling_params import SamplingParams

    eng, rows = llm.engine, []
    for img in images:
        msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}]
        t0 = time.perf_counter()
        prompt = eng.processor.process_chat(msgs)
        cpu_ms = 1000 * (time.perf_counter() - t0)
        seq = type("S", (), {"images": prompt.images})()
        vision_ms = _ms(lambda: eng.runner.encode_images([seq]))
        eng.runner.encoder_cache.entries.clear()
        eng.runner.encoder_cache.rows = 0
        first = _ms(lambda: llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1)))
        rows.append({"cpu_ms": cpu_ms, "vision_ms": vision_ms, "vision_plus_prefill_ms": first,
                     "prompt_tokens": len(prompt.prompt_token_ids)})
    keys = rows[0].keys()
    return {k: statistics.median(r[k] for r in rows[1:]) for k in keys}  # the first is warm-up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="/tmp/phone-9b")
    ap.add_argument("--size", default="1080x2400")
    ap.add_argument("--words", type=int, default=300, help="text words after the image")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quant", default="none", help="comma-separated quant modes, one engine each: none,fp8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from autoglm_trt.engine.llm import LLM

    w, h = (int(v) for v in args.size.split("x"))
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    out = {}
    for mode in args.quant.split(","):
        llm = LLM(args.model_dir, dtype=dtype, max_model_len=8192, max_num_seqs=8,
                  **({"quant": mode} if mode != "none" else {}))
        res = measure(llm, _screens(args.repeats + 1, (w, h)), "tap the search box " * (args.words // 4))
        res.update(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", size=args.size,
                   date=time.strftime("%Y-%m-%d"), quant=mode)
        res["ttft_estimate_ms"] = res["cpu_ms"] + res["vision_plus_prefill_ms"]
        print(json.dumps(res, indent=2), flush=True)
        out[mode] = res
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(out if len(out) > 1 else res, indent=2))

if __name__ == "__main__":
    main()
