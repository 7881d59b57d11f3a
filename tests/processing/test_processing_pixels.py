"""The pixel work on a device (processing/pixels.device_pixels) against transformers' exact CPU numbers."""

from __future__ import annotations

import pytest
import torch

from autoglm_trt.processing.image_processor import ImageProcessor
from autoglm_trt.processing.pixels import device_ok, device_pixels

LEVEL = 1 / 255 / 0.26130258  # one grey level after normalizing (the smallest std)
CASES = [(1080, 2400, 5_000_000), (517, 333, None), (20, 30, None), (3000, 100, None), (728, 1456, 200_000)]


def _compare(make_image, backend: str, size, device: torch.device) -> tuple[float, float]:
    width, height, max_pixels = size
    image = ImageProcessor(backend=backend).preprocess(make_image(width, height, seed=width), max_pixels=max_pixels)
    got = device_pixels(image.rgb, image.resized, image.spec, device, torch.float32).cpu()
    want = image.pixel_values
    assert got.shape == want.shape and got.dtype == want.dtype
    diff = (got - want).abs()
    return diff.max().item(), (diff > 1e-5).float().mean().item()


@pytest.mark.parametrize("backend", ["torch", "pil"])
@pytest.mark.parametrize("size", CASES)
def test_float_resize_within_two_grey_levels_of_transformers(make_image, backend, size):
    worst, share = _compare(make_image, backend, size, torch.device("cpu"))
    assert worst <= 2 * LEVEL + 1e-6
    assert share < 0.05  # rounding on a few pixels (noisy, strongly shrunk images the most), not a shifted image


def test_pixels_on_cpu_are_the_exact_values(make_image):
    image = ImageProcessor().preprocess(make_image(300, 200, seed=1))
    assert torch.equal(image.pixels_on(torch.device("cpu"), torch.float32), image.pixel_values)
    assert torch.equal(image.pixels_on(torch.device("cpu"), torch.bfloat16), image.pixel_values.to(torch.bfloat16))


def test_device_path_only_for_moderate_shrink_and_size():
    small = torch.zeros(2400, 1080, 3, dtype=torch.uint8)
    assert device_ok(small, (2352, 1036))  # a screenshot at max_pixels 5M
    assert not device_ok(torch.zeros(3200, 1440, 3, dtype=torch.uint8), (28, 28))  # 114x: the CUDA kernel fails
    assert not device_ok(torch.zeros(4000, 4001, 3, dtype=torch.uint8), (2800, 2800))  # 16 MP+ upload


def test_preprocess_computes_exact_patches_when_no_gpu_will(make_image):
    proc = ImageProcessor()
    shrunk = proc.preprocess(make_image(1440, 3200, seed=4), max_pixels=1568)
    assert shrunk.grid_thw == (1, 2, 2) and "pixel_values" in shrunk.__dict__  # done in the request thread
    proc.pixels_in_preprocess = True  # the engine runs on the CPU, or was asked for the exact path
    assert "pixel_values" in proc.preprocess(make_image(300, 200, seed=1)).__dict__


def test_image_input_keeps_the_decoded_image_not_the_patches(make_image):
    image = ImageProcessor().preprocess(make_image(1080, 2400, seed=2), max_pixels=5_000_000)
    assert image.rgb.dtype == torch.uint8 and tuple(image.rgb.shape) == (2400, 1080, 3)
    assert image.resized == (2352, 1036) and image.num_patches == 168 * 74
    assert "pixel_values" not in image.__dict__  # computed only when something asks for it


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "pil"])
@pytest.mark.parametrize("size", CASES)
def test_gpu_pixels_within_two_grey_levels(make_image, backend, size):
    worst, share = _compare(make_image, backend, size, torch.device("cuda"))
    assert worst <= 2 * LEVEL + 1e-6
    assert share < 0.05


@pytest.mark.gpu
def test_gpu_falls_back_to_exact_pixels_on_extreme_shrink(make_image):
    image = ImageProcessor().preprocess(make_image(1440, 3200, seed=4), max_pixels=1568)
    got = image.pixels_on(torch.device("cuda"), torch.float32).cpu()
    assert torch.equal(got, image.pixel_values)
