"""GLM-4.1V image preprocessing: smart resize to multiples of 28, CLIP normalization, 2x14x14 patches.

Same numbers as transformers' Glm4vImageProcessor, without transformers:
- backend "torch" = the torchvision class (`Glm4vImageProcessor`, what AutoImageProcessor gives
  when torchvision is installed): uint8 bicubic antialias resize by torch on the CPU, fused
  rescale+normalize in float32.
- backend "pil" = `Glm4vImageProcessorPil` (AutoImageProcessor without torchvision): PIL bicubic
  resize, rescale in float64 -> float32, normalize in float32.
The two resizes differ by a grey level or two on some pixels, so a checkpoint picks its backend
by `image_processor_type` in preprocessor_config.json ("...Pil" -> pil, otherwise torch).
`preprocess` decodes, sizes and hashes an image; the pixel work (resize, normalize, patches) happens
where the patches are used (processing/pixels.py): on the CPU exactly, or on the engine's GPU.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from autoglm_trt.errors import UserError
from autoglm_trt.processing.pixels import PixelSpec, cpu_pixels, device_ok, device_pixels
from autoglm_trt.processing.tokenizer import read_json

# NOTE: ImageInput.rgb is a read-only buffer (preprocess); nothing writes into it, so torch's warning about
# sharing one is noise. Set once: warnings.catch_warnings() is not thread-safe (prompts are built in threads).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

SOURCE_DIGEST = "autoglm_source_sha256"  # image.info key: sha256 hex of the encoded bytes it came from

MAX_ASPECT_RATIO = 200  # transformers' smart_resize refuses longer/shorter side above this


@dataclass(frozen=True, eq=False)  # NOTE: eq=False: compare by identity, never tensor-wise
class ImageInput:
    """One decoded image and how it becomes vision-tower patches (the pixel work runs where it is used)."""

    rgb: torch.Tensor  # [H, W, 3] uint8: the decoded image, transparency composited onto white; READ-ONLY memory
    # (a view of an immutable bytes object): copy before any in-place op
    resized: tuple[int, int]  # (h, w) it is resized to: multiples of patch_size * merge_size
    spec: PixelSpec
    grid_thw: tuple[int, int, int]  # patches along (t, h, w) before the 2x2 merge
    content_hash: str  # sha256 hex of size + grid + raw RGB bytes (prefix-cache key)
    num_tokens: int  # <|image|> tokens in the LLM prompt: t*h*w / merge_size**2

    @property
    def num_patches(self) -> int:
        return self.grid_thw[0] * self.grid_thw[1] * self.grid_thw[2]

    @cached_property
    def pixel_values(self) -> torch.Tensor:
        """[num_patches, C*T*P*P] float32 (3*2*14*14 = 1176 columns), transformers' numbers exactly."""
        return cpu_pixels(self.rgb, self.resized, self.spec)

    def pixels_on(self, device: torch.device, dtype: torch.dtype, exact: bool = False) -> torch.Tensor:
        """The patches as `dtype` on `device`: on a GPU computed there (~1 ms instead of ~100 on the CPU,
        within a grey level or two of transformers) unless `exact`; elsewhere the exact CPU path."""
        if device.type == "cpu" or exact or not device_ok(self.rgb, self.resized):
            return self.pixel_values.to(device, dtype)
        return device_pixels(self.rgb, self.resized, self.spec, device, dtype)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 112 * 112,
                 max_pixels: int = 28 * 28 * 12288, num_frames: int = 2, temporal_factor: int = 2
                 ) -> tuple[int, int]:
    """(height, width) to resize to: multiples of `factor` with t*h*w within [min, max] pixels.

    NOTE: a still image counts as `temporal_factor` frames (GLM-4.1V duplicates it in time), so
    the pixel budget covers two copies of it: 5,000,000 max_pixels allow ~2.5 MP per image.
    """
    if height < factor or width < factor:  # too small: scale up so the short side is one factor
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise UserError(f"image aspect ratio {max(height, width) / min(height, width):.1f} is above "
                        f"the limit of {MAX_ASPECT_RATIO}; crop or pad the image")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_image(source: str | Path | bytes) -> Image.Image:
    """Open an image from a path, raw bytes or a data: URL; UserError if it cannot be decoded."""
    what = "image bytes"
    try:
        if isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        elif isinstance(source, str) and source.startswith("data:"):
            what = "data URL"
            data = base64.b64decode(source.split(",", 1)[1], validate=False)
        else:
            what = str(source)
            data = Path(source).read_bytes()
        image = Image.open(io.BytesIO(data))
        image.load()  # NOTE: PIL decodes lazily; force it so truncated files fail here
        return image
    except (OSError, UnidentifiedImageError, IndexError, binascii.Error, ValueError,
            Image.DecompressionBombError) as exc:
        raise UserError(f"could not read the image from {what}: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB; transparency is composited onto white, as transformers does."""
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image  # NOTE: convert() would copy 7.8 MB of a screenshot for nothing
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def image_hash(rgb: np.ndarray, grid_thw: tuple[int, int, int], source: str | None = None) -> str:
    """sha256 of the image's size, its patch grid and its RGB bytes ([H, W, 3] uint8), or of the size, grid
    and `source`: the sha256 of the encoded file it was decoded from (image.info[SOURCE_DIGEST], set by the
    server), which names the same pixels for a fraction of the bytes."""
    h = hashlib.sha256()
    h.update(f"rgb:{rgb.shape[0]}x{rgb.shape[1]};grid:{grid_thw}\n".encode())
    h.update(f"source:{source}".encode() if source else np.ascontiguousarray(rgb).data)
    return h.hexdigest()


class ImageProcessor:
    """Glm4vImageProcessor in plain numpy/torch: `preprocess(pil_image) -> ImageInput`."""

    def __init__(self, min_pixels: int = 112 * 112, max_pixels: int = 28 * 28 * 12288,
                 patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2,
                 image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073),
                 image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711),
                 rescale_factor: float = 1 / 255, backend: str = "torch"):
        if backend not in ("torch", "pil"):
            raise ValueError(f"backend must be torch or pil, got {backend!r}")
        if min_pixels <= 0 or max_pixels < min_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.rescale_factor = rescale_factor
        self.backend = backend
        # the engine sets it when it will not do the pixel work on a GPU: then preprocess (a request
        # thread) computes the exact patches, so the engine's step never stalls ~100 ms on an image
        self.pixels_in_preprocess = False

    @classmethod
    def from_dir(cls, model_dir: str | Path, backend: str | None = None) -> "ImageProcessor":
        cfg = read_json(Path(model_dir) / "preprocessor_config.json")
        size = cfg.get("size") or {}
        default = cls()
        if backend is None:
            backend = "pil" if str(cfg.get("image_processor_type", "")).endswith("Pil") else "torch"
        return cls(
            min_pixels=size.get("shortest_edge", cfg.get("min_pixels", default.min_pixels)),
            max_pixels=size.get("longest_edge", cfg.get("max_pixels", default.max_pixels)),
            patch_size=cfg.get("patch_size", default.patch_size),
            temporal_patch_size=cfg.get("temporal_patch_size", default.temporal_patch_size),
            merge_size=cfg.get("merge_size", default.merge_size),
            image_mean=cfg.get("image_mean", default.image_mean),
            image_std=cfg.get("image_std", default.image_std),
            rescale_factor=cfg.get("rescale_factor", default.rescale_factor),
            backend=backend,
        )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized_size(self, height: int, width: int, min_pixels: int | None = None,
                     max_pixels: int | None = None) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, min_pixels or self.min_pixels,
                            max_pixels or self.max_pixels, self.temporal_patch_size, self.temporal_patch_size)

    def num_image_tokens(self, height: int, width: int, max_pixels: int | None = None) -> int:
        """<|image|> tokens an image of this size becomes (without preprocessing it)."""
        h, w = self.resized_size(height, width, max_pixels=max_pixels)
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size ** 2

    def preprocess(self, image: Image.Image, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> ImageInput:
        if not isinstance(image, Image.Image):
            raise UserError(f"expected a PIL image, got {type(image).__name__}")
        smallest = self.temporal_patch_size * self.factor ** 2  # one merged patch, two frames
        if max_pixels is not None and max_pixels < smallest:
            raise UserError(f"max_pixels must be at least {smallest}, got {max_pixels}")
        rgb = to_rgb(image)
        h, w = self.resized_size(rgb.height, rgb.width, min_pixels, max_pixels)
        grid = (1, h // self.patch_size, w // self.patch_size)
        array = np.asarray(rgb)  # [H, W, 3] uint8: a read-only view of tobytes()'s copy (np.array copied it again)
        out = ImageInput(rgb=torch.from_numpy(array), resized=(h, w), spec=self.spec, grid_thw=grid,
                         content_hash=image_hash(array, grid, image.info.get(SOURCE_DIGEST)),
                         num_tokens=grid[1] * grid[2] // self.merge_size ** 2)
        if self.pixels_in_preprocess or not device_ok(out.rgb, out.resized):
            out.pixel_values  # noqa: B018 - computed here, cached on the image
        return out

    @property
    def spec(self) -> PixelSpec:
        return PixelSpec(self.patch_size, self.temporal_patch_size, self.merge_size, self.image_mean,
                         self.image_std, self.rescale_factor, self.backend)
