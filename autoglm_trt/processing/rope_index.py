"""3D (t, h, w) M-RoPE positions of a prompt, as transformers' Glm4vModel.get_rope_index.

Text tokens advance one position per token, on all three axes alike. The tokens of an image with
merged grid (t, H, W) = (t, h/2, w/2) all start from the current position p: temporal p + frame,
height p + row, width p + column. The text after the image resumes at p + max(H, W) (the image
takes as many positions as its longer side), so positions run behind token indices by `delta`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _image_positions(start: int, grid_thw: Sequence[int], merge: int) -> torch.Tensor:
    """[3, t*H*W] positions of one image whose tokens start at position `start`."""
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    tt = torch.arange(t).view(t, 1, 1).expand(t, h, w)
    hh = torch.arange(h).view(1, h, 1).expand(t, h, w)
    ww = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start  # [3, t*h*w]


def mrope_positions(input_ids: Sequence[int], grid_thws: Sequence[Sequence[int]], image_token_id: int,
                    spatial_merge_size: int = 2) -> tuple[torch.Tensor, int]:
    """(positions [3, L] int64, delta) of a prompt whose <|image|> runs are already expanded.

    The k-th run of image tokens belongs to grid_thws[k] and must hold t*h*w/merge**2 tokens.
    The position of a generated token at index i >= L is i + delta on all three axes.
    """
    ids = torch.as_tensor(list(input_ids), dtype=torch.long)  # [L]
    image_at = (ids == image_token_id).tolist()
    chunks: list[torch.Tensor] = []
    pos, i, image_idx, length = 0, 0, 0, len(image_at)
    while i < length:
        if not image_at[i]:
            j = i
            while j < length and not image_at[j]:
                j += 1
            chunks.append(torch.arange(pos, pos + j - i).expand(3, -1))  # text: same id on t/h/w
            pos, i = pos + j - i, j
            continue
        if image_idx >= len(grid_thws):
            raise ValueError(f"the prompt has more <|image|> runs than the {len(grid_thws)} grids given")
        grid = grid_thws[image_idx]
        count = int(grid[0]) * int(grid[1]) * int(grid[2]) // spatial_merge_size ** 2
        if i + count > length or not all(image_at[i:i + count]):
            raise ValueError(f"image {image_idx} with grid {tuple(grid)} needs {count} consecutive "
                             "<|image|> tokens; the prompt has fewer")
        chunks.append(_image_positions(pos, grid, spatial_merge_size))
        pos += max(int(grid[1]), int(grid[2])) // spatial_merge_size
        i, image_idx = i + count, image_idx + 1
    if image_idx != len(grid_thws):
        raise ValueError(f"{len(grid_thws)} image grids given but the prompt has {image_idx} images")
    if not chunks:
        return torch.zeros(3, 0, dtype=torch.long), 0
    positions = torch.cat(chunks, dim=1).to(torch.long)  # [3, L]
    delta = int(positions.max()) + 1 - length
    return positions, delta
