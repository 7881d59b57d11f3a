"""The INT4 transform of a whole model (mode "int4-awq"): fold AWQ scales, search clips, quantize, in place.

Inputs (full-model vectors keyed by linear key, 'layers.3.mlp.down_proj'; any prefix before 'layers.'):
  awq_scales  {key: s [K]}   per input channel, from calibration.awq (None: plain round-to-nearest)
  clip_stats  {key: E[x^2] [K]} the input's second moment per channel (None: no clipping search)
Steps, on this rank's shard (quantize AFTER tensor-parallel sharding; vectors are sliced like SmoothQuant's):
  1. fold s into the model, exactly (the float function is unchanged up to rounding): x / s goes into the op that
     produces the input, W * s into the linear:
       qkv_proj     input_layernorm.weight / s
       gate_up_proj post_attention_layernorm.weight / s
       down_proj    the `up` rows of gate_up_proj / s (the MLP is silu(gate) * up)
       o_proj       the `v` rows (and bias) of qkv_proj / s: attention mixes v rows per kv head, so s must be
                    equal across the query heads that share a kv head (calibration.awq ties them so)
  2. per linear, per group of G inputs: the clip ratio (of a grid) minimising sum_k E[(x_k / s_k)^2] dW_k^2
     (AWQ's clipping search with a diagonal output-error proxy: replayable from statistics alone)
  3. layers/int4.py's format (weight / weight_scale / weight_zero); the LM head INT8 per row (W8A16), as the
     INT8 modes do.
The same call at build time and at load time gives the same tensors (deterministic in weights and inputs).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from autoglm_trt.layers import int4, parallel
from autoglm_trt.layers.linear import LinearBase
from autoglm_trt.layers.quant import canonical_key, decoder_layers, decoder_linears, local_slice, quantize_lm_head

MODE = "int4-awq"
CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(10))  # 1.0 .. 0.55, as AWQ's max_shrink 0.5 (its 20 steps halved)
_ROW_CHUNK = 4096  # rows per clip-search chunk: bounds the fp32 temporaries on the 9B's gate_up (27392 rows)


# ---- folding ----------------------------------------------------------------------------------------
def heads_of_kv(attn: nn.Module) -> Tensor:
    """[num_heads * head_dim] (this rank's o_proj inputs) -> index of the v channel (kv head, d) each one reads."""
    qkv = attn.qkv_proj
    per_kv = qkv.num_heads // qkv.num_kv_heads
    h = torch.arange(qkv.num_heads * qkv.head_dim) // qkv.head_dim
    d = torch.arange(qkv.num_heads * qkv.head_dim) % qkv.head_dim
    return (h // per_kv) * qkv.head_dim + d  # [H * D] into [kvH * D]


def _v_scale(attn: nn.Module, s_o: Tensor) -> Tensor:
    """o_proj's s [H * D] -> the factor of each v channel [kvH * D]; refuses an s that differs within a kv group."""
    idx = heads_of_kv(attn).to(s_o.device)
    s_v = torch.empty(int(idx.max()) + 1, device=s_o.device).scatter_(0, idx, s_o)  # [kvH * D]
    if not torch.allclose(s_v[idx], s_o, rtol=1e-6, atol=0.0):
        raise ValueError("o_proj's AWQ scales differ between query heads of one kv head: they cannot fold into v")
    return s_v


def _scale_(t: Tensor, factor: Tensor) -> None:
    t.copy_((t.float() * factor).to(t.dtype))


@torch.no_grad()
def fold_awq_scales(model: nn.Module, scales: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Fold s (full-model vectors) into this rank's model in place; returns {key: this rank's s}."""
    scales = {canonical_key(k): v for k, v in scales.items()}
    local = {}
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        for name, lin in (("self_attn.qkv_proj", attn.qkv_proj), ("self_attn.o_proj", attn.o_proj),
                          ("mlp.gate_up_proj", mlp.gate_up_proj), ("mlp.down_proj", mlp.down_proj)):
            s = scales.get(f"layers.{i}.{name}")
            if s is None:
                continue
            s = local_slice(s.to(lin.weight.device).float(), lin)  # [K]
            _fold_one(layer, name, lin, s)
            local[f"layers.{i}.{name}"] = s
    return local


def _fold_one(layer: nn.Module, name: str, lin: LinearBase, s: Tensor) -> None:
    _scale_(lin.weight, s[None, :])
    if name == "self_attn.qkv_proj":
        _scale_(layer.input_layernorm.weight, 1.0 / s)
    elif name == "mlp.gate_up_proj":
        _scale_(layer.post_attention_layernorm.weight, 1.0 / s)
    elif name == "mlp.down_proj":
        up = layer.mlp.gate_up_proj.weight[layer.mlp.gate_up_proj.weight.shape[0] // 2:]
        _scale_(up, 1.0 / s[:, None])
    else:  # o_proj: the v rows of qkv_proj (and their bias)
        qkv = layer.self_attn.qkv_proj
        s_v = _v_scale(layer.self_attn, s)  # [kvH * D]
        start = (qkv.num_heads + qkv.num_kv_heads) * qkv.head_dim
        _scale_(qkv.weight[start:], 1.0 / s_v[:, None])
        if qkv.bias is not None:
            _scale_(qkv.bias[start:], 1.0 / s_v)


# ---- clipping search --------------------------------------------------------------------------------
@torch.no_grad()
def search_clip(w: Tensor, group: int, weight: Tensor, grid: tuple[float, ...] = CLIP_GRID) -> Tensor:
    """Per group, the clip ratio of `grid` minimising sum_k weight[k] * (w - dequant(quant(w, clip)))^2 -> [N, Gs]."""
    n, k = w.shape
    out = []
    for r0 in range(0, n, _ROW_CHUNK):
        rows = w[r0:r0 + _ROW_CHUNK].float()
        best_err, best = None, None
        for ratio in grid:
            clip = torch.full((rows.shape[0], int4.num_groups(k, group)), ratio, device=w.device)
            d = (int4.dequantize_int4(*int4.quantize_int4(rows, group, clip), group) - rows) ** 2  # [n, K]
            err = _group_sum(d * weight.float()[None, :], group)  # [n, Gs]
            if best is None:
                best_err, best = err, clip
            else:
                better = err < best_err
                best_err, best = torch.where(better, err, best_err), torch.where(better, clip, best)
        out.append(best)
    return torch.cat(out)


def _group_sum(d: Tensor, group: int) -> Tensor:
    n, k = d.shape
    pad = int4.num_groups(k, group) * group - k
    return torch.nn.functional.pad(d, (0, pad)).reshape(n, -1, group).sum(-1)


# ---- the transform ----------------------------------------------------------------------------------
@torch.no_grad()
def quantize_model_int4(model: nn.Module, awq_scales: Mapping[str, Tensor] | None = None,
                        clip_stats: Mapping[str, Tensor] | None = None, *, group: int = int4.GROUP_SIZE,
                        lm_head: bool = True) -> None:
    """The "int4-awq" transform in place (module docstring); sets model.quant_config."""
    local_s = fold_awq_scales(model, awq_scales) if awq_scales else {}
    m2 = {canonical_key(k): v for k, v in (clip_stats or {}).items()}
    for key, lin in decoder_linears(model):
        clip = None
        if key in m2:
            x2 = local_slice(m2[key].to(lin.weight.device).float(), lin)  # [K] E[x^2] of the float input
            s = local_s.get(key)
            clip = search_clip(lin.weight, group, x2 if s is None else x2 / s ** 2)  # the input is now x / s
        int4.quantize_linear(lin, group, clip)
    head = getattr(model, "lm_head", None) if lm_head else None  # NOTE: the builder's one-layer holders have none
    if head is not None:
        quantize_lm_head(head)
    model.quant_config = quant_config(group, bool(awq_scales), bool(clip_stats), head is not None)


def quant_config(group: int, awq: bool, clip: bool, lm_head: bool) -> dict:
    """What a manifest records about an INT4 build."""
    return {"mode": MODE, "group_size": group, "awq": awq, "clip_search": clip, "scale_dtype": "float16",
            "lm_head": "int8" if lm_head else None, "tp_size": parallel.get_tp_size()}


__all__ = ["CLIP_GRID", "MODE", "fold_awq_scales", "heads_of_kv", "quant_config",
           "quantize_model_int4", "search_clip"]
