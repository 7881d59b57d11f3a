"""All-reduce latency on 2 GPUs: NCCL against the one-shot peer-memory all-reduce, eager and in a graph.

    python benchmarks/bench_allreduce.py [--sizes 8K,64K,256K,512K,1M] [--programs 16,32] [--json out.json]

bf16 messages. A figure is the median over `iters` of (time of `reps` back-to-back all-reduces) / reps,
on rank 0 with CUDA events, the ranks aligned by a barrier before each timing. "eager" launches each
call from Python; "graph" captures the `reps` calls in one CUDA graph and times its replays (launch
overhead gone: how decode steps run them). NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from autoglm_trt.engine.distributed import free_port, join_nccl_with_gloo

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
    return int(text.rstrip("KM")) * scale


def time_per_call_us(fn, x: torch.Tensor, reps: int, iters: int, graph: bool, cpu_group) -> float:
    """Median over iters of the time of `reps` calls of fn(x), divided by reps (microseconds)."""
    import torch.distributed as dist

    def burst():
        for _ in range(reps):
            fn(x)

    burst()
    torch.cuda.synchronize()
    run = burst
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            burst()
        run = g.replay
        run()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        torch.cuda.synchronize()
        dist.barrier(group=cpu_group)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / reps)
    return sorted(times)[len(times) // 2]


def nccl_all_reduce(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(x)
    return x


def rank_main(rank: int, world: int, port: int, sizes: list[int], programs: list[int], reps: int, iters: int,
              out_path: str) -> None:
    """One rank: every (variant, mode, size) in the same order on both ranks; rank 0 writes the table."""
    import torch.distributed as dist

    from autoglm_trt.plugins.custom_allreduce import CustomAllReduce

    cpu = join_nccl_with_gloo(rank, world, port)
    dev = torch.device("cuda", rank)
    variants = {"nccl": nccl_all_reduce}
    for p in programs:
        car, why = CustomAllReduce.create(rank, world, dev, dist.group.WORLD, cpu, num_programs=p,
                                          max_bytes=max(max(sizes), 1 << 20))
        if car is None:
            print(f"custom all-reduce unavailable: {why}")
            break
        variants[f"custom-p{p}"] = car.one_shot
    rows = []
    for size in sizes:
        x = torch.randn(size // 2, device=dev).to(torch.bfloat16)
        for name, fn in variants.items():
            for graph in (False, True):
                us = time_per_call_us(fn, x, reps, iters, graph, cpu)
                rows.append({"variant": name, "mode": "graph" if graph else "eager", "bytes": size, "us": us})
    if rank == 0:
        Path(out_path).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}))
    dist.barrier(group=cpu)
    dist.destroy_process_group()


def run(sizes: list[int], programs: list[int], reps: int = 50, iters: int = 20) -> dict:
    """Spawn 2 ranks, time everything, return {"gpu", "rows": [{variant, mode, bytes, us}]}."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "allreduce.json")
        torch.multiprocessing.spawn(rank_main, args=(2, free_port(), sizes, programs, reps, iters, out), nprocs=2)
        return json.loads(Path(out).read_text())


def report(res: dict) -> None:
    rows = res["rows"]
    sizes = sorted({r["bytes"] for r in rows})
    names = list(dict.fromkeys(r["variant"] for r in rows))
    print(f"\nall-reduce latency, 2 ranks, bf16, {res['gpu']} (us per call, median)")
    print(f"{'variant':<14} {'mode':<6} " + " ".join(f"{s // 1024:>7} KB" for s in sizes))
    us = {(r["variant"], r["mode"], r["bytes"]): r["us"] for r in rows}
    for name in names:
        for mode in ("eager", "graph"):
            print(f"{name:<14} {mode:<6} " + " ".join(f"{us[(name, mode, s)]:>10.1f}" for s in sizes))
    for mode in ("eager", "graph"):
        best = {s: min(us[(n, mode, s)] for n in names if n != "nccl") for s in sizes} if len(names) > 1 else {}
        if best:
            print(f"NCCL / best custom, {mode}: " + " ".join(f"{us[('nccl', mode, s)] / best[s]:.1f}x" for s in sizes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8K,64K,256K,512K,1M")
    ap.add_argument("--programs", default="16,32", help="grid sizes of the custom kernel to try")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("bench_allreduce needs 2 GPUs")
    res = run([parse_size(s) for s in args.sizes.split(",")], [int(p) for p in args.programs.split(",")],
              args.reps, args.iters)
    report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
