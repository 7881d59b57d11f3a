"""What structured outputs add to a GPU decode step, before the engine integration: the mask kernel and the
CPU fill + copy of one step's masks (the two pieces the integration adds; docs/structured-outputs.md).

For batch sizes 1, 32 and 256 with all / half of the rows constrained, on bf16 logits of 151,552 columns:
the Triton kernel (plugins/triton_bitmask.py) against the torch reference, CUDA-event timed, results checked
equal; and the CPU side of a step for the constrained rows (StepBitmasks.fill: llguidance masks of a JSON
schema at mid-document, pinned buffer, non-blocking H2D copy), wall-clock timed, on the 151,552-id BPE of
structured_vocab.py (trained on first use: ~1 minute, 2.7 GB).

    python benchmarks/bench_bitmask_gpu.py [--json OUT.json]      # on a CUDA machine; writes JSON to $OUT too
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from autoglm_trt.plugins import triton_bitmask  # noqa: E402
from autoglm_trt.plugins.bitmask import apply_token_bitmask_reference_  # noqa: E402
from autoglm_trt.processing.structured import GrammarCompiler, StepBitmasks, StructuredOutputs  # noqa: E402
from autoglm_trt.processing.tokenizer import Tokenizer  # noqa: E402
from autoglm_trt.processing.tokenizer_files import EOS_TOKEN_IDS, VOCAB_SIZE  # noqa: E402

SCHEMA = {"type": "object", "properties": {"action": {"type": "string", "enum": ["Tap", "Swipe", "Back"]},
                                           "reason": {"type": "string"}, "x": {"type": "integer"}},
          "required": ["action", "reason", "x"]}


def cuda_ms(fn, iters: int = 200) -> float:
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def kernel_rows(batch: int, constrained: int) -> dict:
    gen = torch.Generator().manual_seed(batch)
    logits = torch.randn(batch, VOCAB_SIZE, generator=gen).to("cuda", torch.bfloat16)
    words = (VOCAB_SIZE + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (constrained, words), generator=gen, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32).cuda()
    rows = torch.arange(0, batch, batch // constrained, device="cuda")[:constrained]
    want, got = logits.clone(), logits.clone()
    apply_token_bitmask_reference_(want, bitmask, rows)
    triton_bitmask.apply_token_bitmask_(got, bitmask, rows)
    assert torch.equal(got, want), "the Triton kernel differs from the reference"
    work = logits.clone()
    return {"batch": batch, "constrained": constrained,
            "triton_us": 1e3 * cuda_ms(lambda: triton_bitmask.apply_token_bitmask_(work, bitmask, rows)),
            "torch_reference_us": 1e3 * cuda_ms(lambda: apply_token_bitmask_reference_(work, bitmask, rows), 50)}


def cpu_fill(compiler: GrammarCompiler, constrained: int) -> dict:
    tok = compiler.tokenizer
    so = StructuredOutputs.json_schema(SCHEMA)
    prefix = tok.encode('{"action": "Tap", "reason": "the button')
    states = [compiler.new_state(so, []) for _ in range(constrained)]
    for s in states:
        s.accept_tokens(prefix)
    step = StepBitmasks(max_rows=256, vocab_size=VOCAB_SIZE, device="cuda")
    pairs = [(s, i) for i, s in enumerate(states)]
    times = []
    for _ in range(50):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step.fill(pairs)
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return {"constrained": constrained, "fill_and_copy_us_p50": statistics.median(times),
            "fill_and_copy_us_mean": statistics.fmean(times), "cpu_threads": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the 151,552-id BPE of structured_vocab.py)")
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "kernel": [], "cpu_fill": []}
    for batch in (1, 32, 256):
        for constrained in sorted({batch, max(1, batch // 2)}):
            out["kernel"].append(kernel_rows(batch, constrained))
            print(out["kernel"][-1], flush=True)
    from tokenizers import Tokenizer as HFTokenizer

    from structured_vocab import load_or_train

    path = args.tokenizer or str(load_or_train(Path("/tmp/autoglm-trt-bench")))
    compiler = GrammarCompiler(Tokenizer(HFTokenizer.from_file(path), list(EOS_TOKEN_IDS)), VOCAB_SIZE)
    for constrained in (1, 16, 32, 128):
        out["cpu_fill"].append(cpu_fill(compiler, constrained))
        print(out["cpu_fill"][-1], flush=True)
    for path in filter(None, [args.json, os.environ.get("OUT") and os.path.join(os.environ["OUT"],
                                                                                "bitmask_gpu.json")]):
        Path(path).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
