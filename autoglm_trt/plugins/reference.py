"""Plain-PyTorch references for every kernel in the plugins contract.

They are the CPU production path and the oracle the Triton kernels are tested against, so they
follow the contract literally: softmax in float32, outputs in the input dtype, RMSNorm exactly as
Hugging Face computes it (normalise in float32, cast back, then multiply by the weight).

KV cache layout (per layer): `k_cache`, `v_cache` are `[num_blocks, block_size, kv_heads, D]`;
slot = block_id * block_size + offset; slot -1 means "do not store".
A sequence with seq_len 0 (CUDA-graph batch padding) attends to nothing and yields zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor

# NOTE: the references materialise float32 score matrices; bound them (elements) so long prompts
# and large decode batches run in chunks instead of allocating gigabytes.
_MAX_SCORE_ELEMS = 1 << 25


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write k/v `[T, kvH, D]` into the paged caches at `slot_mapping [T]` (-1 = skip)."""
    keep = slot_mapping >= 0  # [T]
    slots = slot_mapping[keep].long()  # [T']
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size  # [T'], [T']
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)  # [T', kvH, D]
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)  # [T', kvH, D]


def _gather_kv(cache: Tensor, block_table: Tensor, length: int) -> Tensor:
    """Contiguous `[length, kvH, D]` view of one sequence's first `length` cached tokens."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = block_table[:num_blocks].long()  # [nb]
    return cache[blocks].flatten(0, 1)[:length]  # [length, kvH, D]


def _attend(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, scale: float) -> Tensor:
    """Causal GQA attention of queries at absolute positions `q_pos` over keys [0, L).

    q [Tq, H, D], k/v [L, kvH, D], q_pos [Tq] -> [Tq, H, D] float32.
    """
    num_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    qf = (q.float() * scale).view(num_q, num_kv_heads, group, head_dim)  # [Tq, kvH, G, D]
    qf = qf.permute(1, 2, 0, 3)  # [kvH, G, Tq, D]
    kf = k.transpose(0, 1).contiguous().float()  # [kvH, L, D]; contiguous: matmul's fast layout
    vf = v.transpose(0, 1).contiguous().float()  # [kvH, L, D]
    scores = torch.matmul(qf.flatten(1, 2), kf.transpose(1, 2))  # [kvH, G*Tq, L]
    scores = scores.view(num_kv_heads, group, num_q, -1)  # [kvH, G, Tq, L], scaled via q
    k_pos = torch.arange(k.shape[0], device=q.device)  # [L]
    allowed = k_pos[None, :] <= q_pos[:, None]  # [Tq, L]
    scores.masked_fill_(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [kvH, G, Tq, L]
    out = torch.matmul(probs.flatten(1, 2), vf)  # [kvH, G*Tq, D]
    return out.view(num_kv_heads, group, num_q, head_dim).permute(2, 0, 1, 3).reshape(
        num_q, num_heads, head_dim
    )  # [Tq, H, D]


def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cu_seqlens_q: Tensor,
    seq_lens: Tensor,
    block_tables: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
) -> Tensor:
    """Varlen causal attention over the paged cache; q `[T, H, D]` -> `[T, H, D]`.

    Query j of sequence b sits at absolute position seq_lens[b] - q_len_b + j and attends to KV
    positions [0, that position]. Head h reads kv head h // (H // kvH).
    """
    del max_seqlen_q, max_seqlen_k  # NOTE: the reference reads the exact lengths instead
    out = torch.zeros_like(q)  # [T, H, D]
    starts = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    num_heads = q.shape[1]
    for b, seq_len in enumerate(lens):
        q_start, q_end = starts[b], starts[b + 1]
        q_len = q_end - q_start
        if q_len == 0 or seq_len == 0:
            continue
        k = _gather_kv(k_cache, block_tables[b], seq_len)  # [L, kvH, D]
        v = _gather_kv(v_cache, block_tables[b], seq_len)  # [L, kvH, D]
        chunk = max(1, _MAX_SCORE_ELEMS // (num_heads * seq_len))
        for c0 in range(0, q_len, chunk):
            c1 = min(q_len, c0 + chunk)
            q_pos = torch.arange(c0, c1, device=q.device) + (seq_len - q_len)  # [c]
            kv_end = seq_len - q_len + c1  # keys past the chunk's last position are masked anyway
            o = _attend(q[q_start + c0 : q_start + c1], k[:kv_end], v[:kv_end], q_pos, scale)
            out[q_start + c0 : q_start + c1] = o.to(q.dtype)
    return out


def _decode_chunk(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor, block_tables: Tensor,
    scale: float,
) -> Tensor:
    """Decode attention for a chunk of sequences, vectorised over the batch -> float32 [B, H, D]."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    max_len = int(seq_lens.max()) if batch else 0
    num_blocks = max(1, -(-max_len // block_size))
    table = block_tables[:, :num_blocks].long().clamp(min=0)  # [B, nb]; -1 pads never unmasked

    def gather(cache: Tensor) -> Tensor:  # NOTE: contiguous [B, kvH, L, D]: matmul's fast layout
        return cache[table].flatten(1, 2).transpose(1, 2).contiguous().float()

    k, v = gather(k_cache), gather(v_cache)  # [B, kvH, L, D] each
    qf = q.float().view(batch, num_kv_heads, group, head_dim)  # [B, kvH, G, D]
    scores = torch.matmul(qf, k.transpose(-1, -2)) * scale  # [B, kvH, G, L]
    k_pos = torch.arange(k.shape[2], device=q.device)  # [L]
    valid = k_pos[None, :] < seq_lens[:, None].long()  # [B, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # [B, kvH, G, L]; seq_len 0 -> zeros
    out = torch.matmul(probs, v)  # [B, kvH, G, D]
    return out.reshape(batch, num_heads, head_dim)


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor, block_tables: Tensor,
    scale: float,
) -> Tensor:
    """One query per sequence: q `[B, H, D]` attends to its first seq_lens[b] cached tokens."""
    batch = q.shape[0]
    if batch == 0:
        return torch.empty_like(q)
    max_len = max(1, int(seq_lens.max()))
    per_seq = max_len * k_cache.shape[2] * k_cache.shape[3]  # gathered float32 elements per seq
    step = max(1, _MAX_SCORE_ELEMS // per_seq)
    out = torch.empty_like(q)  # [B, H, D]
    for b0 in range(0, batch, step):
        b1 = min(batch, b0 + step)
        o = _decode_chunk(q[b0:b1], k_cache, v_cache, seq_lens[b0:b1], block_tables[b0:b1], scale)
        out[b0:b1] = o.to(q.dtype)
    return out


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Hugging Face RMSNorm: weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)."""
    xf = x.float()  # [T, N]
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [T, N]
    return (weight * normed.to(x.dtype)).to(x.dtype)


def norm_add_norm(
    x: Tensor, residual: Tensor, w_a: Tensor | None, w_b: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """The sandwich-norm junction: h = residual + rms_norm(x, w_a) (+ x when w_a is None); y = rms_norm(h, w_b)."""
    h = residual + (x if w_a is None else rms_norm(x, w_a, eps))  # [T, N] in the input dtype, as HF rounds it
    return h, rms_norm(h, w_b, eps)


def _rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, heads, D]; rotate pairs (2i, 2i+1) of the first 2 * cos.shape[1] dims (GPT-J style)."""
    rot_dim = 2 * cos.shape[1]
    pairs = x[..., :rot_dim].unflatten(-1, (-1, 2))  # [T, heads, R/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos.to(x.dtype).unsqueeze(1), sin.to(x.dtype).unsqueeze(1)  # [T, 1, R/2]
    out = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
    return torch.cat((out, x[..., rot_dim:]), dim=-1)


def rope_qkv_store(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                   slot_mapping: Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                   bias: Tensor | None = None) -> Tensor:
    """qkv [T, (H + 2 kvH) * D] (+ bias) -> rotated q [T, H, D]; rotated k and v stored at slot_mapping."""
    if bias is not None:
        qkv = qkv + bias
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = _rotate_pairs(q.unflatten(-1, (num_heads, head_dim)), cos, sin)  # [T, H, D]
    k = _rotate_pairs(k.unflatten(-1, (num_kv_heads, head_dim)), cos, sin)  # [T, kvH, D]
    store_kv(k, v.unflatten(-1, (num_kv_heads, head_dim)), k_cache, v_cache, slot_mapping)
    return q


def silu_mul(x: Tensor, up: Tensor | None = None) -> Tensor:
    """x [T, 2I] = [gate | up] (or x = gate [T, I] and `up` [T, I]) -> silu(gate) * up [T, I]."""
    gate, up = x.chunk(2, dim=-1) if up is None else (x, up)
    return torch.nn.functional.silu(gate) * up


def vision_rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [N, heads, D] rotated in float32 (rotate-half over all D dims; cos/sin [N, D]), in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).to(x.dtype)


def vision_rope_(qkv: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Rotate q = qkv[:, 0] and k = qkv[:, 1] of the vision tower's qkv [N, 3, heads, D] in place."""
    for i in (0, 1):
        qkv[:, i] = vision_rotate(qkv[:, i], cos, sin)
