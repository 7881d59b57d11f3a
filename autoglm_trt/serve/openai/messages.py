"""Chat messages of a request -> the dicts InputProcessor.process_chat takes, images decoded."""

from __future__ import annotations

from typing import Any

from autoglm_trt.serve.errors import ServeError
from autoglm_trt.serve.media import MediaPolicy, load_image
from autoglm_trt.serve.openai.protocol import ChatMessage, ImageURLPart, TextPart, UnsupportedPart

_UNSUPPORTED = {
    "input_audio": "audio input is not supported: AutoGLM-Phone-9B has no audio encoder",
    "audio_url": "audio input is not supported: AutoGLM-Phone-9B has no audio encoder",
    "video_url": "video input is not supported by this server; send frames as images",
    "video": "video input is not supported by this server; send frames as images",
    "file": "file inputs are not supported; send images as image_url parts",
}


def count_images(messages: list[ChatMessage]) -> int:
    return sum(isinstance(p, ImageURLPart) for m in messages if isinstance(m.content, list)
               for p in m.content)


def text_chars(messages: list[ChatMessage]) -> int:
    """Characters of text in the messages (what the tokenizer will read, besides the template's own)."""
    total = 0
    for m in messages:
        if isinstance(m.content, str):
            total += len(m.content)
        elif m.content:
            total += sum(len(p.text) for p in m.content if isinstance(p, TextPart))
    return total


def check_parts(messages: list[ChatMessage], limit_images: int) -> None:
    """Refuse audio/video parts and too many images before any image is decoded."""
    for i, m in enumerate(messages):
        if not isinstance(m.content, list):
            continue
        for j, part in enumerate(m.content):
            if isinstance(part, UnsupportedPart):
                raise ServeError(_UNSUPPORTED[part.type], param=f"messages.{i}.content.{j}")
            if isinstance(part, ImageURLPart) and m.role != "user":
                raise ServeError(f"images are only accepted in user messages, not {m.role}",
                                 param=f"messages.{i}.content.{j}")
    n = count_images(messages)
    if n > limit_images:
        raise ServeError(f"this prompt has {n} images; the server accepts at most {limit_images} per "
                         "prompt (--limit-images-per-prompt)", param="messages")


def to_engine_messages(messages: list[ChatMessage], policy: MediaPolicy) -> list[dict]:
    """Plain dicts for the chat template; image URLs resolved to PIL images (blocking: run in a
    thread). Roles the template does not know are mapped: developer -> system."""
    out: list[dict] = []
    index = 0
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, list):
            parts: list[dict] = []
            for part in m.content:
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                elif isinstance(part, ImageURLPart):
                    url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                    parts.append({"type": "image", "image": load_image(url, policy, index)})
                    index += 1
            content: Any = _join_text(parts) if role != "user" else parts
        else:
            content = m.content or ""
        out.append({"role": role, "content": content})
    return out


def _join_text(parts: list[dict]) -> str:
    return "".join(p["text"] for p in parts if p["type"] == "text")
