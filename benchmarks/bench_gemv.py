"""The decode GEMV (plugins/triton_gemv.py) at the 9B decoder's shapes, every candidate config, on one GPU.

    python benchmarks/bench_gemv.py [--m 1,4] [--shapes qkv,o,gate_up,down,down_silu,lm_head] [--json out.json]

Per shape and M: torch F.linear (cuBLAS, bf16 weights), the GEMV with bf16 weights and with int8 weights
(+ fp32 per-channel scales) at every candidate config (triton_gemv.candidates), and the Triton W8A16 GEMM of
plugins/int8_gemm (tl.dot, split-K). down_silu is down_proj fed x [M, 2I] = [gate | up] with silu_mul fused
into the GEMV; its baselines (and "gemv unfused") run plugins.silu_mul first. qkv carries its bias.
Times: CUDA events around a CUDA graph of --reps launches whose weights rotate among copies larger than L2
(no launch gaps, no cache hits), per launch; and single launches (events around one eager launch, so
launch latency included). GB/s = bytes moved (weights once, scales, bias, x, y) / graph time.
Every candidate's output is checked against the fp32 reference first; a wrong one is reported, never picked.
Kernels compile first in --jobs processes (Triton's disk cache), so the run stays around a minute.
Prints the winner per shape, M and weight kind, and TABLE lines to paste into triton_gemv.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import median_event_ms  # noqa: E402

# name: (N, K, has bias, silu_mul fused); the 9B decoder's linears, TP 1, and the bf16 LM head
SHAPES = {"qkv": (4608, 4096, True, False), "o": (4096, 4096, False, False), "gate_up": (27392, 4096, False, False),
          "down": (4096, 13696, False, False), "down_silu": (4096, 13696, False, True),
          "lm_head": (151552, 4096, False, False)}
LAYERS = 40
KINDS = {"bf16": torch.bfloat16, "int8": torch.int8}


# ---- compile ahead, in parallel ----------------------------------------------------------------------
def _compile_one(job: tuple) -> str | None:
    """Run one config once on small tensors with the real call's specialization (M, dtypes, flags; N, K and
    strides multiples of 16), so Triton's disk cache holds the kernel when the timed run asks for it."""
    kind, m, bias, silu, cfg = job
    from autoglm_trt.plugins import triton_gemv as G

    n, k = 64, 512
    try:
        x = torch.randn(m, 2 * k if silu else k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda").to(KINDS[kind])
        s = torch.rand(n, device="cuda") if kind == "int8" else None
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
        G.gemv(x, w, s, b, silu_mul=silu, config=cfg)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - the timed run reports it
        return f"{cfg.tag}: {type(exc).__name__}: {str(exc)[:200]}"
    return None


def precompile(jobs: list[tuple], workers: int) -> None:
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(workers) as pool:
        errors = [e for e in pool.imap_unordered(_compile_one, jobs, chunksize=2) if e]
    print(f"compiled {len(jobs)} kernel variants in {time.perf_counter() - t0:.1f} s ({workers} processes)"
          + "".join(f"\n  compile error {e}" for e in errors), flush=True)


# ---- timing --------------------------------------------------------------------------------------------
_median_ms = median_event_ms


def time_call(calls: list, reps: int, iters: int) -> tuple[float, float]:
    """(us per launch inside a CUDA graph of `reps` launches rotating over `calls`, us of one eager launch)."""
    seq = [calls[i % len(calls)] for i in range(reps)]
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in seq:
            c()
    graph.replay()
    graph_us = 1e3 * _median_ms(graph.replay, iters) / reps
    it = iter(range(10**9))
    single_us = 1e3 * _median_ms(lambda: calls[next(it) % len(calls)](), 2 * iters)
    del graph
    return graph_us, single_us


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


# ---- one shape --------------------------------------------------------------------------------------
def make_weights(n: int, k: int, l2_bytes: int) -> tuple[list, list]:
    """bf16 copies and their int8 (+ scale) versions, enough copies that the int8 ones span 3x L2."""
    from autoglm_trt.layers import quant as Q

    copies = max(1, min(8, math.ceil(3 * l2_bytes / (n * k))))
    w_bf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    return w_bf, [Q.quantize_weight(w) for w in w_bf]


def bench_shape(name: str, m: int, w_bf: list, w_q: list, args, best_plain: dict) -> list[dict]:
    from autoglm_trt import plugins
    from autoglm_trt.plugins import int8_gemm
    from autoglm_trt.plugins import triton_gemv as G

    n, k, has_bias, silu = SHAPES[name]
    x = torch.randn(m, 2 * k if silu else k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if has_bias else None
    act = (lambda: plugins.silu_mul(x)) if silu else (lambda: x)
    io = 2 * x.numel() + 2 * m * n + (2 * n if has_bias else 0)
    nbytes = {"bf16": 2 * n * k + io, "int8": n * k + 4 * n + io}
    rows, refs = [], {kind: G.gemv_reference(x, *wt, bias=bias, silu_mul=silu)
                      for kind, wt in (("bf16", (w_bf[0],)), ("int8", w_q[0]))}

    def run(label: str, kind: str, make, cfg=None) -> None:
        calls, ref = [make(i) for i in range(len(w_bf))], refs[kind]
        row = {"shape": name, "m": m, "n": n, "k": k, "kind": kind, "impl": label,
               "config": cfg.__dict__ if cfg else None, "tag": cfg.tag if cfg else label}
        try:
            row["err"] = rel_err(calls[0](), ref)
            row["graph_us"], row["single_us"] = time_call(calls, args.reps, args.iters)
            row["gbs"] = nbytes[kind] / row["graph_us"] / 1e3
            row["ok"] = row["err"] <= 2e-2
        except Exception as exc:  # noqa: BLE001 - a config that fails is reported and skipped
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:160]}")
        rows.append(row)
        if args.verbose or not row["ok"]:
            print("   ", _row_text(row), flush=True)

    run("cublas", "bf16", lambda i: lambda: F.linear(act(), w_bf[i], bias))
    run("int8_gemm", "int8", lambda i: lambda: int8_gemm.w8a16_matmul(act(), *w_q[i], bias))
    if silu:  # the same GEMV, unfused: silu_mul kernel + the best plain down_proj config
        for kind, wts in (("bf16", [(w,) for w in w_bf]), ("int8", w_q)):
            cfg = best_plain.get((kind, m)) or G.gemv_config(m, n, k, KINDS[kind])
            run("gemv_unfused", kind, lambda i, wt=wts, c=cfg: lambda: G.gemv(act(), *wt[i], bias=bias, config=c), cfg)
    for kind, wts in (("bf16", [(w,) for w in w_bf]), ("int8", w_q)):
        for cfg in _configs(name, m, kind, args):
            run("gemv", kind, lambda i, wt=wts, c=cfg: lambda: G.gemv(x, *wt[i], bias=bias, silu_mul=silu, config=c), cfg)
    return rows


