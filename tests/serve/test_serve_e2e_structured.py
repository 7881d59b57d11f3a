"""End to end: structured outputs through the real `autoglm-trt serve` on the tiny random checkpoint (CPU),
with the official openai client. The output of random weights is noise, so every check is that the noise
obeys the constraint: it parses and validates against the schema, matches the regex, is one of the choices,
is a well-formed phone-agent step.

These need the engine to apply the masks in its step; they skip until `LLMEngine.supports_structured_outputs`
is set by that integration (docs/structured-outputs.md, "Engine integration").
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from autoglm_trt.engine.llm_engine import LLMEngine
from autoglm_trt.processing.actions import parse_reply
from serve_harness import start_serve

jsonschema = pytest.importorskip("jsonschema")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not getattr(LLMEngine, "supports_structured_outputs", False),
                       reason="engine integration pending: the engine does not apply grammar masks yet"),
]
KEY = "e2e-key"
MODEL = "autoglm-phone-9b"
# bounded strings and numbers: random weights end every field within a few tokens
STEP = {"type": "object", "properties": {
    "action": {"type": "string", "enum": ["Tap", "Swipe", "Back"]},
    "x": {"type": "integer", "minimum": 0, "maximum": 999},
    "note": {"type": "string", "maxLength": 8},
    "done": {"type": "boolean"}},
    "required": ["action", "x", "note", "done"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "tap", "description": "tap a point", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 999},
                                     "y": {"type": "integer", "minimum": 0, "maximum": 999}},
    "required": ["x", "y"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "home", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}}]
MSG = [{"role": "user", "content": "打开微信"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc = start_serve(tiny_model_dir, "--max-model-len", "4096", api_key=KEY)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def reasoning_server(tiny_model_dir):
    proc = start_serve(tiny_model_dir, "--max-model-len", "4096", "--reasoning-parser", "glm45", api_key=KEY)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def actions_server(tiny_model_dir):
    proc = start_serve(tiny_model_dir, "--max-model-len", "4096", "--max-num-seqs", "16", "--constrain-actions",
                       api_key=KEY)
    yield proc
    proc.stop()


def client(proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=proc.url + "/v1", api_key=KEY, max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema(server, stream) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "step", "schema": STEP, "strict": True}}
    for seed in range(3):
        kw = dict(model=MODEL, messages=MSG, response_format=fmt, max_tokens=200, temperature=1.0, seed=seed)
        if stream:
            chunks = client(server).chat.completions.create(stream=True, **kw)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            done = client(server).chat.completions.create(**kw)
            assert done.choices[0].finish_reason == "stop"
            text = done.choices[0].message.content
        jsonschema.validate(json.loads(text), STEP)


def test_response_format_json_object(server) -> None:
    done = client(server).chat.completions.create(model=MODEL, messages=MSG, max_tokens=300,
                                                  response_format={"type": "json_object"})
    if done.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(done.choices[0].message.content), dict)


def test_tools_required_returns_valid_tool_calls(server) -> None:
    for seed in range(3):
        done = client(server).chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS,
                                                      tool_choice="required", max_tokens=200, seed=seed)
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_named_tool_streams_its_arguments(server) -> None:
    chunks = client(server).chat.completions.create(
        model=MODEL, messages=MSG, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "tap"}},
        max_tokens=100, stream=True)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "tap"
    jsonschema.validate(json.loads("".join(c.function.arguments or "" for c in calls)),
                        TOOLS[0]["function"]["parameters"])


def test_guided_regex_and_choice_via_extra_body(server) -> None:
    pattern = r"(Tap|Swipe) \[[0-9]{1,3},[0-9]{1,3}\]"
    done = client(server).chat.completions.create(model=MODEL, messages=MSG, max_tokens=40,
                                                  extra_body={"guided_regex": pattern})
    assert re.fullmatch(pattern, done.choices[0].message.content)
    choices = ["打开", "关闭", "返回"]
    done = client(server).chat.completions.create(model=MODEL, messages=MSG, max_tokens=20, n=3, temperature=1.0,
                                                  extra_body={"guided_choice": choices})
    assert all(c.message.content in choices for c in done.choices)
    done = client(server).chat.completions.create(model=MODEL, messages=MSG, max_tokens=20,
                                                  extra_body={"structured_outputs": {"choice": choices}})
    assert done.choices[0].message.content in choices


def test_invalid_schema_is_a_400(server) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(model=MODEL, messages=MSG, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}})
    assert "invalid JSON schema" in str(info.value)


def test_constraint_after_think_with_reasoning_on(reasoning_server) -> None:
    """With the glm45 parser the reasoning is free and the constraint applies to what follows </think>
    (random weights seldom write </think>: the offline test below starts after a closed think block)."""
    pattern = r"(yes|no)"
    for seed in range(4):
        done = client(reasoning_server).chat.completions.create(
            model=MODEL, messages=MSG, max_tokens=120, seed=seed, temperature=1.0,
            extra_body={"guided_regex": pattern})
        choice = done.choices[0]
        if getattr(choice.message, "reasoning_content", None) is not None and choice.finish_reason == "stop":
            assert re.fullmatch(pattern, choice.message.content or "")


def test_offline_constraint_after_a_closed_think_block(tiny_model_dir) -> None:
    from autoglm_trt import LLM, SamplingParams
    from autoglm_trt.processing.structured import StructuredOutputs

    llm = LLM(str(tiny_model_dir))
    gated = StructuredOutputs.regex("(yes|no)", after_reasoning=True)
    closed = "<|user|>\nok?<|assistant|>\n<think>sure</think>"
    outs = llm.generate([closed] * 3, SamplingParams(max_tokens=8, temperature=1.0, seed=1,
                                                     structured_outputs=gated))
    assert all(re.fullmatch("(yes|no)", o.text) for o in outs)


def test_constrain_actions_200_replies_parse(actions_server) -> None:
    """`serve --constrain-actions`: the phone agent's request shape, unchanged; every reply is a valid step."""
    count = int(os.environ.get("AUTOGLM_ACTIONS_E2E_COUNT", "200"))

    def one(i: int) -> str:
        # NOTE: the agent's own sampling (greedy, top_p 0.85, frequency_penalty 0.2); 200 different tasks give
        # 200 different replies. max_tokens 120 (the agent asks 3000) keeps the CPU's time in bounds: the grammar
        # fits the thought and the action inside whatever budget a request has.
        messages = [{"role": "user", "content": f"任务 {i}: 打开第 {i % 17} 个应用, then tap item {i}"}]
        done = client(actions_server).chat.completions.create(
            model=MODEL, messages=messages, max_tokens=120, temperature=0.0, top_p=0.85, frequency_penalty=0.2,
            extra_body={"skip_special_tokens": False})
        assert done.choices[0].finish_reason == "stop"
        return done.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(one, range(count)))
    for text in replies:
        parse_reply(text)
