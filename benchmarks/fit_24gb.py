"""Does INT8 let the whole model plus a 16k context fit in 24 GB of GPU memory? Runs the engine with
`gpu_memory_utilization` set so that only `--budget-gib` of the card is used, then one request with a
~16k-token prompt, and reports the process's peak GPU memory (allocator and driver view).

    python benchmarks/fit_24gb.py --model-dir /tmp/phone-9b --quant int8-wo [--budget-gib 24]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="/tmp/phone-9b")
    ap.add_argument("--quant", default="int8-wo")
    ap.add_argument("--budget-gib", type=float, default=24.0)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from autoglm_trt.engine.llm import LLM
    from autoglm_trt.engine.sampling_params import SamplingParams

    total = torch.cuda.get_device_properties(0).total_memory
    util = args.budget_gib * 2**30 / total
    llm = LLM(args.model_dir, dtype="bfloat16", quant=args.quant, gpu_memory_utilization=util,
              max_model_len=args.context, max_num_seqs=8)
    gen = 256
    t0 = time.perf_counter()
    out = llm.generate(_prompt(args.context - gen, 7), SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True))
    dt = time.perf_counter() - t0
    free, _ = torch.cuda.mem_get_info()
    res = {"gpu": torch.cuda.get_device_name(), "quant": args.quant, "budget_gib": args.budget_gib,
           "gpu_memory_utilization": util, "kv_tokens": llm.engine.kv_capacity_tokens,
           "prompt_tokens": args.context - gen, "generated": len(out[0].token_ids), "seconds": dt,
           "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
           "device_used_gib": (total - free) / 2**30}
    res["fits"] = res["device_used_gib"] <= args.budget_gib and res["kv_tokens"] >= args.context
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
