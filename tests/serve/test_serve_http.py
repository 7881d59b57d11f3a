"""The OpenAI HTTP layer over the scripted FakeEngine: exact SSE framing, reasoning split, images,
n fan-out, logprobs, completions, errors, 429, health while loading and aborts on disconnect."""

from __future__ import annotations

import base64
import io
import json
import socket
import time

import httpx
from PIL import Image

from serve_fakes import FakeEngine
from serve_harness import InProcessServer

KEY = {"Authorization": "Bearer test-key"}
MSG = [{"role": "user", "content": "hi"}]
SCRIPT_CONTENT = '<answer>do(action="Tap")</answer>'


def png_url(size=(20, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (0, 128, 255)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def post(server, path, body, headers=KEY, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30, **kw)


def chat(server, **fields) -> httpx.Response:
    return post(server, "/v1/chat/completions", {"model": "autoglm-phone-9b", "messages": MSG, **fields})


def sse_events(resp: httpx.Response) -> list:
    """Parse a whole SSE body strictly: only `data: ...` events separated by blank lines."""
    assert resp.headers["content-type"].startswith("text/event-stream")
    body = resp.text
    assert body.endswith("data: [DONE]\n\n")
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    return [e[6:] if e == "data: [DONE]" else json.loads(e[6:]) for e in events]


def assert_error(resp: httpx.Response, status: int, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err
    return err


# ---- basics ----------------------------------------------------------------------------------------
def test_health_version_models_metrics(fake_server):
    assert httpx.get(fake_server.url + "/health").status_code == 200
    assert "version" in httpx.get(fake_server.url + "/version").json()
    models = httpx.get(fake_server.url + "/v1/models", headers=KEY).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "autoglm-phone-9b"
    text = httpx.get(fake_server.url + "/metrics").text
    assert "autoglm:kv_blocks_in_use" in text and "autoglm:time_to_first_token_seconds" in text


def test_api_key(fake_server):
    assert_error(httpx.get(fake_server.url + "/v1/models"), 401, "API key")
    wrong = post(fake_server, "/v1/chat/completions", {"messages": MSG}, headers={"Authorization": "Bearer wrong"})
    assert assert_error(wrong, 401)["code"] == "invalid_api_key"
    assert httpx.get(fake_server.url + "/health").status_code == 200  # probes need no key


# ---- chat ------------------------------------------------------------------------------------------
def test_chat_non_streaming_keeps_think_without_parser(fake_server):
    resp = chat(fake_server, max_tokens=200, temperature=0.0)
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == "autoglm-phone-9b"
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"] == fake_server.engine.script
    assert "reasoning_content" not in msg
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == len(fake_server.engine.script)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_return_reasoning_splits_think(fake_server):
    msg = chat(fake_server, return_reasoning=True).json()["choices"][0]["message"]
    assert msg["reasoning_content"] == "hmm" and msg["reasoning"] == "hmm"
    assert msg["content"] == SCRIPT_CONTENT


def test_chat_stream_exact_openai_framing(fake_server):
    events = sse_events(chat(fake_server, stream=True, max_tokens=5))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == fake_server.engine.script[:5]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_chat_stream_include_usage(fake_server):
    events = sse_events(chat(fake_server, stream=True, max_tokens=4, stream_options={"include_usage": True}))
    chunks = events[:-1]
    assert all("usage" in c for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_chat_stream_reasoning_deltas(fake_server):
    chunks = sse_events(chat(fake_server, stream=True, return_reasoning=True))[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    assert reasoning == "".join(d.get("reasoning", "") for d in deltas) == "hmm"
    assert "".join(d.get("content", "") for d in deltas) == SCRIPT_CONTENT


def test_server_reasoning_parser_splits_without_the_request_flag():
    with InProcessServer(FakeEngine(), reasoning_parser="glm45") as server:
        msg = chat(server, max_tokens=200).json()["choices"][0]["message"]
        assert (msg["reasoning_content"], msg["content"]) == ("hmm", SCRIPT_CONTENT)
        deltas = [c["choices"][0]["delta"] for c in sse_events(chat(server, stream=True))[:-1]]
        assert "".join(d.get("reasoning", "") for d in deltas) == "hmm"


def test_template_kwargs_and_enable_thinking_reach_the_processor(fake_server):
    calls = fake_server.engine.processor.calls
    chat(fake_server, max_tokens=1, enable_thinking=False)
    assert calls[-1]["chat_template_kwargs"] == {"enable_thinking": False}
    chat(fake_server, max_tokens=1, chat_template_kwargs={"enable_thinking": True, "foo": 1}, enable_thinking=False)
    assert calls[-1]["chat_template_kwargs"] == {"enable_thinking": True, "foo": 1}
    chat(fake_server, max_tokens=1, mm_processor_kwargs={"max_pixels": 12345})
    assert calls[-1]["max_pixels"] == 12345


def test_image_parts_become_pil_images(fake_server):
    msgs = [{"role": "system", "content": "phone agent"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url()}},
                                         {"type": "text", "text": "tap"}]}]
    resp = post(fake_server, "/v1/chat/completions", {"model": "autoglm-phone-9b", "messages": msgs, "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    part = fake_server.engine.processor.calls[-1]["messages"][1]["content"][0]
    assert part["type"] == "image" and isinstance(part["image"], Image.Image) and part["image"].size == (20, 10)


def test_n_choices(fake_server):
    body = chat(fake_server, n=3, max_tokens=3).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 9
    chunks = sse_events(chat(fake_server, n=2, max_tokens=3, stream=True))[:-1]
    for i in (0, 1):
        mine = [c for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in mine) == fake_server.engine.script[:3]


def test_logprobs_chat_format(fake_server):
    lp = chat(fake_server, max_tokens=2, logprobs=True, top_logprobs=2).json()["choices"][0]["logprobs"]
    first = lp["content"][0]
    assert first["token"] == "<" and first["bytes"] == [60] and len(first["top_logprobs"]) == 2
    ids = chat(fake_server, max_tokens=2, logprobs=True, return_tokens_as_token_ids=True).json()
    assert ids["choices"][0]["logprobs"]["content"][0]["token"] == "token_id:60"
    chunks = sse_events(chat(fake_server, max_tokens=2, logprobs=True, stream=True))[:-1]
    assert sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks if c["choices"][0]["logprobs"]) == 2


def test_stop_string(fake_server):
    body = chat(fake_server, stop=["</think>"]).json()  # the engine trims; the fake only stops
    assert body["choices"][0]["message"]["content"].startswith("<think>hmm")
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 18


# ---- completions -----------------------------------------------------------------------------------
def test_completions(fake_server):
    body = post(fake_server, "/v1/completions", {"model": "autoglm-phone-9b", "prompt": "abc", "max_tokens": 3,
                                                "echo": True, "logprobs": 1}).json()
    assert body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["text"] == "abc<th" and choice["logprobs"]["text_offset"] == [3, 4, 5]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    batch = post(fake_server, "/v1/completions", {"prompt": ["a", "bb"], "max_tokens": 2, "n": 2}).json()
    assert len(batch["choices"]) == 4 and batch["usage"]["prompt_tokens"] == 3
    ids = post(fake_server, "/v1/completions", {"prompt": [104, 105], "max_tokens": 1}).json()
    assert ids["usage"]["prompt_tokens"] == 2
    events = sse_events(post(fake_server, "/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "<th"
    assert all(e["object"] == "text_completion" for e in events[:-1])


# ---- errors ----------------------------------------------------------------------------------------
def test_error_cases_are_4xx_and_the_server_keeps_serving(fake_server):
    url = fake_server.url + "/v1/chat/completions"
    assert_error(httpx.post(url, content=b'{"messages": [', headers=KEY), 400, "JSON")
    assert_error(chat(fake_server, temperature="hot"), 400, "temperature")
    unknown = assert_error(chat(fake_server, model="gpt-4"), 404, "gpt-4", "autoglm-phone-9b")  # OpenAI's, vLLM's
    assert unknown["code"] == "model_not_found" and unknown["param"] == "model"
    err = assert_error(chat(fake_server, max_tokens=5000), 400, "max_model_len is 4096", "5000")
    assert err["param"] == "max_tokens"
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}]}]
    assert_error(post(fake_server, "/v1/chat/completions", {"messages": audio}), 400, "audio")
    local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/hosts"}}]}]
    assert_error(post(fake_server, "/v1/chat/completions", {"messages": local}), 400, "allowed-local-media-path")
    bad_img = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    assert_error(post(fake_server, "/v1/chat/completions", {"messages": bad_img}), 400, "image 1")
    many = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url()}}] * 11}]
    assert_error(post(fake_server, "/v1/chat/completions", {"messages": many}), 400, "11 images", "at most 10")
    assert_error(chat(fake_server, messages=[{"role": "user", "content": "RAISE_USER_ERROR"}]), 400, "template")
    assert_error(httpx.get(fake_server.url + "/v1/nothing", headers=KEY), 404)
    assert_error(httpx.get(url, headers=KEY), 405)
    assert_error(post(fake_server, "/v1/completions", {"prompt": "x", "suffix": "y"}), 400, "suffix")
    assert chat(fake_server, max_tokens=2).status_code == 200


