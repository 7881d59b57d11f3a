"""Request validation (strict types, unknown fields ignored, clear locations) and response shapes."""

from __future__ import annotations

import json

import pytest

from autoglm_trt.serve.errors import ServeError, body_for, error_body
from autoglm_trt.serve.openai import protocol as P

MSG = [{"role": "user", "content": "hi"}]


def parse(body) -> P.ChatCompletionRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return P.parse_request(P.ChatCompletionRequest, raw)


def error_of(body) -> ServeError:
    with pytest.raises(ServeError) as info:
        parse(body)
    assert info.value.status == 400
    return info.value


def test_autoglm_client_request_parses():
    req = parse({"model": "autoglm-phone-9b", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "tap the button"}]}], "stream": True, "max_tokens": 3000,
        "temperature": 0.0, "top_p": 0.85, "frequency_penalty": 0.2})
    assert req.stream and req.max_tokens == 3000 and req.top_p == 0.85
    assert isinstance(req.messages[0].content[0], P.ImageURLPart)


def test_langchain_extra_body_fields_parse():
    req = parse({"model": "autoglm-phone-9b", "messages": MSG, "stream": True, "n": 1,
                 "enable_thinking": True, "return_reasoning": True,
                 "stream_options": {"include_usage": True}})
    assert req.enable_thinking is True and req.return_reasoning is True
    assert req.stream_options.include_usage


def test_unknown_fields_are_ignored():
    req = parse({"model": "m", "messages": MSG, "some_future_field": {"x": 1}, "parallel_tool_calls": False})
    assert not hasattr(req, "some_future_field")


@pytest.mark.parametrize("field,value", [("temperature", "0"), ("max_tokens", "12"), ("max_tokens", 1.5),
                                         ("stream", 1), ("n", 0), ("top_logprobs", 25), ("stop", 5),
                                         ("max_tokens", 0), ("seed", "x"), ("logprobs", "yes")])
def test_wrong_types_are_400_naming_the_field(field, value):
    err = error_of({"model": "m", "messages": MSG, field: value})
    assert err.param.split(".")[0] == field
    assert field in str(err)


def test_non_finite_numbers_rejected():
    err = error_of(b'{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":NaN}')
    assert err.param == "temperature"


def test_malformed_json_and_non_object():
    assert "not valid JSON" in str(error_of(b'{"model": "m", "messages": ['))
    assert "not valid JSON" in str(error_of(b""))
    assert "JSON object" in str(error_of(b"[1, 2]"))


def test_union_errors_point_at_the_deepest_location():
    err = error_of({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]})
    assert err.param == "messages.0.content.0.text"
    err = error_of({"model": "m", "messages": MSG, "stop": ["ok", 1]})
    assert err.param == "stop.1"
    err = error_of({"model": "m", "messages": [{"role": "user", "content": [{"type": "bogus"}]}]})
    assert err.param == "messages.0.content.0" and "bogus" in str(err)


def test_missing_or_empty_messages():
    assert error_of({"model": "m"}).param == "messages"
    assert error_of({"model": "m", "messages": []}).param == "messages"
    assert error_of({"model": "m", "messages": [{"role": "robot", "content": "x"}]}).param == "messages.0.role"


def test_audio_parts_parse_so_the_handler_can_refuse_them_clearly():
    req = parse({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]})
    assert isinstance(req.messages[0].content[0], P.UnsupportedPart)


def test_completion_prompt_forms():
    for prompt in ("hi", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        req = P.parse_request(P.CompletionRequest, json.dumps({"model": "m", "prompt": prompt}).encode())
        assert req.prompt == prompt
    with pytest.raises(ServeError):
        P.parse_request(P.CompletionRequest, b'{"model": "m", "prompt": 5}')


def test_chunk_and_response_shapes():
    chunk = P.chat_chunk("id", "m", 1, [P.chunk_choice(0, P.delta(role="assistant", content=""))])
    assert chunk["object"] == "chat.completion.chunk" and "usage" not in chunk
    assert chunk["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}
    with_usage = P.chat_chunk("id", "m", 1, [], P.usage(3, 4), with_usage_field=True)
    assert with_usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    d = P.delta(content="x", reasoning="why")
    assert d == {"content": "x", "reasoning_content": "why", "reasoning": "why"}
    choice = P.chat_choice(0, "answer", None, "stop", None)
    assert "reasoning_content" not in choice["message"] and choice["message"]["content"] == "answer"


def test_error_body_shape():
    body = error_body("bad", 400, "temperature")
    assert body == {"error": {"message": "bad", "type": "invalid_request_error", "param": "temperature",
                              "code": None}}
    assert error_body("no key", 401)["error"]["code"] == "invalid_api_key"
    assert error_body("busy", 429)["error"]["type"] == "rate_limit_error"
    assert body_for(ServeError("x", status=400, code="model_not_found"))["error"]["code"] == "model_not_found"
