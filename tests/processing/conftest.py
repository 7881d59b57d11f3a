"""Fixtures of the processing tests: a checkpoint directory with our processing files and a tiny
transformers Glm4vConfig, plus the transformers objects we compare against (test-only dependency)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from autoglm_trt.processing.tokenizer_files import write_processing_files

transformers = pytest.importorskip("transformers")


def tiny_glm4v_config():
    from transformers import Glm4vConfig

    text = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=151552)
    vision = dict(depth=1, hidden_size=32, num_heads=2, out_hidden_size=64, intermediate_size=64,
                  spatial_merge_size=2, patch_size=14, temporal_patch_size=2)
    return Glm4vConfig(text_config=text, vision_config=vision)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm4v-processing")
    write_processing_files(path, "autoglm-phone-9b")
    tiny_glm4v_config().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def hf_processor(model_dir, hf_tokenizer):
    """Glm4vProcessor of the checkpoint: AutoProcessor where torchvision is installed; without it
    AutoProcessor cannot build the (torchvision-only) video processor, so we assemble the
    processor from AutoTokenizer + AutoImageProcessor with no video processor."""
    from transformers import AutoImageProcessor, AutoProcessor, Glm4vProcessor

    if _has_torchvision():
        return AutoProcessor.from_pretrained(model_dir)

    class _ImageOnlyGlm4vProcessor(Glm4vProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return _ImageOnlyGlm4vProcessor(image_processor=AutoImageProcessor.from_pretrained(model_dir),
                                    tokenizer=hf_tokenizer, video_processor=None,
                                    chat_template=hf_tokenizer.chat_template)


@pytest.fixture(scope="session")
def hf_glm4v_model():
    """A tiny transformers Glm4vModel, used only for its get_rope_index."""
    from transformers import Glm4vModel

    return Glm4vModel(tiny_glm4v_config()).eval()


def _make_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A deterministic image with smooth gradients and some noise rows (bicubic sees both)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + 3 * y) % 256], -1)
    arr = arr.astype(np.uint8)
    arr[::5] = rng.integers(0, 256, arr[::5].shape, dtype=np.uint8)
    image = Image.fromarray(arr)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        image = Image.fromarray(np.dstack([arr, alpha]), "RGBA")
    elif mode != "RGB":
        image = image.convert(mode)
    return image


@pytest.fixture(scope="session")
def make_image():
    """make_image(width, height, seed=0, mode="RGB") -> a deterministic PIL image."""
    return _make_image
