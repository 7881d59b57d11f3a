"""Structured-output request fields over the HTTP layer (scripted FakeEngine, real tokenizer for the grammar
compile): what reaches SamplingParams, 400s naming the problem, and tool-call replies read by the openai SDK."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import openai
import pytest

from autoglm_trt.processing.structured import StructuredOutputs
from autoglm_trt.processing.tokenizer import Tokenizer
from autoglm_trt.processing.tokenizer_files import VOCAB_SIZE, write_processing_files
from autoglm_trt.serve.errors import ServeError
from autoglm_trt.serve.openai import protocol as P
from autoglm_trt.serve.openai import structured as S
from serve_fakes import FakeEngine
from serve_harness import InProcessServer

pytest.importorskip("llguidance")

KEY = {"Authorization": "Bearer test-key"}
MSG = [{"role": "user", "content": "hi"}]
TAP = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
       "required": ["x", "y"]}
TOOLS = [{"type": "function", "function": {"name": "tap", "description": "tap the screen", "parameters": TAP}},
         {"type": "function", "function": {"name": "home", "parameters": {"type": "object"}}}]


class StructuredFakeEngine(FakeEngine):
    """The scripted engine with the real tokenizer (the server compiles grammars with it); records params."""

    def __init__(self, tokenizer: Tokenizer, script: str) -> None:
        super().__init__(script=script)
        self.tokenizer = tokenizer
        self.model_config = SimpleNamespace(text=SimpleNamespace(vocab_size=VOCAB_SIZE))
        self.params: dict[str, object] = {}

    def add_request(self, request_id, prompt, params) -> None:
        self.params[request_id] = params
        super().add_request(request_id, prompt, params)

    def last_constraint(self) -> StructuredOutputs | None:
        return list(self.params.values())[-1].structured_outputs


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok")
    write_processing_files(path)
    return Tokenizer.from_dir(path)


def serve(tokenizer, script: str, **config) -> InProcessServer:
    return InProcessServer(StructuredFakeEngine(tokenizer, script), api_key="test-key", **config)


def chat(server, **fields) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", headers=KEY, timeout=30,
                      json={"model": "autoglm-phone-9b", "messages": MSG, **fields})


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="test-key")


# ---- request fields -> one constraint -----------------------------------------------------------------
def parse(**fields) -> P.ChatCompletionRequest:
    return P.parse_request(P.ChatCompletionRequest, json.dumps({"messages": MSG, **fields}).encode())


@pytest.mark.parametrize("fields, kind", [
    ({"response_format": {"type": "json_object"}}, "json_object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": TAP}}}, "json"),
    ({"response_format": {"type": "text"}}, None),
    ({"structured_outputs": {"json": TAP}}, "json"),
    ({"structured_outputs": {"regex": "a+"}}, "regex"),
    ({"structured_outputs": {"choice": ["a", "b"]}}, "choice"),
    ({"structured_outputs": {"grammar": 'start: "a"'}}, "grammar"),
    ({"structured_outputs": {"json_object": True}}, "json_object"),
    ({"guided_json": json.dumps(TAP)}, "json"),
    ({"guided_regex": "a+"}, "regex"),
    ({"guided_choice": ["a", "b"]}, "choice"),
    ({"guided_grammar": 'root ::= "a"'}, "grammar"),
    ({"tools": TOOLS, "tool_choice": "required"}, "json"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "tap"}}}, "json"),
    ({"tools": TOOLS, "tool_choice": "auto"}, None),
    ({"tools": TOOLS}, None),
    ({"tools": TOOLS, "tool_choice": "none"}, None),
    ({}, None),
])
def test_fields_to_one_constraint(fields, kind) -> None:
    spec = S.structured_request(parse(**fields))
    assert (spec.constraint.kind if spec.constraint else None) == kind


def test_named_tool_constrains_to_its_arguments() -> None:
    spec = S.structured_request(parse(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "tap"}}))
    assert spec.constraint.schema() == TAP and spec.tool_mode == "named" and spec.tool_name == "tap"


@pytest.mark.parametrize("fields, param, words", [
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "only one"),
    ({"response_format": {"type": "json_object"}, "tools": TOOLS, "tool_choice": "required"}, "tool_choice",
     "only one"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice", "fly"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema",
     "schema"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "not supported"),
])
def test_bad_asks_are_400s_naming_the_field(fields, param, words) -> None:
    with pytest.raises(ServeError, match=words) as info:
        S.structured_request(parse(**fields))
    assert info.value.status == 400 and info.value.param == param


def test_reasoning_gate_follows_the_parser_and_thinking() -> None:
    on, off = SimpleNamespace(reasoning_parser="glm45"), SimpleNamespace(reasoning_parser=None)
    assert S.after_reasoning(on, parse())
    assert not S.after_reasoning(off, parse())
    assert not S.after_reasoning(on, parse(enable_thinking=False))
    assert not S.after_reasoning(on, parse(chat_template_kwargs={"enable_thinking": False}))
    spec = S.structured_request(parse(guided_regex="a"), after_reasoning=True)
    assert spec.constraint.after_reasoning
    actions = S.structured_request(parse(), after_reasoning=True, constrain_actions=True)
    assert actions.constraint == StructuredOutputs.actions()  # the action grammar spans the whole reply


# ---- over HTTP --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "nonsense"}}}},
     "response_format", "invalid JSON schema"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "invalid regex"),
    ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs.grammar", "nowhere"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}],
      "tool_choice": "required"}, "tool_choice", "invalid JSON schema"),
])
def test_invalid_constraints_are_400_over_http(tokenizer, fields, param, words) -> None:
    with serve(tokenizer, "x") as server:
        resp = chat(server, **fields)
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"]
        assert chat(server).status_code == 200  # and the server keeps serving


def test_constraint_reaches_sampling_params(tokenizer) -> None:
    with serve(tokenizer, '{"x": 1}') as server:
        assert chat(server, response_format={"type": "json_schema",
                                             "json_schema": {"name": "t", "schema": TAP}}).status_code == 200
        assert server.engine.last_constraint() == StructuredOutputs.json_schema(TAP)
        assert chat(server, guided_choice=["a", "b"], n=2).status_code == 200
        assert [p.structured_outputs.kind for p in list(server.engine.params.values())[-2:]] == ["choice"] * 2
        resp = httpx.post(server.url + "/v1/completions", headers=KEY, timeout=30,
                          json={"prompt": "hi", "guided_regex": "[0-9]+"})
        assert resp.status_code == 200 and server.engine.last_constraint() == StructuredOutputs.regex("[0-9]+")
        assert chat(server).status_code == 200 and server.engine.last_constraint() is None


def test_constrain_actions_server_option(tokenizer) -> None:
    with serve(tokenizer, "x", constrain_actions=True, reasoning_parser="glm45") as server:
        chat(server)
        assert server.engine.last_constraint() == StructuredOutputs.actions()
        chat(server, max_tokens=3000)
        assert server.engine.last_constraint() == StructuredOutputs.actions(max_tokens=3000)
        chat(server, response_format={"type": "json_object"})
        assert server.engine.last_constraint() == StructuredOutputs.json_object(after_reasoning=True)


def test_named_tool_call_reply(tokenizer) -> None:
    named = {"type": "function", "function": {"name": "tap"}}
    with serve(tokenizer, '{"x": 1, "y": 2}') as server:
        done = client(server).chat.completions.create(model="autoglm-phone-9b", messages=MSG, tools=TOOLS,
                                                      tool_choice=named)
        msg = done.choices[0].message
        assert msg.content is None and done.choices[0].finish_reason == "stop"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [("tap", {"x": 1, "y": 2})]
        stream = client(server).chat.completions.create(model="autoglm-phone-9b", messages=MSG, tools=TOOLS,
                                                        tool_choice=named, stream=True)
        deltas = [c.choices[0].delta for c in stream if c.choices]
        calls = [tc for d in deltas for tc in (d.tool_calls or [])]
        assert calls[0].function.name == "tap" and calls[0].id and sum(1 for c in calls if c.id) == 1
        assert json.loads("".join(c.function.arguments for c in calls)) == {"x": 1, "y": 2}
        assert not any(d.content for d in deltas)


def test_required_tool_calls_reply_with_reasoning(tokenizer) -> None:
    script = '<think>tap it</think>[{"name": "tap", "parameters": {"x": 5, "y": 6}}, {"name": "home", "parameters": {}}]'
    with serve(tokenizer, script, reasoning_parser="glm45") as server:
        done = client(server).chat.completions.create(model="autoglm-phone-9b", messages=MSG, tools=TOOLS,
                                                      tool_choice="required")
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.reasoning_content == "tap it"
        got = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
        assert got == [("tap", {"x": 5, "y": 6}), ("home", {})]
        assert server.engine.last_constraint().after_reasoning
        stream = client(server).chat.completions.create(model="autoglm-phone-9b", messages=MSG, tools=TOOLS,
                                                        tool_choice="required", stream=True)
        chunks = [c for c in stream if c.choices]
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert [c.function.name for c in calls] == ["tap", "home"] and [c.index for c in calls] == [0, 1]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_truncated_tool_call_comes_back_as_content(tokenizer) -> None:
    with serve(tokenizer, '{"x": 1, "y": 2}') as server:
        resp = chat(server, tools=TOOLS, tool_choice="required", max_tokens=5).json()
        choice = resp["choices"][0]
        assert choice["finish_reason"] == "length" and choice["message"]["content"] == '{"x":'
        assert choice["message"]["tool_calls"] == []


# ---- gRPC: TensorRT-LLM's guided decoding inputs --------------------------------------------------------
def test_grpc_guided_decoding_inputs(tokenizer) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    def inputs(guide_type: str, guide: str) -> list:
        out = []
        for name, value in (("text_input", "hi"), ("guided_decoding_guide_type", guide_type),
                            ("guided_decoding_guide", guide)):
            tensor = grpcclient.InferInput(name, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[value.encode()]], dtype=object))
            out.append(tensor)
        return out

    with serve(tokenizer, "42") as server:
        grpc_client = grpcclient.InferenceServerClient(server.grpc_url)
        grpc_client.infer("ensemble", inputs("regex", "[0-9]+"), headers={"authorization": "Bearer test-key"})
        assert server.engine.last_constraint() == StructuredOutputs.regex("[0-9]+")
        grpc_client.infer("ensemble", inputs("json_schema", json.dumps(TAP)),
                          headers={"authorization": "Bearer test-key"})
        assert server.engine.last_constraint() == StructuredOutputs.json_schema(TAP)
        for guide_type, guide, words in (("regex", "(unclosed", "invalid regex"), ("yaml", "x", "must be one of")):
            with pytest.raises(InferenceServerException, match=words) as info:
                grpc_client.infer("ensemble", inputs(guide_type, guide), headers={"authorization": "Bearer test-key"})
            assert "INVALID_ARGUMENT" in str(info.value.status())
        grpc_client.close()