def _configs(name: str, m: int, kind: str, args) -> list:
    """The candidates for a shape, M and weight kind, plus what gemv_config picks today (table or rule)."""
    from autoglm_trt.plugins import triton_gemv as G

    n, k, _, silu = SHAPES[name]
    vec = 16 // torch.empty(0, dtype=KINDS[kind]).element_size()
    if args.configs:  # NOTE: any tag, candidate or not; those whose block_k misses this dtype's vector drop
        return [c for c in map(G.GemvConfig.from_tag, sorted(args.configs)) if c.block_k % vec == 0]
    cands = G.candidates(m, G.weight_kind(KINDS[kind]), silu)
    default = G.gemv_config(m, n, k, KINDS[kind], silu)
    return cands + [default] * (default not in cands)


def _row_text(r: dict) -> str:
    if "graph_us" not in r:
        return f"{r['shape']:>9} M={r['m']} {r['kind']:>4} {r['impl']:<12} {r['tag']:<22} FAILED {r.get('error', '')}"
    bad = "" if r["ok"] else f"  WRONG (rel err {r['err']:.2e})"
    return (f"{r['shape']:>9} M={r['m']} {r['kind']:>4} {r['impl']:<12} {r['tag']:<22} {r['graph_us']:8.2f} us "
            f"{r['gbs']:7.0f} GB/s  single {r['single_us']:7.2f} us{bad}")


# ---- report --------------------------------------------------------------------------------------------
def best(rows: list[dict], impl: str, kind: str) -> dict | None:
    ok = [r for r in rows if r["impl"] == impl and r["kind"] == kind and r.get("ok")]
    return min(ok, key=lambda r: r["graph_us"]) if ok else None


