"""One-token W8A16 GEMV on integer units: y[1, N] = x[1, K] @ (W int8 [N, K] * w_scale[N])^T (+ bias).

The kernel that writes x (RMSNorm, norm_add_norm, silu_mul: asked with a16=True) also rounds its row to a
16-bit integer, scale = max|x| / 32767, stored as two byte planes, low (unsigned) and high (signed): an
`A16`, which rides on the output tensor (`attached`). Four weights and four activations of one plane
then multiply in one `dp4a` (int32 sums, exact). The GEMV of plugins/triton_gemv spends ~4 instructions per
weight (int8 -> fp32, bf16 -> fp32, FMA) and reads int8 weights at ~2.6 TB/s on an H100; this one spends
~0.5 and reads near the memory's pace (benchmarks/probe_dp4a.py, H100: gate_up 42.8 -> 39.1 us, down_proj
25.0 -> 22.8 us, against 37.1 and 20.6 us for reading the weights alone). Rounding in a launch of its own
(~2 us) ate that gain in the engine (docs/benchmarks.md, session 7), hence the fusion into the producers.
Numerics: the 16-bit rounding adds at most max|x| / 65534 per element, so the output's extra error stays
under sqrt(K) * max|x| * |w| / 65534 / sqrt(3): below what bf16's own rounding of x costs (up to
2**-9 * ||x|| * |w| / sqrt(3)) for K up to ~16k, however x's values are spread (an outlier included).
This module imports triton: import it lazily.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

_Q_MAX = tl.constexpr(32767.0)
_RNE = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + c) - c rounds fp32 |v| < 2**22 half-to-even, like torch.round
_DP4A_U = tl.constexpr("dp4a.s32.u32 $0, $1, $2, $3;")  # signed weight bytes . unsigned low-plane bytes
_DP4A_S = tl.constexpr("dp4a.s32.s32 $0, $1, $2, $3;")  # signed . signed high-plane bytes
BLOCK_N, BLOCK_K4 = 4, 128  # rows per program, int32 words (4 weights each) per K step: probe_dp4a's pick
MAX_K = 16384  # the producers hold a whole row in registers


@dataclass
class A16:
    """x [1, K] as round(x / scale): planes uint8 [2, K] (low bytes, then high bytes), scale fp32 [1]."""

    planes: Tensor
    scale: Tensor


def new_a16(k: int, device: torch.device) -> A16:
    return A16(torch.empty(2, k, dtype=torch.uint8, device=device), torch.empty(1, dtype=torch.float32, device=device))


def attach(t: Tensor, a16: A16) -> Tensor:
    t.a16 = a16  # NOTE: a Python attribute of this tensor object; views and copies do not carry it
    return t


def attached(t: Tensor) -> A16 | None:
    return getattr(t, "a16", None)


@triton.jit
def emit_a16(y, planes_ptr, scale_ptr, offs, mask, K):
    """y fp32 [BLOCK] (zeros where ~mask): scale = max|y| / 32767; planes[0, k], planes[1, k] = the low and high
    bytes of round(y / scale)."""
    amax = tl.max(tl.abs(tl.where(mask, y, 0.0)), axis=0)
    scale = tl.where(amax > 0.0, amax / _Q_MAX, 1.0)
    q = ((y / scale + _RNE) - _RNE).to(tl.int32)  # [BLOCK] in [-32767, 32767]
    tl.store(planes_ptr + offs, (q & 255).to(tl.uint8), mask=mask)
    tl.store(planes_ptr + K + offs, (q >> 8).to(tl.int8).to(tl.uint8, bitcast=True), mask=mask)
    tl.store(scale_ptr, scale)


@triton.jit
def _quantize_kernel(x_ptr, planes_ptr, scale_ptr, K, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    emit_a16(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32), planes_ptr, scale_ptr, offs, mask, K)


@triton.jit
def _dp4a(acc, w, x, SIGNED: tl.constexpr):
    asm: tl.constexpr = _DP4A_S if SIGNED else _DP4A_U
    return tl.inline_asm_elementwise(asm, "=r,r,r,r", [w, x, acc], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _step(acc_hi, acc_lo, w_ptrs, xp_ptr, k0, kw, K4, MASKED: tl.constexpr):
    if MASKED:  # NOTE: the ragged last step reads zeros (0 . anything adds nothing)
        live = kw < K4 - k0
        w = tl.load(w_ptrs + k0, mask=live, other=0, eviction_policy="evict_first")
        hi, lo = tl.load(xp_ptr + K4 + k0 + kw, mask=live, other=0), tl.load(xp_ptr + k0 + kw, mask=live, other=0)
    else:
        w = tl.load(w_ptrs + k0, eviction_policy="evict_first")
        hi, lo = tl.load(xp_ptr + K4 + k0 + kw), tl.load(xp_ptr + k0 + kw)
    return _dp4a(acc_hi, w, hi, True), _dp4a(acc_lo, w, lo, False)


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
    k_full = K4 - K4 % BK4
    for k0 in range(0, k_full, BK4):
        acc_hi, acc_lo = _step(acc_hi, acc_lo, w_ptrs, xp_ptr, k0, kw, K4, False)
    if k_full < K4:
        acc_hi, acc_lo = _step(acc_hi, acc_lo, w_ptrs, xp_ptr, k_full, kw, K4, True)
    y = tl.sum(acc_hi, axis=1).to(tl.float32) * 256.0 + tl.sum(acc_lo, axis=1).to(tl.float32)  # [BN]
    y = y * tl.load(s_ptr + rows) * tl.load(xs_ptr)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + rows).to(tl.float32)
    offs = pid * BN + tl.arange(0, BN)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=offs < N)


def supported(a16: A16, w: Tensor) -> bool:
    """int8 W [N, K] in whole words (K % 4 == 0) matching the planes' K, on the planes' CUDA device."""
    return (w.dtype == torch.int8 and w.dim() == 2 and w.is_contiguous() and w.shape[1] % 4 == 0
            and a16.planes.shape[1] == w.shape[1] and w.device == a16.planes.device and w.is_cuda)


def quantize_a16(x: Tensor) -> A16:
    """x [1, K] -> its A16 in a launch of its own (tests; the engine has the producers emit it)."""
    k = x.shape[1]
    out = new_a16(k, x.device)
    _quantize_kernel[(1,)](x.contiguous(), out.planes, out.scale, k, triton.next_power_of_2(k),
                           num_warps=8 if k > 4096 else 4)
    return out


def gemv_a16(a16: A16, w: Tensor, w_scale: Tensor, bias: Tensor | None = None,
             out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """x (as its A16) @ (w int8 [N, K] * w_scale fp32 [N])^T (+ bias [N]) -> [1, N] in out_dtype."""
    if not supported(a16, w):
        raise ValueError(f"gemv_a16 needs int8 w [N, K] with K % 4 == 0 and planes of K columns, got "
                         f"{w.dtype} {tuple(w.shape)} and planes {tuple(a16.planes.shape)}")
    n, k = w.shape
    y = torch.empty(1, n, dtype=out_dtype, device=w.device)
    _gemv_a16_kernel[(triton.cdiv(n, BLOCK_N),)](
        w.view(torch.int32), a16.planes.view(torch.int32), a16.scale, w_scale,
        bias if bias is not None else w_scale, y, n, k // 4, k // 4, bias is not None, BLOCK_N, BLOCK_K4,
        num_warps=4)
    return y


def a16_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """(round(x / scale) as float64 [1, K], scale float64 [1, 1]): what the producers emit, in torch."""
    xd = x.double()
    amax = xd.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, (amax.float() / _Q_MAX.value).double(), torch.ones_like(amax))
    return torch.round(xd / scale), scale


def gemv_a16_reference(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """What gemv_a16 computes from x's A16, in float64 torch (any device)."""
    q, scale = a16_reference(x)
    y = (q @ w.double().t()) * w_scale.double() * scale
    return (y if bias is None else y + bias.double()).to(x.dtype)


__all__ = ["A16", "MAX_K", "a16_reference", "attach", "attached", "emit_a16", "gemv_a16", "gemv_a16_reference",
           "new_a16", "quantize_a16", "supported"]
