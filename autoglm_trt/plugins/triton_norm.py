"""Triton RMSNorm and the fused sandwich-norm junction (norm -> residual add -> norm).

One program per row holds the whole row in registers (hidden <= 8192), so each input is read once
and each output written once. Rounding follows Hugging Face exactly: normalise in float32, round
to the input dtype, multiply by the weight (rounded again), and in norm_add_norm round the
residual sum h to the input dtype before the second norm, as the eager model does.
This module imports triton: import it lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_MAX_HIDDEN = 8192


@triton.jit
def _hf_rms_norm(x, w, n_cols, eps, DTYPE: tl.constexpr):
    """x, w float32 [BLOCK] (zeros past n_cols) -> float32 values of the HF result in DTYPE."""
    rstd = tl.math.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    normed = (x * rstd).to(DTYPE).to(tl.float32)  # HF: hidden_states.to(input_dtype)
    return (w * normed).to(DTYPE).to(tl.float32)  # HF: weight * normed, in the input dtype


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)  # [N]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [N]
    y = _hf_rms_norm(x, w, n_cols, eps, y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_add_norm_kernel(
    x_ptr, r_ptr, wa_ptr, wb_ptr, h_ptr, y_ptr, stride_x, stride_r, stride_h, stride_y,
    n_cols, eps, BLOCK: tl.constexpr, NORM_A: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    dtype = h_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)  # [N]
    r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)  # [N]
    w_b = tl.load(wb_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM_A:
        w_a = tl.load(wa_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = _hf_rms_norm(x, w_a, n_cols, eps, dtype)
    h = (r + x).to(dtype)  # residual stream, rounded
    tl.store(h_ptr + row * stride_h + offs, h, mask=mask)
    y = _hf_rms_norm(h.to(tl.float32), w_b, n_cols, eps, dtype)
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps): 16-byte bf16 vectors need BLOCK / (32 * warps) >= 8 elements."""
    if n_cols > _MAX_HIDDEN:
        raise ValueError(f"hidden size {n_cols} exceeds the Triton norm limit {_MAX_HIDDEN}")
    block = triton.next_power_of_2(n_cols)
    warps = max(1, min(16, block // 256))
    return block, warps


def _rows(x: Tensor) -> Tensor:
    """2-D view `[T, N]` with a contiguous last dimension."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def rms_norm(x: Tensor, weight: Tensor, eps: float, *, out: Tensor | None = None) -> Tensor:
    """HF RMSNorm of x `[T, N]` -> `[T, N]` in x's dtype (`out`: optional contiguous result)."""
    x2 = _rows(x)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if out is None else out.view(x2.shape)
    if x2.shape[0] > 0:
        block, warps = _launch_config(x2.shape[1])
        _rms_norm_kernel[(x2.shape[0],)](
            x2, weight, y, x2.stride(0), y.stride(0), x2.shape[1], eps,
            BLOCK=block, num_warps=warps,
        )
    return y.view(x.shape)


def norm_add_norm(
    x: Tensor, residual: Tensor, w_a: Tensor | None, w_b: Tensor, eps: float, *,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """h = residual + rms_norm(x, w_a) (residual + x when w_a is None); y = rms_norm(h, w_b); one pass, both written.

    `out` = (h, y): optional contiguous results; h may alias residual (in-place residual update).
    """
    if x.dtype != residual.dtype:
        raise ValueError(f"norm_add_norm: x dtype {x.dtype} != residual dtype {residual.dtype}")
    x2, r2 = _rows(x), _rows(residual)
    if out is None:
        h = torch.empty(x2.shape, dtype=residual.dtype, device=x.device)
        y = torch.empty(x2.shape, dtype=residual.dtype, device=x.device)
    else:
        h, y = out[0].view(x2.shape), out[1].view(x2.shape)
    if x2.shape[0] > 0:
        block, warps = _launch_config(x2.shape[1])
        _norm_add_norm_kernel[(x2.shape[0],)](
            x2, r2, w_b if w_a is None else w_a, w_b, h, y, x2.stride(0), r2.stride(0), h.stride(0), y.stride(0),
            x2.shape[1], eps, BLOCK=block, NORM_A=w_a is not None, num_warps=warps,
        )
    return h.view(x.shape), y.view(x.shape)
