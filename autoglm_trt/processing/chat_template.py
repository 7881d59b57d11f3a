"""Chat template rendering with a sandboxed jinja2, matching transformers' apply_chat_template.

The template is the checkpoint's own (chat_template.jinja, else tokenizer_config.json's
chat_template, else chat_template.json). The jinja environment has the same options, filters and
globals as transformers' (trim_blocks, lstrip_blocks, loopcontrols, tojson, raise_exception,
strftime_now), so a template renders to the same text here as there.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from autoglm_trt.errors import UserError
from autoglm_trt.processing.tokenizer import read_json

IMAGE_PART_TYPES = ("image", "image_url", "input_image")
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # NOTE: jinja's own tojson escapes HTML characters; chat templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _plain_part(part: Any) -> Any:
    """A content part the template can see: image parts become {"type": "image"} (no payload)."""
    if not isinstance(part, dict):
        return part
    if part.get("type") in IMAGE_PART_TYPES or "image" in part or "image_url" in part:
        return {"type": "image"}
    return {k: v for k, v in part.items() if isinstance(v, (str, int, float, bool, type(None)))}


def normalize_messages(messages: list[dict]) -> list[dict]:
    """OpenAI-style messages -> what the GLM template reads.

    User content lists keep their order, with every image part (image, image_url, input_image)
    reduced to {"type": "image"} (the template checks only the type; the image itself is handed to
    the image processor separately). System/assistant content given as a list of text parts is
    joined into one string, as the template prints those contents as-is.
    """
    out = []
    for msg in messages:
        if not isinstance(msg, dict) or "role" not in msg:
            raise UserError(f"each chat message must be an object with a 'role', got {msg!r}")
        msg = dict(msg)
        content = msg.get("content")
        if isinstance(content, list):
            parts = [_plain_part(p) for p in content]
            if msg["role"] != "user" and all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
                msg["content"] = "".join(p.get("text", "") for p in parts)
            else:
                msg["content"] = parts
        elif content is None:
            msg["content"] = ""
        out.append(msg)
    return out


class ChatTemplate:
    """A checkpoint's chat template: `render(messages, add_generation_prompt, **kwargs) -> str`."""

    def __init__(self, template: str, special_tokens: dict[str, str] | None = None):
        self.source = template
        self.special_tokens = dict(special_tokens or {})
        self._template = _environment().from_string(template)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ChatTemplate":
        path = Path(model_dir)
        tok_cfg = read_json(path / "tokenizer_config.json")
        specials = {k: _name(tok_cfg[k]) for k in _SPECIAL_TOKEN_KEYS if tok_cfg.get(k) is not None}
        return cls(_load_template_source(path, tok_cfg), specials)

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               enable_thinking: bool = True, **kwargs: Any) -> str:
        """Prompt text of a conversation; extra kwargs are visible to the template."""
        context = {**self.special_tokens, **kwargs}
        context.setdefault("tools", None)
        context.setdefault("documents", None)
        try:
            return self._template.render(messages=normalize_messages(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking, **context)
        except jinja2.exceptions.TemplateError as exc:
            raise UserError(f"the chat template failed on these messages: {exc}") from None


def _name(value: Any) -> str:
    return value.get("content", "") if isinstance(value, dict) else str(value)


def _load_template_source(path: Path, tok_cfg: dict) -> str:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():  # NOTE: takes priority over tokenizer_config, as in transformers
        return jinja_file.read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template")
    if template is None:
        template = read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise UserError(f"{path} has no chat template (chat_template.jinja or tokenizer_config.json's "
                        "chat_template); it is needed to turn chat messages into a prompt")
    return template