def summary(rows: list[dict], ms: list[int], names: list[str]) -> dict:
    from autoglm_trt.plugins import triton_gemv as G

    print("\nper shape (graph us per launch, GB/s; best GEMV config; single-launch us in brackets)")
    print(f"{'shape':>9} {'M':>2} | {'cuBLAS bf16':>20} | {'GEMV bf16':>42} | {'int8_gemm W8A16':>20} | {'GEMV int8':>42}")
    table, winners = {}, []
    for name in names:
        for m in ms:
            sub = [r for r in rows if r["shape"] == name and r["m"] == m]
            cells = []
            for impl, kind in (("cublas", "bf16"), ("gemv", "bf16"), ("int8_gemm", "int8"), ("gemv", "int8")):
                b = best(sub, impl, kind)
                tag = f" {b['tag']:<21}" if b and impl == "gemv" else ""
                cells.append(f"{b['graph_us']:6.1f} {b['gbs']:5.0f} [{b['single_us']:5.1f}]{tag}" if b else "-")
                if b and impl == "gemv":
                    n, k, _, silu = SHAPES[name]
                    key = (G.weight_kind(KINDS[kind]), G.block_m_for(m), n, k, silu)
                    table[key] = b
                    winners.append({"shape": name, "m": m, "kind": kind, **{f: b[f] for f in ("tag", "graph_us", "gbs")}})
            print(f"{name:>9} {m:>2} | {cells[0]:>20} | {cells[1]:>42} | {cells[2]:>20} | {cells[3]:>42}")
    print("\n# paste into autoglm_trt/plugins/triton_gemv.py (winners of this run):\nTABLE.update({")
    for key, b in table.items():
        base = best([r for r in rows if r["shape"] == b["shape"] and r["m"] == b["m"]],
                    *(("cublas", "bf16") if b["kind"] == "bf16" else ("int8_gemm", "int8")))
        vs = f" ({base['impl']} {base['graph_us']:.1f} us)" if base else ""
        print(f"    {key!r}: {G.GemvConfig(**b['config'])!r},  # {b['shape']} {b['graph_us']:.1f} us{vs}, "
              f"{b['gbs']:.0f} GB/s")
    print("})")
    return {"winners": winners, "table": [[list(k), v["config"]] for k, v in table.items()]}


def step_estimate(rows: list[dict], ms: list[int]) -> dict:
    """All decoder linears x 40 + the LM head, per implementation (best config each), graph times."""
    out = {}
    for m in ms:
        def t(name, impl, kind, m=m):
            b = best([r for r in rows if r["shape"] == name and r["m"] == m], impl, kind)
            return b["graph_us"] if b else float("nan")
        lin = {"cuBLAS bf16": [t(s, "cublas", "bf16") for s in ("qkv", "o", "gate_up", "down_silu")],
               "GEMV bf16": [t(s, "gemv", "bf16") for s in ("qkv", "o", "gate_up", "down_silu")],
               "int8_gemm": [t(s, "int8_gemm", "int8") for s in ("qkv", "o", "gate_up", "down_silu")],
               "GEMV int8": [t(s, "gemv", "int8") for s in ("qkv", "o", "gate_up", "down_silu")]}
        head = min(t("lm_head", "cublas", "bf16"), t("lm_head", "gemv", "bf16"))
        out[m] = {impl: (LAYERS * sum(v) + head) / 1e3 for impl, v in lin.items()}
        print(f"M={m}: 40 layers of linears (+ silu_mul) + bf16 LM head, ms per step: "
              + ", ".join(f"{impl} {ms_:.2f} ({1e3 / ms_:.0f} steps/s)" for impl, ms_ in out[m].items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,4", help="rows of x (decode batch)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--configs", default="", help="time these configs instead of the candidates: tags, comma "
                    "separated, e.g. n4k2048w4s1-vec,n8k512w4s1-end-magic (nN kK wWARPS sSTAGES-REDUCE[-I8])")
    ap.add_argument("--reps", type=int, default=20, help="launches per CUDA graph")
    ap.add_argument("--iters", type=int, default=10, help="timed graph replays (2x as many single launches)")
    ap.add_argument("--jobs", type=int, default=min(12, mp.cpu_count()), help="compile processes (0: compile inline)")
    ap.add_argument("--verbose", action="store_true", help="print every config's timing")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.configs = {c for c in args.configs.split(",") if c}
    ms, names = [int(m) for m in args.m.split(",")], [s for s in args.shapes.split(",") if s]
    from autoglm_trt.plugins import triton_gemv as G

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}; "
          f"M {ms}, shapes {names}, {args.reps} launches per graph", flush=True)
    t0 = time.perf_counter()
    if args.jobs:
        jobs = {(kind, m, SHAPES[s][2], SHAPES[s][3], c) for s in names for m in ms for kind in KINDS
                for c in _configs(s, m, kind, args)}
        precompile(sorted(jobs, key=str), args.jobs)
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    rows, best_plain = [], {}
    for name in names:
        w_bf, w_q = make_weights(*SHAPES[name][:2], l2)
        for m in ms:
            rows += bench_shape(name, m, w_bf, w_q, args, best_plain)
            if name == "down":
                for kind in KINDS:
                    b = best([r for r in rows if r["shape"] == "down" and r["m"] == m], "gemv", kind)
                    best_plain[(kind, m)] = G.GemvConfig(**b["config"]) if b else None
            print(f"{name} M={m} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        del w_bf, w_q
        gc.collect()
        torch.cuda.empty_cache()
    res = {"gpu": torch.cuda.get_device_name(), "triton": __import__("triton").__version__,
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "args": {**vars(args), "configs": sorted(args.configs)},
           "rows": rows, **summary(rows, ms, names)}
    if all(s in names for s in ("qkv", "o", "gate_up", "down_silu", "lm_head")):
        res["step_ms"] = step_estimate(rows, ms)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
