"""Offline saturated throughput on one GPU (like vLLM's benchmark_throughput): every request queued at
once, the engine runs until all are done; no HTTP in the way.

    python benchmarks/bench_throughput.py --model-dir /tmp/phone-9b --num-prompts 512 \
        --input-len 467 --output-len 256 --max-num-seqs 512 [--json out.json]

Reports output tok/s, and where the wall time went: steps with prompt tokens (mixed prefill + decode,
eager) vs pure decode steps (CUDA graphs, multi-step windows), with their counts and mean times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import _prompt  # noqa: E402


def _has_prompt_work(eng) -> bool:
    """Will the next step compute prompt tokens (an eager mixed step) rather than decode only?"""
    if eng._window is not None:  # a decode window in flight is read first
        return False
    sched = eng.scheduler
    return bool(sched.waiting) or any(s.num_computed_tokens < s.num_prompt_tokens for s in sched.running)


def run(llm, num_prompts: int, input_len: int, output_len: int, seed: int = 0) -> dict:
    from autoglm_trt.engine.sampling_params import SamplingParams

    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for i in range(num_prompts):
        eng.add_request(f"t{seed}-{i}", _prompt(input_len, seed * 100000 + i), params)
    kinds = {"mixed": [0, 0.0], "decode": [0, 0.0]}  # count, seconds
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = 0
    while eng.has_unfinished_requests():
        s0 = time.perf_counter()
        kind = "mixed" if _has_prompt_work(eng) else "decode"
        outs = eng.step()
        k = kinds[kind]
        k[0] += 1
        k[1] += time.perf_counter() - s0
        tokens += sum(len(o.new_token_ids) for o in outs)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"num_prompts": num_prompts, "input_len": input_len, "output_len": output_len, "seconds": dt,
            "output_tok_s": tokens / dt, "total_tok_s": (tokens + num_prompts * input_len) / dt,
            "requests_s": num_prompts / dt,
            "steps": {k: {"count": c, "seconds": s, "mean_ms": 1000 * s / max(c, 1)} for k, (c, s) in kinds.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="/tmp/phone-9b")
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=467)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-num-seqs", default="512", help="comma-separated: one run each")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--num-decode-steps", type=int, default=8)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    ap.add_argument("--graph-sizes", default="", help="decode CUDA-graph batch sizes (default: the engine's)")
    ap.add_argument("--quant", default="none", help="none | fp8 | int8-wo | w8a8 (quantized at load)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from autoglm_trt.engine.llm import LLM

    res = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "args": vars(args), "runs": []}
    for seqs in [int(s) for s in args.max_num_seqs.split(",")]:
        llm = LLM(args.model_dir, dtype="bfloat16", max_model_len=2048, max_num_seqs=seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, num_decode_steps=args.num_decode_steps,
                  gpu_memory_utilization=args.gpu_memory_utilization, quant=args.quant,
                  cuda_graph_batch_sizes=tuple(int(b) for b in args.graph_sizes.split(",")) if args.graph_sizes else None)
        # warm-up: compile and autotune every kernel specialization the timed run meets (Triton specializes
        # on sizes: a warm-up of 64 prompts left ~1 s of compiling in the timed mixed steps on an H100)
        run(llm, args.num_prompts, args.input_len, 2, seed=99)
        r = run(llm, args.num_prompts, args.input_len, args.output_len)
        r["max_num_seqs"], r["kv_tokens"] = seqs, llm.engine.kv_capacity_tokens
        res["runs"].append(r)
        print(json.dumps(r), flush=True)
        llm.engine.shutdown()
        del llm
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
