"""Structured-output request fields -> one StructuredOutputs per request, and tool-call replies.

OpenAI's `response_format` (json_object, json_schema) and `tools` + `tool_choice` ("required" or a named
function constrain the output to the arguments' JSON schema and the reply comes back as `tool_calls`; "auto"
and "none" leave the output free), vLLM's `structured_outputs` (json / regex / choice / grammar /
json_object) and its older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`. At most one of
them per request. `serve --constrain-actions` gives chat requests that ask for none of them the phone
agent's action grammar. A constraint that does not compile is a 400 naming the field and the problem.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from autoglm_trt.processing.structured import StructuredOutputError, StructuredOutputs, tool_call_schema
from autoglm_trt.serve.errors import ServeError


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, populate_by_name=True)


class JsonSchemaFormat(_Base):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(_Base):
    """vLLM's `structured_outputs` (SamplingParams.structured_outputs in vLLM >= 0.11)."""

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None


class StructuredFields(_Base):
    """Request fields shared by /v1/chat/completions and /v1/completions."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted and ignored: there is one backend (llguidance)


class FunctionDefinition(_Base):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Base):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Base):
    name: str


class NamedToolChoice(_Base):
    type: Literal["function"]
    function: NamedFunction


class ToolFields(_Base):
    """Chat-only request fields."""

    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None


@dataclass(frozen=True)
class StructuredRequest:
    constraint: StructuredOutputs | None  # None: free output
    param: str | None = None  # the request field it came from (the 400's `param`)
    tool_mode: str | None = None  # "named" | "required": the reply is `tool_calls`
    tool_name: str | None = None  # the function of tool_choice {"type": "function", ...}


def structured_request(req: Any, after_reasoning: bool = False, constrain_actions: bool = False
                       ) -> StructuredRequest:
    """What `req` constrains its output to; a conflicting or malformed ask is a ServeError (400)."""
    asks = [(param, make) for param, make in _asks(req) if make is not None]
    if len(asks) > 1:
        raise ServeError(f"only one structured-output constraint per request; got {', '.join(p for p, _ in asks)}",
                         param=asks[1][0])
    if not asks:
        if not constrain_actions:
            return StructuredRequest(None)
        # NOTE: bounded by the request's max_tokens, the reply always ends in its </answer>
        budget = getattr(req, "max_completion_tokens", None) or req.max_tokens
        return StructuredRequest(StructuredOutputs.actions(budget), "constrain-actions")
    param, make = asks[0]
    try:
        so, tool_mode, tool_name = make()
    except StructuredOutputError as exc:
        raise ServeError(f"{param}: {exc}", param=param) from None
    return StructuredRequest(so.with_reasoning(after_reasoning), param, tool_mode, tool_name)


def _asks(req: Any) -> list[tuple[str, Any]]:
    """(field, a function building (StructuredOutputs, tool mode, tool name)) for every field set."""
    so = StructuredOutputs
    plain = lambda build, *a: (lambda: (build(*a), None, None))  # noqa: E731
    out = [("response_format", _response_format(req.response_format)), ("tool_choice", _tool_choice(req))]
    p = req.structured_outputs
    if p is not None:
        if p.structural_tag is not None:
            raise ServeError("structured_outputs.structural_tag is not supported", param="structured_outputs")
        out += [("structured_outputs.json", None if p.json_ is None else plain(so.json_schema, p.json_)),
                ("structured_outputs.regex", None if p.regex is None else plain(so.regex, p.regex)),
                ("structured_outputs.choice", None if p.choice is None else plain(so.choice, p.choice)),
                ("structured_outputs.grammar", None if p.grammar is None else plain(so.grammar, p.grammar)),
                ("structured_outputs.json_object", plain(so.json_object) if p.json_object else None)]
    out += [("guided_json", None if req.guided_json is None else plain(so.json_schema, req.guided_json)),
            ("guided_regex", None if req.guided_regex is None else plain(so.regex, req.guided_regex)),
            ("guided_choice", None if req.guided_choice is None else plain(so.choice, req.guided_choice)),
            ("guided_grammar", None if req.guided_grammar is None else plain(so.grammar, req.guided_grammar))]
    return out


def _response_format(fmt: ResponseFormat | None):
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "structural_tag":
        raise ServeError("response_format structural_tag is not supported", param="response_format")
    if fmt.type == "json_object":
        return lambda: (StructuredOutputs.json_object(), None, None)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ServeError("response_format json_schema needs json_schema.schema", param="response_format.json_schema")
    return lambda: (StructuredOutputs.json_schema(fmt.json_schema.schema_), None, None)


def _tool_choice(req: Any):
    tools, choice = getattr(req, "tools", None), getattr(req, "tool_choice", None)
    if choice in (None, "none", "auto"):
        return None  # NOTE: "auto" (the default with tools) leaves the reply free, as without a tool parser
    if not tools:
        raise ServeError("tool_choice needs tools", param="tool_choice")
    names = [t.function.name for t in tools]
    if choice == "required":
        return lambda: (StructuredOutputs.json_schema(tool_call_schema(_tool_dicts(tools), None)), "required", None)
    if choice.function.name not in names:
        raise ServeError(f"tool_choice names `{choice.function.name}`, which is not among the tools "
                         f"({', '.join(names)})", param="tool_choice")
    name = choice.function.name
    return lambda: (StructuredOutputs.json_schema(tool_call_schema(_tool_dicts(tools), name)), "named", name)


def _tool_dicts(tools: list[Tool]) -> list[dict]:
    return [{"type": "function", "function": {"name": t.function.name, "parameters": t.function.parameters}}
            for t in tools]


def validate(spec: StructuredRequest, engine: Any) -> None:
    """Compile the constraint now (cached for the engine); blocking: call it in a worker thread."""
    validate_constraint(spec.constraint, engine, spec.param)


def validate_constraint(so: StructuredOutputs | None, engine: Any, param: str | None) -> None:
    if so is None:
        return
    from autoglm_trt.processing.structured import compiler_for

    compiler = compiler_for(engine.tokenizer, engine.model_config.text.vocab_size)
    try:
        compiler.validate(so)
    except StructuredOutputError as exc:
        raise ServeError(f"{param}: {exc}", param=param) from None


def guided_decoding(guide_type: str, guide: str | None) -> StructuredOutputs:
    """TensorRT-LLM's (guided_decoding_guide_type, guided_decoding_guide) inputs of the ensemble model."""
    so = StructuredOutputs
    makers = {"json": lambda: so.json_object(), "json_schema": lambda: so.json_schema(guide),
              "regex": lambda: so.regex(guide), "ebnf_grammar": lambda: so.grammar(guide)}
    if guide_type not in makers:
        raise ServeError(f"guided_decoding_guide_type must be one of {', '.join(makers)}, got {guide_type!r}",
                         param="guided_decoding_guide_type")
    if guide_type != "json" and not guide:
        raise ServeError(f"guided_decoding_guide_type {guide_type} needs guided_decoding_guide",
                         param="guided_decoding_guide")
    try:
        return makers[guide_type]()
    except StructuredOutputError as exc:
        raise ServeError(f"guided_decoding_guide: {exc}", param="guided_decoding_guide") from None


