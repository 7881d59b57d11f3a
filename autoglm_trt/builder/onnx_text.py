"""The text decoder as one ONNX-exportable function for prefill and decode, over our model's own modules.

Same function as Glm4vTextModel + lm_head: the norms, projections, M-RoPE, MLP and LM head are the model's
modules (their plugins take the torch reference path on the CPU, where export runs). The attention alone is
written here, over explicit past/present KV tensors and a padding mask: NOTE the model's attention reads and
writes the paged KV cache through block tables and slot mappings, which have no place in a standard decoder
graph (the past/present convention of onnxruntime-genai and TensorRT); tests/builder/test_export.py holds
the graph to the model's logits.

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
        self.cfg = model.cfg.text
        self.text = model.language_model
        self.lm_head = model.lm_head

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, heads * D] -> [B, heads, S, D], M-RoPE applied by the model's rotary module."""
        b, s, d = x.shape[0], x.shape[1], self.cfg.head_dim
        x = self.text.rotary(x.reshape(b * s, -1, d), cos, sin)  # [B*S, heads, D]
        return x.reshape(b, s, -1, d).transpose(1, 2)

    def attention(self, attn, x, cos, sin, bias, past_k, past_v):
        """x [B, S, H] -> out [B, S, H], present k/v [B, kvH, P+S, D]."""
        b, s = x.shape[0], x.shape[1]
        hq, hkv, d = attn.num_heads, attn.num_kv_heads, self.cfg.head_dim
        q, k, v = attn.qkv_proj(x).split([hq * d, hkv * d, hkv * d], dim=-1)  # [B, S, (H + 2 kvH) D]
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)  # [B, H, S, D], [B, kvH, S, D]
        k = torch.cat((past_k, k), dim=2)  # [B, kvH, L, D]
        v = torch.cat((past_v, v.reshape(b, s, hkv, d).transpose(1, 2)), dim=2)
        q5 = q.reshape(b, hkv, hq // hkv, s, d).float()  # [B, kvH, G, S, D]: head h reads kv head h // G
        scores = torch.matmul(q5, k.float().unsqueeze(2).transpose(-1, -2)) * (d ** -0.5)  # [B, kvH, G, S, L]
        probs = torch.softmax(scores + bias, dim=-1)
        out = torch.matmul(probs, v.float().unsqueeze(2)).to(x.dtype)  # [B, kvH, G, S, D]
        out = out.reshape(b, hq, s, d).transpose(1, 2).reshape(b, s, hq * d)
        return attn.o_proj(out), k, v

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                *past: torch.Tensor):
        b, s = inputs_embeds.shape[0], inputs_embeds.shape[1]
        cos, sin = self.text.rotary.cos_sin(position_ids.reshape(3, b * s))  # [B*S, R/2]
        bias = attention_bias(attention_mask, s)  # [B, 1, 1, S, L]
        x, presents = inputs_embeds, []
        for i, layer in enumerate(self.text.layers):
            a, k, v = self.attention(layer.self_attn, layer.input_layernorm(x), cos, sin, bias, past[2 * i],
                                     past[2 * i + 1])
            x = x + layer.post_self_attn_layernorm(a)
            x = x + layer.post_mlp_layernorm(layer.mlp(layer.post_attention_layernorm(x)))
            presents += [k, v]
        logits = F.linear(self.text.norm(x), self.lm_head.weight[: self.cfg.vocab_size]).float()  # [B, S, V]
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
