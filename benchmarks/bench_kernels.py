"""Time the Triton plugin kernels on one GPU (median of triton.testing.do_bench, L2 flushed).

    python benchmarks/bench_kernels.py [--block-size 16] [--splits N] [--graph]

Prints, per case, the median time, the bytes the kernel must move (each input read once, each
output written once) and the achieved GB/s against the copy ceiling measured at start
(a large device-to-device copy, read + write bytes). Prefill reports TFLOP/s instead.
Shapes are GLM-4.1V's text decoder: 32 query heads, 2 KV heads, head_dim 128, hidden 4096.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.testing

from autoglm_trt.plugins import triton_attention, triton_norm

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 32, 2, 128, 4096
DTYPE = torch.bfloat16


def bench(fn, graph: bool) -> float:
    """Median milliseconds; with graph=True the call is captured once and its replays timed."""
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def copy_ceiling_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / ms / 1e6


def decode_case(batch: int, context: int, block_size: int) -> tuple:
    blocks_per_seq = triton.cdiv(context, block_size)
    num_blocks = batch * blocks_per_seq
    cache_shape = (num_blocks, block_size, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(cache_shape, device="cuda", dtype=DTYPE)
    v_cache = torch.randn(cache_shape, device="cuda", dtype=DTYPE)
    table = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    return q, k_cache, v_cache, seq_lens, table, HEAD_DIM**-0.5


def run_decode(args, peak: float) -> None:
    print(f"\n== decode_attention  (block_size {args.block_size}, splits "
          f"{args.splits or 'auto'}, {'graph' if args.graph else 'eager'})")
    print(f"{'batch':>5} {'ctx':>5} {'splits':>6} {'us':>9} {'MB':>8} {'GB/s':>7} {'%peak':>6}")
    for batch in (1, 8, 32, 64):
        for context in (512, 1024, 2048, 4096):
            case = decode_case(batch, context, args.block_size)
            splits = args.splits or triton_attention.choose_num_splits(
                batch, KV_HEADS, case[4].shape[1] * args.block_size, case[0].device)
            ms = bench(lambda: triton_attention.decode_attention(*case, num_splits=splits),
                       args.graph)
            kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * 2
            nbytes = kv_bytes + 2 * case[0].numel() * 2 + batch * (4 + case[4].shape[1] * 4)
            gbs = nbytes / ms / 1e6
            print(f"{batch:>5} {context:>5} {splits:>6} {ms * 1e3:>9.1f} {nbytes / 1e6:>8.2f} "
                  f"{gbs:>7.0f} {100 * gbs / peak:>5.0f}%")
            del case


def run_prefill(args) -> None:
    print(f"\n== paged_attention prefill  (block_size {args.block_size})")
    print(f"{'batch':>5} {'q_len':>6} {'us':>9} {'TFLOP/s':>8}")
    for batch, q_len in ((1, 512), (1, 2048), (1, 8192), (4, 2048)):
        case = decode_case(batch, q_len, args.block_size)
        q = torch.randn(batch * q_len, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        cu = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * q_len
        fn = lambda: triton_attention.paged_attention(  # noqa: E731
            q, case[1], case[2], cu, case[3], case[4], q_len, q_len, case[5])
        ms = bench(fn, args.graph)
        flops = batch * 4 * HEADS * HEAD_DIM * q_len * q_len / 2  # causal: half of QK^T and PV
        print(f"{batch:>5} {q_len:>6} {ms * 1e3:>9.1f} {flops / ms / 1e9:>8.1f}")


def run_norms(args, peak: float) -> None:
    print(f"\n== norms (bf16, {'graph' if args.graph else 'eager'})")
    print(f"{'kernel':>14} {'tokens':>6} {'hidden':>6} {'us':>9} {'GB/s':>7} {'%peak':>6}")
    for hidden in (HIDDEN, 1536):
        for tokens in (1, 64, 1024, 8192):
            x = torch.randn(tokens, hidden, device="cuda", dtype=DTYPE)
            r, w_a, w_b = torch.randn_like(x), torch.randn_like(x[0]), torch.randn_like(x[0])
            cases = (
                ("rms_norm", lambda: triton_norm.rms_norm(x, w_a, 1e-5), 2 * x.numel() * 2),
                ("norm_add_norm", lambda: triton_norm.norm_add_norm(x, r, w_a, w_b, 1e-5),
                 4 * x.numel() * 2),
            )
            for name, fn, nbytes in cases:
                ms = bench(fn, args.graph)
                gbs = nbytes / ms / 1e6
                print(f"{name:>14} {tokens:>6} {hidden:>6} {ms * 1e3:>9.1f} {gbs:>7.0f} "
                      f"{100 * gbs / peak:>5.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--splits", type=int, default=0, help="force decode split count (0=auto)")
    parser.add_argument("--graph", action="store_true", help="time CUDA-graph replays")
    parser.add_argument("--only", choices=("decode", "prefill", "norms"), default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    peak = copy_ceiling_gbs()
    print(f"device: {torch.cuda.get_device_name()}  copy ceiling: {peak:.0f} GB/s (read + write)")
    if args.only in (None, "decode"):
        run_decode(args, peak)
    if args.only in (None, "prefill"):
        run_prefill(args)
    if args.only in (None, "norms"):
        run_norms(args, peak)


if __name__ == "__main__":
    main()
