"""A batch-1 INT8 weight-only decode step without a checkpoint: the 9B decoder's 40 layers on random int8
weights, through the engine's own kernels, one CUDA graph per variant, all in one process.

    python benchmarks/bench_layer_step.py [--layers 40] [--context 640] [--variants base,gemv,split=256,...] [--json out.json]

Per layer, as Glm4vTextDecoderLayer runs it under the engine: qkv (W8A16, bias) -> rotary + KV store ->
decode attention over `--context` cached keys -> o_proj -> norm_add_norm -> gate_up -> silu_mul -> down_proj
-> norm_add_norm. No embedding, LM head or sampling. A variant is a set of switches (VARIANTS):
  gemv     gate_up and down_proj on the Triton GEMV too (else the split-K int8 GEMM; qkv/o take the GEMV)
  split=N  decode attention: each split takes >= N keys (default: one tile)
  fan=N, bn=N, splits=N  decode attention: partials merged per program (8), keys per tile (64), splits
  reduce   decode attention merges its splits in a second launch (session 1's design) instead of in-kernel
  int4     the four linears on INT4 weights (group 128, plugins/int4_gemm.w4a16_linear: the GEMV at batch 1) in
           place of int8: the int4-awq mode's decode step (UNMEASURED when written; weight rate from its own bytes)
  silu     with int4: down_proj's GEMV computes silu(gate) * up itself (no silu_mul launch; UNMEASURED: the sm_90
           compile counts 7.1 SASS instructions a weight against 4.5 without, so it may lose where it saves a launch)
Prints ms per step, us per layer, the weight bytes' rate and the ratio to the first variant; --profile adds
each variant's kernel times per layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import median_event_ms  # noqa: E402

H, I, HEADS, KV, D, PAGE, EPS = 4096, 13696, 32, 2, 128, 16, 1e-5
QKV = (HEADS + 2 * KV) * D
VARIANTS = {"base": "", "reduce": "reduce", "gemv": "gemv", "split256": "split=256", "fan16": "fan=16",
            "tile32": "bn=32", "int4": "int4", "int4silu": "int4,silu"}
GROUP = 128  # INT4 group size


@dataclass
class Layer:
    w: dict  # name -> (int8 [N, K], fp32 scale [N])
    w4: dict | None  # name -> (int32 [N, K / 8], fp16 scale [N, K / G], fp16 zero [N, K / G]) for the int4 variant
    qkv_bias: torch.Tensor  # [QKV] bf16
    norms: list  # 4 x [H] bf16
    k_cache: torch.Tensor  # [blocks, PAGE, KV, D]
    v_cache: torch.Tensor


def random_int4(n: int, k: int, g: torch.Generator) -> tuple:
    """Random INT4 weights in layers/int4.py's format (values do not matter for timing)."""
    groups = -(-k // GROUP)
    packed = torch.randint(-2**31, 2**31 - 1, (n, k // 8), device="cuda", dtype=torch.int32, generator=g)
    scale = (torch.rand(n, groups, device="cuda", generator=g) * 1e-3 + 1e-3).to(torch.float16)
    zero = torch.randint(0, 16, (n, groups), device="cuda", generator=g).to(torch.float16)
    return packed, scale, zero


def make_layers(n: int, context: int, int4: bool = False) -> list[Layer]:
    g = torch.Generator("cuda").manual_seed(0)
    shapes = {"qkv": (QKV, H), "o": (H, HEADS * D), "gate_up": (2 * I, H), "down": (H, I)}
    blocks = context // PAGE + 2
    layers = []
    for _ in range(n):
        w = {k: (torch.randint(-127, 128, s, device="cuda", dtype=torch.int8, generator=g),
                 torch.rand(s[0], device="cuda", generator=g) * 2e-4 + 1e-4) for k, s in shapes.items()}
        cache = [torch.randn(blocks, PAGE, KV, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2)]
        w4 = {k: random_int4(*s, g) for k, s in shapes.items()} if int4 else None
        layers.append(Layer(w, w4, torch.randn(QKV, device="cuda", generator=g).to(torch.bfloat16) * 0.1,
                            [torch.ones(H, device="cuda", dtype=torch.bfloat16) for _ in range(4)], *cache))
    return layers


def parse(spec: str) -> dict:
    opts = {}
    for part in filter(None, spec.split(",")):
        key, _, val = part.partition("=")
        opts[key] = int(val) if val else True
    return opts


def make_step(layers: list[Layer], context: int, opts: dict, max_blocks: int):
    from autoglm_trt import plugins
    from autoglm_trt.layers import quant as Q
    from autoglm_trt.plugins import int4_gemm as K4
    from autoglm_trt.plugins import triton_attention
    from autoglm_trt.plugins import triton_gemv as G

    x0 = torch.randn(1, H, device="cuda").to(torch.bfloat16)
    cos, sin = torch.rand(1, 32, device="cuda"), torch.rand(1, 32, device="cuda")  # [T, rotary_dim / 2]
    seq_lens = torch.tensor([context], device="cuda", dtype=torch.int32)
    bt = torch.arange(max_blocks, device="cuda", dtype=torch.int32)[None] % (context // PAGE + 2)
    slot = torch.tensor([context - 1], device="cuda", dtype=torch.int64)

    if opts.get("silu") and not opts.get("int4"):
        raise ValueError("the silu switch needs int4 (the int8 path has no silu GEMV in this step)")

    def lin(x, wq, bias=None):  # x [1, K] -> [1, N]
        if opts.get("int4"):  # wq is the int4 triple (the step picks L.w4)
            return K4.w4a16_linear(x, *wq, GROUP, bias)
        return G.gemv(x, *wq, bias) if opts.get("gemv") else Q.w8a16(x, *wq, bias)  # the engine's int8-wo path

    def step():
        x, residual = x0, x0
        for L in layers:
            W = L.w4 if opts.get("int4") else L.w  # noqa: N806 - the layer's weights in the variant's format
            qkv = lin(x, W["qkv"], L.qkv_bias)  # [1, QKV]
            q = plugins.rope_qkv_store(qkv, cos, sin, L.k_cache, L.v_cache, slot, HEADS, KV, D)  # [1, 32, 128]
            a = triton_attention.decode_attention(q, L.k_cache, L.v_cache, seq_lens, bt, D ** -0.5,
                                                  min_split=opts.get("split"), merge_fan=opts.get("fan"),
                                                  block_n=opts.get("bn"), num_splits=opts.get("splits"),
                                                  separate=bool(opts.get("reduce")))
            residual, x = plugins.norm_add_norm(lin(a.flatten(1), W["o"]), residual, L.norms[0], L.norms[1], EPS)
            if opts.get("silu"):  # int4 only: silu(gate) * up inside down_proj's GEMV
                down = K4.gemv(lin(x, W["gate_up"]), *W["down"], GROUP, silu_mul=True)  # [1, 2I] -> [1, H]
            else:
                down = lin(plugins.silu_mul(lin(x, W["gate_up"])), W["down"])  # [1, 2I] -> [1, I] -> [1, H]
            residual, x = plugins.norm_add_norm(down, residual, L.norms[2], L.norms[3], EPS)
        return x

    return step


def time_variant(layers, context, spec, iters, max_blocks, profile: bool = False) -> float:
    step = make_step(layers, context, parse(spec), max_blocks)
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    ms = median_event_ms(graph.replay, iters)
    if profile:
        print_profile(graph, spec, len(layers))
    del graph
    return ms


def print_profile(graph, spec: str, n_layers: int) -> None:
    """Kernel time per layer, in all and by kernel name (the top 10), over 5 replays of the graph."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    per = 5 * n_layers
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / per
    print(f"  profile [{spec}]: kernels {total:.1f} us per layer")
    for e in events[:10]:
        print(f"    {e.key[:60]:<60} {e.device_time_total / per:7.2f} us/layer  ({e.count / per:.0f} per layer)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--context", type=int, default=640, help="cached keys per layer (a multiple of 16)")
    ap.add_argument("--max-model-len", type=int, default=32768, help="block-table width, as the engine's graphs")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"names of {list(VARIANTS)} or 'a+b' switch sets")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2, help="each variant timed this many times, interleaved")
    ap.add_argument("--profile", action="store_true", help="per-kernel times of each variant's graph")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    specs = {n: VARIANTS.get(n, n.replace("+", ",")) for n in names}
    print(f"{torch.cuda.get_device_name()}: {args.layers} layers, context {args.context}", flush=True)
    t0 = time.perf_counter()
    layers = make_layers(args.layers, args.context, int4=any("int4" in parse(sp) for sp in specs.values()))
    wbytes8 = args.layers * sum(q.numel() + 4 * s.numel() for q, s in layers[0].w.values())
    wbytes4 = args.layers * sum(sum(t.numel() * t.element_size() for t in w) for w in (layers[0].w4 or {}).values())
    res = {n: [] for n in names}
    for _ in range(args.rounds):  # NOTE: interleaved, so clock or thermal drift does not favour one variant
        for n in names:
            res[n].append(time_variant(layers, args.context, specs[n], args.iters, args.max_model_len // PAGE,
                                       args.profile and len(res[n]) == 0))
    base = min(res[names[0]])
    rows = []
    for n in names:
        ms = min(res[n])
        wbytes = wbytes4 if "int4" in parse(specs[n]) else wbytes8
        rows.append({"variant": n, "switches": specs[n], "ms": ms, "us_per_layer": 1e3 * ms / args.layers,
                     "tb_s": wbytes / ms / 1e9, "vs_first": ms / base, "all_ms": res[n]})
        print(f"{n:>18} [{specs[n]:<32}] {ms:7.3f} ms/step  {1e3 * ms / args.layers:6.1f} us/layer  "
              f"{wbytes / ms / 1e9:5.2f} TB/s of weights  x{ms / base:.3f}", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                                               "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
