"""Fused decoder-layer glue: M-RoPE + KV-cache store in one launch, and SiLU(gate) * up; the vision
tower's 2D rotary in place (one pass over q and k instead of six fp32 temporaries each).

Without them a decode step spends more launches on rotary slicing and stacking than on the matmuls.
This module imports triton: import it lazily (plugins/__init__.py does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rope_store_kernel(
    qkv_ptr, bias_ptr, cos_ptr, sin_ptr, q_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, n_tok,
    stride_qkv, stride_cs, stride_q_t, stride_q_h, stride_kc_blk, stride_kc_pos, stride_kc_h,
    stride_vc_blk, stride_vc_pos, stride_vc_h,
    NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_ROT: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Program (BLOCK_T tokens, one head of q, k or v): rotate q/k pairs (2i, 2i+1); store k/v in the cache."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [T]
    live = tl.where(toks < n_tok, 1, 0)  # [T] int: 0 past the last token
    tok = tl.minimum(toks, n_tok - 1).to(tl.int64)[:, None]  # [T, 1] clamped: loads stay in bounds
    head = tl.program_id(1)
    src = qkv_ptr + tok * stride_qkv + head * HEAD_DIM  # [T, 1]
    is_v = head >= NUM_HEADS + NUM_KV
    # NOTE: masks from integer limits (tl.where on scalars), never scalar & block booleans.
    pair = tl.arange(0, BLOCK_P)[None, :]  # [1, P]
    pmask = pair < tl.where(is_v, 0, HALF_ROT)  # q and k heads rotate their first 2*HALF_ROT dims
    c = tl.load(cos_ptr + tok * stride_cs + pair, mask=pmask, other=1.0)  # [T, P] fp32
    s = tl.load(sin_ptr + tok * stride_cs + pair, mask=pmask, other=0.0)
    x0 = tl.load(src + 2 * pair, mask=pmask, other=0.0)
    x1 = tl.load(src + 2 * pair + 1, mask=pmask, other=0.0)
    dims = tl.arange(0, BLOCK_D)[None, :]  # [1, D]
    rest = (dims >= tl.where(is_v, 0, 2 * HALF_ROT)) & (dims < HEAD_DIM)  # pass-through dims (all of v)
    xr = tl.load(src + dims, mask=rest, other=0.0)  # [T, D]
    if HAS_BIAS:  # NOTE: the projection's bias, added (and rounded) as nn.Linear would before rotary
        b = bias_ptr + head * HEAD_DIM
        x0 = x0 + tl.load(b + 2 * pair, mask=pmask, other=0.0)
        x1 = x1 + tl.load(b + 2 * pair + 1, mask=pmask, other=0.0)
        xr = xr + tl.load(b + dims, mask=rest, other=0.0)
    x0, x1, xr = x0.to(tl.float32), x1.to(tl.float32), xr.to(tl.float32)
    y0, y1 = x0 * c - x1 * s, x1 * c + x0 * s
    slot = tl.load(slot_ptr + tok)  # [T, 1]
    blk, pos = slot // PAGE, slot % PAGE
    stored = tl.where(slot >= 0, live[:, None], 0)  # [T, 1] int
    q_on = live[:, None] * tl.where(head < NUM_HEADS, 1, 0)
    k_on = stored * tl.where((head >= NUM_HEADS) & (head < NUM_HEADS + NUM_KV), 1, 0)
    v_on = stored * tl.where(is_v, 1, 0)
    q_dst = q_ptr + tok * stride_q_t + head * stride_q_h
    k_dst = k_cache_ptr + blk * stride_kc_blk + pos * stride_kc_pos + (head - NUM_HEADS) * stride_kc_h
    v_dst = v_cache_ptr + blk * stride_vc_blk + pos * stride_vc_pos + (head - NUM_HEADS - NUM_KV) * stride_vc_h
    _store3(q_dst, y0, y1, xr, pair, dims, pmask & (pair < q_on * BLOCK_P), rest & (dims < q_on * BLOCK_D))
    _store3(k_dst, y0, y1, xr, pair, dims, pmask & (pair < k_on * BLOCK_P), rest & (dims < k_on * BLOCK_D))
    _store3(v_dst, y0, y1, xr, pair, dims, pmask & (pair < v_on * BLOCK_P), rest & (dims < v_on * BLOCK_D))


@triton.jit
def _store3(dst, y0, y1, xr, pair, dims, rot_mask, rest_mask):
    ty = dst.dtype.element_ty
    tl.store(dst + 2 * pair, y0.to(ty), mask=rot_mask)
    tl.store(dst + 2 * pair + 1, y1.to(ty), mask=rot_mask)
    tl.store(dst + dims, xr.to(ty), mask=rest_mask)


def _rope_tokens(t: int) -> tuple[int, int]:
    """(tokens per program, warps): one token (one warp) for decode-sized steps, up to 16 for a prefill,
    where one tiny program per (token, head) left the GPU waiting on launch waves (6.6 ms of a 3.8k prefill)."""
    block_t = min(16, triton.next_power_of_2(triton.cdiv(t, 64)))
    return block_t, 1 if block_t <= 2 else 4


def rope_qkv_store(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                   slot_mapping: Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                   bias: Tensor | None = None) -> Tensor:
    """qkv [T, (H + 2 kvH) * D] (+ bias) -> rotated q [T, H, D]; rotated k and v stored at slot_mapping."""
    t = qkv.shape[0]
    q = torch.empty(t, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q
    half = cos.shape[1]
    cos, sin = cos.contiguous(), sin.contiguous()
    block_t, warps = _rope_tokens(t)
    _rope_store_kernel[(triton.cdiv(t, block_t), num_heads + 2 * num_kv_heads)](
        qkv, qkv if bias is None else bias, cos, sin, q, k_cache, v_cache, slot_mapping, t,
        qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        NUM_HEADS=num_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim, HALF_ROT=half, PAGE=k_cache.shape[1],
        BLOCK_P=triton.next_power_of_2(half), BLOCK_D=triton.next_power_of_2(head_dim), HAS_BIAS=bias is not None,
        BLOCK_T=block_t, num_warps=warps,
    )
    return q


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, stride_g, stride_u, stride_y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul(x: Tensor, up: Tensor | None = None) -> Tensor:
    """x [T, 2I] = [gate | up] (or x = gate [T, I] and `up` [T, I]) -> silu(gate) * up [T, I], one rounding."""
    gate = _last_contiguous(x)
    up = gate[:, gate.shape[1] // 2:] if up is None else _last_contiguous(up)  # [T, I]
    t, n = up.shape
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t:
        block = 1024
        _silu_mul_kernel[(t, triton.cdiv(n, block))](gate, up, y, gate.stride(0), up.stride(0), y.stride(0), n,
                                                     BLOCK=block, num_warps=4)
    return y


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    page, off = tl.maximum(slot, 0) // PAGE, tl.maximum(slot, 0) % PAGE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = tl.where(slot >= 0, KV_HEADS, 0)  # NOTE: not `& (slot >= 0)`: the interpreter
    mask = (offs_h[:, None] < heads) & (offs_d[None, :] < HEAD_DIM)  # mistypes scalar & tensor
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    kc = kc_ptr + page * stride_kcb + off * stride_kcs + offs_h[:, None] * stride_kch
    vc = vc_ptr + page * stride_vcb + off * stride_vcs + offs_h[:, None] * stride_vch
    kc, vc = kc + offs_d[None, :], vc + offs_d[None, :]  # [kvH, D] destinations
    tl.store(kc, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write k/v `[T, kvH, D]` into the caches at `slot_mapping [T]` (-1 = skip).

    NOTE: a kernel rather than `index_copy_`: skipping -1 slots in torch needs a boolean index
    (a host sync, not capturable in a CUDA graph), and K and V would be two launches. The copy is
    tiny (T * kvH * D * 2 tensors), so one launch with one program per token is the whole cost.
    """
    num_tokens, kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _last_contiguous(k), _last_contiguous(v)
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, PAGE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=1 if kv_heads * head_dim <= 512 else 4,
    )


