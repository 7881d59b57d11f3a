"""What a request constrains its output to: one small frozen dataclass carried on SamplingParams.

The serve layer builds it from OpenAI's `response_format` / `tools` and vLLM's `structured_outputs` /
`guided_*` fields (serve/openai/structured.py); the offline API builds it directly:

    SamplingParams(structured_outputs=StructuredOutputs.json_schema({"type": "object", ...}))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar", "actions")


class StructuredOutputError(ValueError):
    """A constraint that cannot be compiled: the message names the problem (a 400 at the server)."""


@dataclass(frozen=True)
class StructuredOutputs:
    kind: str  # one of KINDS
    # json: the schema as JSON text (property order kept: it is the order the output follows);
    # regex: the pattern; choice: a JSON list of the strings; grammar: Lark or GBNF text;
    # actions: "" or the reply's token budget (decimal), which bounds the thought and the strings
    spec: str = ""
    # the constraint starts after the model's `</think>` (glm45 reasoning parser, as vLLM does); the
    # reasoning before it is free. The actions grammar spans the whole reply and ignores this.
    after_reasoning: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise StructuredOutputError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise StructuredOutputError(f"spec must be a string, got {type(self.spec).__name__}")
        if self.kind in ("json", "regex", "choice", "grammar") and not self.spec:
            raise StructuredOutputError(f"a {self.kind} constraint needs a non-empty spec")
        if self.kind == "actions" and self.spec and not (self.spec.isdigit() and int(self.spec) > 0):
            raise StructuredOutputError(f"an actions constraint's spec is a token budget, got {self.spec!r}")

    @property
    def key(self) -> tuple[str, str]:
        """What the compile cache is keyed by (the reasoning gate is per request, not per grammar)."""
        return (self.kind, self.spec)

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def json_schema(cls, schema: dict | str | bool, after_reasoning: bool = False) -> "StructuredOutputs":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise StructuredOutputError(f"the JSON schema is not valid JSON ({exc})") from None
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise StructuredOutputError(f"a JSON schema must be an object, got {_type_name(schema)}")
        return cls("json", json.dumps(schema, ensure_ascii=False, separators=(",", ":")), after_reasoning)

    @classmethod
    def json_object(cls, after_reasoning: bool = False) -> "StructuredOutputs":
        return cls("json_object", "", after_reasoning)

    @classmethod
    def regex(cls, pattern: str, after_reasoning: bool = False) -> "StructuredOutputs":
        if not isinstance(pattern, str) or not pattern:
            raise StructuredOutputError("a regex must be a non-empty string")
        return cls("regex", pattern, after_reasoning)

    @classmethod
    def choice(cls, choices: list[str], after_reasoning: bool = False) -> "StructuredOutputs":
        if not isinstance(choices, (list, tuple)) or not choices:
            raise StructuredOutputError("choice must be a non-empty list of strings")
        if not all(isinstance(c, str) and c for c in choices):
            raise StructuredOutputError("every choice must be a non-empty string")
        return cls("choice", json.dumps(list(choices), ensure_ascii=False), after_reasoning)

    @classmethod
    def grammar(cls, text: str, after_reasoning: bool = False) -> "StructuredOutputs":
        if not isinstance(text, str) or not text.strip():
            raise StructuredOutputError("a grammar must be a non-empty string (Lark or GBNF)")
        return cls("grammar", text, after_reasoning)

    @classmethod
    def actions(cls, max_tokens: int | None = None) -> "StructuredOutputs":
        """The phone agent's whole reply: <think>...</think><answer>ACTION</answer> (actions.lark); with
        `max_tokens` (the request's) the thought and strings are bounded so the reply ends within it."""
        return cls("actions", "" if max_tokens is None else str(int(max_tokens)))

    def with_reasoning(self, after_reasoning: bool) -> "StructuredOutputs":
        return StructuredOutputs(self.kind, self.spec, after_reasoning and self.kind != "actions")

    def schema(self) -> dict[str, Any] | None:
        """The JSON schema of a json constraint, else None."""
        return json.loads(self.spec) if self.kind == "json" else None


def _type_name(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def tool_call_schema(tools: list[dict], name: str | None) -> dict:
    """The JSON schema a forced tool call is generated under (vLLM's shapes).

    `name` given (tool_choice naming a function): the output is that function's arguments object.
    `name` None (tool_choice "required"): a non-empty array of {"name": ..., "parameters": {...}}, one
    item per call, each naming one of the tools with that tool's arguments.
    """
    by_name = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    if name is not None:
        return by_name[name]
    # NOTE: a call is its name and parameters, nothing else (a weak model would otherwise add keys forever)
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [n]}, "parameters": params},
              "required": ["name", "parameters"], "additionalProperties": False} for n, params in by_name.items()]
    return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
