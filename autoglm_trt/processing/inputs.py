"""Chat messages (+ images) -> prompt token ids, preprocessed images and M-RoPE positions.

Same token ids as transformers' Glm4vProcessor: render the chat template, tokenize, then replace
each <|image|> by grid_h * grid_w / merge**2 copies of it (the vision tower's merged patches).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from autoglm_trt.errors import UserError
from autoglm_trt.processing.chat_template import IMAGE_PART_TYPES, ChatTemplate
from autoglm_trt.processing.image_processor import ImageInput, ImageProcessor, load_image
from autoglm_trt.processing.rope_index import mrope_positions
from autoglm_trt.processing.tokenizer import Tokenizer, read_json

IMAGE_TOKEN = "<|image|>"


@dataclass(eq=False)
class ProcessedPrompt:
    """A prompt ready for the engine."""

    prompt_token_ids: list[int]  # <|image|> already expanded to grid_h*grid_w/merge^2 copies
    images: list[ImageInput]  # in order of appearance
    mrope_positions: torch.Tensor  # [3, L] int64
    mrope_delta: int  # position of token i >= L is i + delta
    prompt_text: str | None  # rendered text before image expansion (None if given as ids)
    image_spans: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, hash) per image

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids)


class InputProcessor:
    """Tokenizer + chat template + image processor + M-RoPE of one checkpoint."""

    def __init__(self, tokenizer: Tokenizer, chat_template: ChatTemplate | None,
                 image_processor: ImageProcessor, spatial_merge_size: int = 2):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_processor = image_processor
        self.spatial_merge_size = spatial_merge_size
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "InputProcessor":
        path = Path(model_dir)
        vision = read_json(path / "config.json").get("vision_config") or {}
        image_processor = ImageProcessor.from_dir(path)
        merge = int(vision.get("spatial_merge_size", image_processor.merge_size))
        return cls(Tokenizer.from_dir(path), ChatTemplate.from_dir(path), image_processor, merge)

    def process_chat(self, messages: list[dict], chat_template_kwargs: dict | None = None,
                     max_pixels: int | None = None, add_generation_prompt: bool = True) -> ProcessedPrompt:
        """OpenAI-style messages (image parts hold PIL images or data URLs) -> ProcessedPrompt."""
        if self.chat_template is None:
            raise UserError("this checkpoint has no chat template; send a plain prompt instead")
        images = collect_images(messages)
        kwargs = dict(chat_template_kwargs or {})
        kwargs.setdefault("enable_thinking", True)
        text = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.process_text(text, images, max_pixels=max_pixels)

    def process_text(self, prompt: str, images: list[Image.Image] | None = None,
                     max_pixels: int | None = None) -> ProcessedPrompt:
        """A raw prompt; each <|image|> in it takes the next of `images`."""
        ids = self.tokenizer.encode(prompt)
        return self.process_ids(ids, images, max_pixels=max_pixels, prompt_text=prompt)

    def process_ids(self, ids: list[int], images: list[Image.Image] | None = None,
                    max_pixels: int | None = None, prompt_text: str | None = None) -> ProcessedPrompt:
        """Token ids with one (unexpanded) <|image|> per image."""
        images = list(images or [])
        n_slots = sum(1 for i in ids if i == self.image_token_id)
        if n_slots != len(images):
            raise UserError(f"the prompt has {n_slots} {IMAGE_TOKEN} placeholders but {len(images)} "
                            "images were given")
        inputs = [self.image_processor.preprocess(im, max_pixels=max_pixels) for im in images]
        expanded, spans = self._expand(ids, inputs)
        grids = [im.grid_thw for im in inputs]
        positions, delta = mrope_positions(expanded, grids, self.image_token_id, self.spatial_merge_size)
        return ProcessedPrompt(prompt_token_ids=expanded, images=inputs, mrope_positions=positions,
                               mrope_delta=delta, prompt_text=prompt_text, image_spans=spans)

    def _expand(self, ids: list[int], images: list[ImageInput]) -> tuple[list[int], list[tuple[int, int, str]]]:
        out: list[int] = []
        spans: list[tuple[int, int, str]] = []
        next_image = iter(images)
        for token_id in ids:
            if token_id != self.image_token_id:
                out.append(token_id)
                continue
            image = next(next_image)
            spans.append((len(out), len(out) + image.num_tokens, image.content_hash))
            out.extend([self.image_token_id] * image.num_tokens)
        return out, spans


def _part_image(part: dict) -> Any:
    """The image object or reference held by a content part."""
    for key in ("image", "image_url", "url", "path"):  # OpenAI and transformers spellings
        ref = part.get(key)
        if isinstance(ref, dict):
            ref = ref.get("url")
        if ref is not None:
            return ref
    return None


def _resolve(ref: Any) -> Image.Image:
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, bytes):
        return load_image(ref)
    if isinstance(ref, (str, Path)) and not str(ref).startswith(("http://", "https://")):
        return load_image(ref)  # data: URL or a local file
    raise UserError(f"cannot use image {str(ref)[:80]!r}: give a PIL image, bytes, a data: URL or a "
                    "file path (remote URLs are fetched by the server, not here)")


def collect_images(messages: list[dict]) -> list[Image.Image]:
    """Images of the user messages, in the order the chat template renders them."""
    images: list[Image.Image] = []
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind in ("video", "video_url") or "video" in part:
                raise UserError("video input is not supported; send the frames as images")
            if kind in IMAGE_PART_TYPES or "image" in part or "image_url" in part:
                if msg.get("role") != "user":
                    raise UserError(f"images are only supported in user messages, not in {msg.get('role')!r}")
                images.append(_resolve(_part_image(part)))
    return images
