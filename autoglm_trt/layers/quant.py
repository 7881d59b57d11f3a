"""INT8 for the decoder linears (qkv_proj, o_proj, gate_up_proj, down_proj), as in-place transforms.

Modes:
- "int8-wo": W8A16. `weight` int8 [N, K] + `weight_scale` fp32 [N] (per output channel, symmetric,
  amax / 127); activations stay in the model dtype, the kernel dequantizes in its epilogue.
- "w8a8": SmoothQuant. Activation outliers migrate into the weights with per-input-channel scales
  s (x / s, W * s); s folds into the RMSNorm before qkv_proj (input_layernorm) and gate_up_proj
  (post_attention_layernorm), and for down_proj into the `up` rows of gate_up_proj (exact: the MLP
  is silu(gate) * up). o_proj has nothing foldable before it, so it keeps `smooth_scale` = 1 / s,
  multiplied into x by the activation-quantization kernel. Then int8 weights per output channel
  and int8 activations per token (dynamic), or per tensor from calibration (act_quant="static",
  `input_scale` fp32 [1]).
- "fp8": float8_e4m3fn weights per output channel, activations per token (dynamic) on the FP8 tensor
  cores; see layers/fp8.py.
Tensor parallelism: quantize AFTER sharding. Weight scales follow the local output channels;
smoothing scales are full-model vectors (from calibration, or from weights max-reduced over ranks)
sliced to the local input channels of row-parallel layers, so folded norms stay replicated.
The CPU references below (dequantize, then matmul in fp32) run on the CPU and are the test oracles.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoglm_trt import plugins
from autoglm_trt.layers import fp8, parallel
from autoglm_trt.layers.linear import LinearBase

DECODER_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
MODES = ("int8-wo", "w8a8", "fp8")  # this module's; "int4-awq" is layers/int4_model.py's
ACT_QUANT = ("dynamic", "static")
_EPS = 1e-8


# ---- names --------------------------------------------------------------------------------------
def linear_key(layer_idx: int, name: str) -> str:
    """The one name of a decoder linear everywhere (statistics, caches, ONNX): 'layers.3.mlp.down_proj'."""
    return f"layers.{layer_idx}.{name}"


def canonical_key(name: str) -> str:
    """'model.language_model.layers.3.mlp.down_proj' (any prefix) -> 'layers.3.mlp.down_proj'."""
    idx = name.find("layers.")
    if idx < 0:
        raise ValueError(f"{name!r} names no decoder layer")
    return name[idx:]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    text = getattr(model, "language_model", model)
    return text.layers


def decoder_linears(model: nn.Module) -> list[tuple[str, LinearBase]]:
    """(key, module) of every decoder linear, in execution order."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        out += [(linear_key(i, name), layer.get_submodule(name)) for name in DECODER_LINEARS]
    return out


# ---- numerics: quantizers and the CPU reference GEMMs ---------------------------------------------
def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (int8 [N, K], fp32 scale [N]); symmetric per output channel, scale = amax / 127."""
    scale = w.detach().float().abs().amax(dim=1).clamp(min=_EPS) / 127.0  # [N]
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_weight(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]  # [N, K] fp32


def quantize_per_token_reference(x: Tensor, mul: Tensor | None = None,
                                 static_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (int8 [M, K], fp32 scale [M]); what plugins.int8_gemm.quantize_per_token computes."""
    xf = x.float() if mul is None else x.float() * mul.float()
    if static_scale is not None:
        scale = static_scale.float().reshape(1).expand(xf.shape[0])
    else:
        scale = xf.abs().amax(dim=1).clamp(min=_EPS) / 127.0  # [M]
    q = torch.round((xf / scale[:, None]).clamp(-128, 127)).to(torch.int8)
    return q, scale.contiguous()


