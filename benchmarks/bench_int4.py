"""INT4 weight-only (W4A16, group 128) on one GPU: every candidate at the 9B's decoder linear shapes, side by side
with bf16 and the memory floor. One command, JSON out, a few minutes:

    python benchmarks/bench_int4.py [--json $OUT/bench_int4.json] [--sweep] [--budget-s 240] [--quick]

Shapes (TP 1): qkv 4608x4096, o 4096x4096, gate_up 27392x4096, down 4096x13696; M = 1, 8, 32 and a 3,500-token
prefill. Candidates (a missing one is reported as missing, one that fails as its error, never a crash):
  bf16          F.linear (cuBLAS)                         bf16_gemv   plugins.linear's Triton GEMV (M = 1)
  int4_gemv     plugins/int4_gemm.gemv (M <= 8)           int4_mm     plugins/int4_gemm.matmul (tl.dot)
  int4_deq      dequantize to bf16 + cuBLAS               int4        w4a16_linear (the method's dispatch)
  tinygemm      torch.ops.aten._weight_int4pack_mm (innerKTiles 8, bf16 scales_and_zeros)
  gemlite       gemlite.GemLiteLinear(4 bits, group 128, bf16) when importable (carry it: see --help epilog)
  marlin        vLLM's gptq_marlin_gemm when importable: probed only (this script does not repack for it)
Weights rotate among copies totalling > 4x L2 inside one CUDA graph, so L2 does not flatter them. The floor of a
row is bytes read / the device-to-device copy bandwidth measured here (and for prefill, FLOPs / the bf16 GEMM rate
measured here). Each candidate's output is checked against the fp32 reference (dequantize, matmul): rel_err.
Then the decode-step floor: all 160 decoder linears at M = 1 (and 8) in one graph: bf16 vs int4 vs tinygemm.
--sweep also times plugins/int4_gemm's candidate launch configs (to set gemv_config / gemm_config).
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"qkv": (4608, 4096), "o": (4096, 4096), "gate_up": (27392, 4096), "down": (4096, 13696)}
BATCHES = (1, 8, 32, 3500)
GROUP = 128
L2_BYTES = 50 << 20
DEV = "cuda"
LAYERS = 40


def dry_run_setup() -> None:
    """--dry-run: the whole script on the CPU (Triton interpreter, tiny shapes), to check it before GPU time."""
    global DEV, SHAPES, BATCHES, L2_BYTES, LAYERS
    os.environ["TRITON_INTERPRET"] = "1"  # NOTE: before triton's first import
    DEV, L2_BYTES, LAYERS = "cpu", 1 << 12, 1
    SHAPES = {"qkv": (72, 128), "o": (64, 128), "gate_up": (80, 128), "down": (64, 256)}
    BATCHES = (1, 3, 70)
EPILOG = ("gemlite is pure Python + Triton: to time it on a machine without network, copy its package folder "
          "(pip download gemlite==0.6.0.post2, unpack, gemlite/) into a folder you carry and set PYTHONPATH to it.")


# ---- timing ---------------------------------------------------------------------------------------------
def median_ms(fn, iters: int) -> float:
    if DEV == "cpu":
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def rotating_ms(calls: list, iters: int) -> float:
    """ms of one call, cycling through `calls` (one per weight copy) inside a CUDA graph (eager if capture fails)."""
    def step():
        for c in calls:
            c()

    step()
    if DEV == "cpu":
        return median_ms(step, 1) / len(calls)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    except Exception:  # noqa: BLE001 - a library that cannot be captured is timed eagerly (launch gaps included)
        torch.cuda.synchronize()
        run = step
    run()
    return median_ms(run, iters) / len(calls)


def free() -> None:
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def copy_tbs() -> float:
    if DEV == "cpu":
        return 0.1
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    ms = median_ms(lambda: b.copy_(a), 10)
    del a, b
    free()
    return 2 * (1 << 30) / ms / 1e9  # read + write


def gemm_tflops() -> float:
    if DEV == "cpu":
        return 1.0  # NOTE: placeholders in a dry run
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ a, 5)
    del a
    free()
    return 2 * 8192 ** 3 / ms / 1e9


# ---- candidates ----------------------------------------------------------------------------------------
class Weights:
    """One random [n, k] weight in every candidate's format (quantized once, prepared lazily per candidate)."""

    def __init__(self, n: int, k: int, seed: int) -> None:
        from autoglm_trt.layers import int4 as L

        g = torch.Generator(device=DEV).manual_seed(seed)
        self.bf16 = (torch.randn(n, k, device=DEV, generator=g) * 0.02).to(torch.bfloat16)
        self.q = L.quantize_int4(self.bf16, GROUP)  # (packed, scale, zero)
        self.extra: dict = {}

    def ref(self, x: torch.Tensor) -> torch.Tensor:
        from autoglm_trt.layers import int4 as L

        return L.int4_reference(x, *self.q, GROUP)


