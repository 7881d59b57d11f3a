"""Calibration samples: JSONL files of OpenAI-style conversations, and one plain forward per sample.

One JSON object per line: {"id": "...", "messages": [...]} (or {"id", "text"} for a raw prompt).
Image parts hold a file path (relative to the JSONL file), a data: URL, or "synthetic:<kind>:<seed>"
for a screenshot drawn by `screens.draw_screen`. A conversation that ends with an assistant reply
is rendered without a generation prompt, so the reply's tokens are calibrated too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from autoglm_trt.calibration.screens import draw_screen
from autoglm_trt.errors import UserError
from autoglm_trt.processing.inputs import InputProcessor, ProcessedPrompt

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_DATASET = DATA_DIR / "prompts.jsonl"
HELDOUT_DATASET = DATA_DIR / "heldout.jsonl"
HELDOUT_TEXT = DATA_DIR / "heldout.txt"


@dataclass
class Sample:
    id: str
    messages: list[dict] | None  # OpenAI-style, image parts resolved to PIL images
    text: str | None = None  # a raw prompt instead of messages

    @property
    def add_generation_prompt(self) -> bool:
        return not self.messages or self.messages[-1].get("role") != "assistant"


def load_samples(path: str | Path | None = None, limit: int | None = None) -> list[Sample]:
    """Read up to `limit` samples (all when None) from a JSONL file (default: the shipped set)."""
    path = Path(path) if path else DEFAULT_DATASET
    if not path.is_file():
        raise UserError(f"calibration dataset {path} does not exist")
    samples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if limit is not None and len(samples) >= limit:
            break
        samples.append(_parse(line, f"{path}:{lineno}", path.parent))
    if not samples:
        raise UserError(f"{path} holds no samples")
    return samples


def _parse(line: str, where: str, base: Path) -> Sample:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(obj, dict) or not (isinstance(obj.get("messages"), list) or isinstance(obj.get("text"), str)):
        raise UserError(f"{where}: each line needs a 'messages' list or a 'text' string")
    sid = str(obj.get("id", where))
    if "messages" not in obj:
        return Sample(sid, None, obj["text"])
    return Sample(sid, [_resolve_message(m, where, base) for m in obj["messages"]])


def _resolve_message(msg: dict, where: str, base: Path) -> dict:
    content = msg.get("content") if isinstance(msg, dict) else None
    if not isinstance(content, list):
        return msg
    parts = []
    for part in content:
        ref = part.get("image") if isinstance(part, dict) and part.get("type") == "image" else None
        if isinstance(ref, str):
            part = {"type": "image", "image": _image(ref, where, base)}
        parts.append(part)
    return {**msg, "content": parts}


def _image(ref: str, where: str, base: Path):
    if ref.startswith("synthetic:"):
        try:
            _, kind, seed = ref.split(":")
            return draw_screen(kind, int(seed))
        except ValueError as exc:
            raise UserError(f"{where}: bad synthetic image {ref!r} ({exc}); use synthetic:<kind>:<seed>") from None
    if ref.startswith("data:"):
        return ref
    path = Path(ref) if Path(ref).is_absolute() else base / ref
    if not path.is_file():
        raise UserError(f"{where}: image file {path} does not exist")
    return str(path)


def encode(processor: InputProcessor, sample: Sample, max_pixels: int | None = None) -> ProcessedPrompt:
    if sample.messages is None:
        return processor.process_text(sample.text)
    return processor.process_chat(sample.messages, max_pixels=max_pixels,
                                  add_generation_prompt=sample.add_generation_prompt)


@torch.inference_mode()
def forward(model, prompt: ProcessedPrompt, device: torch.device) -> torch.Tensor:
    """One plain causal forward without a KV cache: prompt -> final hidden states [T, hidden]."""
    ids = torch.tensor(prompt.prompt_token_ids, dtype=torch.long, device=device)  # [T]
    image_embeds = None
    if prompt.images:
        pixels = torch.cat([torch.as_tensor(im.pixel_values) for im in prompt.images]).to(device)
        image_embeds = model.encode_images(pixels, [im.grid_thw for im in prompt.images])
    embeds = model.embed(ids, image_embeds)  # [T, hidden]
    return model(embeds, prompt.mrope_positions.to(device))
