"""Triton kernels over the paged KV cache: decode attention (split-K), varlen prefill (store_kv:
triton_fused, re-exported here).

Layouts (see docs/architecture.md): q `[T, H, D]`, caches `[num_blocks, block_size, kvH, D]`,
slot = block_id * block_size + offset. Every kernel addresses the cache through its strides, with
the last dimension contiguous. GQA: query head h reads kv head h // (H // kvH); both attention
kernels give one program all the query heads of one kv head, so each K/V tile is loaded once for
the whole group (16 heads for GLM-4.1V) and the QK product is a real matrix product (tl.dot).

Key positions are looked up per token (page = block_tables[b, pos // block_size]), so any block
size works with any tile width BLOCK_N. Softmax runs in the log2 domain in float32. Sequences with
seq_len 0 (CUDA-graph padding) produce zeros. This module imports triton: import it lazily.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from autoglm_trt.plugins.triton_fused import _last_contiguous, _store_kv_kernel, store_kv  # noqa: F401 (re-exported)
from autoglm_trt.plugins.triton_split_merge import (  # noqa: F401 (_decode_reduce_kernel: aot_compile reads it here)
    _decode_reduce_kernel, _finish_split, _split_plan, _store_partial,
)

# NOTE: key tokens per decode tile. [64, 128] bf16 = 16 KB each for K and V per stage; float32
# (tests only) halves the tile to stay inside shared memory.
_DECODE_BLOCK_N = {2: 64, 4: 32}
_MIN_SPLIT_TOKENS = 128  # never split a sequence's keys finer than this (merge cost, empty splits)
_MAX_SPLITS = 64
_MERGE_FAN = 8  # splits merged per program at each of the two merge levels (<= FAN**2 splits)
_MIN_COUNTERS = 4096  # arrival counters allocated at least (16 KB), so warm-ups rarely regrow
_COUNTERS: dict[torch.device, list[Tensor]] = {}  # per device; the last one is in use
_LOG2E = 1.4426950408889634


@triton.jit
def _attn_tile(
    acc, l_i, m_i, q, qk_scale, k_ptr, v_ptr, bt_row, start, kv_hi, q_pos, offs_n, offs_d, d_mask,
    stride_kb, stride_ks, stride_vb, stride_vs,
    PAGE: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
):
    """One online-softmax step over key tokens [start, start + BLOCK_N) (all < kv_hi valid)."""
    toks = start + offs_n  # [BLOCK_N]
    n_mask = toks < kv_hi
    page = tl.load(bt_row + toks // PAGE, mask=n_mask, other=0).to(tl.int64)
    k_off = page * stride_kb + (toks % PAGE) * stride_ks  # [BLOCK_N]
    v_off = page * stride_vb + (toks % PAGE) * stride_vs  # [BLOCK_N]
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [N, D]
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [M, N]
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale  # NOTE: scale * log2(e) in fp32 after the dot: no extra rounding of q
    keep = n_mask[None, :]
    if CAUSAL:
        keep = keep & (toks[None, :] <= q_pos[:, None])
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [M]
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked row: keep exp finite
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])  # [M, N]
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [N, D]
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_o_ptr, part_lse_ptr, cnt_ptr, seq_lens_ptr, bt_ptr,
    qk_scale, num_splits, cnt_stride, stride_qb, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_bt, stride_ob, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, FAN: tl.constexpr, DIRECT: tl.constexpr,
    IEEE: tl.constexpr, MIN_SPLIT: tl.constexpr, SEPARATE: tl.constexpr,
):
    """Program (b, kv_head, split): the GROUP query heads of one kv head over one key range.
    SEPARATE: used splits only store their partials; _decode_reduce_kernel merges them (a second launch)."""
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    split_len, n_used = _split_plan(seq_len, num_splits, BLOCK_N, MIN_SPLIT)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seq_len)
    offs_g, offs_d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    g_mask, d_mask = offs_g < GROUP, offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g  # [BLOCK_G]
    live = offs_g < tl.where(lo < hi, GROUP, 0)  # [BLOCK_G]; an empty split loads no q
    q_ptrs = q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=live[:, None] & d_mask[None, :], other=0.0)  # [G, D]; pad rows 0
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b * stride_bt
    k_base, v_base = k_ptr + kvh * stride_kh, v_ptr + kvh * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = _attn_tile(
            acc, l_i, m_i, q, qk_scale, k_base, v_base, bt_row, start, hi, offs_g, offs_n, offs_d,
            d_mask, stride_kb, stride_ks, stride_vb, stride_vs, PAGE=PAGE, CAUSAL=False, IEEE=IEEE,
        )
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # seq_len 0 -> zeros
    o = acc / l_safe[:, None]  # [G, D] normalised
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))  # [G] log2-sum-exp
    out_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT:
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=out_mask)
    elif n_used <= 1:  # all keys (or none: seq_len 0 -> zeros) in split 0: nothing to merge
        if split == 0:
            tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=out_mask)
    elif split < n_used:
        row = b * tl.num_programs(1) + kvh  # partial rows of (b, kvh): [S, GROUP] from rows0
        rows0 = row * num_splits * GROUP + offs_g  # [G]
        if SEPARATE:  # _decode_reduce_kernel merges them
            _store_partial(part_o_ptr, part_lse_ptr, rows0 + split * GROUP, o, lse, g_mask, offs_d, BLOCK_D)
        else:
            _finish_split(o, lse, out_ptrs, out_mask, part_o_ptr, part_lse_ptr, cnt_ptr + row * cnt_stride, rows0,
                          split, n_used, offs_g, offs_d, GROUP=GROUP, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, FAN=FAN)


def _decode_warps(elem_bytes: int) -> int:
    """4 warps for 16-bit caches; float32 (tests) uses 8 so its [16, 128] tiles do not spill."""
    return 4 if elem_bytes == 2 else 8


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch: int, kv_heads: int, max_context: int, device: torch.device) -> int:
    """Key splits per (sequence, kv head) so that the grid holds about two programs per SM.

    Decided from shapes only (never from seq_lens, which live on the device), so one choice holds
    for every replay of a CUDA graph; each program then splits its own sequence's actual length.
    """
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 8
    want = triton.cdiv(2 * sms, max(1, batch * kv_heads))
    cap = max(1, max_context // _MIN_SPLIT_TOKENS)
    return max(1, min(want, cap, _MAX_SPLITS))


def _arrival_counters(device: torch.device, n: int) -> Tensor:
    """>= n zeroed int32 counters on `device`. Each launch leaves its counters at 0, so one buffer
    serves all layers, calls and replays with no zeroing launch. NOTE: outgrown buffers stay alive
    (captured graphs keep their address); growing zeroes eagerly, so it is refused mid-capture."""
    bufs = _COUNTERS.setdefault(device, [])
    if bufs and bufs[-1].numel() >= n:
        return bufs[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"decode_attention needs {n} arrival counters on {device}: call it once "
                           "at this batch size outside CUDA-graph capture (a warm-up) first")
    bufs.append(torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device))
    return bufs[-1]


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor, block_tables: Tensor,
    scale: float, *, num_splits: int | None = None, out: Tensor | None = None, min_split: int | None = None,
    merge_fan: int | None = None, block_n: int | None = None, separate: bool = False,
) -> Tensor:
    """Flash-decoding over the paged cache in one launch: q `[B, H, D]` -> `[B, H, D]`.

    `num_splits` overrides the heuristic (tests); `out` is an optional preallocated result. Benchmarks'
    knobs: `min_split` (keys, a multiple of the tile) the fewest keys a split takes, `merge_fan` the
    partials one program merges, `block_n` the keys per tile, `separate` a second launch that merges the
    splits (the design before the one-launch merge) instead of the last-arriving programs.
    """
    fan = merge_fan or _MERGE_FAN
    tile = block_n or _DECODE_BLOCK_N[q.element_size()]
    if min_split is not None and min_split % tile:
        raise ValueError(f"min_split must be a multiple of the {tile}-key tile, got {min_split}")
    batch, num_heads, head_dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    out = torch.empty_like(q) if out is None else out
    if batch == 0:
        return out
    q = _last_contiguous(q)
    if num_splits is None:
        num_splits = choose_num_splits(batch, kv_heads, block_tables.shape[1] * page, q.device)
    if not 1 <= num_splits <= fan ** 2:
        raise ValueError(f"num_splits must be in [1, {fan ** 2}], got {num_splits}")
    block_d = triton.next_power_of_2(head_dim)
    direct = num_splits == 1
    cnt_stride = 1 + triton.cdiv(num_splits, fan)  # per (b, kv head): [top, chunk 0, ...]
    # NOTE: the direct and separate paths touch no counter; seq_lens (int32) stands in for the pointer.
    counters = seq_lens if direct or separate else _arrival_counters(q.device, batch * kv_heads * cnt_stride)
    min_keys = tile if min_split is None else max(tile, min_split)
    rows = (batch, kv_heads, num_splits, group)  # partials: out [*rows, BLOCK_D], lse [*rows]
    part_o = q.new_empty((1,) if direct else (*rows, block_d), dtype=torch.float32)
    part_lse = q.new_empty((1,) if direct else rows, dtype=torch.float32)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_o, part_lse, counters, seq_lens, block_tables,
        scale * _LOG2E, num_splits, cnt_stride, q.stride(0), q.stride(1), *k_cache.stride()[:3],
        *v_cache.stride()[:3], block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, PAGE=page, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d, BLOCK_N=tile, FAN=fan, DIRECT=direct,
        IEEE=q.dtype == torch.float32, MIN_SPLIT=min_keys, SEPARATE=separate,
        num_warps=_decode_warps(q.element_size()), num_stages=2,
    )
    if separate and not direct:
        block_s = triton.next_power_of_2(num_splits)
        _decode_reduce_kernel[(batch, kv_heads, group)](
            part_o, part_lse, seq_lens, out, num_splits, out.stride(0), out.stride(1), GROUP=group,
            HEAD_DIM=head_dim, BLOCK_N=tile, MIN_SPLIT=min_keys, BLOCK_S=block_s, BLOCK_D=block_d,
            num_warps=max(1, min(8, block_s * block_d // 1024)),
        )
    return out


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cu_q_ptr, seq_lens_ptr, bt_ptr, qk_scale,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, Q_TOKENS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (q block, b, kv head): rows are (token, head-in-group) pairs, Q_TOKENS x GROUP."""
    qb, b, kvh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + b)
    t0 = qb * Q_TOKENS
    rows = tl.arange(0, BLOCK_M)
    tok = t0 + rows // GROUP  # [M] query token index within the sequence
    heads = kvh * GROUP + rows % GROUP  # [M]
    offs_d, offs_n = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    row_mask = (rows < Q_TOKENS * GROUP) & (tok < q_len)
    io_mask = row_mask[:, None] & d_mask[None, :]
    q_rows = (q_start + tok).to(tl.int64) * stride_qt + heads * stride_qh  # [M]
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=io_mask, other=0.0)
    q_pos = seq_len - q_len + tok  # [M] absolute positions (chunked prefill offset)
    first_pos = seq_len - q_len + t0
    last_tok = tl.minimum(t0 + Q_TOKENS, q_len)  # exclusive
    kv_hi = tl.where(t0 < q_len, seq_len - q_len + last_tok, 0)
    full_hi = tl.minimum((first_pos + 1) // BLOCK_N * BLOCK_N, kv_hi)  # tiles no row masks
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b * stride_bt
    k_base, v_base = k_ptr + kvh * stride_kh, v_ptr + kvh * stride_vh
    for start in range(0, full_hi, BLOCK_N):
        acc, l_i, m_i = _attn_tile(
            acc, l_i, m_i, q, qk_scale, k_base, v_base, bt_row, start, kv_hi, q_pos, offs_n, offs_d,
            d_mask, stride_kb, stride_ks, stride_vb, stride_vs, PAGE=PAGE, CAUSAL=False, IEEE=IEEE,
        )
    for start in range(full_hi, kv_hi, BLOCK_N):
        acc, l_i, m_i = _attn_tile(
            acc, l_i, m_i, q, qk_scale, k_base, v_base, bt_row, start, kv_hi, q_pos, offs_n, offs_d,
            d_mask, stride_kb, stride_ks, stride_vb, stride_vs, PAGE=PAGE, CAUSAL=True, IEEE=IEEE,
        )
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_rows = (q_start + tok).to(tl.int64) * stride_ot + heads * stride_oh
    tl.store(o_ptr + o_rows[:, None] + offs_d[None, :], o.to(o_ptr.dtype.element_ty), mask=io_mask)


def _prefill_config(head_dim: int, group: int, elem_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the prefill kernel.

    BLOCK_M rows = BLOCK_M // group query tokens x group heads (8 tokens x 16 heads for GLM).
    """
    if elem_bytes == 4:  # float32 (tests): smaller tiles so K/V stages fit in shared memory
        return max(64, triton.next_power_of_2(group)), 32, 4, 2
    block_m = max(128, triton.next_power_of_2(group))
    return block_m, 64, 4 if head_dim <= 64 else 8, 2


def paged_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, seq_lens: Tensor,
    block_tables: Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float, *,
    out: Tensor | None = None,
) -> Tensor:
    """Varlen causal (chunked) prefill over the paged cache; q `[T, H, D]` -> `[T, H, D]`."""
    del max_seqlen_k  # NOTE: each program reads its own seq_len; the bound is not needed
    num_tokens, num_heads, head_dim = q.shape
    batch = seq_lens.shape[0]
    _, page, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    out = torch.empty_like(q) if out is None else out
    if num_tokens == 0 or batch == 0 or max_seqlen_q == 0:
        return out
    q = _last_contiguous(q)
    block_m, block_n, warps, stages = _prefill_config(head_dim, group, q.element_size())
    q_tokens = block_m // group
    grid = (triton.cdiv(max_seqlen_q, q_tokens), batch, kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_tables, scale * _LOG2E,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, PAGE=page, Q_TOKENS=q_tokens, BLOCK_M=block_m,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
        num_warps=warps, num_stages=stages,
    )
    return out
