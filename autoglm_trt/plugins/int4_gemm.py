"""Triton W4A16 kernels: y[M, N] = x[M, K] @ ((q - zero) * scale)^T (+ bias), the format of layers/int4.py.

    w      int32 [N, K / 8]   word j of row n: q[n, 8j + i] in bits 4i..4i+3
    scale  fp16  [N, ceil(K / G)],  zero fp16 [N, ceil(K / G)] (integers 0..15)   (fp32 / bf16 also run)

- gemv (decode, M <= GEMV_ROWS): plugins/int4_gemv.py.
- matmul (small batch and prefill tiles): tl.dot on [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]; the weight tile
  is loaded as [BLOCK_N, BLOCK_K / 8] words and unpacked in registers by int4_gemv's PRMT floats (an interleave
  tree keeps each word's 8 values in k order in one lane: 16-byte stores to shared memory; ~6 SASS instructions a
  weight at 16 rows, sm_90 compile). BLOCK_K divides G, so one group per step:
  exact form: acc += dot(x, q - zero) * scale (q - zero in -15..15 is exact in bf16); dequant_tile form: the
  tile becomes (q - zero) * scale in x's dtype and the dot accumulates directly (fewer FMAs on big tiles).
  Split-K writes fp32 partials that a second launch sums (bias there).
- dequantize: the bf16 weight, for prefill through cuBLAS (w4a16_linear picks it from PREFILL_ROWS rows on).
Launch configs come from the shapes only (CUDA-graph safe). The thresholds below are UNMEASURED defaults:
`benchmarks/bench_int4.py` times every path and config on an H100; set them from its JSON.
This module imports triton: import it lazily. The oracle is layers.int4.int4_reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from autoglm_trt.plugins.int4_gemv import (
    GemvConfig,
    nibble_floats,
    check_pow2,
    check_args,
    gemv,
    gemv_candidates,
    gemv_config,
    interpreted,
)

_MAGIC = tl.constexpr(8388608.0)  # 2**23: float(0x4B000000 | b) - 2**23 == b for 0 <= b < 2**23
GEMV_ROWS = 2  # UNMEASURED: at most this many rows take the GEMV, more the tl.dot matmul
PREFILL_ROWS = 512  # UNMEASURED: from this many rows, dequantize + cuBLAS (bf16 tensor cores at full rate)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int  # >= 16 (mma)
    block_n: int
    block_k: int  # divides the group size: one group per K step
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    dequant_tile: bool = False  # the weight tile to (q - zero) * scale in x's dtype before the dot (docstring)

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            check_pow2(f"GemmConfig.{name}", getattr(self, name))
        if self.block_m < 16 or self.block_n < 16 or self.block_k < 16 or self.split_k < 1:
            raise ValueError(f"GemmConfig: block_m/n/k >= 16 and split_k >= 1, got {self}")

    @property
    def tag(self) -> str:
        return (f"m{self.block_m}n{self.block_n}k{self.block_k}s{self.split_k}w{self.num_warps}st{self.num_stages}"
                + ("-deq" if self.dequant_tile else ""))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(t: Tensor) -> int:
    return _num_sms(t.device.index or 0) if t.is_cuda else 4


def gemm_candidates(m: int, group: int = 128) -> list[GemmConfig]:
    """What benchmarks/bench_int4.py --sweep times for the tl.dot matmul at m rows."""
    bm = max(16, triton.next_power_of_2(min(m, 64)))
    if m > 64:
        return [GemmConfig(128, 128, 64, 1, 8, 3, True), GemmConfig(128, 256, 64, 1, 8, 3, True),
                GemmConfig(64, 128, 64, 1, 4, 4, True), GemmConfig(128, 128, 64, 1, 8, 4, False)]
    return [GemmConfig(bm, bn, bk, s, 4, st, deq) for bn, bk, s, st, deq in
            ((64, 128, 1, 3, False), (64, 128, 4, 3, False), (32, 128, 4, 3, False), (128, 64, 2, 4, False),
             (64, 64, 4, 4, False), (64, 128, 4, 3, True), (32, 128, 8, 3, False))]


def gemm_config(m: int, n: int, k: int, group: int, sms: int) -> GemmConfig:
    """UNMEASURED default: decode-sized M pads to 16-64 rows of mma with split-K until there are >= 2 programs
    per SM; prefill tiles 128 x 128 with the weight dequantized in the tile."""
    bk = min(128, group & -group)  # NOTE: the largest power of two dividing the group, at most 128
    if m > 64:
        return GemmConfig(128, 128, min(64, bk), 1, 8, 3, dequant_tile=True)
    bm = max(16, triton.next_power_of_2(m))
    bn = 64
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    split = 1
    while tiles * split < 2 * sms and split < 8 and k // (bk * 2 * split) >= 4:
        split *= 2
    return GemmConfig(bm, bn, bk, split, 4, 3)


@triton.jit
def _unpack_k(w, zero, PRMT: tl.constexpr):
    """w [R, W] words, zero [R, 1] -> [R, 8W] fp32 q - zero in k order (k = 8j + i), exactly (256 f - 128 - zero
    with f = 0.5 (1 + q / 128) from nibble_floats). An interleave tree keeps each word's 8 values next to each
    other in a lane's registers, so the tile reaches shared memory in 16-byte stores."""
    f0, f1, f2, f3, f4, f5, f6, f7 = nibble_floats(w, PRMT)
    c = zero + 128.0
    lo = tl.interleave(tl.interleave(f0 * 256.0 - c, f4 * 256.0 - c), tl.interleave(f2 * 256.0 - c, f6 * 256.0 - c))
    hi = tl.interleave(tl.interleave(f1 * 256.0 - c, f5 * 256.0 - c), tl.interleave(f3 * 256.0 - c, f7 * 256.0 - c))
    return tl.interleave(lo, hi)  # position 8j + i holds nibble i of word j


