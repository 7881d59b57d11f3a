"""Decode benchmark on one GPU, side by side in one process: the GEMV floor, our engine, transformers.

    python benchmarks/bench_decode.py --model-dir /tmp/phone-9b [--batch-sizes 1,8,32,64] [--json out.json]

Writes a full-size random `phone-9b` checkpoint first if the directory does not exist (on the GPU:
seconds). Prompt 512 tokens, 256 generated, greedy, EOS ignored. Prints tok/s and ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from autoglm_trt.config import ModelConfig


def decoder_weight_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """[out, in] of every matmul of one decode step: 4 per layer, then the LM head."""
    t = cfg.text
    qkv = (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    per_layer = [(qkv, t.hidden_size), (t.hidden_size, t.num_attention_heads * t.head_dim),
                 (2 * t.intermediate_size, t.hidden_size), (t.hidden_size, t.intermediate_size)]
    return per_layer * t.num_hidden_layers + [(t.vocab_size, t.hidden_size)]


@torch.inference_mode()
def gemv_floor(cfg: ModelConfig, batch: int, iters: int = 50) -> float:
    """ms per step for one bf16 matmul per decoder weight, in order, in one CUDA graph."""
    shapes = decoder_weight_shapes(cfg)
    weights = [torch.randn(o, i, dtype=torch.bfloat16, device="cuda") * 0.02 for o, i in shapes]
    xs = {i: torch.randn(batch, i, dtype=torch.bfloat16, device="cuda") for _, i in shapes}

    def step():
        for w in weights:
            torch.matmul(xs[w.shape[1]], w.t())

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ms = _time_ms(graph.replay, iters)
    del weights, xs, graph
    _free()
    return ms


def _time_ms(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    return median_event_ms(fn, iters)


def median_event_ms(fn, iters: int) -> float:
    """Median GPU time of fn() over `iters` calls, by CUDA events (shared by the other benchmarks)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _prompt(n: int, seed: int):
    from autoglm_trt.processing.inputs import ProcessedPrompt

    ids = torch.randint(100, 150000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return ProcessedPrompt(prompt_token_ids=ids, images=[], mrope_positions=torch.arange(n).expand(3, -1).clone(),
                           mrope_delta=0, prompt_text=None)


def engine_decode(llm, batch: int, prompt_len: int, gen_len: int) -> dict:
    from autoglm_trt.engine.sampling_params import SamplingParams

    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"b{batch}-{i}", _prompt(prompt_len, i), params)
    produced = 0
    while produced < batch:  # prefill (and first token) of every sequence
        produced += sum(1 for o in eng.step() if o.num_output_tokens == 1)
    torch.cuda.synchronize()
    t0, tokens = time.perf_counter(), 0
    while eng.has_unfinished_requests():
        tokens += sum(len(o.new_token_ids) for o in eng.step())  # NOTE: a step may yield several tokens
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    graphs = eng.runner.graphs
    graph_ms = _time_ms(graphs.graphs[graphs.bucket(batch)][0].replay, 20) if graphs else None
    per_seq = tokens / batch
    return {"batch": batch, "tokens": tokens, "ms_per_token": 1000 * dt / per_seq, "graph_ms": graph_ms,
            "tok_s_per_seq": per_seq / dt, "tok_s_total": tokens / dt}


def engine_prefill_ms(llm, n: int, seed: int) -> float:
    from autoglm_trt.engine.sampling_params import SamplingParams

    eng = llm.engine  # NOTE: a fresh prompt each call, or the prefix cache answers it
    eng.add_request(f"prefill-{n}-{seed}", _prompt(n, seed), SamplingParams(temperature=0.0, max_tokens=1))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0)


