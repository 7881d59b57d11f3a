"""GLM-4.1V vision tower: Conv3d patch embed, resized learned positions, 2D RoPE, 24 blocks, merger.

Parameter names follow Hugging Face (`visual.blocks.N.attn.qkv`, `visual.merger.gate_proj`, ...). The
tower is replicated on every tensor-parallel rank (it is ~0.6 B parameters and runs once per image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from autoglm_trt import plugins
from autoglm_trt.config import VisionConfig
from autoglm_trt.layers.attention import SDPA_BACKENDS
from autoglm_trt.layers.norm import RMSNorm, add_norm
from autoglm_trt.layers.rotary import VisionRotaryEmbedding


_GEOMETRY_CACHE = 4  # grids whose rotary tables and position embeddings stay on the device


def _version(t: torch.Tensor) -> int:
    """t's in-place write counter; -1 for inference tensors, which keep none (only weight loading writes the
    position table, and that comes before any forward)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def vision_position_ids(grid_thw: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(row, col) of each patch, laid out block-major over merge x merge blocks -> [N, 2] int64."""
    out = []
    for t, h, w in grid_thw:
        rows = torch.arange(h).unsqueeze(1).expand(h, w)
        cols = torch.arange(w).unsqueeze(0).expand(h, w)
        blocks = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(blocks).transpose(1, 2).flatten()
        cols = cols.reshape(blocks).transpose(1, 2).flatten()
        out.append(torch.stack((rows, cols), dim=-1).repeat(t, 1))
    return torch.cat(out)


class Glm4vVisionEmbeddings(nn.Module):
    """Learned position table (image_size/patch)^2 entries, resized to each image's grid by bicubic sampling."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size)

    def positions(self, hw: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """The table resized to each grid at hw [N, 2] (row, col) -> [N, C] in the table's dtype."""
        table = self.position_embedding.weight  # [S*S, C]
        side = int(table.shape[0] ** 0.5)
        table_2d = table.view(side, side, -1).permute(2, 0, 1).unsqueeze(0).float()  # [1, C, S, S]
        sizes = torch.tensor([[h, w] for t, h, w in grid_thw for _ in range(t * h * w)], dtype=torch.float32,
                             device=table.device)  # [N, 2]
        norm = (hw.to(table.device).float() + 0.5) / sizes * 2 - 1  # [N, 2] (row, col) in [-1, 1]
        grid = norm.flip(-1).view(1, -1, 1, 2)  # grid_sample wants (x=col, y=row)
        pos = F.grid_sample(table_2d, grid, mode="bicubic", align_corners=False, padding_mode="border")
        return pos.squeeze(0).squeeze(-1).t().to(table.dtype)  # [N, C]


class Glm4vVisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, self.head_dim)  # [N, 3, heads, D]
        plugins.vision_rope_(qkv, cos, sin)  # q and k rotated in place (fp32 math, one pass on GPU)
        q, k, v = qkv.unbind(1)  # [N, heads, D] each
        outs = []
        with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
            for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths)):  # one image frame each
                # NOTE: 4-D [1, heads, n_i, D]: SDPA's fused kernels need a batch dim; with 3-D input it fell
                # back to the math path, materialising [heads, n_i, n_i] scores (8 GiB for a screenshot)
                qi, ki, vi = (t.transpose(0, 1).unsqueeze(0) for t in (qi, ki, vi))
                o = F.scaled_dot_product_attention(qi, ki, vi)[0]  # [heads, n_i, D]
                outs.append(o.transpose(0, 1))  # [n_i, heads, D]
        return self.proj(torch.cat(outs).flatten(1))


class Glm4vVisionMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(plugins.silu_mul(self.gate_proj(x), self.up_proj(x)))  # [N, C] -> [N, H] -> [N, C]


class Glm4vVisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Glm4vVisionAttention(cfg)
        # NOTE: transformers sizes the block MLP by out_hidden_size, not intermediate_size.
        self.mlp = Glm4vVisionMlp(cfg.hidden_size, cfg.out_hidden_size)

    def forward(self, x, normed, next_norm: RMSNorm, cos, sin, lengths):
        """x: the residual stream, normed = norm1(x) -> (x out, next_norm(x out)); each add fused with its norm."""
        x, normed = add_norm(self.attn(normed, cos, sin, lengths), x, self.norm2)
        return add_norm(self.mlp(normed), x, next_norm)


class Glm4vVisionPatchMerger(nn.Module):
    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, context_dim, bias=False)
        self.up_proj = nn.Linear(dim, context_dim, bias=False)
        self.down_proj = nn.Linear(context_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.post_projection_norm(self.proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Glm4vVisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg
        kernel = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(c.in_channels, c.hidden_size, kernel_size=kernel, stride=kernel)
        self.post_conv_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.embeddings = Glm4vVisionEmbeddings(c)
        self.rotary = VisionRotaryEmbedding(c.head_dim, c.rope_theta)
        self.blocks = nn.ModuleList(Glm4vVisionBlock(c) for _ in range(c.depth))
        self.post_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        m = c.spatial_merge_size
        self.downsample = nn.Conv2d(c.hidden_size, c.out_hidden_size, kernel_size=m, stride=m)
        self.merger = Glm4vVisionPatchMerger(c.out_hidden_size, c.intermediate_size)
        self._geometry: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def geometry(self, grid_thw: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What depends on the grids only: rotary cos/sin [N, head_dim] and position embeddings [N, C_v].

        Kept for the last few grids (a phone sends one screen size over and over): their bicubic resize and
        the per-patch index lists otherwise cost ~5 ms of CPU and GPU time per screenshot.
        """
        table = self.embeddings.position_embedding.weight
        key = (tuple(map(tuple, grid_thw)), table.device, table.dtype, table.data_ptr(), _version(table))
        hit = self._geometry.get(key)
        if hit is None:
            hw = vision_position_ids(grid_thw, self.cfg.spatial_merge_size).to(table.device)  # [N, 2]
            hit = (*self.rotary.cos_sin(hw), self.embeddings.positions(hw, grid_thw))
            if len(self._geometry) >= _GEOMETRY_CACHE:
                self._geometry.pop(next(iter(self._geometry)))
            self._geometry[key] = hit
        return hit

    def forward(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixel_values [N, C*T*P*P] (patches of all images) -> [N / merge^2, out_hidden] image embeddings."""
        c, m = self.cfg, self.cfg.spatial_merge_size
        conv = self.patch_embed.proj
        x = F.linear(pixel_values.to(conv.weight.dtype), conv.weight.flatten(1), conv.bias)  # [N, C_v]
        x = self.post_conv_layernorm(x)
        cos, sin, pos = self.geometry(grid_thw)  # [N, head_dim] fp32 x 2, [N, C_v]
        x = x + pos
        lengths = [h * w for t, h, w in grid_thw for _ in range(t)]
        next_norms = [b.norm1 for b in self.blocks[1:]] + [self.post_layernorm]
        normed = self.blocks[0].norm1(x)
        for block, next_norm in zip(self.blocks, next_norms):
            x, normed = block(x, normed, next_norm, cos, sin, lengths)
        x = normed  # post_layernorm of the last residual stream
        x = x.view(-1, m, m, c.hidden_size).permute(0, 3, 1, 2)  # [N/m^2, C_v, m, m]
        x = self.downsample(x).view(-1, c.out_hidden_size)
        return self.merger(x)
