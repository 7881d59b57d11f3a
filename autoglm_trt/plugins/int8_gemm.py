"""Triton INT8 GEMMs for the decoder linears: W8A16 (int8 weights, bf16 activations) and W8A8.

Weights are `[N, K]` int8 (the Linear layout, K contiguous) with one float32 scale per output
channel; both kernels apply the scales (and the bias) in the epilogue. Decode (M <= 64) is
memory-bound: each weight byte is read once, in 16-byte vectors along K, through a cp.async
pipeline (tl.dot: batch 1 pads M to 16 rows of mma, which costs nothing when the weights dominate),
and split-K fills the SMs when N alone gives too few tiles (a small reduce kernel sums the fp32
partials and applies the scales). M tiles are the fastest grid axis, so in prefill the programs
that share a weight tile run together and W leaves HBM once. Launch configs come from the shapes only (no autotuning), so every call is
CUDA-graph safe; `benchmarks/bench_int8.py --sweep` times the alternatives.
This module imports triton: import it lazily. CPU references live in `layers/quant.py`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from autoglm_trt.plugins.triton_gemv import gemv

_RNE = tl.constexpr(12582912.0)  # 1.5 * 2**23: (x + c) - c rounds fp32 |x| < 2**22 half-to-even, like torch.round


# batch-1 W8A16 on matrices up to this many weights (qkv, o_proj) goes to triton_gemv: 9.6 vs 11.0 us
# (qkv) and 9.0 vs 10.5 us (o) on an H100; larger ones (gate_up, down) stay here (equal or faster).
_GEMV_MAX_WEIGHTS = 1 << 25


@dataclass(frozen=True)
class GemmConfig:
    block_m: int  # >= 16 (mma): decode's GEMV case (M <= 16) pads M to 16 rows
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(t: Tensor) -> int:
    return _num_sms(t.device.index or 0) if t.is_cuda else 4


def _split_for(tiles: int, k_blocks: int, target: int, cap: int) -> int:
    """Smallest power of two (<= cap) giving >= target programs, keeping >= 4 K blocks per split."""
    split = 1
    while tiles * split < target and split < cap and k_blocks // (2 * split) >= 4:
        split *= 2
    return split


def default_config(m: int, n: int, k: int, sms: int, int8_act: bool = False) -> GemmConfig:
    """The launch config used when none is given, from the H100 sweep (benchmarks/bench_int8.py --sweep).

    Decode W8A16 (M <= 16, the GEMV case: M padded to 16 rows of mma): 32-channel tiles, split-K up
    to 4 until there are >= 4 programs per SM. W8A8: no split-K, 512-wide K steps of int8.
    """
    bm = max(16, triton.next_power_of_2(m))
    if m > 64 and not int8_act:  # prefill: compute-bound (the int8 -> bf16 conversion limits it)
        return GemmConfig(128, 128, 64, 1, 8, 3)
    if m > 64:  # 128-row tiles unless that leaves SMs idle
        few = triton.cdiv(m, 128) * triton.cdiv(n, 128) < sms
        return GemmConfig(64, 128, 128, 1, 4, 4) if few else GemmConfig(128, 128, 128, 1, 8, 3)
    if int8_act:
        return GemmConfig(bm, 64, 512, 1, 4, 4) if m <= 32 else GemmConfig(bm, 32, 256, 1, 4, 4)
    bn, bk = (32, 128) if m <= 16 else (64, 128)
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    target, cap = (4 * sms, 4) if m <= 16 else (sms, 64)
    return GemmConfig(bm, bn, bk, _split_for(tiles, k // bk, target, cap), 4, 4)


# ---- W8A16 --------------------------------------------------------------------------------------
@triton.jit
def _int8_dot_kernel(x_ptr, w_ptr, xs_ptr, s_ptr, b_ptr, y_ptr, p_ptr, M, N, K, stride_xm, stride_wn,
                     stride_ym, k_per_split, INT8_ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[M, N] = (x @ w^T) * xs[m] * s[n] + b[n]; x int8 (W8A8, xs per token) or float (W8A16)."""
    # NOTE: M tiles vary fastest, so the programs sharing a weight tile run together: W leaves HBM once
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn  # [1, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if INT8_ACT else tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None], other=0)  # [BM, BK]
            w = tl.load(w_cols + offs_k[:, None], mask=n_mask[None, :], other=0)  # [BK, BN] int8
        else:
            k_mask = offs_k < K
            x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
            w = tl.load(w_cols + offs_k[:, None], mask=n_mask[None, :] & k_mask[:, None], other=0)
        if INT8_ACT:
            acc = tl.dot(x, w, acc, out_dtype=tl.int32)
        elif DOT_F32:  # fp32 inputs, or the interpreter (its bf16 dot is wrong): exact fp32 products
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    y = acc.to(tl.float32)  # [BM, BN]
    if INT8_ACT:
        y = y * tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
    if SPLIT_K == 1:
        y = y * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    else:
        part = p_ptr + (pid_k * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :]
        tl.store(part, y, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _splitk_reduce_kernel(p_ptr, s_ptr, b_ptr, y_ptr, M, N, stride_ym, HAS_BIAS: tl.constexpr,
                          SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """y[m, n] = sum_s p[s, m, n] * scale[n] + bias[n] (p: fp32 partials [S, M, N])."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat over M * N
    mask = offs < M * N
    n = offs % N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptr + s * M * N + offs, mask=mask, other=0.0)
    acc = acc * tl.load(s_ptr + n, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + (offs // N).to(tl.int64) * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _check(x: Tensor, w: Tensor, w_scale: Tensor) -> tuple[int, int, int]:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"expected x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if w.dtype != torch.int8 or w_scale.dtype != torch.float32 or w_scale.numel() != w.shape[0]:
        raise ValueError("w must be int8 [N, K] with a float32 scale [N]")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("x and w must be contiguous along K")
    return x.shape[0], w.shape[0], x.shape[1]


def _launch(x, w, xs, w_scale, bias, out_dtype, cfg: GemmConfig, int8_act: bool) -> Tensor:
    m, n, k = x.shape[0], w.shape[0], x.shape[1]
    y = torch.empty((m, n), device=x.device, dtype=out_dtype)
    if m == 0:
        return y
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.block_k), cfg.split_k) * cfg.block_k
    part = torch.empty((cfg.split_k, m, n), device=x.device, dtype=torch.float32) if cfg.split_k > 1 else y
    b = bias if bias is not None else w_scale  # NOTE: a valid pointer; HAS_BIAS=False never reads it
    even_k = k % cfg.block_k == 0
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.split_k)
    _int8_dot_kernel[grid](x, w, xs if xs is not None else w_scale, w_scale, b, y, part, m, n, k, x.stride(0),
                           w.stride(0), y.stride(0), k_per_split, int8_act, bias is not None, cfg.split_k, even_k,
                           x.dtype == torch.float32 or not x.is_cuda, cfg.block_m, cfg.block_n, cfg.block_k,
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.split_k > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](part, w_scale, b, y, m, n, y.stride(0),
                                                           bias is not None, cfg.split_k, block, num_warps=4)
    return y


def w8a16_matmul(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None = None,
                 config: GemmConfig | None = None) -> Tensor:
    """x [M, K] (bf16/fp16/fp32) @ dequant(w int8 [N, K], w_scale fp32 [N])^T + bias -> [M, N] in x's dtype."""
    m, n, k = _check(x, w, w_scale)
    if config is None and m == 1 and n * k <= _GEMV_MAX_WEIGHTS and x.stride(1) == 1:
        return gemv(x, w, w_scale, bias)  # one launch, no split-K reduce: faster on small matrices
    cfg = config or default_config(m, n, k, _sms(x))
    return _launch(x, w, None, w_scale, bias, x.dtype, cfg, int8_act=False)


def w8a8_matmul(xq: Tensor, x_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None = None,
                out_dtype: torch.dtype = torch.bfloat16, config: GemmConfig | None = None) -> Tensor:
    """(xq int8 [M, K] @ w int8 [N, K]^T) * x_scale[M] * w_scale[N] + bias -> [M, N] out_dtype (int32 accumulate)."""
    m, n, k = _check(xq, w, w_scale)
    if xq.dtype != torch.int8 or x_scale.dtype != torch.float32 or x_scale.numel() != m:
        raise ValueError("xq must be int8 [M, K] with a float32 per-token scale [M]")
    cfg = config or default_config(m, n, k, _sms(xq), int8_act=True)
    return _launch(xq, w, x_scale, w_scale, bias, out_dtype, cfg, int8_act=True)


def w8a8_matmul_int_mm(xq: Tensor, x_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None = None,
                       out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The same through cuBLASLt (torch._int_mm, needs M > 16 and K, N multiples of 8) + a torch epilogue."""
    acc = torch._int_mm(xq, w.t())  # [M, N] int32
    y = acc.to(torch.float32) * x_scale[:, None] * w_scale[None, :]
    return (y if bias is None else y + bias.float()).to(out_dtype)


# ---- per-token activation quantization ----------------------------------------------------------
@triton.jit
def _quant_rows_kernel(x_ptr, mul_ptr, static_ptr, q_ptr, s_ptr, K, stride_x, stride_q,
                       HAS_MUL: tl.constexpr, STATIC: tl.constexpr, BLOCK: tl.constexpr, FP8: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)  # [K]
    if HAS_MUL:  # SmoothQuant's explicit per-channel factor (1 / s)
        x = x * tl.load(mul_ptr + offs, mask=mask, other=0.0)
    if STATIC:
        scale = tl.load(static_ptr)
    elif FP8:
        scale = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), 448.0)
    else:
        scale = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-8), 127.0)
    if FP8:  # e4m3, round to nearest even, within +-448
        q8 = tl.minimum(tl.maximum(tl.div_rn(x, scale), -448.0), 448.0).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + row * stride_q + offs, q8, mask=mask)
    else:
        q = tl.minimum(tl.maximum(tl.div_rn(x, scale), -128.0), 127.0)  # IEEE division, saturate like ONNX
        q = (q + _RNE) - _RNE  # round half to even
        tl.store(q_ptr + row * stride_q + offs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, scale)


def quantize_per_token(x: Tensor, mul: Tensor | None = None, static_scale: Tensor | None = None,
                       fp8: bool = False) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (int8 [M, K], fp32 scale [M]); scale = amax(|x * mul|) / 127 per row, or the static one.
    fp8: float8_e4m3fn values and amax / 448 instead (layers/fp8.py)."""
    m, k = x.shape
    q = torch.empty((m, k), device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    s = torch.empty((m,), device=x.device, dtype=torch.float32)
    if m == 0:
        return q, s
    block = triton.next_power_of_2(k)
    warps = min(16, max(4, block // 1024))
    dummy = s  # NOTE: valid pointer for the disabled options
    _quant_rows_kernel[(m,)](x, mul if mul is not None else dummy, static_scale if static_scale is not None else dummy,
                             q, s, k, x.stride(0), q.stride(0), mul is not None, static_scale is not None, block,
                             fp8, num_warps=warps)
    return q, s


__all__ = [
    "GemmConfig",
    "default_config",
    "quantize_per_token",
    "w8a8_matmul",
    "w8a8_matmul_int_mm",
    "w8a16_matmul",
]