@triton.jit
def _matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                   stride_ym, k_per_split, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                   EVEN_K: tl.constexpr, DEQUANT_TILE: tl.constexpr, DOT_F32: tl.constexpr, PRMT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # NOTE: M tiles vary fastest, so the programs sharing a weight tile run together: W leaves HBM once
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    # NOTE: clamped rows keep the loads unmasked (EVEN_K: no mask at all); the stores mask them
    m_safe, n_safe = tl.minimum(offs_m, M - 1).to(tl.int64), tl.minimum(offs_n, N - 1).to(tl.int64)
    x_rows = x_ptr + m_safe[:, None] * stride_xm  # [BM, 1]
    w_rows = w_ptr + n_safe[:, None] * stride_wn  # [BN, 1]
    s_cols = s_ptr + n_safe * stride_sn  # [BN]
    z_cols = z_ptr + n_safe * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        word = k0 // 8 + tl.arange(0, BLOCK_K // 8)  # [W]
        if EVEN_K:
            x = tl.load(x_rows + offs_k[None, :])  # [BM, BK]
            w = tl.load(w_rows + word[None, :])  # [BN, W]
        else:
            x = tl.load(x_rows + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0)
            w = tl.load(w_rows + word[None, :], mask=(word < K // 8)[None, :], other=0)
        s = tl.load(s_cols + k0 // GROUP).to(tl.float32)  # [BN]
        z = tl.load(z_cols + k0 // GROUP).to(tl.float32)
        qz = tl.trans(_unpack_k(w, z[:, None], PRMT))  # [BK, BN] q - zero (exact), k contiguous in each lane
        if DEQUANT_TILE:
            wt = qz * s[None, :]  # [BK, BN]
            if DOT_F32:
                acc = tl.dot(x.to(tl.float32), wt, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, wt.to(x.dtype), acc)
        else:
            if DOT_F32:  # fp32 inputs, or the interpreter (its bf16 dot is wrong)
                part = tl.dot(x.to(tl.float32), qz, input_precision="ieee")
            else:
                part = tl.dot(x, qz.to(x.dtype))  # [BM, BN]: q - zero in -15..15 is exact in bf16 / fp16
            acc += part * s[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    else:
        part_ptr = p_ptr + (pid_k * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :]
        tl.store(part_ptr, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _splitk_sum_kernel(p_ptr, b_ptr, y_ptr, M, N, stride_ym, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                       BLOCK: tl.constexpr):
    """y[m, n] = sum_s p[s, m, n] + bias[n] (p: fp32 partials [S, M, N])."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat over M * N
    mask = offs < M * N
    n = offs % N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptr + s * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + (offs // N).to(tl.int64) * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ---- dequantize ---------------------------------------------------------------------------------------
@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_wn, stride_sn, stride_yn, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G] in y's dtype; one [BLOCK_N, BLOCK_K] tile a program."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    word = tl.program_id(1) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)  # [W]
    n64 = offs_n.to(tl.int64)[:, None]
    live = (offs_n < N)[:, None] & (word < K // 8)[None, :]  # [BN, W]
    w = tl.load(w_ptr + n64 * stride_wn + word[None, :], mask=live, other=0)  # [BN, W]
    grp = (word * 8) // GROUP
    s = tl.load(s_ptr + n64 * stride_sn + grp[None, :], mask=live, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + n64 * stride_sn + grp[None, :], mask=live, other=0.0).to(tl.float32) + _MAGIC
    i = tl.arange(0, 8)
    q = (((w[:, :, None] >> (i * 4)[None, None, :]) & 15) | 0x4B000000).to(tl.float32, bitcast=True)  # 2**23 + q
    y = tl.reshape((q - z[:, :, None]) * s[:, :, None], (BLOCK_N, BLOCK_K))  # (q - zero) * scale
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    tl.store(y_ptr + n64 * stride_yn + offs_k[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# ---- host ---------------------------------------------------------------------------------------------
def matmul(x: Tensor, w: Tensor, scale: Tensor, zero: Tensor, group: int, bias: Tensor | None = None,
           config: GemmConfig | None = None) -> Tensor:
    """x [M, K] @ INT4 w^T (+ bias) -> [M, N] in x's dtype through tl.dot (any M)."""
    m, n, k = check_args(x, w, scale, zero, group, bias)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    cfg = config or gemm_config(m, n, k, group, _sms(x))
    if group % cfg.block_k:
        raise ValueError(f"block_k {cfg.block_k} must divide the group size {group} (one group per K step)")
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.block_k), cfg.split_k) * cfg.block_k
    part = torch.empty((cfg.split_k, m, n), device=x.device, dtype=torch.float32) if cfg.split_k > 1 else y
    b = bias if bias is not None else scale
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.split_k)
    dot_f32 = x.dtype == torch.float32 or interpreted(x)
    _matmul_kernel[grid](x, w, scale, zero, b, y, part, m, n, k, x.stride(0), w.stride(0), scale.stride(0),
                         y.stride(0), k_per_split, group, bias is not None and cfg.split_k == 1, cfg.split_k,
                         k % cfg.block_k == 0, cfg.dequant_tile, dot_f32, not interpreted(x), cfg.block_m,
                         cfg.block_n, cfg.block_k,
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.split_k > 1:
        block = 1024
        _splitk_sum_kernel[(triton.cdiv(m * n, block),)](part, b, y, m, n, y.stride(0), bias is not None,
                                                         cfg.split_k, block, num_warps=4)
    return y


def dequantize(w: Tensor, scale: Tensor, zero: Tensor, group: int, dtype: torch.dtype = torch.bfloat16,
               block_n: int = 32, block_k: int = 256) -> Tensor:
    """-> [N, K] in dtype: (q - zero) * scale (the weight that cuBLAS multiplies in prefill)."""
    n, k = w.shape[0], 8 * w.shape[1]
    check_args(torch.empty((0, k), device=w.device), w, scale, zero, group, None)
    y = torch.empty((n, k), device=w.device, dtype=dtype)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_kernel[grid](w, scale, zero, y, n, k, w.stride(0), scale.stride(0), y.stride(0), group, block_n,
                          block_k, num_warps=4)
    return y


def w4a16_linear(x: Tensor, w: Tensor, scale: Tensor, zero: Tensor, group: int,
                 bias: Tensor | None = None) -> Tensor:
    """The dispatch the linear method uses: GEMV for up to GEMV_ROWS rows, tl.dot below PREFILL_ROWS,
    dequantize + cuBLAS from there (shapes only: CUDA-graph safe)."""
    m = x.shape[0]
    if m <= GEMV_ROWS:
        return gemv(x, w, scale, zero, group, bias)
    if m < PREFILL_ROWS:
        return matmul(x, w, scale, zero, group, bias)
    return F.linear(x, dequantize(w, scale, zero, group, x.dtype), bias)


__all__ = ["GEMV_ROWS", "PREFILL_ROWS", "GemmConfig", "GemvConfig", "dequantize", "gemm_candidates", "gemm_config",
           "gemv", "gemv_candidates", "gemv_config", "matmul", "w4a16_linear"]