def _last_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def _vision_rope_kernel(qkv_ptr, cos_ptr, sin_ptr, n_rows, stride_row, stride_cs,
                        HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr):
    """Programs over (row blocks, q/k heads): out_lo = lo*cos - hi*sin, out_hi = hi*cos + lo*sin, in fp32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    head = tl.program_id(1)  # 0..HEADS-1: q heads, HEADS..2*HEADS-1: k heads (qkv is [N, 3, heads, D])
    cols = tl.arange(0, HALF)
    mask = rows[:, None] < n_rows
    cs = rows[:, None].to(tl.int64) * stride_cs + cols[None, :]
    c_lo, c_hi = tl.load(cos_ptr + cs, mask=mask), tl.load(cos_ptr + cs + HALF, mask=mask)
    s_lo, s_hi = tl.load(sin_ptr + cs, mask=mask), tl.load(sin_ptr + cs + HALF, mask=mask)
    x_ptr = qkv_ptr + rows[:, None].to(tl.int64) * stride_row + head * (2 * HALF) + cols[None, :]
    lo = tl.load(x_ptr, mask=mask).to(tl.float32)
    hi = tl.load(x_ptr + HALF, mask=mask).to(tl.float32)
    tl.store(x_ptr, (lo * c_lo - hi * s_lo).to(qkv_ptr.dtype.element_ty), mask=mask)
    tl.store(x_ptr + HALF, (hi * c_hi + lo * s_hi).to(qkv_ptr.dtype.element_ty), mask=mask)


def vision_rope_(qkv: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Rotate q = qkv[:, 0] and k = qkv[:, 1] of qkv [N, 3, heads, D] (contiguous rows) in place; cos/sin [N, D] fp32."""
    n, three, heads, dim = qkv.shape
    if n == 0:
        return
    if qkv.stride(3) != 1 or qkv.stride(2) != dim or qkv.stride(1) != heads * dim or cos.stride(1) != 1:
        raise ValueError("vision_rope_ needs qkv [N, 3, heads, D] with contiguous heads and cos/sin [N, D]")
    block = 16
    _vision_rope_kernel[(triton.cdiv(n, block), 2 * heads)](
        qkv, cos, sin, n, qkv.stride(0), cos.stride(0), HEADS=heads, HALF=dim // 2, BLOCK_R=block, num_warps=4)
