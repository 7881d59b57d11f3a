"""INT4 weight-only (W4A16) for the decoder linears: the packed format, its torch reference, the linear method.

Format (per linear, after tensor-parallel sharding; K = this rank's input features, G = group size, 128):
    w[n, k] ~= (q[n, k] - zero[n, g]) * scale[n, g],   g = k // G,   q and zero in 0..15 (asymmetric)
  weight        int32 [N, K // 8]      word j of row n holds q[n, 8j + i] in bits 4i..4i+3 (low nibble first)
  weight_scale  fp16  [N, ceil(K / G)]  (fp32 and bf16 also run)
  weight_zero   fp16  [N, ceil(K / G)]  integer values 0..15 (the grid point of w = 0: every group's range holds 0)
K must be a multiple of 8; the last group may be short (down_proj's 13696 inputs split over 2 ranks: 53.5 groups).
Why this layout: rows stay output channels, so column- and row-parallel sharding cut it like the float weight;
K stays contiguous, so the batch-1 GEMV streams each row in 4-byte words (8 weights) per lane and the tl.dot GEMM
loads [BN, BK / 8] words and unpacks them in registers. The zero point is an integer so that a kernel gets q - zero
exactly from a nibble placed in a float's mantissa (plugins/int4_gemv.py: PRMT, then one FMA), and the scale is
one multiply per group and output channel: sum_k x (q - z) * s.
Kernels: plugins/int4_gemm.py and int4_gemv.py (Triton, CUDA); the CPU path is `int4_reference` (dequantize,
then an fp32 matmul), the oracle of the kernels' tests.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoglm_trt import plugins
from autoglm_trt.layers.linear import LinearBase

GROUP_SIZE = 128
PACK = 8  # 4-bit values per int32 word
QMAX = 15
SCALE_DTYPE = torch.float16
_SHIFTS = torch.arange(PACK, dtype=torch.int32) * 4  # [8] bit offset of nibble i


def num_groups(k: int, group: int) -> int:
    return -(-k // group)


def check_shape(n: int, k: int, group: int) -> None:
    if k % PACK or group < 16 or group & (group - 1):
        raise ValueError(f"INT4 needs in_features % 8 == 0 and a power-of-two group size >= 16, got K={k}, "
                         f"group={group}")
    if n < 1:
        raise ValueError(f"INT4 needs out_features >= 1, got {n}")


# ---- packing ----------------------------------------------------------------------------------------
def pack_int4(q: Tensor) -> Tensor:
    """q [N, K] integers in 0..15 -> int32 [N, K // 8]; nibble i of word j is q[:, 8j + i]."""
    n, k = q.shape
    if k % PACK:
        raise ValueError(f"INT4 packs 8 values a word: K={k} is not a multiple of 8")
    nib = q.to(torch.int32).reshape(n, k // PACK, PACK) << _SHIFTS.to(q.device)  # [N, K/8, 8]
    # NOTE: the nibbles occupy disjoint bits, so the sum is the bitwise or; int64 then a wrap to int32 keeps bit 31
    word = nib.to(torch.int64).sum(dim=-1)  # [N, K/8] in [0, 2**32)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_int4(packed: Tensor) -> Tensor:
    """int32 [N, K // 8] -> uint8 [N, K] in 0..15 (the inverse of pack_int4)."""
    n, words = packed.shape
    nib = (packed[:, :, None] >> _SHIFTS.to(packed.device)) & QMAX  # [N, K/8, 8]; >> is arithmetic, & drops the sign
    return nib.reshape(n, words * PACK).to(torch.uint8)


# ---- quantization -----------------------------------------------------------------------------------
def _grouped(w: Tensor, group: int) -> Tensor:
    """w [N, K] -> [N, ceil(K / G), G] fp32; a short last group is padded with copies of its first element
    (min / max unchanged)."""
    n, k = w.shape
    pad = num_groups(k, group) * group - k
    wf = w.detach().float()
    if pad:
        last = wf[:, (k // group) * group:(k // group) * group + 1]  # [N, 1]
        wf = torch.cat([wf, last.expand(n, pad)], dim=1)
    return wf.reshape(n, -1, group)


def group_range(w: Tensor, group: int, clip: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(lo, hi) [N, ceil(K / G)] of each group, widened to hold 0; clip (same shape, in (0, 1]) shrinks both
    ends to +-clip * max|w| of the group, as AWQ's clipping search does."""
    g = _grouped(w, group)
    lo, hi = g.amin(dim=-1).clamp(max=0.0), g.amax(dim=-1).clamp(min=0.0)
    if clip is not None:
        m = torch.maximum(-lo, hi) * clip.to(lo.device).float()
        lo, hi = torch.maximum(lo, -m), torch.minimum(hi, m)
    return lo, hi


def quantize_int4(w: Tensor, group: int = GROUP_SIZE, clip: Tensor | None = None,
                  scale_dtype: torch.dtype = SCALE_DTYPE) -> tuple[Tensor, Tensor, Tensor]:
    """w [N, K] -> (packed int32 [N, K/8], scale [N, ceil(K/G)], zero [N, ceil(K/G)]) with scale_dtype floats.

    Asymmetric min-max per group (clip: optional per-group shrink, see group_range), as AWQ and GPTQ quantize:
    scale = (hi - lo) / 15, zero = round(-lo / scale), q = clamp(round(w / scale) + zero, 0, 15); q is rounded
    against the stored 16-bit scale, so dequantize_int4 gives the grid points that the kernels read."""
    n, k = w.shape
    check_shape(n, k, group)
    lo, hi = group_range(w, group, clip)
    scale = ((hi - lo) / QMAX).to(scale_dtype)  # [N, Gs]
    sf = scale.float()
    live = sf > 0  # NOTE: an all-zero group (or one below the 16-bit range) keeps q = zero = 0: it dequantizes to 0
    zero = torch.where(live, torch.round(-lo / sf.clamp(min=1e-30)), torch.zeros_like(sf)).clamp(0, QMAX)
    s, z = _expand(sf, k, group), _expand(zero, k, group)  # [N, K] fp32
    q = torch.where(s > 0, torch.round(w.float() / s.clamp(min=1e-30)) + z, torch.zeros_like(s))
    return pack_int4(q.clamp(0, QMAX)), scale, zero.to(scale_dtype)


def _expand(v: Tensor, k: int, group: int) -> Tensor:
    """[N, ceil(K / G)] per group -> [N, K] per weight, fp32."""
    return v.float().repeat_interleave(group, dim=1)[:, :k]


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, group: int = GROUP_SIZE) -> Tensor:
    """-> fp32 [N, K]: (q - zero) * scale, per group."""
    q = unpack_int4(packed).float()  # [N, K]
    k = q.shape[1]
    return (q - _expand(zero, k, group)) * _expand(scale, k, group)


def int4_reference(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group: int = GROUP_SIZE,
                   bias: Tensor | None = None) -> Tensor:
    """x [M, K] @ dequantize(...)^T (+ bias) in fp32 -> x's dtype: the oracle of every INT4 kernel."""
    y = x.float() @ dequantize_int4(packed, scale, zero, group).t()  # [M, N]
    return (y if bias is None else y + bias.float()).to(x.dtype)


def quant_error(w: Tensor, group: int = GROUP_SIZE, clip: Tensor | None = None,
                weight: Tensor | None = None) -> float:
    """sum over weights of weight[k] * (w - dequantize(quantize(w)))**2: the diagonal output-error proxy
    (weight = E[x_k^2] of the inputs; None: plain squared weight error)."""
    d = (dequantize_int4(*quantize_int4(w, group, clip), group) - w.float()) ** 2  # [N, K]
    return float((d * weight.float()[None, :]).sum() if weight is not None else d.sum())


# ---- the linear method -------------------------------------------------------------------------------
def _kernels(t: Tensor):
    """plugins.int4_gemm for CUDA tensors (lazy import), None for the CPU reference."""
    return plugins.kernels_for("int4_gemm", t)


def w4a16(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group: int, bias: Tensor | None = None) -> Tensor:
    """x [M, K] @ INT4 weights^T (+ bias) -> [M, N] in x's dtype: Triton on CUDA, the reference elsewhere."""
    k = _kernels(x)
    if k is None:
        return int4_reference(x, packed, scale, zero, group, bias)
    return k.w4a16_linear(x, packed, scale, zero, group, bias)


class Int4Method:
    """LinearBase.quant_method for W4A16: reads layer.weight / weight_scale / weight_zero (see the module doc)."""

    name = "int4"

    def __init__(self, group: int = GROUP_SIZE) -> None:
        self.group = group

    def apply(self, layer: LinearBase, x: Tensor) -> Tensor:
        bias = None if layer.tp_dim == 1 else layer.bias  # NOTE: row-parallel adds its bias after the all-reduce
        y = w4a16(x.reshape(-1, x.shape[-1]), layer.weight, layer.weight_scale, layer.weight_zero, self.group,
                  bias)  # [T, N]
        return y.reshape(*x.shape[:-1], -1)


@torch.no_grad()
def quantize_linear(lin: LinearBase, group: int = GROUP_SIZE, clip: Tensor | None = None,
                    scale_dtype: torch.dtype = SCALE_DTYPE) -> None:
    """One linear (this rank's shard) to INT4 in place: weight -> packed int32, + weight_scale / weight_zero."""
    packed, scale, zero = quantize_int4(lin.weight, group, clip, scale_dtype)
    lin.weight = nn.Parameter(packed, requires_grad=False)
    lin.weight_scale = nn.Parameter(scale, requires_grad=False)
    lin.weight_zero = nn.Parameter(zero, requires_grad=False)
    lin.quant_method = Int4Method(group)


def prepare_linear(lin: LinearBase, group: int = GROUP_SIZE, scale_dtype: torch.dtype = SCALE_DTYPE) -> None:
    """Empty INT4 parameters in this linear's shape, for a quantized state_dict to load into strictly."""
    n, k = lin.out_features, lin.in_features
    check_shape(n, k, group)
    dev, gs = lin.weight.device, num_groups(k, group)
    lin.weight = nn.Parameter(torch.empty(n, k // PACK, dtype=torch.int32, device=dev), requires_grad=False)
    lin.weight_scale = nn.Parameter(torch.empty(n, gs, dtype=scale_dtype, device=dev), requires_grad=False)
    lin.weight_zero = nn.Parameter(torch.empty(n, gs, dtype=scale_dtype, device=dev), requires_grad=False)
    lin.quant_method = Int4Method(group)


def dequantized_linear(lin: LinearBase) -> Tensor:
    """What an INT4 linear computes with, as fp32 [N, K] (tests, accuracy reports)."""
    return dequantize_int4(lin.weight, lin.weight_scale, lin.weight_zero, lin.quant_method.group)


def float_linear(x: Tensor, lin: LinearBase) -> Tensor:
    """The same linear through F.linear on the dequantized weights (bias included when column-parallel)."""
    bias = None if lin.tp_dim == 1 else lin.bias
    return F.linear(x.float(), dequantized_linear(lin), None if bias is None else bias.float()).to(x.dtype)


__all__ = ["GROUP_SIZE", "Int4Method", "dequantize_int4", "dequantized_linear", "float_linear", "group_range",
           "int4_reference", "num_groups", "pack_int4", "prepare_linear", "quant_error", "quantize_int4",
           "quantize_linear", "unpack_int4", "w4a16"]