def attach(params: list, spec: StructuredRequest) -> list:
    """The request's SamplingParams with its constraint."""
    if spec.constraint is None:
        return params
    return [dataclasses.replace(p, structured_outputs=spec.constraint) for p in params]


# ---- tool-call replies ----------------------------------------------------------------------------
def tool_calls(spec: StructuredRequest, content: str) -> list[dict] | None:
    """The `tool_calls` of a constrained reply (None when the text is not a complete call: cut by length)."""
    try:
        value = json.loads(content)
    except json.JSONDecodeError:
        return None
    if spec.tool_mode == "named":
        calls = [(spec.tool_name, value)]
    else:
        calls = [(c.get("name"), c.get("parameters")) for c in value if isinstance(c, dict)]
    return [_call(i, name, args) for i, (name, args) in enumerate(calls)]


def _call(index: int, name: str, args: Any) -> dict:
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function", "index": index,
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def finish_choice(choice: dict, spec: StructuredRequest) -> dict:
    """Turn a tool-constrained chat choice's content into `tool_calls` (vLLM's finish reasons)."""
    message = choice["message"]
    calls = tool_calls(spec, message["content"] or "") if spec.tool_mode else None
    if calls is not None:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
        message["content"] = None
        if spec.tool_mode == "required" and choice["finish_reason"] == "stop":
            choice["finish_reason"] = "tool_calls"
    return choice


class ToolCallStream:
    """Streamed tool calls: a named function's arguments stream as they come; "required" calls are sent
    whole at the end (the array must be complete to split it into calls)."""

    def __init__(self, spec: StructuredRequest) -> None:
        self.spec = spec
        self.buffer = ""
        self.call_id = f"chatcmpl-tool-{uuid.uuid4().hex}"
        self.header_sent = False
        self.made_calls = False

    def transform(self, delta: dict, finished: bool) -> dict:
        content = delta.pop("content", None) or ""
        self.buffer += content
        if self.spec.tool_mode == "named":
            if content:
                fn: dict = {"arguments": content}
                call: dict = {"index": 0, "function": fn}
                if not self.header_sent:
                    call.update(id=self.call_id, type="function")
                    fn["name"], self.header_sent = self.spec.tool_name, True
                delta["tool_calls"] = [call]
            return delta
        if finished:
            calls = tool_calls(self.spec, self.buffer)
            if calls is None:
                delta["content"] = self.buffer  # not a complete call: hand the text back
            else:
                delta["tool_calls"], self.made_calls = calls, True
        return delta

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.made_calls else reason


def after_reasoning(config: Any, req: Any) -> bool:
    """vLLM's reasoning-aware constraint: with the glm45 parser and thinking on, it starts after </think>."""
    kwargs = req.chat_template_kwargs or {}
    thinking = kwargs.get("enable_thinking", req.enable_thinking)
    return config.reasoning_parser is not None and thinking is not False
