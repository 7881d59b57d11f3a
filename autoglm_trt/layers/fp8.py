"""FP8 (e4m3) for the decoder linears: the "fp8" quant mode, as vLLM's `--quantization fp8` does it.

Weights: float8_e4m3fn [N, K] with one fp32 scale per output channel (amax / 448), quantized once at load.
Activations: per token, dynamic (amax / 448 per row, one Triton pass), and the product on the FP8 tensor
cores through `torch._scaled_mm` (row-wise scales, bf16 out; Hopper and Ada: compute capability >= 8.9).
Decode steps of one or two rows take the Triton GEMV with the fp8 weights and bf16 activations instead (the weight
bytes are the cost, half of bf16's), as W8A16 does for int8; from three rows cuBLAS's FP8 GEMM is faster. So the
activations are rounded to e4m3 only from three rows on: a greedy request's tokens can depend on how many others
share its decode step (as they did at the old 8 / 9 boundary).
The vision blocks' linears take the same mode at load time (`Fp8Linear`, `quantize_linears`): their weights
stay bf16 on disk and in engine directories, as vLLM quantizes a bf16 checkpoint's vision encoder under
`--quantization fp8`; a screenshot's 13k patches make those GEMMs compute-bound.
The CPU reference (fake-quantized activations, dequantized weights, fp32 matmul) is the test oracle.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from autoglm_trt.errors import UserError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# at most this many rows -> the weight-only GEMV; from 3 rows cuBLAS's FP8 GEMM wins (H100, benchmarks/profile_steps.py:
# a decode step at batch 4 / 8 took 8.8 / 14.2 ms through the GEMV, 7.7 / 7.7 ms through _scaled_mm; 6.6 vs 7.6 at 2)
GEMV_ROWS = 2
MIN_CAPABILITY = (8, 9)
_EPS = 1e-12


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (float8_e4m3fn [N, K], fp32 scale [N]): symmetric per output channel, scale = amax / 448."""
    scale = w.detach().float().abs().amax(dim=1).clamp(min=_EPS) / FP8_MAX  # [N]
    q = (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_rows_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], fp32 scale [M]): what plugins.int8_gemm.quantize_per_token(fp8=True) does."""
    xf = x.float()
    scale = xf.abs().amax(dim=1).clamp(min=_EPS) / FP8_MAX  # [M]
    return (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_reference(x: Tensor, q: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [M, K] (quantized per row here) @ (q [N, K] * w_scale [N])^T (+ bias), fp32 math -> x's dtype."""
    xq, xs = quantize_rows_reference(x)
    y = (xq.float() @ q.float().t()) * xs[:, None] * w_scale.float()[None, :]  # [M, N]
    return (y if bias is None else y + bias.float()).to(x.dtype)


def check_device(device: torch.device) -> None:
    """FP8 tensor cores or the CPU reference; anything else is refused before the weights are touched."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise UserError(f"--quant fp8 needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper); {name} has "
                        f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}. Use int8-wo or w8a8.")


def fp8_linear(x: Tensor, q: Tensor, w_scale: Tensor, bias: Tensor | None, kernels) -> Tensor:
    """x [M, K] @ fp8 weights -> [M, N] in x's dtype; `kernels` is plugins.int8_gemm (None: the CPU reference)."""
    if kernels is None:
        return fp8_reference(x, q, w_scale, bias)
    if x.shape[0] <= GEMV_ROWS and x.stride(1) == 1:
        return kernels.gemv(x, q, w_scale, bias)
    xq, xs = kernels.quantize_per_token(x, fp8=True)  # [M, K] fp8, [M] fp32
    y = torch._scaled_mm(xq, q.t(), scale_a=xs[:, None], scale_b=w_scale[None, :], out_dtype=x.dtype)  # [M, N]
    return y if bias is None else y.add_(bias)


def fp8_linear_nd(x: Tensor, q: Tensor, w_scale: Tensor, bias: Tensor | None, kernels) -> Tensor:
    """fp8_linear over any leading dims: x [..., K] -> [..., N]."""
    y = fp8_linear(x.reshape(-1, x.shape[-1]), q, w_scale, bias, kernels)  # [T, N]
    return y.reshape(*x.shape[:-1], q.shape[0])


class Fp8Linear(nn.Module):
    """An nn.Linear with e4m3 weights (one scale per output channel) run by fp8_linear; any leading dims."""

    def __init__(self, lin: nn.Linear, kernels) -> None:
        super().__init__()
        q, scale = quantize_weight(lin.weight)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = nn.Parameter(q, requires_grad=False)  # [N, K] e4m3
        self.weight_scale = nn.Parameter(scale.to(q.device), requires_grad=False)  # [N] fp32
        self.bias = lin.bias
        self.kernels = kernels  # plugins.int8_gemm, or None for the CPU reference

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear_nd(x, self.weight, self.weight_scale, self.bias, self.kernels)  # [..., N]


@torch.no_grad()
def quantize_linears(root: nn.Module, kernels) -> int:
    """Every nn.Linear inside `root` -> Fp8Linear, in place; returns how many."""
    found = [(name, mod) for name, mod in root.named_modules() if type(mod) is nn.Linear]
    for name, lin in found:
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, attr, Fp8Linear(lin, kernels))
    return len(found)


__all__ = ["FP8", "FP8_MAX", "Fp8Linear", "check_device", "fp8_linear", "fp8_linear_nd", "fp8_reference",
           "quantize_linears", "quantize_rows_reference", "quantize_weight"]
