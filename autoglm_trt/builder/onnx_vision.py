"""The vision encoder as an ONNX-exportable function with tensor inputs only (any number of images).

    pixel_values [N, C*T*P*P]   patches of all images, in the image processor's order
    patch_pos    [N, 2] int64   (row, col) of each patch in its image, block-major over 2x2 merge blocks
    patch_grid   [N, 2] int64   (grid_h, grid_w) of the image each patch belongs to
    segment_ids  [N] int64      attention segment (one per image frame): patches attend within theirs
 -> image_embeds [N / 4, out_hidden]

Rotary cos/sin, the bicubic-resized position table (GridSample) and the block-diagonal attention mask
are computed in the graph from these; `vision_graph_inputs(grid_thw)` makes them for a runtime.

The norms, projections, rotary tables, MLPs and patch merger are the tower's own modules. Written here, and
why: NOTE the tower takes its images' grids as a Python list (geometry per grid, cached; attention as one
SDPA call per image, rotary in place through a plugin), which a graph over any number of images of any size
cannot hold; so the position-table resampling and the attention over `segment_ids` are tensor ops here, and
tests/builder/test_export.py holds the graph to the tower's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoglm_trt.models.glm4v_vision import Glm4vVisionModel, vision_position_ids

INPUT_NAMES = ["pixel_values", "patch_pos", "patch_grid", "segment_ids"]
OUTPUT_NAMES = ["image_embeds"]
DYNAMIC_AXES = {"pixel_values": {0: "num_patches"}, "patch_pos": {0: "num_patches"},
                "patch_grid": {0: "num_patches"}, "segment_ids": {0: "num_patches"},
                "image_embeds": {0: "num_tokens"}}


def vision_graph_inputs(grid_thw: list[tuple[int, int, int]], merge: int) -> dict[str, torch.Tensor]:
    """The index tensors of the vision graph for images of these (t, h, w) patch grids."""
    pos = vision_position_ids(grid_thw, merge)  # [N, 2]
    grid = torch.tensor([[h, w] for t, h, w in grid_thw for _ in range(t * h * w)], dtype=torch.long)
    frames = [(h, w) for t, h, w in grid_thw for _ in range(t)]  # one attention segment per frame
    seg = torch.cat([torch.full((h * w,), i, dtype=torch.long) for i, (h, w) in enumerate(frames)])
    return {"patch_pos": pos, "patch_grid": grid.view(-1, 2), "segment_ids": seg}


class VisionGraph(nn.Module):
    def __init__(self, visual: Glm4vVisionModel) -> None:
        super().__init__()
        self.visual = visual
        self.cfg = visual.cfg

    def position_embeddings(self, pos: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Bicubic sample of the learned position table at each patch's centre -> [N, C]."""
        table = self.visual.embeddings.position_embedding.weight  # [S*S, C]
        side = int(table.shape[0] ** 0.5)
        table_2d = table.view(side, side, -1).permute(2, 0, 1).unsqueeze(0).float()  # [1, C, S, S]
        norm = (pos.float() + 0.5) / grid.float() * 2 - 1  # [N, 2] (row, col) in [-1, 1]
        coords = norm.flip(-1).unsqueeze(0).unsqueeze(2)  # [1, N, 1, 2] as (x=col, y=row)
        out = F.grid_sample(table_2d, coords, mode="bicubic", align_corners=False, padding_mode="border")
        return out.squeeze(0).squeeze(-1).t().to(table.dtype)  # [N, C]

    def block(self, blk, x, cos, sin, bias):
        c = self.cfg
        n = x.shape[0]
        qkv = blk.attn.qkv(blk.norm1(x)).reshape(n, 3, c.num_heads, c.head_dim)
        q, k, v = qkv.unbind(1)  # [N, heads, D] each
        q, k = (self._rotate(t, cos, sin).transpose(0, 1) for t in (q, k))  # [heads, N, D] float32
        scores = torch.matmul(q, k.transpose(1, 2)) * (c.head_dim ** -0.5) + bias  # [heads, N, N]
        out = torch.matmul(torch.softmax(scores, dim=-1), v.float().transpose(0, 1)).to(x.dtype)
        x = x + blk.attn.proj(out.transpose(0, 1).reshape(n, c.hidden_size))
        return x + blk.mlp(blk.norm2(x))

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return xf * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, pixel_values, patch_pos, patch_grid, segment_ids):
        vis, c = self.visual, self.cfg
        m = c.spatial_merge_size
        conv = vis.patch_embed.proj
        # NOTE: the patch Conv3d's kernel equals its stride: one matmul over flattened patches, as the tower does
        x = F.linear(pixel_values.to(conv.weight.dtype), conv.weight.flatten(1), conv.bias)  # [N, C_v]
        x = vis.post_conv_layernorm(x) + self.position_embeddings(patch_pos, patch_grid)
        cos, sin = (t.unsqueeze(1) for t in vis.rotary.cos_sin(patch_pos))  # [N, 1, head_dim]
        same = segment_ids.unsqueeze(0) == segment_ids.unsqueeze(1)  # [N, N]
        bias = torch.where(same, torch.zeros((), dtype=torch.float32), torch.full((), -1e30, dtype=torch.float32))
        for blk in vis.blocks:
            x = self.block(blk, x, cos, sin, bias)
        x = vis.post_layernorm(x).reshape(-1, m, m, c.hidden_size).permute(0, 3, 1, 2)  # [N/m^2, C_v, m, m]
        x = vis.downsample(x).reshape(-1, c.out_hidden_size)  # [N/m^2, out_hidden]
        return vis.merger(x)  # [N/m^2, out_hidden]


def vision_example_inputs(visual: Glm4vVisionModel, grid_thw=((1, 4, 6), (1, 2, 2))) -> tuple:
    c = visual.cfg
    width = c.in_channels * c.temporal_patch_size * c.patch_size ** 2
    n = sum(t * h * w for t, h, w in grid_thw)
    pixels = torch.randn(n, width, generator=torch.Generator().manual_seed(0)).to(visual.dtype)
    idx = vision_graph_inputs(list(grid_thw), c.spatial_merge_size)
    return (pixels, idx["patch_pos"], idx["patch_grid"], idx["segment_ids"])
