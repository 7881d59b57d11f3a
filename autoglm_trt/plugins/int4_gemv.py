"""The W4A16 batch-1 GEMV (decode): y[M, N] = x[M, K] @ ((q - zero) * scale)^T (+ bias), layers/int4.py's format.

One row of x a program, no tl.dot. Each lane owns one word (8 weights) of each of the program's BLOCK_N rows per
256 inputs, UNROLL such words in flight, and the 8 x values of that word as one 16-byte load shared by the rows.
Nibbles become floats without I2F: PRMT (inline PTX; integer ops under the interpreter) writes nibble i into
mantissa bits 16..19 under the exponent of 0.5, the float 0.5 * (1 + q / 128), whose products with x are exact;
per word sum_i x_i (q_i - zero) = 256 d - (128 + zero) sum_i x_i with d = sum_i x_i * that float (one FMA chain).
About 4.5 SASS instructions a weight at 8 rows (sm_90 compile: a PRMT and an FFMA a weight, the rest loads,
addresses and the per-word epilogue); the cancellation costs 7 of fp32's 24 bits (relative error ~3e-6 in fp32,
nothing in bf16).
The nibble-to-float helpers here are shared with int4_gemm.py's tl.dot matmul. Launch configs come from the
shapes only (CUDA-graph safe); `gemv_candidates` lists what benchmarks/bench_int4.py --sweep times.
This module imports triton: import it lazily. The oracle is layers.int4.int4_reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor


def check_pow2(name: str, v: int) -> None:
    if v < 1 or v & (v - 1):
        raise ValueError(f"{name} must be a power of two >= 1, got {v}")


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 4  # rows of W per program (every lane takes all of them: x is loaded once for the rows)
    unroll: int = 2  # words per lane and row in flight: each step reads unroll * 256 inputs
    num_warps: int = 4  # NOTE: warps split a step's words (unroll >= num_warps keeps every warp busy)

    def __post_init__(self) -> None:
        for name in ("block_n", "unroll", "num_warps"):
            check_pow2(f"GemvConfig.{name}", getattr(self, name))

    @property
    def tag(self) -> str:
        return f"n{self.block_n}u{self.unroll}w{self.num_warps}"


def gemv_config(m: int, n: int, k: int) -> GemvConfig:
    """UNMEASURED default: 8 rows a program, 4 words of each row a lane in flight (per weight the fewest SASS
    instructions of the candidates compiled for sm_90: ~4.5, against 5.1 at 4 rows)."""
    return GemvConfig(8, 4 if k >= 1024 else 1, 4)


def gemv_candidates() -> list[GemvConfig]:
    """What benchmarks/bench_int4.py --sweep times for the GEMV."""
    return [GemvConfig(bn, u, w) for bn, u, w in ((2, 4, 4), (4, 2, 4), (4, 4, 4), (8, 4, 4), (8, 2, 2), (8, 8, 8),
                                                  (16, 4, 4), (4, 8, 4))]


# ---- the GEMV -----------------------------------------------------------------------------------------
# 8 nibbles of a word -> 8 floats 0.5 * (1 + q / 128): bytes of (w & 0x0F0F0F0F) hold nibbles 0, 2, 4, 6, of
# (w >> 4) & 0x0F0F0F0F nibbles 1, 3, 5, 7; PRMT puts byte j in bits 16..23 under the exponent byte 0x3F.
_NIBBLES_ASM = tl.constexpr("""{
.reg .b32 lo, hi;
and.b32 lo, $8, 0x0F0F0F0F;
shr.u32 hi, $8, 4;
and.b32 hi, hi, 0x0F0F0F0F;
prmt.b32 $0, lo, 0x3F000000, 0x7044;
prmt.b32 $1, hi, 0x3F000000, 0x7044;
prmt.b32 $2, lo, 0x3F000000, 0x7144;
prmt.b32 $3, hi, 0x3F000000, 0x7144;
prmt.b32 $4, lo, 0x3F000000, 0x7244;
prmt.b32 $5, hi, 0x3F000000, 0x7244;
prmt.b32 $6, lo, 0x3F000000, 0x7344;
prmt.b32 $7, hi, 0x3F000000, 0x7344;
}""")


@triton.jit
def _nib(w, I: tl.constexpr):
    """Nibble I of every word -> the float 0.5 * (1 + q / 128) (q in mantissa bits 16..19), in integer ops."""
    return ((((w >> (4 * I)) & 15) << 16) | 0x3F000000).to(tl.float32, bitcast=True)


@triton.jit
def nibble_floats(w, PRMT: tl.constexpr):
    """w int32 words -> 8 tensors of w's shape: 0.5 * (1 + q_i / 128) for nibble i = 0..7."""
    if PRMT:  # 11 instructions a word (inline PTX: CUDA only)
        i32 = tl.int32
        b0, b1, b2, b3, b4, b5, b6, b7 = tl.inline_asm_elementwise(
            _NIBBLES_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(i32, i32, i32, i32, i32, i32, i32, i32),
            is_pure=True, pack=1)
        f32 = tl.float32
        return (b0.to(f32, bitcast=True), b1.to(f32, bitcast=True), b2.to(f32, bitcast=True),
                b3.to(f32, bitcast=True), b4.to(f32, bitcast=True), b5.to(f32, bitcast=True),
                b6.to(f32, bitcast=True), b7.to(f32, bitcast=True))
    return _nib(w, 0), _nib(w, 1), _nib(w, 2), _nib(w, 3), _nib(w, 4), _nib(w, 5), _nib(w, 6), _nib(w, 7)


