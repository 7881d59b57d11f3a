"""How decode attention's key splits become one output: the in-kernel "last program merges" (two levels over
int32 arrival counters, the default) and a second-launch reduce (`decode_attention(separate=True)`).

Partials are normalised fp32 outputs [.., GROUP, BLOCK_D] with their log2-sum-exp, in rows
((b * kvH + kv_head) * num_splits + split) * GROUP + head. Used by plugins/triton_attention; imports triton.
"""

from __future__ import annotations

import triton
import triton.language as tl


# NOTE: memory ordering of "last program reduces" (no spinning; both merge levels alike), the
# pattern of CUTLASS's split-K semaphore:
#  1. the writer's threads store the partial (weak st.global; one writer per address per launch);
#  2. tl.debug_barrier() (bar.sync) orders every thread's stores before step 3 within the CTA;
#  3. one thread's atom.acq_rel.gpu add is a gpu-scope release; releases are cumulative, so it
#     publishes all stores ordered before it, other threads' included (ptxas: MEMBAR.GPU + ATOMG);
#  4. the arrival reading old == target - 1 is last in the counter's modification order, and as an
#     acquire RMW it synchronises with every earlier (release) arrival; Triton broadcasts the
#     scalar result through shared memory behind a bar.sync, so all merge loads follow the acquire;
#  5. those loads are .cg (LDG.STRONG.GPU: served by L2, never by this SM's non-coherent L1);
#  6. the last arrival resets the counter; no program of the launch touches it again, and the next
#     launch on the stream (next layer, next graph replay) starts after this one ends. Counters are
#     shared per device, so concurrent launches on two streams of one device would race.
# Only splits holding keys take part (target = their count, equal in all programs since they read
# the same seq_len), so empty splits return without a store or an atomic.


@triton.jit
def _arrive(cnt_ptr, target):
    """Count this program in at cnt_ptr; True for the target-th (last) arrival, which resets it."""
    tl.debug_barrier()  # all threads' partial stores are issued before the release below
    old = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    last = old == target - 1
    if last:
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")  # ready for the next launch
    return last


@triton.jit
def _split_plan(seq_len, num_splits, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr):
    """(keys per split: a tile-aligned share, at least MIN_SPLIT; splits holding keys, 0 if seq_len is 0)."""
    split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N, MIN_SPLIT)
    return split_len, tl.cdiv(seq_len, tl.maximum(split_len, 1))


@triton.jit
def _decode_reduce_kernel(part_o_ptr, part_lse_ptr, seq_lens_ptr, out_ptr, num_splits, stride_ob, stride_oh,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                          MIN_SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b, kv_head, head in group): merge the used splits' partials by their log2-sum-exp."""
    b, kvh, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, n_used = _split_plan(tl.load(seq_lens_ptr + b), num_splits, BLOCK_N, MIN_SPLIT)
    if n_used > 1:  # NOTE: otherwise split 0 wrote the output itself
        offs_s, offs_d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
        s_mask = offs_s < n_used
        rows = (b * tl.num_programs(1) + kvh) * num_splits * GROUP + offs_s * GROUP + g  # [S]
        lse = tl.load(part_lse_ptr + rows, mask=s_mask, other=float("-inf"))  # [S]
        w = tl.exp2(lse - tl.max(lse, 0))  # [S]; unused splits weigh 0
        o = tl.load(part_o_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
        o = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)  # [D]
        tl.store(out_ptr + b * stride_ob + (kvh * GROUP + g) * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty),
                 mask=offs_d < HEAD_DIM)


@triton.jit
def _store_partial(part_o_ptr, part_lse_ptr, rows, o, lse, g_mask, offs_d, BLOCK_D: tl.constexpr):
    """rows [G]: partial rows of the group's heads; o [G, BLOCK_D] normalised, lse [G] log2."""
    tl.store(part_o_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], o, mask=g_mask[:, None])
    tl.store(part_lse_ptr + rows, lse, mask=g_mask)


@triton.jit
def _merge(
    part_o_ptr, part_lse_ptr, rows0, first, stride, count, offs_g, offs_d,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, FAN: tl.constexpr,
):
    """Merge `count` (<= FAN) partials at slots first + i * stride by their log2-sum-exp."""
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for i in tl.static_range(FAN):  # NOTE: unrolled, so all the loads can be in flight at once
        live = offs_g < tl.where(i < count, GROUP, 0)  # [G]
        rows = rows0 + (first + i * stride) * GROUP  # [G]
        lse = tl.load(part_lse_ptr + rows, mask=live, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(part_o_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], mask=live[:, None],
                    other=0.0, cache_modifier=".cg")  # [G, D]
        m_new = tl.maximum(m, lse)  # [G]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha, w = tl.exp2(m - m_safe), tl.exp2(lse - m_safe)  # [G]; missing partials weigh 0
        acc = acc * alpha[:, None] + o * w[:, None]
        l_sum = l_sum * alpha + w
        m = m_new
    l_safe = tl.where(l_sum == 0.0, 1.0, l_sum)
    return acc / l_safe[:, None], tl.where(l_sum == 0.0, float("-inf"), m + tl.log2(l_safe))


@triton.jit
def _finish_split(
    o, lse, out_ptrs, out_mask, part_o_ptr, part_lse_ptr, cnt_row, rows0, split, n_used, offs_g,
    offs_d, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, FAN: tl.constexpr,
):
    """Two-level "last program reduces": the last of each chunk of FAN used splits merges the
    chunk into the chunk's first slot, the last chunk to finish merges the chunks into out."""
    g_mask = offs_g < GROUP
    chunk, n_chunks = split // FAN, tl.cdiv(n_used, FAN)
    in_chunk = tl.minimum(FAN, n_used - chunk * FAN)
    _store_partial(part_o_ptr, part_lse_ptr, rows0 + split * GROUP, o, lse, g_mask, offs_d, BLOCK_D)
    if _arrive(cnt_row + 1 + chunk, in_chunk):
        o_c, lse_c = _merge(part_o_ptr, part_lse_ptr, rows0, chunk * FAN, 1, in_chunk, offs_g,
                            offs_d, GROUP=GROUP, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, FAN=FAN)
        if n_chunks == 1:
            tl.store(out_ptrs, o_c.to(out_ptrs.dtype.element_ty), mask=out_mask)
        else:
            rows_c = rows0 + chunk * FAN * GROUP  # [G]
            _store_partial(part_o_ptr, part_lse_ptr, rows_c, o_c, lse_c, g_mask, offs_d, BLOCK_D)
            if _arrive(cnt_row, n_chunks):
                o_t, _ = _merge(part_o_ptr, part_lse_ptr, rows0, 0, FAN, n_chunks, offs_g, offs_d,
                                GROUP=GROUP, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, FAN=FAN)
                tl.store(out_ptrs, o_t.to(out_ptrs.dtype.element_ty), mask=out_mask)