def tinygemm_scales_and_zeros(scale, zero):
    """[K/G, N, 2] bf16 for tinygemm's w = (q - 8) * scale + zero from ours, w = (q - zero) * scale."""
    s = scale.float()
    return torch.stack([s, (8.0 - zero.float()) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def tinygemm_prepare(packed, scale, zero):
    """Our format -> tinygemm's (CUDA): uint8 [N, K/2] with even k in the high nibble, packed by torch for
    innerKTiles 8, and tinygemm_scales_and_zeros."""
    from autoglm_trt.layers import int4 as L

    q = L.unpack_int4(packed).to(torch.int32)  # [N, K]
    u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(u8, 8), tinygemm_scales_and_zeros(scale, zero)


def gemlite_prepare(packed, scale, zero, n: int, k: int):
    """gemlite's HQQ-style layer, (W_q - zeros) * scales ~= W: our q, zero and scale in bf16 (its compute dtype)."""
    from gemlite import DType, GemLiteLinear

    from autoglm_trt.layers import int4 as L

    lin = GemLiteLinear(4, group_size=GROUP, in_features=k, out_features=n, input_dtype=DType.BF16,
                        output_dtype=DType.BF16)
    lin.pack(L.unpack_int4(packed), scale.to(torch.bfloat16), zero.to(torch.bfloat16), bias=None)
    return lin


def probe_libraries() -> dict:
    out = {}
    out["tinygemm"] = ("ok" if hasattr(torch.ops.aten, "_weight_int4pack_mm") else "missing: this torch has no "
                       "aten._weight_int4pack_mm")
    try:
        import gemlite

        out["gemlite"] = f"ok {getattr(gemlite, '__version__', '?')}"
        cfg = Path(gemlite.__file__).parent / "configs" / "h100.json"
        if DEV == "cuda" and "H100" in torch.cuda.get_device_name() and cfg.is_file():
            gemlite.load_config(str(cfg))  # NOTE: its shipped H100 autotune cache: less autotuning here
    except Exception as exc:  # noqa: BLE001
        out["gemlite"] = f"missing: {type(exc).__name__}: {exc}"[:200]
    try:
        from vllm import _custom_ops as ops  # noqa: F401

        out["marlin"] = "present (vllm importable) but not timed: this script does not repack for Marlin"
    except Exception as exc:  # noqa: BLE001
        out["marlin"] = f"missing: {type(exc).__name__}: {exc}"[:200]
    return out


def make_call(name: str, w: Weights, x: torch.Tensor, libs: dict):
    """A zero-argument callable computing x @ W^T with candidate `name`, or raise (missing / unsupported)."""
    from autoglm_trt import plugins
    from autoglm_trt.plugins import int4_gemm as K

    m, n = x.shape[0], w.bf16.shape[0]
    args = (*w.q, GROUP)
    if name == "bf16":
        return lambda: F.linear(x, w.bf16)
    if name == "bf16_gemv":
        if m != 1:
            raise NotImplementedError("M = 1 only")
        return lambda: plugins.linear(x, w.bf16)
    if name == "int4_gemv":
        if m > 8:
            raise NotImplementedError("M <= 8 only")
        return lambda: K.gemv(x, *args)
    if name == "int4_mm":
        return lambda: K.matmul(x, *args)
    if name == "int4_deq":
        return lambda: F.linear(x, K.dequantize(*args, x.dtype))
    if name == "int4":
        return lambda: K.w4a16_linear(x, *args)
    if name in ("tinygemm", "gemlite", "marlin") and not libs[name].startswith("ok"):
        raise ModuleNotFoundError(libs[name])
    if name == "tinygemm":
        if "tinygemm" not in w.extra:
            w.extra["tinygemm"] = tinygemm_prepare(*w.q)
        tw, sz = w.extra["tinygemm"]
        return lambda: torch.ops.aten._weight_int4pack_mm(x, tw, GROUP, sz)
    if name == "gemlite":
        if "gemlite" not in w.extra:
            w.extra["gemlite"] = gemlite_prepare(*w.q, n, x.shape[1])
        lin = w.extra["gemlite"]
        return lambda: lin(x)
    raise ValueError(name)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-30)) if torch.isfinite(o).all() else float("inf")


