"""RMSNorm with Hugging Face semantics, dispatching to the fused kernels in plugins/."""

from __future__ import annotations

import torch
from torch import nn

from autoglm_trt import plugins


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return plugins.rms_norm(x, self.weight, self.eps)


def add_norm(x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm):
    """The pre-norm junction: h = residual + x; returns (h, norm(h)) from one pass."""
    return plugins.norm_add_norm(x, residual, None, norm.weight, norm.eps)


def norm_add_norm(x: torch.Tensor, residual: torch.Tensor, norm_a: RMSNorm, norm_b: RMSNorm):
    """The sandwich-norm junction: h = residual + norm_a(x); returns (h, norm_b(h))."""
    return plugins.norm_add_norm(x, residual, norm_a.weight, norm_b.weight, norm_a.eps)
