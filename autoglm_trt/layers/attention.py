"""Attention over the paged KV cache (or plain causal attention when no step context is set)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoglm_trt import plugins
from autoglm_trt.layers.context import get_context


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
        return plugins.paged_attention(q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.seq_lens, ctx.block_tables,
                                       ctx.max_seqlen_q, ctx.max_seqlen_k, self.scale)
