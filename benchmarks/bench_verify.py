"""What verifying a speculation costs: one engine step of q query tokens per row (q = 1 is the plain decode step;
q > 1 a verification of q - 1 drafts), at batch 1 and 8, over a context of --context tokens, on the 9B. Both
layouts: "graph" is the engine's (engine/batch.build_verify_batch: one decode row per position, replayed from
the decode CUDA graph of batch x q rows), "eager" the prefill-shaped step it replaced.

    python benchmarks/bench_verify.py --model-dir /tmp/phone-9b [--context 2048] [--json verify.json]

Each figure is the median of --iters forward passes (logits of every position included, as verification needs),
timed with CUDA events. The speed-up speculation can give is tokens per step / (step time / decode step time).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_decode import _time_ms  # NOTE: benchmarks/ is on sys.path when a script there runs

from autoglm_trt.engine.batch import StepBatch, slots_for
from autoglm_trt.engine.llm import LLM
from autoglm_trt.engine.sampling_params import SamplingParams
from autoglm_trt.processing.inputs import ProcessedPrompt


def prompt(n: int, seed: int) -> ProcessedPrompt:
    ids = torch.randint(100, 150000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return ProcessedPrompt(prompt_token_ids=ids, images=[], mrope_positions=torch.arange(n).expand(3, -1).clone(),
                           mrope_delta=0, prompt_text=None)


def prefilled(llm: LLM, batch: int, context: int) -> list:
    """`batch` sequences whose prompts are in the KV cache, with room for 16 more tokens each."""
    eng = llm.engine
    for i in range(batch):
        eng.add_request(f"v{batch}-{i}", prompt(context, 7 * batch + i), SamplingParams(temperature=0.0,
                                                                                          max_tokens=64))
    seqs = [eng.scheduler.get(f"v{batch}-{i}") for i in range(batch)]
    while any(s.num_output_tokens == 0 for s in seqs):
        eng.step()
    for s in seqs:
        assert eng.scheduler.block_manager.allocate(s, 1, lookahead=16).ok
    return seqs


def verify_batch(seqs: list, q: int, block_size: int) -> StepBatch:
    """The engine's layout: a decode row per position, each attending to the KV up to itself."""
    ids, pos, slots, lens, tables = [], [], [], [], []
    for s in seqs:
        start = s.num_tokens - 1
        for j in range(q):
            ids.append(s.last_token if j == 0 else 1000 + j)
            pos.append(start + j)
            slots += slots_for(s, start + j, start + j + 1, block_size)
            lens.append(start + j + 1)
            tables.append(s.block_table)
    n = len(ids)
    return StepBatch(ids, torch.tensor(pos).expand(3, -1), slots, list(range(n + 1)), lens, tables, list(range(n)),
                     [], True)


def step_batch(seqs: list, q: int, block_size: int) -> StepBatch:
    ids, pos, slots, cu, lens = [], [], [], [0], []
    for s in seqs:
        start = s.num_tokens - 1  # the last known token, then q - 1 drafts
        ids += [s.last_token] + [1000 + j for j in range(q - 1)]
        pos.append(torch.arange(start, start + q).expand(3, -1))
        slots += slots_for(s, start, start + q, block_size)
        cu.append(cu[-1] + q)
        lens.append(start + q)
    rows = list(range(cu[-1]))
    return StepBatch(ids, torch.cat(pos, dim=1), slots, cu, lens, [s.block_table for s in seqs], rows, [], q == 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/phone-9b")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--queries", default="1,2,4,8,16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--quant", default="none")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    llm = LLM(args.model_dir, dtype="bfloat16", max_model_len=args.context + 128, max_num_seqs=128,
              gpu_memory_utilization=0.85, **({"quant": args.quant} if args.quant != "none" else {}))
    print(f"engine start-up {time.perf_counter() - t0:.1f} s")
    runner, bs = llm.engine.runner, llm.engine.config.cache.block_size
    res = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "args": vars(args), "ms": {}}
    for batch in (int(b) for b in args.batches.split(",")):
        seqs = prefilled(llm, batch, args.context)
        for layout, make in (("graph", verify_batch), ("eager", step_batch)):
            row = res["ms"].setdefault(layout, {}).setdefault(batch, {})
            for q in (int(x) for x in args.queries.split(",")):
                b = make(seqs, q, bs)
                row[q] = _time_ms(lambda: runner.forward_logits(b).argmax(-1), args.iters)
            base = res["ms"]["graph"][batch][1]
            print(f"{layout} batch {batch}: " + "  ".join(f"q={q}: {ms:.2f} ms ({ms / base:.2f}x)"
                                                         for q, ms in row.items()))
        for s in seqs:
            llm.engine.abort_request(s.request_id)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