@triton.jit
def _split8(x, BN: tl.constexpr, U: tl.constexpr):
    """x [BN, U, 32, 8] -> x[..., 0], ..., x[..., 7] (the 8-axis is in each thread: register moves only)."""
    a, b = tl.split(tl.reshape(x, (BN, U, 32, 4, 2)))  # a[..., j] = x[..., 2j], b[..., j] = x[..., 2j + 1]
    a0, a1 = tl.split(tl.reshape(a, (BN, U, 32, 2, 2)))  # a0 = (x0, x4), a1 = (x2, x6)
    b0, b1 = tl.split(tl.reshape(b, (BN, U, 32, 2, 2)))  # b0 = (x1, x5), b1 = (x3, x7)
    x0, x4 = tl.split(a0)
    x2, x6 = tl.split(a1)
    x1, x5 = tl.split(b0)
    x3, x7 = tl.split(b1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _gemv_step(acc, x_ptrs, w_ptrs, s_rows, z_rows, word, K, GROUP: tl.constexpr, MASKED: tl.constexpr,
               PRMT: tl.constexpr, SILU_MUL: tl.constexpr):
    """acc [BN, U, 32] += s * sum_i x_i (q_i - z) for each word: x_ptrs [BN, U, 32, 8] (equal along BN),
    w_ptrs [BN, U, 32] (one word a lane and row), word [U, 32] its index in the row, s_rows / z_rows [BN, 1, 1]."""
    grp = (word * 8) // GROUP  # [U, 32]
    if MASKED:  # the ragged last step: words past K read as 0 (x too, so they add nothing)
        live = word < K // 8
        w = tl.load(w_ptrs, mask=live[None], other=0, eviction_policy="evict_first")
        x = tl.load(x_ptrs, mask=live[None, :, :, None], other=0.0)
        if SILU_MUL:
            up = tl.load(x_ptrs + K, mask=live[None, :, :, None], other=0.0)
        s = tl.load(s_rows + grp[None], mask=live[None], other=0.0)
        z = tl.load(z_rows + grp[None], mask=live[None], other=0.0)
    else:  # NOTE: W streams through once: first out of L2
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        x = tl.load(x_ptrs)
        if SILU_MUL:
            up = tl.load(x_ptrs + K)
        s = tl.load(s_rows + grp[None])
        z = tl.load(z_rows + grp[None])
    xf = x.to(tl.float32)
    if SILU_MUL:  # NOTE: rounded to x's dtype, as plugins.silu_mul would store it for down_proj
        xf = (xf / (1.0 + tl.exp(-xf)) * up.to(tl.float32)).to(x.dtype).to(tl.float32)
    f0, f1, f2, f3, f4, f5, f6, f7 = nibble_floats(w, PRMT)  # [BN, U, 32] each
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(xf, w.shape[0], w.shape[1])
    # d = sum_i x_i (1 + q_i / 128) / 2 as one FMA chain (every product exact); xs = sum_i x_i (once for the rows)
    d = x0 * f0 + x1 * f1 + x2 * f2 + x3 * f3 + x4 * f4 + x5 * f5 + x6 * f6 + x7 * f7
    xs = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7
    # sum_i x_i (q_i - z) = 256 d - (128 + z) xs
    return acc + (256.0 * d - (128.0 + z.to(tl.float32)) * xs) * s.to(tl.float32)


@triton.jit(do_not_specialize=["one"])
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_ym, one,
                 GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, PRMT: tl.constexpr, SILU_MUL: tl.constexpr,
                 BLOCK_N: tl.constexpr, UNROLL: tl.constexpr):
    """y[m, n] = sum_k act(x)[m, k] w[n, k] (+ b[n]) for one row m of x and BLOCK_N rows of W a program;
    act = silu(gate) * up when SILU_MUL (x [M, 2K])."""
    m, pid_n = tl.program_id(0), tl.program_id(1)  # NOTE: rows of x vary fastest: a second row finds W in L2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_safe = tl.minimum(offs_n, N - 1).to(tl.int64)  # NOTE: clamped rows keep the loads unmasked; stores mask them
    # NOTE: `one` is a runtime 1 that hides the words' contiguity from the compiler, so each lane takes ONE word
    # (8 weights) of a row instead of a 16-byte vector: x's 8 values of that word then load as one 16-byte
    # vector in the same register layout, and no tile goes through shared memory (tests: int4 aot).
    word0 = (tl.arange(0, UNROLL)[:, None] * 32 + tl.arange(0, 32)[None, :]) * one  # [U, 32]
    w_ptrs = w_ptr + (n_safe * stride_wn)[:, None, None] + word0[None, :, :]  # [BN, U, 32]
    kk = word0[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]  # [U, 32, 8] input channels
    x_ptrs = x_ptr + m.to(tl.int64) * stride_xm + kk[None] + tl.zeros((BLOCK_N, 1, 1, 1), tl.int32)  # [BN, U, 32, 8]
    s_rows = s_ptr + (n_safe * stride_sn)[:, None, None]  # [BN, 1, 1]
    z_rows = z_ptr + (n_safe * stride_sn)[:, None, None]
    acc = tl.zeros((BLOCK_N, UNROLL, 32), dtype=tl.float32)
    STEP: tl.constexpr = UNROLL * 256
    k_full = K - K % STEP
    for k0 in tl.range(0, k_full, STEP):
        acc = _gemv_step(acc, x_ptrs + k0, w_ptrs + k0 // 8, s_rows, z_rows, word0 + k0 // 8, K, GROUP, False, PRMT,
                         SILU_MUL)
    if k_full < K:
        acc = _gemv_step(acc, x_ptrs + k_full, w_ptrs + k_full // 8, s_rows, z_rows, word0 + k_full // 8, K,
                         GROUP, True, PRMT, SILU_MUL)
    y = tl.sum(tl.sum(acc, axis=2), axis=1)  # [BN]
    if HAS_BIAS:
        y += tl.load(b_ptr + n_safe).to(tl.float32)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


