"""Attention over the paged KV cache (or plain causal attention when no step context is set)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from autoglm_trt import plugins
from autoglm_trt.layers.context import AttentionContext, get_context

# SDPA kernels in order of preference for long attention: a whole prompt in one step (cuDNN ran a 3.8k-token
# causal GQA prefill at 448 TFLOP/s on an H100, the paged Triton kernel at 198) and the vision tower (cuDNN 617
# TFLOP/s, flash 351); see benchmarks/bench_prefill_ops.py. A backend that cannot take the input passes to
# the next; the math path stays the last resort.
SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.MATH]
# cuDNN builds (and caches) one execution plan per shape, and a build costs tens of ms: a new prompt length each
# request put that on every first token over HTTP. So only steps of one sequence with DENSE_MIN_TOKENS or more new
# tokens (a whole prompt, or its rest after a cached prefix or an earlier chunk) go dense
# (below, attention is a small share of the prefill), padded up to a multiple of DENSE_BUCKET (the padding sits
# after every real token, so causal masking keeps it out of the real rows): a few plans serve every length.
DENSE_MIN_TOKENS = 1024
DENSE_BUCKET = 256
WARM_LENGTHS = 64  # start-up builds plans for at most this many lengths (to 17,152 tokens); longer ones on first use


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence, no cache. q [T, H, D], k/v [T, kvH, D] -> [T, H, D]."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, scale=scale)  # [H, T, D]
    return out.transpose(0, 1)


class PagedAttention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """No step context (parity tests, ONNX export): q [T, H, D], k/v [T, kvH, D] -> [T, H, D].

        With a context the decoder stores K/V in its fused rotary kernel and calls attend_cached.
        """
        return causal_attention(q, k, v, self.scale)

    def attend_cached(self, q: torch.Tensor) -> torch.Tensor:
        """q [T, H, D] over the paged cache, where this step's K/V are already stored -> [T, H, D]."""
        ctx = get_context()
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        if ctx.is_decode:
            return plugins.decode_attention(q, k_cache, v_cache, ctx.seq_lens, ctx.block_tables, self.scale)
        if is_long_single_prefill(ctx):
            return self._dense_prefill(q, k_cache, v_cache, ctx.block_tables[0], ctx.max_seqlen_k)
        return plugins.paged_attention(q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.seq_lens, ctx.block_tables,
                                       ctx.max_seqlen_q, ctx.max_seqlen_k, self.scale)

    def _dense_prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       table: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Causal GQA attention of one prompt's last q [S, H, D] over its first kv_len tokens' K/V (the S new
        ones just stored, after a cached prefix or an earlier chunk) -> [S, H, D].

        NOTE: the queries are left-padded with kv_len - S zero rows, so the attention is square and causal
        (cuDNN's fast path and its per-length plans, warmed at start-up) and the new rows sit where causality
        puts them; the pad rows cost (kv_len - S)^2 / 2 scores, a fraction of what they save over the paged
        kernel (an agent step: a 2k-token cached history before a 3.3k-token screenshot and turn)."""
        s = q.shape[0]
        pad = kv_len - s
        qf = q if pad == 0 else torch.cat((q.new_zeros(pad, *q.shape[1:]), q))  # [kv_len, H, D]
        out = dense_causal(qf, gather_kv(k_cache, table, kv_len), gather_kv(v_cache, table, kv_len), self.scale)
        return out[pad:]


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA (SDPA_BACKENDS) of one prompt padded to a multiple of DENSE_BUCKET: q [T, H, D], k/v [T, kvH, D] -> [T, H, D]."""
    t = q.shape[0]
    pad = -t % DENSE_BUCKET
    qh, kh, vh = (F.pad(x, (0, 0, 0, 0, 0, pad)).transpose(0, 1).unsqueeze(0)
                  for x in (q, k, v))  # [1, heads, T + pad, D], zeros after the prompt
    with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                             enable_gqa=kh.shape[1] != qh.shape[1])  # [1, H, T + pad, D]
    return out[0, :, :t].transpose(0, 1)


@torch.inference_mode()
def warm_dense_plans(attn: PagedAttention, max_tokens: int, device: torch.device, dtype: torch.dtype) -> int:
    """Run dense_causal once at every bucket length a whole prompt can take (DENSE_MIN_TOKENS..max_tokens, the first
    WARM_LENGTHS), so cuDNN builds its per-shape plans at start-up, not on some request's first token. Returns how many."""
    lo = -(-DENSE_MIN_TOKENS // DENSE_BUCKET) * DENSE_BUCKET
    lengths = range(lo, max_tokens + DENSE_BUCKET, DENSE_BUCKET) if max_tokens >= DENSE_MIN_TOKENS else range(0)
    lengths = lengths[:WARM_LENGTHS]
    if not lengths:
        return 0
    q = torch.zeros(lengths[-1], attn.num_heads, attn.head_dim, device=device, dtype=dtype)  # [T_max, H, D]
    kv = torch.zeros(lengths[-1], attn.num_kv_heads, attn.head_dim, device=device, dtype=dtype)  # [T_max, kvH, D]
    for t in lengths:
        dense_causal(q[:t], kv[:t], kv[:t], attn.scale)
    return len(lengths)


def is_long_single_prefill(ctx: AttentionContext) -> bool:
    """One sequence computing DENSE_MIN_TOKENS or more new tokens in this step: a whole prompt, or its rest
    after a prefix-cache hit or an earlier chunk."""
    return ctx.seq_lens.shape[0] == 1 and ctx.max_seqlen_q >= DENSE_MIN_TOKENS


def gather_kv(cache: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    """The first n tokens of one sequence from a paged cache [blocks, page, kvH, D] (table [max_blocks]) -> [n, kvH, D]."""
    page = cache.shape[1]
    blocks = cache.index_select(0, table[: -(-n // page)].long())  # [nb, page, kvH, D]
    return blocks.flatten(0, 1)[:n]
