"""The HTTP layer against careless and hostile clients (in-process server over the FakeEngine): body limit (413),
prompts too long to tokenize, clients that hang up mid-body, the key on every /v1 path, /openapi.json and /docs."""

from __future__ import annotations

import json
import logging
import socket
import time

import grpc
import httpx
import pytest

from autoglm_trt.serve.grpc import inference_pb2 as pb
from autoglm_trt.serve.grpc import inference_pb2_grpc as pb_grpc

from serve_fakes import FakeEngine
from serve_harness import InProcessServer
from test_serve_http import KEY, MSG, assert_error


@pytest.fixture(scope="module")
def small_server():
    with InProcessServer(FakeEngine(), max_request_bytes=10_000) as server:
        yield server


def test_body_over_the_limit_is_413(small_server):
    url = small_server.url + "/v1/chat/completions"
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 12_000}]}).encode()
    assert_error(httpx.post(url, content=big, headers={"content-type": "application/json"}), 413, "--max-request-bytes")

    def chunked():  # no Content-Length: counted while reading
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    err = assert_error(httpx.post(url, content=chunked()), 413, "10000")
    assert err["code"] == "request_too_large"
    ok = httpx.post(url, json={"messages": MSG, "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200, ok.text


def test_a_prompt_too_long_to_fit_is_refused_before_tokenizing(fake_server):
    calls = len(fake_server.engine.processor.calls)
    long_text = "y" * 5000  # the fake tokenizer: one character per token; max_model_len 4096
    err = assert_error(httpx.post(fake_server.url + "/v1/chat/completions", headers=KEY, timeout=30,
                                  json={"messages": [{"role": "user", "content": long_text}]}), 400, "5000", "4096")
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert len(fake_server.engine.processor.calls) == calls  # refused without building the prompt
    assert_error(httpx.post(fake_server.url + "/v1/completions", headers=KEY, json={"prompt": long_text}), 400, "5000")
    request = pb.ModelInferRequest(model_name="ensemble", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text_input", datatype="BYTES", shape=[1, 1], contents=pb.InferTensorContents(
            bytes_contents=[long_text.encode()]))])
    with grpc.insecure_channel(fake_server.grpc_url) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=(("authorization", KEY["Authorization"]),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "5000" in info.value.details()


def test_clients_hanging_up_mid_body_are_one_debug_line_each(fake_server, caplog):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: " + KEY["Authorization"].encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"messages\": [")
    with caplog.at_level(logging.DEBUG):
        socks = [socket.create_connection(("127.0.0.1", fake_server.config.port)) for _ in range(20)]
        for s in socks:
            s.sendall(head)
        time.sleep(0.3)
        for s in socks:
            s.close()
        time.sleep(1.0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records][:3]
    hung_up = [r for r in caplog.records if "hung up" in r.getMessage()]
    assert 1 <= len(hung_up) <= 20 and all(r.levelno == logging.DEBUG for r in hung_up)


def test_every_v1_path_needs_the_key(fake_server):
    assert_error(httpx.get(fake_server.url + "/v1/no-such-route"), 401, "API key")
    assert_error(httpx.post(fake_server.url + "/v1/embeddings", json={}), 401)
    assert_error(httpx.get(fake_server.url + "/v1/no-such-route", headers=KEY), 404)
    assert httpx.get(fake_server.url + "/openapi.json").status_code == 200  # the docs are not the API


def test_openapi_and_docs(fake_server):
    spec = httpx.get(fake_server.url + "/openapi.json").json()
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = body["$ref"].rsplit("/", 1)[1]
    schema = spec["components"]["schemas"][name]
    assert {"messages", "max_tokens", "temperature", "top_p", "frequency_penalty", "stream"} <= set(schema["properties"])
    refs = {v.rsplit("/", 1)[1] for v in _refs(spec)}
    assert refs <= set(spec["components"]["schemas"]), refs - set(spec["components"]["schemas"])
    assert "/v1/completions" in spec["paths"] and "/health" in spec["paths"]
    docs = httpx.get(fake_server.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)
