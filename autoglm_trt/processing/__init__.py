"""Text, images and positions: tokenizer, chat template, image processor, M-RoPE, reasoning parser.

The tokenizer, chat template and reasoning modules import no torch; the names that need torch
(images, positions, the input processor) are imported on first use.
"""

from autoglm_trt.processing.chat_template import ChatTemplate
from autoglm_trt.processing.reasoning import ReasoningParser, ReasoningStream, split
from autoglm_trt.processing.tokenizer import IncrementalDetokenizer, Tokenizer

_LAZY = {
    "ImageInput": "image_processor", "ImageProcessor": "image_processor", "load_image": "image_processor",
    "smart_resize": "image_processor", "mrope_positions": "rope_index", "InputProcessor": "inputs",
    "ProcessedPrompt": "inputs", "write_processing_files": "tokenizer_files",
}

__all__ = ["ChatTemplate", "IncrementalDetokenizer", "ReasoningParser", "ReasoningStream", "Tokenizer",
           "split", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"autoglm_trt.processing.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'autoglm_trt.processing' has no attribute {name!r}")