def w8a16_reference(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    y = (x.float() @ q.float().t()) * scale.float()  # [M, N]
    return (y if bias is None else y + bias.float()).to(x.dtype)


def w8a8_reference(xq: Tensor, x_scale: Tensor, q: Tensor, w_scale: Tensor, bias: Tensor | None,
                   out_dtype: torch.dtype) -> Tensor:
    y = (xq.float() @ q.float().t()) * x_scale.float()[:, None] * w_scale.float()[None, :]
    return (y if bias is None else y + bias.float()).to(out_dtype)


def _kernels(t: Tensor):
    """plugins.int8_gemm for CUDA tensors (lazy import), None for the CPU references."""
    return plugins.kernels_for("int8_gemm", t)


# ---- quant methods (LinearBase.quant_method) ----------------------------------------------------------
def _bias(layer: LinearBase) -> Tensor | None:
    return None if layer.tp_dim == 1 else layer.bias  # NOTE: row-parallel adds its bias after the all-reduce


def w8a16(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None, gemv_one_row: bool = False) -> Tensor:
    """x [M, K] @ (q int8 [N, K] * scale [N])^T (+ bias): Triton on CUDA, the reference elsewhere.
    gemv_one_row: a single row always takes the GEMV (large N: no split-K needed; the LM head)."""
    k = _kernels(x)
    if k is None:
        return w8a16_reference(x, q, scale, bias)
    if gemv_one_row and x.shape[0] == 1 and x.stride(1) == 1:
        return k.gemv(x, q, scale, bias)
    return k.w8a16_matmul(x, q, scale, bias)


class Int8WeightOnlyMethod:
    name = "int8-wo"

    def apply(self, layer: LinearBase, x: Tensor) -> Tensor:
        y = w8a16(x.reshape(-1, x.shape[-1]), layer.weight, layer.weight_scale, _bias(layer))  # [T, N]
        return y.reshape(*x.shape[:-1], -1)


def quantize_lm_head(head: nn.Module) -> None:
    """The LM head (this rank's vocabulary rows) to int8 per row + fp32 scales: W8A16 in every INT8 mode."""
    if head.weight.dtype != torch.int8:
        q, scale = quantize_weight(head.weight)
        head.weight = nn.Parameter(q, requires_grad=False)
        head.weight_scale = nn.Parameter(scale.to(q.device), requires_grad=False)


class Fp8Method:
    name = "fp8"

    def apply(self, layer: LinearBase, x: Tensor) -> Tensor:
        return fp8.fp8_linear_nd(x, layer.weight, layer.weight_scale, _bias(layer), _kernels(x))  # [..., N]


_PLAIN_METHODS = {"int8-wo": Int8WeightOnlyMethod, "fp8": Fp8Method}  # no smoothing, no calibrated scales


class W8A8Method:
    name = "w8a8"

    def __init__(self, static: bool = False) -> None:
        self.static = static

    def apply(self, layer: LinearBase, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [T, K]
        mul = getattr(layer, "smooth_scale", None)
        static = layer.input_scale if self.static else None
        k = _kernels(x2)
        if k is not None:
            xq, xs = k.quantize_per_token(x2, mul, static)
            y = k.w8a8_matmul(xq, xs, layer.weight, layer.weight_scale, _bias(layer), out_dtype=x.dtype)
        else:
            xq, xs = quantize_per_token_reference(x2, mul, static)
            y = w8a8_reference(xq, xs, layer.weight, layer.weight_scale, _bias(layer), x.dtype)
        return y.reshape(*x.shape[:-1], -1)


class SmoothedFloatMethod:
    """Float linear with an explicit input factor: y = (x * smooth_scale) W^T (o_proj after smoothing)."""

    name = "smoothed-float"

    def apply(self, layer: LinearBase, x: Tensor) -> Tensor:
        return F.linear(x * layer.smooth_scale.to(x.dtype), layer.weight, _bias(layer))


# ---- SmoothQuant scales and their folding ----------------------------------------------------------
def smooth_scales(act_amax: Tensor, weight_amax: Tensor, alpha: float) -> Tensor:
    """s = amax_x^alpha / amax_w^(1 - alpha) per input channel; 1 where the channel never fired."""
    a, w = act_amax.float(), weight_amax.float().clamp(min=1e-5)
    s = (a.clamp(min=1e-5) ** alpha / w ** (1.0 - alpha)).clamp(1e-5, 1e5)
    return torch.where(a > 0, s, torch.ones_like(s))


def weight_input_amax(layer: LinearBase) -> Tensor:
    """max |W[:, j]| over ALL output channels (max-reduced over ranks for column-parallel layers)."""
    amax = layer.weight.detach().float().abs().amax(dim=0)  # [K]
    if layer.tp_dim == 0 and parallel.get_tp_size() > 1:
        import torch.distributed as dist

        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=parallel._STATE.group)
    return amax


def local_slice(vec: Tensor, layer: LinearBase) -> Tensor:
    """A full-model input-channel vector -> this rank's part (row-parallel layers split their input)."""
    if vec.numel() == layer.in_features:
        return vec
    tp = parallel.get_tp_size()
    if layer.tp_dim == 1 and vec.numel() == layer.in_features * tp:
        return vec.chunk(tp)[parallel.get_tp_rank()]
    raise ValueError(f"a vector of {vec.numel()} channels does not fit a linear with {layer.in_features} inputs")


def compute_smooth_scales(model: nn.Module, channel_amax: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """SmoothQuant s (this rank's input channels) for every decoder linear found in channel_amax."""
    amax = {canonical_key(k): v for k, v in channel_amax.items()}
    out = {}
    for key, lin in decoder_linears(model):
        if key in amax:
            a = local_slice(amax[key].to(lin.weight.device), lin)
            out[key] = smooth_scales(a, weight_input_amax(lin), alpha)
    return out


@torch.no_grad()
def apply_smoothing(model: nn.Module, scales: Mapping[str, Tensor]) -> None:
    """Fold s into the model in place (float; the function is unchanged up to rounding).

    qkv_proj / gate_up_proj: norm weight / s, W * s. down_proj: up rows of gate_up_proj / s, W * s.
    o_proj: W * s and an explicit `smooth_scale` = 1 / s on its input (SmoothedFloatMethod).
    """
    scales = {canonical_key(k): v for k, v in scales.items()}
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        for name, lin in zip(DECODER_LINEARS, (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)):
            s = scales.get(linear_key(i, name))
            if s is None:
                continue
            s = local_slice(s.to(lin.weight.device).float(), lin)  # [K]
            _scale_(lin.weight, s[None, :])
            if name == "self_attn.qkv_proj":
                _scale_(layer.input_layernorm.weight, 1.0 / s)
            elif name == "mlp.gate_up_proj":
                _scale_(layer.post_attention_layernorm.weight, 1.0 / s)
            elif name == "mlp.down_proj":
                half = mlp.gate_up_proj.weight.shape[0] // 2
                _scale_(mlp.gate_up_proj.weight[half:], 1.0 / s[:, None])
            else:
                lin.smooth_scale = nn.Parameter((1.0 / s).contiguous(), requires_grad=False)
                lin.quant_method = SmoothedFloatMethod()


def _scale_(t: Tensor, factor: Tensor) -> None:
    t.copy_((t.float() * factor).to(t.dtype))


# ---- the transforms --------------------------------------------------------------------------------
def _check_mode(mode: str, act_quant: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if act_quant not in ACT_QUANT:
        raise ValueError(f"act_quant must be one of {', '.join(ACT_QUANT)}, got {act_quant!r}")


def _calibration_inputs(act_scales, smooth_alpha: float) -> tuple[dict | None, dict | None, dict | None]:
    """act_scales (a CalibrationResult or {key: per-channel amax [K]}) -> (channel amax, s, static amax)."""
    if act_scales is None:
        return None, None, None
    if hasattr(act_scales, "channel_amax"):  # a CalibrationResult (duck-typed: layers/ imports no calibration)
        same = abs(act_scales.smooth_alpha - smooth_alpha) < 1e-9
        return (dict(act_scales.channel_amax), dict(act_scales.smooth_scales) if same else None,
                dict(act_scales.smoothed_amax) if same else None)
    bad = [k for k, v in act_scales.items() if v.dim() != 1 or v.numel() < 2]
    if bad:
        raise ValueError(f"act_scales[{bad[0]!r}] must be the per-input-channel amax [K] of the layer's input "
                         "(CalibrationResult.channel_amax), not a per-tensor scale")
    return dict(act_scales), None, None


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, act_scales=None, smooth_alpha: float = 0.5, *,
                   act_quant: str = "dynamic", lm_head: bool = True) -> None:
    """The one quantization transform: the decoder linears (and the LM head, weight-only, unless
    lm_head=False) in place, after tensor-parallel sharding; see the module docstring.

    act_scales: a calibration.CalibrationResult, or {linear key: per-input-channel amax [K]} (any key prefix
    before 'layers.'). Used by "w8a8" only: without it, W8A8 runs without smoothing (dynamic only).
    The build runs it on each rank's float weights; loading a checkpoint with a quant mode runs it on the
    loaded model; loading an engine directory runs it on a meta-device model, where it only lays out the
    quantized parameters (no numbers exist there, so no calibration is needed) that the rank file fills.
    """
    _check_mode(mode, act_quant)
    meta = next(model.parameters()).is_meta
    amax, scales, static_amax = _calibration_inputs(act_scales, smooth_alpha)
    if mode == "w8a8" and amax is not None:
        if scales is None:
            scales = compute_smooth_scales(model, amax, smooth_alpha)
        apply_smoothing(model, scales)
    if mode == "w8a8" and act_quant == "static" and amax is None and not meta:
        raise ValueError("act_quant='static' needs calibration statistics (act_scales)")
    scales = {canonical_key(k): v for k, v in (scales or {}).items()}
    amax = {canonical_key(k): v for k, v in (amax or {}).items()}
    if mode == "fp8":
        fp8.check_device(next(model.parameters()).device)
    for key, lin in decoder_linears(model):
        _quantize_linear(key, lin, mode, act_quant, amax, scales, static_amax)
    head = getattr(model, "lm_head", None) if lm_head else None  # NOTE: the builder's one-layer holders have none
    if head is not None:
        quantize_lm_head(head)
    model.quant_config = {"mode": mode, "act_quant": act_quant if mode == "w8a8" else None,
                          "smooth_alpha": smooth_alpha if mode == "w8a8" and scales else None,
                          "lm_head": "int8" if head is not None else None}


def _quantize_linear(key: str, lin: LinearBase, mode: str, act_quant: str, amax: dict, scales: dict,
                     static_amax: dict | None) -> None:
    q, w_scale = (fp8.quantize_weight if mode == "fp8" else quantize_weight)(lin.weight)
    lin.weight = nn.Parameter(q, requires_grad=False)
    lin.weight_scale = nn.Parameter(w_scale.to(q.device), requires_grad=False)
    if mode in _PLAIN_METHODS:
        lin.quant_method = _PLAIN_METHODS[mode]()
        return
    if key.endswith("o_proj") and not hasattr(lin, "smooth_scale"):
        lin.smooth_scale = nn.Parameter(torch.ones(lin.in_features, device=q.device), requires_grad=False)
    if act_quant == "static":
        a = torch.ones((), device=q.device) if q.is_meta else _static_amax(key, lin, amax, scales, static_amax)
        lin.input_scale = nn.Parameter((a.float().clamp(min=_EPS) / 127.0).reshape(1).to(q.device),
                                       requires_grad=False)
    lin.quant_method = W8A8Method(static=act_quant == "static")


def quantize_vision(model: nn.Module, mode: str) -> None:
    """fp8 mode: the vision blocks' linears to e4m3 too, at load time (layers/fp8.py); other modes keep them.
    NOTE: the patch merger stays bf16: it writes the decoder's image embeddings, and on the tiny checkpoint
    it alone moved them by 8% (relative) in e4m3, the 24 blocks by 0.03%, for 7% of the tower's FLOPs."""
    tower = getattr(model, "visual", None)
    if mode != "fp8" or tower is None:
        return
    weight = next(tower.parameters())
    fp8.check_device(weight.device)
    fp8.quantize_linears(tower.blocks, _kernels(weight))


def _static_amax(key: str, lin: LinearBase, amax: dict, scales: dict, static_amax: dict | None) -> Tensor:
    """Per-tensor amax of the (smoothed) input: calibrated when available, else max_j amax_j / s_j."""
    if static_amax and key in static_amax:
        return static_amax[key].reshape(())
    a = local_slice(amax[key].to(lin.weight.device).float(), lin)
    s = scales.get(key)
    return (a / local_slice(s.to(a.device).float(), lin)).max() if s is not None else a.max()
