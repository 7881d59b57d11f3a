"""Batch-1 W8A16 GEMV on integer units: y[1, N] = x[1, K] @ (W int8 [N, K] * w_scale[N])^T (+ bias).

x is first rounded to a 16-bit integer per token (`quantize_a16`: scale = max|x| / 32767), stored as two
byte planes, low (unsigned) and high (signed), so that four weights and four activations of one plane
multiply in one `dp4a` (int32 sums, exact). The GEMV of plugins/triton_gemv spends ~4 instructions per
weight (int8 -> fp32, bf16 -> fp32, FMA) and reads int8 weights at ~2.6 TB/s on an H100; this one spends
~0.5 and reads at the memory's pace (benchmarks/probe_dp4a.py: gate_up 43.5 -> 37.6 us, down_proj 25.7 ->
21.1 us, against 37.2 and 20.5 for reading the weights alone).
Numerics: the 16-bit rounding of x adds at most max|x| / 65534 per element, which bounds the output's
extra error by sqrt(K) * max|x| * |w| / 65534 / sqrt(3): below what bf16's own rounding of x costs
(2**-9 * ||x|| * |w| / sqrt(3)) for K up to 16,384, however x's values are spread (one large outlier included).
This module imports triton: import it lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_Q_MAX = 32767.0
_RNE = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + c) - c rounds fp32 |v| < 2**22 half-to-even, like torch.round
_DP4A_U = tl.constexpr("dp4a.s32.u32 $0, $1, $2, $3;")  # signed weight bytes . unsigned low-plane bytes
_DP4A_S = tl.constexpr("dp4a.s32.s32 $0, $1, $2, $3;")  # signed . signed high-plane bytes
BLOCK_N, BLOCK_K4 = 4, 128  # rows per program, int32 words (4 weights each) per K step: probe_dp4a's winner


@triton.jit
def _quantize_kernel(x_ptr, planes_ptr, scale_ptr, K, BLOCK: tl.constexpr):
    """One row: scale = max|x| / 32767; q = round(x / scale) as planes [2, K] bytes (q & 255, q >> 8)."""
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.where(amax > 0.0, amax / _Q_MAX, 1.0)
    q = ((x / scale + _RNE) - _RNE).to(tl.int32)  # [BLOCK] in [-32767, 32767]
    tl.store(planes_ptr + offs, (q & 255).to(tl.uint8), mask=mask)
    tl.store(planes_ptr + K + offs, (q >> 8).to(tl.int8).to(tl.uint8, bitcast=True), mask=mask)
    tl.store(scale_ptr, scale)


@triton.jit
def _dp4a(acc, w, x, SIGNED: tl.constexpr):
    asm: tl.constexpr = _DP4A_S if SIGNED else _DP4A_U
    return tl.inline_asm_elementwise(asm, "=r,r,r,r", [w, x, acc], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _gemv_a16_kernel(w_ptr, xp_ptr, xs_ptr, s_ptr, b_ptr, y_ptr, N, K4, stride_wn, HAS_BIAS: tl.constexpr,
                     BN: tl.constexpr, BK4: tl.constexpr):
    """w: int32 words [N, K4] (4 int8 each); xp: plane words [2, K4] (low, high). One program: BN rows."""
    pid = tl.program_id(0)
    rows = tl.minimum(pid * BN + tl.arange(0, BN), N - 1)  # [BN] clamped: loads stay in bounds
    kw = tl.arange(0, BK4)[None, :] + tl.zeros((BN, 1), tl.int32)  # [BN, BK4]: x's pointers get W's layout
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + kw
    acc_hi = tl.zeros((BN, BK4), tl.int32)
    acc_lo = tl.zeros((BN, BK4), tl.int32)
    for k0 in range(0, K4, BK4):
        live = kw < K4 - k0  # NOTE: the ragged last step reads zeros (0 . anything adds nothing)
        w = tl.load(w_ptrs + k0, mask=live, other=0, eviction_policy="evict_first")
        acc_hi = _dp4a(acc_hi, w, tl.load(xp_ptr + K4 + k0 + kw, mask=live, other=0), True)
        acc_lo = _dp4a(acc_lo, w, tl.load(xp_ptr + k0 + kw, mask=live, other=0), False)
    y = tl.sum(acc_hi, axis=1).to(tl.float32) * 256.0 + tl.sum(acc_lo, axis=1).to(tl.float32)  # [BN]
    y = y * tl.load(s_ptr + rows) * tl.load(xs_ptr)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + rows).to(tl.float32)
    offs = pid * BN + tl.arange(0, BN)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=offs < N)


def supported(x: Tensor, w: Tensor) -> bool:
    """One row of x on CUDA, int8 W [N, K] with K a multiple of 4 (whole words) and at most 16,384."""
    return (x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and w.dtype == torch.int8 and w.dim() == 2
            and w.is_contiguous() and w.shape[1] % 4 == 0 and w.shape[1] <= 16384 and x.shape[1] == w.shape[1])


def quantize_a16(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [1, K] -> (planes uint8 [2, K]: low bytes, high bytes of round(x / scale); scale fp32 [1])."""
    k = x.shape[1]
    planes = torch.empty(2, k, dtype=torch.uint8, device=x.device)
    scale = torch.empty(1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _quantize_kernel[(1,)](x, planes, scale, k, block, num_warps=8 if block >= 8192 else 4)
    return planes, scale


def gemv_a16(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [1, K] (bf16/fp16/fp32) @ (w int8 [N, K] * w_scale fp32 [N])^T (+ bias [N]) -> [1, N] in x's dtype."""
    if not supported(x, w):
        raise ValueError(f"gemv_a16 takes one row of x and int8 w [N, K%4 == 0, K <= 16384], got "
                         f"{tuple(x.shape)} and {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    planes, xs = quantize_a16(x.contiguous())
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_a16_kernel[(triton.cdiv(n, BLOCK_N),)](
        w.view(torch.int32), planes.view(torch.int32), xs, w_scale, bias if bias is not None else w_scale, y,
        n, k // 4, k // 4, bias is not None, BLOCK_N, BLOCK_K4, num_warps=4)
    return y


def gemv_a16_reference(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """What gemv_a16 computes, in float64 torch (any device): x rounded to 16 bits per row first."""
    xd = x.double()
    amax = xd.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, (amax.float() / _Q_MAX).double(), torch.ones_like(amax))
    q = torch.round(xd / scale)  # [1, K]
    y = (q @ w.double().t()) * w_scale.double() * scale
    return (y if bias is None else y + bias.double()).to(x.dtype)


__all__ = ["gemv_a16", "gemv_a16_reference", "quantize_a16", "supported"]
