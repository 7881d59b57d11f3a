"""Where one engine step's GPU time goes, per quant mode: a text prefill and a small decode batch, as a server
runs them (eager prefill, decode steps with logprobs so each is one CUDA-graph step).

    python benchmarks/profile_steps.py --model-dir /tmp/phone-9b --quant none,fp8 [--prompt-len 467] [--batch 8]
        [--batches 1,2,4,8] [--image 1080x2400] [--no-profile]

Prints, per mode: the wall ms of the prefill (one request, max_tokens=1) and of a decode step at --batch (and at
each of --batches), a fresh screenshot's prompt building and first step (--image), then the top CUDA kernels of
each under torch.profiler (kernels inside CUDA graphs included) unless --no-profile.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import _prompt  # noqa: E402


def _drain(eng) -> None:
    while eng.has_unfinished_requests():
        eng.step()


def prefill_ms(eng, n: int, seed: int) -> float:
    from autoglm_trt.engine.sampling_params import SamplingParams

    eng.add_request(f"p{seed}", _prompt(n, seed), SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    _drain(eng)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0)


def decode_ms(eng, batch: int, steps: int, seed: int) -> float:
    """Mean wall ms of a decode step at `batch` (logprobs: one token per step, as the HTTP benchmark asks)."""
    from autoglm_trt.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True, logprobs=1)
    for i in range(batch):
        eng.add_request(f"d{seed}-{i}", _prompt(64, seed * 1000 + i), params)
    eng.step()  # the prompts
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    torch.cuda.synchronize()
    dt = 1e3 * (time.perf_counter() - t0) / steps
    _drain(eng)
    return dt


def image_steps(eng, size: tuple[int, int], rows: int, profile: bool) -> None:
    """A fresh screenshot each time (no cache answers): prompt building on the CPU, then its first step."""
    from autoglm_trt.calibration.screens import draw_screen
    from autoglm_trt.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def one(seed: int) -> tuple[float, float]:
        msgs = [{"role": "user", "content": [{"type": "image", "image": draw_screen("chat", seed, size)},
                                             {"type": "text", "text": "tap the search box " * 75}]}]
        t0 = time.perf_counter()
        prompt = eng.processor.process_chat(msgs)
        t1 = time.perf_counter()
        eng.add_request(f"img{seed}", prompt, params)
        _drain(eng)
        torch.cuda.synchronize()
        return 1e3 * (t1 - t0), 1e3 * (time.perf_counter() - t1)

    runs = [one(100 + s) for s in range(5)][1:]  # the first is warm-up
    cpu, step = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    print(f"   screenshot {size[0]}x{size[1]}: prompt building {cpu:.1f} ms, first step {step:.1f} ms (median)",
          flush=True)
    if profile:
        profiled(lambda: one(200), rows)


def profiled(fn, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="/tmp/phone-9b")
    ap.add_argument("--quant", default="none,fp8")
    ap.add_argument("--prompt-len", type=int, default=467)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", default="", help="also time decode steps at these batch sizes (no profile)")
    ap.add_argument("--image", default="", help="WxH: also time and profile a screenshot prompt's first step")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--rows", type=int, default=16)
    args = ap.parse_args()
    from autoglm_trt.engine.llm import LLM

    for quant in args.quant.split(","):
        llm = LLM(args.model_dir, dtype="bfloat16", max_model_len=4096, max_num_seqs=64, quant=quant,
                  gpu_memory_utilization=0.8)
        eng = llm.engine
        for s in range(3):  # warm-up: kernels compiled, shapes met
            prefill_ms(eng, args.prompt_len + s, 10 + s)
            decode_ms(eng, args.batch, 4, 20 + s)
        pre = [prefill_ms(eng, args.prompt_len + 3 + s, 30 + s) for s in range(5)]
        dec = decode_ms(eng, args.batch, 32, 40)
        print(f"== quant {quant}: prefill of {args.prompt_len} tokens {statistics.median(pre):.1f} ms (median of 5); "
              f"decode step at batch {args.batch} {dec:.2f} ms", flush=True)
        for b in [int(v) for v in args.batches.split(",") if v]:
            print(f"   decode step at batch {b}: {decode_ms(eng, b, 32, 70 + b):.2f} ms", flush=True)
        if args.image:
            image_steps(eng, tuple(int(v) for v in args.image.split("x")), args.rows, not args.no_profile)
        if not args.no_profile:
            profiled(lambda: prefill_ms(eng, args.prompt_len + 9, 50), args.rows)
            profiled(lambda: decode_ms(eng, args.batch, 8, 60), args.rows)
        eng.shutdown()
        del llm, eng
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