# ---- capacity, loading, disconnects ----------------------------------------------------------------
def test_queue_full_is_429_with_retry_after():
    engine = FakeEngine(script="x" * 10_000, max_num_seqs=1, step_delay=0.01)
    with InProcessServer(engine, max_queue=0) as server:
        body = {"messages": MSG, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as first:
            lines = first.iter_lines()  # NOTE: keep a reference: a collected iterator closes the stream
            next(lines)
            resp = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
            err = assert_error(resp, 429, "capacity")
            assert resp.headers["Retry-After"] == "1" and err["type"] == "rate_limit_error"
        deadline = time.time() + 5
        while server.state.client.in_flight and time.time() < deadline:
            time.sleep(0.02)
        assert httpx.post(server.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 2}).status_code == 200


def test_health_is_503_until_the_engine_is_adopted():
    with InProcessServer(FakeEngine(), start_engine=False) as server:
        resp = httpx.get(server.url + "/health")
        assert resp.status_code == 503 and "loading" in resp.json()["error"]["message"]
        assert_error(httpx.post(server.url + "/v1/chat/completions", json={"messages": MSG}), 503, "loading")
        server.start_engine_now()
        assert httpx.get(server.url + "/health").status_code == 200


def _wait_idle(server, engine, seconds=5.0) -> None:
    deadline = time.time() + seconds
    while (server.state.client.in_flight or engine.requests) and time.time() < deadline:
        time.sleep(0.01)


def test_stream_disconnect_aborts_the_request():
    engine = FakeEngine(script="y" * 10_000, step_delay=0.005)
    with InProcessServer(engine) as server:
        body = {"messages": MSG, "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            for _ in range(5):
                next(lines)
        _wait_idle(server, engine)
        assert len(engine.aborted) == 1 and not engine.requests and engine.blocks_in_use() == 0


def test_non_stream_disconnect_aborts_the_request():
    engine = FakeEngine(script="y" * 10_000, step_delay=0.005)
    with InProcessServer(engine) as server:
        body = json.dumps({"messages": MSG, "max_tokens": 3000, "ignore_eos": True}).encode()
        sock = socket.create_connection(("127.0.0.1", server.config.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.time() + 5
        while not engine.requests and time.time() < deadline:
            time.sleep(0.01)
        assert engine.requests
        sock.close()  # the client goes away before the answer is ready
        _wait_idle(server, engine)
        assert len(engine.aborted) == 1 and not engine.requests
