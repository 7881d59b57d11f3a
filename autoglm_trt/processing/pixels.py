"""Pixel work of GLM-4.1V preprocessing: resize, rescale + normalize, 2x14x14 patches.

Two paths over the same decoded image ([H, W, 3] uint8):
- `cpu_pixels`: transformers' numbers exactly (the torchvision class: uint8 antialias bicubic resize on
  the CPU; the PIL class: PIL's bicubic). ~100 ms for a 1080x2400 screenshot on a CPU core or two.
- `device_pixels`: the same steps on the GPU in ~1 ms: float32 antialias bicubic (torch's, the
  algorithm the uint8 kernel approximates in fixed point), rounded back to grey levels, then the same
  normalize and patchify. It differs from `cpu_pixels` by at most a grey level or two on some pixels
  (1 level = 1/255/std ~ 0.015 after normalizing; tests/processing/test_processing_pixels.py bounds it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class PixelSpec:
    """How an image becomes vision-tower patches (from preprocessor_config.json)."""

    patch_size: int = 14
    temporal_patch_size: int = 2  # a still image is repeated this many times in time
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    backend: str = "torch"  # "torch" (the torchvision class) | "pil" (Glm4vImageProcessorPil)


def cpu_pixels(rgb: torch.Tensor, size: tuple[int, int], spec: PixelSpec) -> torch.Tensor:
    """rgb [H, W, 3] uint8 -> patches [gh*gw, 3*T*P*P] float32, exactly as transformers computes them."""
    h, w = size
    if spec.backend == "pil":
        resized = np.asarray(Image.fromarray(rgb.numpy()).resize((w, h), Image.BICUBIC))  # [h, w, 3] uint8
        x = (resized.astype(np.float64) * spec.rescale_factor).astype(np.float32)
        x = (x - np.asarray(spec.image_mean, np.float32)) / np.asarray(spec.image_std, np.float32)
        return patchify(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), spec)
    x = rgb.permute(2, 0, 1).contiguous()  # [3, H, W] uint8
    if (h, w) != tuple(x.shape[1:]):
        # NOTE: uint8 in, uint8 out: torch's CPU antialias bicubic kernel, as torchvision uses
        x = F.interpolate(x[None], size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0]
    return patchify(_normalize(x.to(torch.float32), spec), spec)


# The GPU path takes images that stay small on the device and shrink moderately: torch's CUDA antialias
# kernel sizes its thread block by the shrink factor (past ~91x a pass fails or divides by zero), and the
# float32 copy of a 64 MP upload would be ~0.8 GB on top of the KV cache. Others take the CPU path.
MAX_DEVICE_SHRINK = 32
MAX_DEVICE_PIXELS = 16_000_000


def device_ok(rgb: torch.Tensor, size: tuple[int, int]) -> bool:
    """Whether `device_pixels` takes this image ([H, W, 3] resized to `size`), else `cpu_pixels` does."""
    height, width = rgb.shape[0], rgb.shape[1]
    shrink = max(height / size[0], width / size[1])
    return height * width <= MAX_DEVICE_PIXELS and shrink <= MAX_DEVICE_SHRINK


def device_pixels(rgb: torch.Tensor, size: tuple[int, int], spec: PixelSpec, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """rgb [H, W, 3] uint8 (host) -> patches [gh*gw, 3*T*P*P] of `dtype` computed on `device`."""
    x = rgb.to(device, non_blocking=rgb.is_pinned()).permute(2, 0, 1)[None].to(torch.float32)  # [1, 3, H, W]
    if tuple(size) != tuple(x.shape[2:]):
        # NOTE: width, then height, each rounded back to grey levels: the passes of the uint8 resize
        for step in ((x.shape[2], size[1]), tuple(size)):
            if step != tuple(x.shape[2:]):
                x = F.interpolate(x, size=step, mode="bicubic", align_corners=False, antialias=True).round_().clamp_(0, 255)
    return patchify(_normalize(x[0], spec), spec).to(dtype)


def _normalize(x: torch.Tensor, spec: PixelSpec) -> torch.Tensor:
    """[3, h, w] float32 grey levels -> (x * rescale - mean) / std, fused as the torchvision class does."""
    mean = torch.tensor(spec.image_mean, device=x.device) * (1.0 / spec.rescale_factor)
    std = torch.tensor(spec.image_std, device=x.device) * (1.0 / spec.rescale_factor)
    return (x - mean[:, None, None]) / std[:, None, None]


def patchify(chw: torch.Tensor, spec: PixelSpec) -> torch.Tensor:
    """[3, h, w] -> [gh*gw, 3*T*P*P]: 2x2 merge groups adjacent, the still image repeated T times."""
    c, h, w = chw.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = h // p, w // p
    x = chw.reshape(c, gh // m, m, p, gw // m, m, p)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, c, p, p]
    x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, t, -1, -1)  # still image -> T identical frames
    return x.reshape(gh * gw, c * t * p * p).contiguous()
