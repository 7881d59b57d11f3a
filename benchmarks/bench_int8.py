"""INT8 on one GPU: the kernels alone at the 9B shapes, the whole decode step's linears, and the engine.

    python benchmarks/bench_int8.py --model-dir /tmp/phone-9b [--skip-engine] [--sweep] [--json out.json]

1. Kernels: each 9B linear shape (qkv 4608x4096, o 4096x4096, gate_up 27392x4096, down 4096x13696) at
   M = 1, 8, 32, 64 (and 512 for prefill): bf16 cuBLAS vs W8A16 (Triton) vs W8A8 (per-token quant +
   Triton int8 GEMM, and torch._int_mm for M > 16). Bytes moved (weights once, activations in and
   out) over time, against the device-to-device copy ceiling measured here. Weights rotate among
   copies larger than L2 so the cache does not flatter the numbers.
2. Step floor: all 160 decoder linears + the bf16 LM head in one CUDA graph, bf16 vs int8-wo vs w8a8.
3. Engine (unless --skip-engine): LLM(model_dir, quant=...) decode tok/s at batch 1 and 64, bf16 vs
   int8-wo vs w8a8, prompt 512, 256 generated, greedy, EOS ignored.
--sweep times the alternative launch configs of each kernel (to retune default_config).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import _free, _time_ms, engine_decode

from autoglm_trt.layers import quant as Q

SHAPES = {"qkv": (4608, 4096), "o": (4096, 4096), "gate_up": (27392, 4096), "down": (4096, 13696)}
L2_BYTES = 64 << 20


def copy_ceiling_tbs() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = _time_ms(lambda: b.copy_(a), 20)
    return 2 * a.numel() / ms / 1e9  # read + write, TB/s


def _rotating(fn_for, copies: int, iters: int) -> float:
    """Median ms of one call, cycling through `copies` argument sets inside a CUDA graph."""
    fns = [fn_for(i) for i in range(copies)]

    def step():
        for f in fns:
            f()

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return _time_ms(graph.replay, iters) / copies


@functools.lru_cache(maxsize=1)
def _weights(n: int, k: int) -> tuple[list, list]:
    """bf16 and int8 copies of an [n, k] weight, distinct memory, > 4x L2 of int8 in all (cache misses)."""
    copies = max(2, -(-4 * L2_BYTES // (n * k)))
    w_bf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    return w_bf, [Q.quantize_weight(w) for w in w_bf]


def bench_shape(name: str, n: int, k: int, m: int, cfg_a16=None, cfg_a8=None, iters: int = 20,
                modes: tuple[str, ...] = ("bf16", "w8a16", "w8a8")) -> dict:
    from autoglm_trt.plugins import int8_gemm as G

    w_bf, w_q = _weights(n, k)
    copies = len(w_bf)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    calls = {"bf16": lambda i: lambda: F.linear(x, w_bf[i]),
             "w8a16": lambda i: lambda: G.w8a16_matmul(x, *w_q[i], config=cfg_a16),
             "w8a8": lambda i: lambda: G.w8a8_matmul(*G.quantize_per_token(x), *w_q[i], config=cfg_a8),
             "w8a8_int_mm": lambda i: lambda: G.w8a8_matmul_int_mm(*G.quantize_per_token(x), *w_q[i])}
    modes = modes + (("w8a8_int_mm",) if "w8a8" in modes and m > 16 else ())
    ms = {mode: _rotating(calls[mode], copies, iters) for mode in modes}
    act = 2 * m * (k + n)
    bytes_ = {"bf16": 2 * n * k + act, "w8a16": n * k + 4 * n + act, "w8a8": n * k + 4 * n + act + m * k}
    bytes_["w8a8_int_mm"] = bytes_["w8a8"]
    return {"shape": name, "n": n, "k": k, "m": m, "ms": ms,
            "tbs": {key: bytes_[key] / v / 1e9 for key, v in ms.items()}}


def kernel_table(ms_list: list[int], ceiling: float) -> list[dict]:
    rows = []
    print(f"\nkernels (TB/s = bytes moved / time; copy ceiling {ceiling:.2f} TB/s)")
    print(f"{'shape':>8} {'M':>4} | {'bf16 us':>8} {'w8a16 us':>9} {'w8a8 us':>8} | {'bf16':>5} {'w8a16':>6} "
          f"{'w8a8':>5} TB/s | w8a16 speed-up")
    for (name, (n, k)), m in itertools.product(SHAPES.items(), ms_list):
        r = bench_shape(name, n, k, m)
        rows.append(r)
        t, b = r["ms"], r["tbs"]
        print(f"{name:>8} {m:>4} | {1e3 * t['bf16']:8.1f} {1e3 * t['w8a16']:9.1f} {1e3 * t['w8a8']:8.1f} | "
              f"{b['bf16']:5.2f} {b['w8a16']:6.2f} {b['w8a8']:5.2f}      | {t['bf16'] / t['w8a16']:.2f}x"
              + (f"  (int_mm {1e3 * t['w8a8_int_mm']:.1f} us)" if "w8a8_int_mm" in t else ""), flush=True)
    _weights.cache_clear()
    _free()
    return rows


@torch.inference_mode()
def step_floor(batch: int, layers: int = 40, vocab: int = 151552, iters: int = 20) -> dict:
    """ms of all decoder linears (+ bf16 LM head) of one decode step, per mode, in one CUDA graph each."""
    from autoglm_trt.plugins import int8_gemm as G

    x = {k: torch.randn(batch, k, device="cuda", dtype=torch.bfloat16) for k in (4096, 13696)}
    head = torch.randn(vocab, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    out = {}
    for mode in ("bf16", "int8-wo", "w8a8"):
        ws = []
        for _ in range(layers):
            for n, k in SHAPES.values():
                w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                ws.append(w if mode == "bf16" else Q.quantize_weight(w))
                del w
        calls = {"bf16": lambda w: F.linear(x[w.shape[1]], w),
                 "int8-wo": lambda w: G.w8a16_matmul(x[w[0].shape[1]], *w),
                 "w8a8": lambda w: G.w8a8_matmul(*G.quantize_per_token(x[w[0].shape[1]]), *w)}[mode]

        def step(ws=ws, call=calls):
            for w in ws:
                call(w)
            F.linear(x[4096], head)

        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        out[mode] = _time_ms(graph.replay, iters)
        del ws, graph
        _free()
    return out


def sweep(m_list: list[int]) -> list[dict]:
    """Time alternative launch configs per shape and M (W8A16 and W8A8); prints the best next to the default."""
    from autoglm_trt.plugins import int8_gemm as G

    rows = []
    for (name, (n, k)), m in itertools.product(SHAPES.items(), m_list):
        bm = min(64, max(16, 1 << (m - 1).bit_length()))
        dots = [G.GemmConfig(bm, bn, bk, s, wp, 4) for bn, bk, s, wp in
                itertools.product((32, 64, 128), (128, 256, 512), (1, 2, 4, 8), (4,) if m == 1 else (4, 8))]
        if m > 64:  # prefill: compute-bound tiles
            dots = [G.GemmConfig(bm_, bn, bk, 1, wp, st) for bm_, bn, bk, wp, st in
                    itertools.product((64, 128), (128, 256), (64, 128), (4, 8), (3, 4))]
        for mode, cands in (("w8a16", [None, *dots]), ("w8a8", [None, *dots])):
            times = {}
            for cfg in cands:
                kw = {"cfg_a16": cfg} if mode == "w8a16" else {"cfg_a8": cfg}
                try:
                    times[cfg] = bench_shape(name, n, k, m, iters=5, modes=(mode,), **kw)["ms"][mode]
                except Exception as exc:  # noqa: BLE001 - a config that does not fit is just skipped
                    print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:80]}")
            best = min((c for c in times if c is not None), key=times.get)
            rows.append({"shape": name, "m": m, "mode": mode, "default_ms": times[None], "best_ms": times[best],
                         "best": best.__dict__, "all": [[c.__dict__ if c else None, t] for c, t in times.items()]})
            print(f"sweep {mode} {name:>8} M={m:<3} default {1e3 * times[None]:.1f} us, best "
                  f"{1e3 * times[best]:.1f} us {best}", flush=True)
    _weights.cache_clear()
    _free()
    return rows


def make_llm(args, mode: str):
    """LLM(model_dir, quant=mode); until LLM takes `quant`, the same through LLMEngine(config, model=quantized)."""
    from autoglm_trt.config import EngineArgs
    from autoglm_trt.engine.llm import LLM

    kw = {"dtype": "bfloat16", "max_model_len": 4608, "max_num_seqs": 64, "max_num_batched_tokens": 4096,
              "gpu_memory_utilization": args.gpu_memory_utilization}
    if mode == "bf16":
        return LLM(args.model_dir, **kw)
    quant = {"quant": mode, **({"calib_dir": args.calib} if args.calib else {})}
    try:
        return LLM(args.model_dir, **kw, **quant)
    except TypeError as exc:  # NOTE: fallback for an LLM without the quant kwarg (TP 1 only)
        print(f"LLM(quant=...) not available ({exc}); quantizing through LLMEngine(model=...)")
    from types import SimpleNamespace

    from autoglm_trt.calibration import load_calibration
    from autoglm_trt.engine.llm_engine import LLMEngine
    from autoglm_trt.models.loader import load_model

    model = load_model(args.model_dir, "bfloat16", "cuda", with_vision=False, show_progress=False)
    Q.quantize_model(model, mode, load_calibration(args.calib) if args.calib and mode == "w8a8" else None)
    _free()
    return SimpleNamespace(engine=LLMEngine(EngineArgs(args.model_dir, **kw).create_engine_config(), model=model))


def engine(args) -> dict:
    out = {}
    for mode, batches in (("bf16", [1, 64]), ("int8-wo", [1, 64]), ("w8a8", [1, 64])):
        t0 = time.perf_counter()
        llm = make_llm(args, mode)
        start = time.perf_counter() - t0
        out[mode] = {b: engine_decode(llm, b, args.prompt_len, args.gen_len) for b in batches}
        out[mode].update(startup_s=start, kv_blocks=llm.engine.runner.num_blocks,
                         peak_gib=torch.cuda.max_memory_allocated() / 2**30)
        print(mode, json.dumps(out[mode]), flush=True)
        del llm
        _free()
        torch.cuda.reset_peak_memory_stats()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="/tmp/phone-9b")
    ap.add_argument("--calib", default=None, help="calibration dir for w8a8 in the engine (smoothing)")
    ap.add_argument("--m", default="1,8,32,64,512", help="rows (tokens) for the kernel table")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-m", default="1,64", help="rows to sweep configs for")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ms_list = [int(m) for m in args.m.split(",") if m]
    res = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    res["copy_ceiling_tbs"] = ceiling = copy_ceiling_tbs()
    res["kernels"] = kernel_table(ms_list, ceiling) if ms_list else []
    res["step_floor_ms"] = {b: step_floor(b) for b in (1, 64)} if ms_list else {}
    for b, r in res["step_floor_ms"].items():
        print(f"step floor batch {b}: bf16 {r['bf16']:.2f} ms, int8-wo {r['int8-wo']:.2f} ms "
              f"({r['bf16'] / r['int8-wo']:.2f}x), w8a8 {r['w8a8']:.2f} ms ({r['bf16'] / r['w8a8']:.2f}x)")
    if args.sweep:
        res["sweep"] = sweep([int(m) for m in args.sweep_m.split(",")])
    if not args.skip_engine:
        _ensure_checkpoint(args.model_dir)
        res["engine"] = engine(args)
        e = res["engine"]
        for b, key in ((1, "tok_s_per_seq"), (64, "tok_s_total")):
            base = e["bf16"][b][key]
            print(f"engine batch {b} ({key}): bf16 {base:.1f}, " + ", ".join(
                f"{m} {e[m][b][key]:.1f} ({e[m][b][key] / base:.2f}x)" for m in ("int8-wo", "w8a8")))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))


def _ensure_checkpoint(model_dir: str) -> None:
    if (Path(model_dir) / "model.safetensors.index.json").exists():
        return
    import shutil

    from autoglm_trt.models.random_checkpoint import init_random

    shutil.rmtree(model_dir, ignore_errors=True)
    init_random(model_dir, preset="phone-9b", device="cuda", show_progress=False)


if __name__ == "__main__":
    main()
