"""Tensor parallelism on 2 GPUs, side by side in one run: batch-1 decode of the engine at TP1 and TP2
(TP2 with the peer-memory all-reduce, and with NCCL only), the GEMV floor at TP1 and TP2 (per-rank half
weights + the step's all-reduces, in one CUDA graph), and all-reduce latencies (8 KB, 1 MB).

    python benchmarks/bench_tp.py --model-dir /tmp/phone-9b [--prompt-len 512] [--gen-len 256] [--json out.json]

Writes a full-size random `phone-9b` checkpoint first if the directory has none (init_random on the GPU).
Greedy, EOS ignored. Prints ratios first, then absolute figures, with the GPU's name.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_allreduce  # noqa: E402
from bench_decode import _prompt, gemv_floor  # noqa: E402

from autoglm_trt.config import ModelConfig  # noqa: E402


# ---- GEMV floor at TP2: each rank's half of every matrix, plus the step's collectives ----------------
def tp_shapes(cfg: ModelConfig, tp: int) -> list[tuple[int, int, bool]]:
    """(out, in, all-reduce after it) of one rank's matmuls in one decode step, LM head last."""
    t, h = cfg.text, cfg.text.hidden_size
    qkv = (t.num_attention_heads // tp + 2 * max(1, t.num_key_value_heads // tp)) * t.head_dim
    layer = [(qkv, h, False), (h, t.num_attention_heads * t.head_dim // tp, True),
             (2 * t.intermediate_size // tp, h, False), (h, t.intermediate_size // tp, True)]
    return layer * t.num_hidden_layers + [(-(-t.vocab_size // tp), h, False)]


@torch.inference_mode()
def floor_rank(rank: int, world: int, port: int, cfg_dir: str, variants: list[str], out_path: str) -> None:
    import torch.distributed as dist

    from autoglm_trt.plugins.custom_allreduce import CustomAllReduce

    cpu = bench_allreduce.join(rank, world, port)
    cfg = ModelConfig.from_dir(cfg_dir)
    dev = torch.device("cuda", rank)
    shapes = tp_shapes(cfg, world)
    weights = [(torch.randn(o, i, dtype=torch.bfloat16, device=dev) * 0.02, ar) for o, i, ar in shapes]
    xs = {i: torch.randn(1, i, dtype=torch.bfloat16, device=dev) for _, i, _ in shapes}
    gathered = torch.empty(world, 1, shapes[-1][0], dtype=torch.bfloat16, device=dev)
    embed = torch.randn(1, cfg.text.hidden_size, dtype=torch.bfloat16, device=dev)  # the embedding's partial sum
    car, _ = CustomAllReduce.create(rank, world, dev, dist.group.WORLD, cpu)
    comms = {"none": lambda y: y, "nccl": bench_allreduce.nccl_all_reduce}
    if car is not None:
        comms["custom"] = car.one_shot
    res = {}
    for name in variants:
        if name not in comms:
            continue
        comm = comms[name]

        def step(_):
            comm(embed)
            for w, ar in weights[:-1]:
                y = torch.matmul(xs[w.shape[1]], w.t())
                if ar:
                    comm(y)
            logits = torch.matmul(xs[weights[-1][0].shape[1]], weights[-1][0].t())
            if name != "none":
                dist.all_gather_into_tensor(gathered, logits)

        res[name] = bench_allreduce.time_per_call_us(step, None, reps=10, iters=20, graph=True,
                                                     cpu_group=cpu) / 1000
    if rank == 0:
        Path(out_path).write_text(json.dumps(res))
    dist.barrier(group=cpu)
    dist.destroy_process_group()


def tp2_floor_ms(model_dir: str) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "floor.json")
        torch.multiprocessing.spawn(floor_rank, args=(2, bench_allreduce.free_port(), model_dir,
                                                      ["none", "nccl", "custom"], out), nprocs=2)
        return json.loads(Path(out).read_text())


# ---- the engine ----------------------------------------------------------------------------------
def _finish(eng) -> int:
    tokens = 0
    while eng.has_unfinished_requests():
        tokens += sum(len(o.new_token_ids) for o in eng.step())  # NOTE: a step may yield several tokens
    return tokens


def decode_batch1(llm, prompt_len: int, gen_len: int) -> dict:
    """Batch-1 greedy decode after a warm-up request: tok/s over the tokens after the first."""
    from autoglm_trt.engine.sampling_params import SamplingParams

    eng = llm.engine
    eng.add_request("warm", _prompt(prompt_len, 1), SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
    _finish(eng)
    eng.add_request("timed", _prompt(prompt_len, 2), SamplingParams(temperature=0.0, max_tokens=gen_len,
                                                                     ignore_eos=True))
    while not any(o.num_output_tokens >= 1 for o in eng.step()):
        pass
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = _finish(eng)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"tokens": tokens, "tok_s": tokens / dt, "ms_per_token": 1000 * dt / tokens}


def engine_run(args, tp: int, custom: bool) -> dict:
    from autoglm_trt.engine.llm import LLM

    os.environ["AUTOGLM_TRT_CUSTOM_ALLREDUCE"] = "1" if custom else "0"
    t0 = time.perf_counter()
    llm = LLM(args.model_dir, dtype="bfloat16", tensor_parallel_size=tp, max_num_seqs=1, num_blocks=512,
              max_model_len=args.prompt_len + args.gen_len + 64, cuda_graph_batch_sizes=(1,),
              num_decode_steps=args.num_decode_steps)
    start_s = time.perf_counter() - t0
    try:
        res = decode_batch1(llm, args.prompt_len, args.gen_len)
    finally:
        llm.engine.shutdown()
        del llm
        gc.unfreeze()  # NOTE: the engine froze its start-up objects; let them (and the GPU memory) go
        gc.collect()
        torch.cuda.empty_cache()
    res["startup_s"] = start_s
    print(f"engine TP{tp}{' custom' if custom and tp > 1 else ''}: {res}", flush=True)
    return res


def report(res: dict) -> None:
    e, f, ar = res["engine"], res["floor_ms"], res["allreduce"]
    fl = {k: 1000 / v for k, v in f.items()}
    print(f"\n{res['gpu']} x2   prompt {res['args']['prompt_len']}  gen {res['args']['gen_len']}  "
          f"num_decode_steps {res['args']['num_decode_steps']}   batch 1")
    print("ratios:")
    print(f"  engine TP2 / TP1            {e['tp2_custom']['tok_s'] / e['tp1']['tok_s']:.2f}x (peer-memory all-reduce)"
          f"   {e['tp2_nccl']['tok_s'] / e['tp1']['tok_s']:.2f}x (NCCL)")
    print(f"  floor  TP2 / TP1            {fl['tp2_custom'] / fl['tp1']:.2f}x (peer-memory)   "
          f"{fl['tp2_nccl'] / fl['tp1']:.2f}x (NCCL)   {fl['tp2_none'] / fl['tp1']:.2f}x (no communication)")
    print(f"  engine / floor              TP1 {e['tp1']['tok_s'] / fl['tp1']:.2f}   "
          f"TP2 {e['tp2_custom']['tok_s'] / fl['tp2_custom']:.2f}")
    print(f"{'':<22} {'engine tok/s':>12} {'floor ms':>9} {'floor tok/s':>11}")
    for key, fkey in (("tp1", "tp1"), ("tp2_custom", "tp2_custom"), ("tp2_nccl", "tp2_nccl")):
        print(f"{key:<22} {e[key]['tok_s']:>12.1f} {f[fkey]:>9.3f} {fl[fkey]:>11.1f}")
    print(f"{'tp2, no communication':<22} {'-':>12} {f['tp2_none']:>9.3f} {fl['tp2_none']:>11.1f}")
    bench_allreduce.report(ar)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="/tmp/phone-9b")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--num-decode-steps", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("bench_tp needs 2 GPUs")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if not (Path(args.model_dir) / "model.safetensors.index.json").exists():
        import shutil

        from autoglm_trt.models.random_checkpoint import init_random

        shutil.rmtree(args.model_dir, ignore_errors=True)
        t0 = time.perf_counter()
        init_random(args.model_dir, preset="phone-9b", device="cuda", show_progress=False)
        print(f"wrote phone-9b random checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
    res = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    res["allreduce"] = bench_allreduce.run([8 << 10, 1 << 20], [16, 32])
    floor2 = tp2_floor_ms(args.model_dir)
    res["floor_ms"] = {"tp1": gemv_floor(ModelConfig.from_dir(args.model_dir), 1), "tp2_none": floor2["none"],
                       "tp2_nccl": floor2["nccl"], "tp2_custom": floor2.get("custom", float("nan"))}
    print("floors (ms):", res["floor_ms"], flush=True)
    gc.collect()
    torch.cuda.empty_cache()
    res["engine"] = {"tp1": engine_run(args, 1, True), "tp2_custom": engine_run(args, 2, True),
                     "tp2_nccl": engine_run(args, 2, False)}
    report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
