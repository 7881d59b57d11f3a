"""Structured outputs on one GPU (issue 22): decode speed with a JSON-schema constraint against none, at batch 1
and 32, and the unconstrained rows' speed in a half-constrained batch; the grammar's compile time.

    python benchmarks/bench_structured_gpu.py --model-dir /tmp/phone-9b [--json structured.json]

Greedy, --gen tokens per request (ignore_eos off: a constrained row ends when its grammar does, so the schema is a
free-text field that random weights keep writing). Prompts are fresh random ids (no prefix-cache hit); the time
is from the first token on (prefill excluded), per row: its tokens / the time until its last token.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_decode import _prompt  # NOTE: benchmarks/ is on sys.path when a script there runs

from autoglm_trt.engine.llm import LLM
from autoglm_trt.engine.sampling_params import SamplingParams
from autoglm_trt.processing.structured import StructuredOutputs, compiler_for

SCHEMA = {"type": "object", "properties": {"app": {"type": "string", "enum": ["WeChat", "Settings", "Taobao"]},
                                           "note": {"type": "string"}}, "required": ["app", "note"]}


def run(llm: LLM, batch: int, constrained: int, gen: int, seed: int) -> dict:
    """`batch` requests, the first `constrained` under SCHEMA -> tok/s per row, split by kind."""
    eng = llm.engine
    so = StructuredOutputs.json_schema(SCHEMA)
    for i in range(batch):
        params = SamplingParams(temperature=0.0, max_tokens=gen, structured_outputs=so if i < constrained else None)
        eng.add_request(f"s{seed}-{i}", _prompt(512, seed * 1000 + i), params)
    first, last, count = {}, {}, {}
    while eng.has_unfinished_requests():
        outs = eng.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        for o in outs:
            first.setdefault(o.request_id, now)
            last[o.request_id] = now
            count[o.request_id] = o.num_output_tokens
    rate = {rid: (count[rid] - 1) / max(last[rid] - first[rid], 1e-9) for rid in count}
    kinds = {"constrained": [r for i, r in enumerate(rate.values()) if i < constrained],
             "free": [r for i, r in enumerate(rate.values()) if i >= constrained]}
    return {k: (sum(v) / len(v) if v else None) for k, v in kinds.items()} | {"tokens": sum(count.values())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/phone-9b")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    llm = LLM(args.model_dir, dtype="bfloat16" if cuda else "float32", max_model_len=2048, max_num_seqs=32,
              **({"gpu_memory_utilization": 0.85} if cuda else {"device": "cpu", "num_blocks": 512}))
    compiler = compiler_for(llm.engine.tokenizer, llm.engine.model_config.text.vocab_size)
    t0 = time.perf_counter()
    compiler.compile(StructuredOutputs.json_schema({**SCHEMA, "title": "fresh"}), None)
    res = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "date": time.strftime("%Y-%m-%d"), "args": vars(args),
           "compile_ms": 1000 * (time.perf_counter() - t0), "tok_s_per_row": {}}
    run(llm, 4, 2, 16, 0)  # warm-up: kernels, graphs, the grammar's lexer
    cases = [(1, 0), (1, 1), (32, 0), (32, 32), (32, 16)] if cuda else [(1, 0), (1, 1), (4, 2)]
    for seed, (batch, constrained) in enumerate(cases, start=1):
        r = res["tok_s_per_row"][f"b{batch}-c{constrained}"] = run(llm, batch, constrained, args.gen, seed)
        print(f"batch {batch}, constrained {constrained}: free rows {r['free']}, constrained rows {r['constrained']} "
              f"tok/s per row", flush=True)
    print(f"compile (a new JSON schema): {res['compile_ms']:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