# ---- host ---------------------------------------------------------------------------------------------
def check_args(x: Tensor, w: Tensor, scale: Tensor, zero: Tensor, group: int, bias: Tensor | None,
               silu_mul: bool = False) -> tuple[int, int, int]:
    """-> (M, N, K) after checking the shapes, dtypes and layouts (silu_mul: x is [M, 2K] = [gate | up])."""
    cols = (2 if silu_mul else 1) * 8 * w.shape[1] if w.dim() == 2 else -1
    if x.dim() != 2 or w.dim() != 2 or w.dtype != torch.int32 or x.shape[1] != cols:
        raise ValueError(f"expected x [M, {'2K' if silu_mul else 'K'}] and packed int32 w [N, K / 8], got "
                         f"{tuple(x.shape)} {x.dtype} and {tuple(w.shape)} {w.dtype}")
    m, k, n = x.shape[0], 8 * w.shape[1], w.shape[0]
    if group % 8 or group < 16 or group & (group - 1):
        raise ValueError(f"group size must be a power of two >= 16, got {group}")
    groups = -(-k // group)
    for name, t in (("scale", scale), ("zero", zero)):
        if t.shape != (n, groups) or t.stride(1) != 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be float [N={n}, {groups}] contiguous along groups, got {tuple(t.shape)}")
    if scale.stride(0) != zero.stride(0):
        raise ValueError("scale and zero must share a layout")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("x and w must be contiguous along K")
    if bias is not None and (bias.numel() != n or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous [N={n}], got {tuple(bias.shape)}")
    return m, n, k


def interpreted(t: Tensor) -> bool:
    """CPU tensors or TRITON_INTERPRET=1: no inline PTX (the integer paths run instead)."""
    return not t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def gemv(x: Tensor, w: Tensor, scale: Tensor, zero: Tensor, group: int, bias: Tensor | None = None,
         config: GemvConfig | None = None, silu_mul: bool = False) -> Tensor:
    """x [M, K] @ INT4 w^T (+ bias) -> [M, N] in x's dtype; one row of x a program (W re-read from L2 per row).
    silu_mul: x is [M, 2K] = [gate | up] and feeds silu(gate) * up (down_proj without plugins.silu_mul's launch)."""
    m, n, k = check_args(x, w, scale, zero, group, bias, silu_mul)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    cfg = config or gemv_config(m, n, k)
    b = bias if bias is not None else scale  # NOTE: a valid pointer; HAS_BIAS=False never reads it
    _gemv_kernel[(m, triton.cdiv(n, cfg.block_n))](x, w, scale, zero, b, y, n, k, x.stride(0), w.stride(0),
                                                   scale.stride(0), y.stride(0), 1, group, bias is not None,
                                                   not interpreted(x), silu_mul, cfg.block_n, cfg.unroll,
                                                   num_warps=cfg.num_warps)
    return y



__all__ = ["GemvConfig", "check_args", "check_pow2", "gemv", "gemv_candidates", "gemv_config", "interpreted",
           "nibble_floats"]
