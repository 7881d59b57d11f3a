"""OpenAI request models (validated strictly: wrong types are a 400, unknown fields are ignored as
OpenAI does) and builders of the response JSON, including the streamed chunks."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autoglm_trt.serve.errors import ServeError
from autoglm_trt.serve.openai.structured import StructuredFields, ToolFields

MAX_N = 16


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


# ---- messages ---------------------------------------------------------------------------------
class ImageURL(_Model):
    url: str
    detail: str | None = None


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURLPart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL | str


class UnsupportedPart(_Model):
    """Audio and video parts: parsed so the error can say clearly that they are not supported."""

    type: Literal["input_audio", "audio_url", "video_url", "video", "file"]


ContentPart = Annotated[Union[TextPart, ImageURLPart, UnsupportedPart], Field(discriminator="type")]


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class MMProcessorKwargs(_Model):
    max_pixels: int | None = Field(default=None, gt=0)


class _SamplingFields(_Model, StructuredFields):
    """Fields shared by /v1/chat/completions and /v1/completions (structured outputs: structured.py)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    return_tokens_as_token_ids: bool = False  # vLLM extension: logprob tokens as "token_id:N"
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatCompletionRequest(_SamplingFields, ToolFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    return_reasoning: bool | None = None
    mm_processor_kwargs: MMProcessorKwargs | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None


def parse_request(cls: type[_Model], body: bytes) -> Any:
    """Validate a raw JSON body; every problem becomes a 400 naming the field."""
    try:
        return cls.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def openapi_body(cls: type[_Model]) -> dict:
    """The OpenAPI requestBody of a route that parses `cls` itself (openapi_components holds the schema)."""
    ref = {"$ref": f"#/components/schemas/{cls.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def openapi_components() -> dict[str, dict]:
    """JSON schemas of the request models and the models they use, for /openapi.json's components."""
    out: dict[str, dict] = {}
    for cls in (ChatCompletionRequest, CompletionRequest):
        schema = cls.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[cls.__name__] = schema
    return out


def validation_error(exc: ValidationError) -> ServeError:
    errors = exc.errors(include_url=False)
    # NOTE: for a union (content: str | list[part]) the deepest location is the useful complaint.
    err = max(errors, key=lambda e: len(e["loc"]))
    if err["type"] == "json_invalid":
        return ServeError(f"the body is not valid JSON: {err['msg']}", status=400)
    if err["type"] == "model_type" and not err["loc"]:
        return ServeError("the body must be a JSON object", status=400)
    loc = _location(err["loc"])
    more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    return ServeError(f"{loc}: {err['msg']}{more}", status=400, param=loc or None)


_TYPE_TAGS = {"str", "int", "float", "bool", "ImageURL"}
_PART_TAGS = {"text", "image_url", "input_audio", "audio_url", "video_url", "video", "file"}


def _location(loc: tuple) -> str:
    """'messages.0.content.list[...].0.text.text' -> 'messages.0.content.0.text'."""
    out: list[str] = []
    prev: Any = None
    for part in loc:
        # NOTE: pydantic names the union member it tried: a type ('str', 'list[str]') after a
        # field, or the discriminator tag ('text') after a list index.
        skip = isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or
                                          (isinstance(prev, int) and part in _PART_TAGS))
        if not skip:
            out.append(str(part))
        prev = part
    return ".".join(out)


# ---- responses ----------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def chat_completion(request_id: str, model: str, created: int, choices: list[dict],
                    usage_: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage_, "system_fingerprint": None}


def chat_choice(index: int, content: str | None, reasoning: str | None, finish_reason: str | None,
                logprobs: dict | None) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content, "tool_calls": []}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
        message["reasoning"] = reasoning
    return {"index": index, "message": message, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_chunk(request_id: str, model: str, created: int, choices: list[dict],
               usage_: dict | None = None, with_usage_field: bool = False) -> dict:
    out = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": choices}
    if with_usage_field:  # stream_options.include_usage: every chunk has "usage" (null until the last)
        out["usage"] = usage_
    return out


def chunk_choice(index: int, delta: dict, finish_reason: str | None = None,
                 logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def delta(role: str | None = None, content: str | None = None,
          reasoning: str | None = None) -> dict:
    out: dict[str, Any] = {}
    if role is not None:
        out["role"] = role
    if content is not None:
        out["content"] = content
    if reasoning is not None:
        out["reasoning_content"] = reasoning
        out["reasoning"] = reasoning
    return out


def completion(request_id: str, model: str, created: int, choices: list[dict], usage_: dict | None,
               chunk: bool = False, with_usage_field: bool = False) -> dict:
    out = {"id": request_id, "object": "text_completion", "created": created, "model": model,
           "choices": choices, "system_fingerprint": None}
    if not chunk or with_usage_field:
        out["usage"] = usage_
    return out


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def model_list(model: str, created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "autoglm-trt", "root": model, "parent": None,
                                        "max_model_len": max_model_len}]}


def now() -> int:
    return int(time.time())