def bytes_read(name: str, m: int, n: int, k: int) -> int:
    act = 2 * m * (k + n)
    return act + (2 * n * k if name.startswith("bf16") else n * k // 2 + 4 * n * (-(-k // GROUP)))


def bench_row(shape: str, m: int, cands: list[str], libs: dict, deadline: float, env: dict) -> dict:
    n, k = SHAPES[shape]
    int4_bytes = n * k // 2
    copies = 2 if m > 64 else max(2, -(-4 * L2_BYTES // int4_bytes))
    ws = [Weights(n, k, seed) for seed in range(copies)]
    x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
    row = {"shape": shape, "n": n, "k": k, "m": m, "us": {}, "tb_s": {}, "rel_err": {}, "skipped": {}}
    flops_us = 2 * m * n * k / env["bf16_tflops"] / 1e6
    row["floor_us"] = {"bf16": max(bytes_read("bf16", m, n, k) / env["copy_tb_s"] / 1e6, flops_us),
                       "int4": max(bytes_read("int4", m, n, k) / env["copy_tb_s"] / 1e6, flops_us)}
    refs = {"int4": ws[0].ref(x).float(), "bf16": x.float() @ ws[0].bf16.float().t()}  # [M, N] fp32
    for name in cands:
        if time.perf_counter() > deadline:
            row["skipped"][name] = "time budget"
            continue
        try:
            calls = [make_call(name, w, x, libs) for w in ws]
            row["rel_err"][name] = rel_err(calls[0]().float(), refs["bf16" if name.startswith("bf16") else "int4"])
            ms = rotating_ms(calls, 10 if m > 64 else 20)
            row["us"][name] = round(1e3 * ms, 2)
            row["tb_s"][name] = round(bytes_read(name, m, n, k) / ms / 1e9, 3)
        except Exception as exc:  # noqa: BLE001 - one candidate's failure is a row entry, not a crash
            row["skipped"][name] = f"{type(exc).__name__}: {exc}"[:300]
    del ws
    free()
    return row


def print_row(r: dict, cands: list[str]) -> None:
    cells = " ".join(f"{r['us'].get(c, float('nan')):9.1f}" for c in cands)
    print(f"{r['shape']:>8} {r['m']:>5} | {r['floor_us']['bf16']:8.1f} {r['floor_us']['int4']:8.1f} | {cells}",
          flush=True)


# ---- the decode step's linears ---------------------------------------------------------------------------
@torch.inference_mode()
def step_floor(m: int, libs: dict) -> dict:
    """ms of all decoder linears of one decode step at m rows, one CUDA graph per mode: bf16, int4, tinygemm."""
    from autoglm_trt import plugins
    from autoglm_trt.layers import int4 as L
    from autoglm_trt.plugins import int4_gemm as K

    x = {k: torch.randn(m, k, device=DEV).to(torch.bfloat16) for _, k in SHAPES.values()}
    out = {}
    for mode in ("bf16", "int4", "tinygemm"):
        if mode == "tinygemm" and not libs["tinygemm"].startswith("ok"):
            out[mode] = libs["tinygemm"]
            continue
        try:
            ws = []
            for _ in range(LAYERS):
                for n, k in SHAPES.values():
                    w = (torch.randn(n, k, device=DEV) * 0.02).to(torch.bfloat16)
                    ws.append(w if mode == "bf16" else L.quantize_int4(w, GROUP) if mode == "int4"
                              else tinygemm_prepare(*L.quantize_int4(w, GROUP)))
                    del w
            call = {"bf16": lambda w: plugins.linear(x[w.shape[1]], w),
                    "int4": lambda w: K.w4a16_linear(x[8 * w[0].shape[1]], *w, GROUP),
                    "tinygemm": lambda w: torch.ops.aten._weight_int4pack_mm(
                        x[GROUP * w[1].shape[0]], w[0], GROUP, w[1])}[mode]
            out[mode] = round(rotating_ms([lambda ws=ws: [call(w) for w in ws]], 10), 4)
        except Exception as exc:  # noqa: BLE001
            out[mode] = f"{type(exc).__name__}: {exc}"[:300]
        ws = None
        free()
    return out


# ---- launch-config sweep ---------------------------------------------------------------------------------
def sweep(deadline: float) -> list[dict]:
    from autoglm_trt.plugins import int4_gemm as K

    rows = []
    for shape, (n, k) in SHAPES.items():
        ws = [Weights(n, k, s) for s in range(max(2, -(-4 * L2_BYTES // (n * k // 2))))]
        for m in BATCHES[:3]:
            x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
            cfgs = [("gemv", c) for c in (K.gemv_candidates() if m <= 8 else [])]
            cfgs += [("mm", c) for c in K.gemm_candidates(m, GROUP)]
            for kind, cfg in cfgs:
                if time.perf_counter() > deadline:
                    return rows
                fn = K.gemv if kind == "gemv" else K.matmul
                try:
                    ms = rotating_ms([lambda w=w: fn(x, *w.q, GROUP, config=cfg) for w in ws], 20)
                    rows.append({"shape": shape, "m": m, "kind": kind, "config": cfg.tag, "us": round(1e3 * ms, 2)})
                except Exception as exc:  # noqa: BLE001
                    rows.append({"shape": shape, "m": m, "kind": kind, "config": cfg.tag, "error": str(exc)[:200]})
        del ws
        free()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    default_json = os.path.join(os.environ["OUT"], "bench_int4.json") if os.environ.get("OUT") else None
    ap.add_argument("--json", default=default_json, help="where to write the results ($OUT/bench_int4.json if set)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new measurements after this long")
    ap.add_argument("--sweep", action="store_true", help="also time int4_gemm's candidate launch configs")
    ap.add_argument("--quick", action="store_true", help="M = 1 and 8 only, no step floor (a smoke run)")
    ap.add_argument("--dry-run", action="store_true", help="everything on the CPU at tiny shapes (Triton interpreter)")
    args = ap.parse_args()
    if args.dry_run:
        dry_run_setup()
    elif not torch.cuda.is_available():
        print("error: bench_int4.py needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    import triton

    env = {"gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)", "torch": torch.__version__,
           "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "copy_tb_s": round(copy_tbs(), 3),
           "bf16_tflops": round(gemm_tflops(), 1)}
    libs = probe_libraries()
    print(json.dumps(env), "\n", json.dumps(libs), flush=True)
    cands = ["bf16", "bf16_gemv", "int4", "int4_gemv", "int4_mm", "int4_deq", "tinygemm", "gemlite"]
    print(f"{'shape':>8} {'M':>5} | {'floor16':>8} {'floor4':>8} | " + " ".join(f"{c[:9]:>9}" for c in cands))
    rows = []
    batches = BATCHES[:2] if args.quick else BATCHES
    # NOTE: M outermost: the decode rows come first if the budget runs out; the step floor next; gemlite last (its
    # first call at each shape autotunes, which must not starve the rest)
    for m in batches:
        for shape in SHAPES:
            rows.append(bench_row(shape, m, cands[:-1], libs, deadline, env))
            print_row(rows[-1], cands)
    result = {**env, "group": GROUP, "libraries": libs, "rows": rows}
    if not args.quick:
        result["step_ms"] = {f"m{m}": step_floor(m, libs) if time.perf_counter() < deadline else "time budget"
                             for m in BATCHES[:2]}
        print("decode-step linears (ms):", json.dumps(result["step_ms"]), flush=True)
    for row in rows:
        if not libs["gemlite"].startswith("ok"):
            row["skipped"]["gemlite"] = libs["gemlite"]
            continue
        extra = bench_row(row["shape"], row["m"], ["gemlite"], libs, deadline, env)  # same seeds: same weights
        for field in ("us", "tb_s", "rel_err", "skipped"):
            row[field].update(extra[field])
    print("gemlite (us):", json.dumps({f"{r['shape']}-{r['m']}": r["us"].get("gemlite", r["skipped"].get("gemlite"))
                                       for r in rows}), flush=True)
    if args.sweep:
        result["sweep"] = sweep(deadline + 120)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"total {result['seconds']} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
