"""GLM-4.1V text decoder: GQA with q/k/v bias, sandwich RMSNorms, partial interleaved M-RoPE.

Module names follow Hugging Face (`language_model.layers.N.self_attn.o_proj`, ...), except that q/k/v
are packed into `qkv_proj`; `packed_modules` tells the loader where the separate tensors go.
"""

from __future__ import annotations

import torch
from torch import nn

from autoglm_trt import plugins
from autoglm_trt.config import TextConfig
from autoglm_trt.layers.attention import PagedAttention
from autoglm_trt.layers.context import get_context
from autoglm_trt.layers.embedding import VocabParallelEmbedding
from autoglm_trt.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                       RowParallelLinear)
from autoglm_trt.layers.norm import RMSNorm, norm_add_norm
from autoglm_trt.layers.rotary import MRotaryEmbedding


class Glm4vTextAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, bias=cfg.attention_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.attn = PagedAttention(layer_idx, self.num_heads, self.num_kv_heads, cfg.head_dim)

    def forward(self, x: torch.Tensor, rotary: MRotaryEmbedding, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        if ctx is not None:  # engine path: one fused launch adds the bias, rotates q/k, stores k/v
            plain = self.qkv_proj.quant_method is None
            qkv = plugins.linear(x, self.qkv_proj.weight) if plain else self.qkv_proj(x)  # [T, (H + 2 kvH) * D]
            k_cache, v_cache = ctx.kv_caches[self.attn.layer_idx]
            q = plugins.rope_qkv_store(qkv, cos, sin, k_cache, v_cache, ctx.slot_mapping, self.num_heads,
                                       self.num_kv_heads, self.head_dim,
                                       self.qkv_proj.bias if plain else None)  # [T, H, D]
            return self.o_proj(self.attn.attend_cached(q).flatten(1))
        qkv = self.qkv_proj(x)  # [T, (H + 2 kvH) * D]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = rotary(q.unflatten(-1, (self.num_heads, self.head_dim)), cos, sin)  # [T, H, D]
        k = rotary(k.unflatten(-1, (self.num_kv_heads, self.head_dim)), cos, sin)  # [T, kvH, D]
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        out = self.attn(q, k, v)  # [T, H, D]
        return self.o_proj(out.flatten(1))


class Glm4vTextMLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(plugins.silu_mul(self.gate_up_proj(x)))  # [T, 2I/tp] -> [T, I/tp] -> [T, H]


class Glm4vTextDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.self_attn = Glm4vTextAttention(cfg, layer_idx)
        self.mlp = Glm4vTextMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, next_norm: RMSNorm, rotary: MRotaryEmbedding,
                cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x = input_layernorm(residual) on entry; returns (next_norm(h_out), h_out)."""
        attn = self.self_attn(x, rotary, cos, sin)
        residual, x = norm_add_norm(attn, residual, self.post_self_attn_layernorm, self.post_attention_layernorm)
        mlp = self.mlp(x)
        residual, x = norm_add_norm(mlp, residual, self.post_mlp_layernorm, next_norm)
        return x, residual


class Glm4vTextModel(nn.Module):
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Glm4vTextDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = MRotaryEmbedding(cfg.head_dim, cfg.rotary_dim, cfg.rope_theta, cfg.mrope_section)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """inputs_embeds [T, hidden], positions [3, T] -> final-normed hidden states [T, hidden]."""
        cos, sin = self.rotary.cos_sin(positions)  # [T, rotary_dim / 2]
        residual = inputs_embeds
        x = self.layers[0].input_layernorm(residual)
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            x, residual = layer(x, residual, nxt, self.rotary, cos, sin)
        return x
