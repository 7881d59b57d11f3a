"""ImageProcessor equals transformers' Glm4vImageProcessor (pixel values and grids)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from autoglm_trt.errors import UserError
from autoglm_trt.processing.image_processor import ImageProcessor, load_image, smart_resize

REAL_SIZE = {"shortest_edge": 12544, "longest_edge": 9633792}
# (width, height, mode, max_pixels): phone screenshot, tiny (scaled up), odd aspect ratios, modes
CASES = [
    (1080, 2400, "RGB", 5_000_000),
    (1080, 2400, "RGB", None),
    (20, 30, "RGB", None),
    (517, 333, "RGB", None),
    (3000, 100, "RGB", None),
    (60, 1500, "RGB", 1_000_000),
    (64, 64, "RGBA", None),
    (90, 50, "L", None),
    (300, 200, "P", None),
    (728, 1456, "RGB", 200_000),
]


def _reference(processor, image, max_pixels):
    size = dict(REAL_SIZE, longest_edge=max_pixels or REAL_SIZE["longest_edge"])
    out = processor(images=[image], size=size, return_tensors="pt")
    return out["pixel_values"], tuple(out["image_grid_thw"][0].tolist())


def _check(ours, image, max_pixels, reference):
    got = ours.preprocess(image, max_pixels=max_pixels)
    want_pixels, want_grid = reference
    assert got.grid_thw == want_grid
    assert got.pixel_values.dtype == torch.float32
    assert got.pixel_values.shape == want_pixels.shape == (got.num_patches, 3 * 2 * 14 * 14)
    assert got.num_tokens == want_grid[1] * want_grid[2] // 4
    return (got.pixel_values - want_pixels).abs().max().item()


@pytest.mark.parametrize("width,height,mode,max_pixels", CASES)
def test_pil_backend_equals_transformers_pil(make_image, width, height, mode, max_pixels):
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    image = make_image(width, height, seed=width, mode=mode)
    ref = _reference(Glm4vImageProcessorPil(), image, max_pixels)
    assert _check(ImageProcessor(backend="pil"), image, max_pixels, ref) <= 1e-6


@pytest.mark.parametrize("width,height,mode,max_pixels", CASES)
def test_torch_backend_equals_transformers_torchvision(make_image, width, height, mode, max_pixels):
    pytest.importorskip("torchvision")
    from transformers.models.glm4v.image_processing_glm4v import Glm4vImageProcessor

    image = make_image(width, height, seed=width, mode=mode)
    ref = _reference(Glm4vImageProcessor(), image, max_pixels)
    assert _check(ImageProcessor(backend="torch"), image, max_pixels, ref) <= 1e-6


@pytest.mark.parametrize("width,height,mode,max_pixels", CASES[2:6])
def test_auto_image_processor_of_checkpoint(model_dir, make_image, width, height, mode, max_pixels):
    """Whatever AutoImageProcessor gives (torchvision class, or the PIL one without torchvision)."""
    from transformers import AutoImageProcessor

    auto = AutoImageProcessor.from_pretrained(model_dir)
    backend = "torch" if auto.__class__.__name__ == "Glm4vImageProcessor" else "pil"
    image = make_image(width, height, seed=width, mode=mode)
    ours = ImageProcessor.from_dir(model_dir, backend=backend)
    assert _check(ours, image, max_pixels, _reference(auto, image, max_pixels)) <= 1e-6


def test_backends_agree_closely(make_image):
    image = make_image(1080, 2400, seed=3)
    a = ImageProcessor(backend="pil").preprocess(image, max_pixels=5_000_000)
    b = ImageProcessor(backend="torch").preprocess(image, max_pixels=5_000_000)
    assert a.grid_thw == b.grid_thw and a.content_hash == b.content_hash
    diff = (a.pixel_values - b.pixel_values).abs()
    assert diff.mean().item() < 0.01  # a grey level or two on a few pixels (1/255/0.27 = 0.015)


def test_phone_screenshot_token_count(make_image):
    processor = ImageProcessor()
    assert smart_resize(2400, 1080, max_pixels=5_000_000) == (2352, 1036)
    image = processor.preprocess(make_image(1080, 2400), max_pixels=5_000_000)
    assert image.grid_thw == (1, 168, 74)
    assert image.num_tokens == 3108 == processor.num_image_tokens(2400, 1080, max_pixels=5_000_000)


def test_from_dir_reads_preprocessor_config(model_dir):
    processor = ImageProcessor.from_dir(model_dir)
    assert (processor.min_pixels, processor.max_pixels) == (12544, 9633792)
    assert (processor.patch_size, processor.temporal_patch_size, processor.merge_size) == (14, 2, 2)
    assert processor.backend == "torch"  # image_processor_type "Glm4vImageProcessor"


def test_content_hash(make_image):
    processor = ImageProcessor()
    a1 = processor.preprocess(make_image(100, 120, seed=1))
    a2 = processor.preprocess(make_image(100, 120, seed=1))
    b = processor.preprocess(make_image(100, 120, seed=2))
    a_small = processor.preprocess(make_image(100, 120, seed=1), max_pixels=12544)
    assert a1.content_hash == a2.content_hash and len(a1.content_hash) == 64
    assert b.content_hash != a1.content_hash
    assert a_small.grid_thw != a1.grid_thw and a_small.content_hash != a1.content_hash


def test_aspect_ratio_limit():
    processor = ImageProcessor()
    with pytest.raises(UserError, match="aspect ratio"):
        processor.preprocess(Image.new("RGB", (6000, 28)))
    assert processor.preprocess(Image.new("RGB", (5600, 28))).grid_thw[0] == 1  # 200:1 is allowed


def _png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_load_image(tmp_path, make_image):
    data = _png_bytes(make_image(40, 30))
    path = tmp_path / "a.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    for source in (data, path, str(path), url):
        assert np.array_equal(np.asarray(load_image(source)), np.asarray(make_image(40, 30)))


@pytest.mark.parametrize("source", [b"not an image", b"", "missing/file.png", "data:image/png;base64,!!!!"])
def test_unreadable_image_is_a_user_error(tmp_path, source):
    with pytest.raises(UserError, match="could not read the image"):
        load_image(source)


def test_truncated_png_is_a_user_error(make_image):
    data = _png_bytes(make_image(200, 200))
    with pytest.raises(UserError, match="could not read the image"):
        load_image(data[: len(data) // 2])


def test_max_pixels_too_small_is_a_user_error(make_image):
    with pytest.raises(UserError, match="max_pixels"):
        ImageProcessor().preprocess(make_image(100, 100), max_pixels=1000)
    assert ImageProcessor().preprocess(make_image(100, 100), max_pixels=2 * 28 * 28).grid_thw == (1, 2, 2)
