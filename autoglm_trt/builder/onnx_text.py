"""The text decoder as one ONNX-exportable function for prefill and decode, over our model's weights.

Same function as Glm4vTextModel + lm_head, written with plain ops (no paged cache, no plugins):

    inputs_embeds  [B, S, H]        embedding lookup happens outside (embedding.safetensors)
    position_ids   [3, B, S] int64  M-RoPE t/h/w positions; cos/sin are computed in the graph
    attention_mask [B, P+S] int64   1 = attend (past and new tokens), 0 = padding
    past_key_values.{i}.key/value [B, kvH, P, D]
 -> logits [B, S, V] float32, present.{i}.key/value [B, kvH, P+S, D]

Query j of row b sits at KV index P + j and attends to KV indices <= P + j whose mask is 1 (the
onnxruntime-genai / Hugging Face convention, so left-padded batches work).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoglm_trt.models.glm4v import Glm4vForConditionalGeneration


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face RMSNorm: normalise in float32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor,
                  sections: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [3, B, S] -> cos, sin [B, S, R/2]: section k of the pairs rotates by axis k % 3."""
    freqs = position_ids.float().unsqueeze(-1) * inv_freq  # [3, B, S, R/2]
    parts, start = [], 0
    for k, n in enumerate(sections):
        parts.append(freqs[k % 3, :, :, start:start + n])  # [B, S, n]
        start += n
    angle = torch.cat(parts, dim=-1)  # [B, S, R/2]
    return angle.cos(), angle.sin()


def apply_mrope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """x [B, heads, S, D]: rotate the first rotary_dim dims in interleaved pairs (GPT-J style)."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    pairs = rot.reshape(rot.shape[0], rot.shape[1], rot.shape[2], rotary_dim // 2, 2)  # [B, h, S, R/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c = cos.to(x.dtype).unsqueeze(1)  # [B, 1, S, R/2]
    s = sin.to(x.dtype).unsqueeze(1)
    out = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)  # [B, h, S, R]
    return torch.cat((out, rest), dim=-1)


def attention_bias(attention_mask: torch.Tensor, num_new: torch.Tensor) -> torch.Tensor:
    """attention_mask [B, L] (L = P + S), S -> additive bias [B, 1, 1, S, L] float32 (0 or -big)."""
    kv_len = attention_mask.shape[1]
    k_idx = torch.arange(kv_len, device=attention_mask.device)  # [L]
    q_idx = torch.arange(num_new, device=attention_mask.device) + (kv_len - num_new)  # [S]
    allowed = (k_idx.unsqueeze(0) <= q_idx.unsqueeze(1)).unsqueeze(0) & (attention_mask.unsqueeze(1) > 0)  # [B,S,L]
    # NOTE: a finite minimum, not -inf: fully masked rows (padding queries) give a uniform softmax, not NaN.
    bias = torch.where(allowed, torch.zeros((), dtype=torch.float32), torch.full((), -1e30, dtype=torch.float32))
    return bias.unsqueeze(1).unsqueeze(1)


class DecoderGraph(nn.Module):
    """Wraps a loaded (tensor-parallel size 1) model; the weights are shared, not copied."""

    def __init__(self, model: Glm4vForConditionalGeneration) -> None:
        super().__init__()
        t = model.cfg.text
        self.cfg = t
        self.layers = model.language_model.layers
        self.norm = model.language_model.norm
        self.lm_head = model.lm_head
        self.register_buffer("inv_freq", model.language_model.rotary.inv_freq.clone(), persistent=False)

    def attention(self, attn, x, cos, sin, bias, past_k, past_v):
        """x [B, S, H] -> out [B, S, H], present k/v [B, kvH, P+S, D]."""
        b, s = x.shape[0], x.shape[1]
        t, hq, hkv = self.cfg, attn.num_heads, attn.num_kv_heads
        d = t.head_dim
        qkv = F.linear(x, attn.qkv_proj.weight, attn.qkv_proj.bias)  # [B, S, (H + 2 kvH) D]
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q = apply_mrope(q.reshape(b, s, hq, d).transpose(1, 2), cos, sin, t.rotary_dim)  # [B, H, S, D]
        k = apply_mrope(k.reshape(b, s, hkv, d).transpose(1, 2), cos, sin, t.rotary_dim)  # [B, kvH, S, D]
        v = v.reshape(b, s, hkv, d).transpose(1, 2)
        k = torch.cat((past_k, k), dim=2)  # [B, kvH, L, D]
        v = torch.cat((past_v, v), dim=2)
        q5 = q.reshape(b, hkv, hq // hkv, s, d).float()  # [B, kvH, G, S, D]: head h reads kv head h // G
        scores = torch.matmul(q5, k.float().unsqueeze(2).transpose(-1, -2)) * (d ** -0.5)  # [B, kvH, G, S, L]
        probs = torch.softmax(scores + bias, dim=-1)
        out = torch.matmul(probs, v.float().unsqueeze(2)).to(x.dtype)  # [B, kvH, G, S, D]
        out = out.reshape(b, hq, s, d).transpose(1, 2).reshape(b, s, hq * d)
        return F.linear(out, attn.o_proj.weight, attn.o_proj.bias), k, v

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                *past: torch.Tensor):
        t = self.cfg
        eps = t.rms_norm_eps
        cos, sin = mrope_cos_sin(position_ids, self.inv_freq, t.mrope_section)  # [B, S, R/2]
        bias = attention_bias(attention_mask, inputs_embeds.shape[1])  # [B, 1, 1, S, L]
        x, presents = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_layernorm.weight, eps)
            a, k, v = self.attention(layer.self_attn, h, cos, sin, bias, past[2 * i], past[2 * i + 1])
            x = x + rms_norm(a, layer.post_self_attn_layernorm.weight, eps)
            h = rms_norm(x, layer.post_attention_layernorm.weight, eps)
            gate, up = F.linear(h, layer.mlp.gate_up_proj.weight).chunk(2, dim=-1)  # [B, S, I] each
            m = F.linear(F.silu(gate) * up, layer.mlp.down_proj.weight, layer.mlp.down_proj.bias)
            x = x + rms_norm(m, layer.post_mlp_layernorm.weight, eps)
            presents += [k, v]
        x = rms_norm(x, self.norm.weight, eps)
        logits = F.linear(x, self.lm_head.weight[: t.vocab_size]).float()  # [B, S, V]
        return (logits, *presents)


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["inputs_embeds", "position_ids", "attention_mask", *past], ["logits", *present]


def decoder_dynamic_axes(num_layers: int) -> dict[str, dict[int, str]]:
    inputs, outputs = decoder_io_names(num_layers)
    axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "position_ids": {1: "batch", 2: "seq"},
            "attention_mask": {0: "batch", 1: "total_seq"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past_seq"} for n in inputs[3:]})
    axes.update({n: {0: "batch", 2: "total_seq"} for n in outputs[1:]})
    return axes


def decoder_example_inputs(t, dtype: torch.dtype, batch: int = 2, seq: int = 3, past: int = 4) -> tuple:
    """Tracing inputs: a past of length > 0, so the graph keeps the concat and every dynamic axis."""
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, seq, t.hidden_size, generator=g).to(dtype)
    pos = (torch.arange(seq) + past).view(1, 1, seq).expand(3, batch, seq).contiguous()
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    kv = [torch.randn(batch, t.num_key_value_heads, past, t.head_dim, generator=g).to(dtype)
          for _ in range(2 * t.num_hidden_layers)]
    return (embeds, pos, mask, *kv)
