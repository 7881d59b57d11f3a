"""Rotary embeddings: the text decoder's partial, interleaved M-RoPE and the vision tower's 2D RoPE."""

from __future__ import annotations

import torch
from torch import nn


class MRotaryEmbedding(nn.Module):
    """M-RoPE over the first `rotary_dim` dims of each head, GPT-J style (pairs x[2i], x[2i+1]).

    The rotary frequency pairs are split by `mrope_section` (e.g. [8, 12, 12] of 32 pairs): the first
    section rotates by the temporal position, the second by the height, the third by the width.
    """

    def __init__(self, head_dim: int, rotary_dim: int, theta: float, mrope_section: tuple[int, ...]) -> None:
        super().__init__()
        self.head_dim, self.rotary_dim = head_dim, rotary_dim
        self.theta, self.mrope_section = theta, tuple(mrope_section)
        self.register_buffer("inv_freq", torch.empty(rotary_dim // 2, dtype=torch.float32), persistent=False)  # [rotary_dim / 2]
        self.register_buffer("axis", torch.empty(rotary_dim // 2, dtype=torch.long), persistent=False)  # in {0, 1, 2}
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Compute the frequency tables in place (again after a meta-built model gets storage)."""
        dev = self.inv_freq.device
        if dev.type == "meta":
            return
        r = self.rotary_dim
        self.inv_freq.copy_(1.0 / (self.theta ** (torch.arange(0, r, 2, dtype=torch.float, device=dev) / r)))
        self.axis.copy_(torch.cat([torch.full((n,), i % 3, dtype=torch.long, device=dev)
                                   for i, n in enumerate(self.mrope_section)]))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, T] -> cos, sin [T, rotary_dim / 2] (float32)."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [3, T, R/2]
        angle = freqs.gather(0, self.axis.view(1, 1, -1).expand(1, freqs.shape[1], -1)).squeeze(0)  # [T, R/2]
        return angle.cos(), angle.sin()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim]; rotates the first rotary_dim dims in interleaved pairs."""
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        pairs = rot.unflatten(-1, (-1, 2))  # [T, heads, R/2, 2]
        x0, x1 = pairs[..., 0], pairs[..., 1]
        c = cos.to(x.dtype).unsqueeze(1)  # [T, 1, R/2]
        s = sin.to(x.dtype).unsqueeze(1)
        out = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
        return torch.cat((out, rest), dim=-1)


class VisionRotaryEmbedding(nn.Module):
    """2D RoPE for the vision tower: half the pairs rotate by the patch row, half by the column."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.spatial, self.theta = head_dim // 2, theta
        self.register_buffer("inv_freq", torch.empty(head_dim // 4, dtype=torch.float32), persistent=False)  # [head_dim / 4]
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Compute the frequency table in place (again after a meta-built model gets storage)."""
        dev = self.inv_freq.device
        if dev.type != "meta":
            s = self.spatial
            self.inv_freq.copy_(1.0 / (self.theta ** (torch.arange(0, s, 2, dtype=torch.float, device=dev) / s)))

    def cos_sin(self, hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hw [N, 2] (row, col) -> cos, sin [N, head_dim] (float32), laid out [h, w, h, w]."""
        freqs = hw.float().unsqueeze(-1) * self.inv_freq  # [N, 2, head_dim / 4]
        half = freqs.flatten(1)  # [N, head_dim / 2]: h freqs then w freqs
        angle = torch.cat((half, half), dim=-1)
        return angle.cos(), angle.sin()