def hf_decode(model_dir: str, batch: int, prompt_len: int, gen_len: int) -> dict:
    from transformers import Glm4vForConditionalGeneration

    model = Glm4vForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda").eval()
    ids = torch.randint(100, 150000, (batch, prompt_len), device="cuda")
    kw = dict(do_sample=False, min_new_tokens=gen_len, max_new_tokens=gen_len)
    with torch.inference_mode():
        model.generate(ids, **{**kw, "min_new_tokens": 4, "max_new_tokens": 4})
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del model
    _free()
    return {"batch": batch, "tok_s_per_seq": gen_len / dt, "tok_s_total": batch * gen_len / dt}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="/tmp/phone-9b")
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--hf-batch-sizes", default="1,8", help="transformers baseline batches ('' to skip)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--quant", default="none", help="none | int8-wo | w8a8 (engine only)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--num-decode-steps", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="print the top kernels of a batch-1 decode graph")
    return ap.parse_args()


def main() -> None:
    args = parse()
    if not (Path(args.model_dir) / "model.safetensors.index.json").exists():
        import shutil

        from autoglm_trt.models.random_checkpoint import init_random

        shutil.rmtree(args.model_dir, ignore_errors=True)  # a partial directory from an interrupted run
        t0 = time.perf_counter()
        init_random(args.model_dir, preset="phone-9b", device="cuda", show_progress=False)
        print(f"wrote phone-9b random checkpoint in {time.perf_counter() - t0:.0f} s")
    cfg = ModelConfig.from_dir(args.model_dir)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    res = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    res["floor_ms"] = {b: gemv_floor(cfg, b) for b in batches}
    hf_batches = [int(b) for b in args.hf_batch_sizes.split(",") if b]
    res["hf"] = {b: hf_decode(args.model_dir, b, args.prompt_len, min(args.gen_len, 128)) for b in hf_batches}
    print("transformers:", res["hf"], flush=True)
    res["engine"], res["prefill_ms"] = run_engine(args, batches)
    report(res, batches)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


def run_engine(args, batches: list[int]) -> tuple[dict, dict]:
    from autoglm_trt.engine.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(args.model_dir, dtype="bfloat16", max_model_len=4608, max_num_seqs=max(batches),
              max_num_batched_tokens=4096, gpu_memory_utilization=args.gpu_memory_utilization,
              num_decode_steps=args.num_decode_steps,
              **({"quant": args.quant} if args.quant != "none" else {}))
    print(f"engine start-up {time.perf_counter() - t0:.1f} s, KV blocks {llm.engine.runner.num_blocks}, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    for warm in range(2):  # the first pass compiles and autotunes
        prefill = {n: engine_prefill_ms(llm, n, seed=1000 * warm + n) for n in (512, 4096)}
    out = {b: engine_decode(llm, b, args.prompt_len, args.gen_len) for b in batches}
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.profile:
        profile_graph(llm, 1)
    del llm
    _free()
    return out, prefill


def profile_graph(llm, batch: int) -> None:
    """Top GPU kernels of one decode-graph replay (CUPTI sees the kernels inside the graph)."""
    from torch.profiler import ProfilerActivity, profile

    graph = llm.engine.runner.graphs.graphs[batch][0]
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


def report(res: dict, batches: list[int]) -> None:
    print(f"\n{res['gpu']}  prompt {res['args']['prompt_len']}  gen {res['args']['gen_len']}")
    print(f"{'batch':>5} {'floor tok/s':>12} {'engine tok/s':>13} {'engine/floor':>13} {'total tok/s':>12} "
          f"{'ms/token':>8} {'graph ms':>9} {'floor ms':>9}")
    for b in batches:
        floor = 1000 / res["floor_ms"][b]
        e = res["engine"][b]
        print(f"{b:>5} {floor:>12.1f} {e['tok_s_per_seq']:>13.1f} {e['tok_s_per_seq'] / floor:>13.3f} "
              f"{e['tok_s_total']:>12.0f} {e['ms_per_token']:>8.2f} {e['graph_ms'] or 0:>9.2f} {res['floor_ms'][b]:>9.2f}")
    for b, h in res["hf"].items():
        e = res["engine"].get(b)
        ratio = f"{e['tok_s_per_seq'] / h['tok_s_per_seq']:.1f}x" if e else "-"
        print(f"transformers batch {b}: {h['tok_s_per_seq']:.1f} tok/s per seq; engine is {ratio}")
    print(f"prefill ms: {res['prefill_ms']}   engine peak GiB: {res['engine']['peak_gib']:.1f}")


if __name__ == "__main__":
    main()
