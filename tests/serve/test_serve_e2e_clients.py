"""End to end: the real `autoglm-trt serve` on the tiny random checkpoint (CPU), driven by the
official clients (openai sync/async/streaming/images, langchain-openai) and plain HTTP errors."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import openai
import pytest
from PIL import Image

from serve_harness import start_serve

pytestmark = pytest.mark.slow
KEY = "e2e-key"
MODEL = "autoglm-phone-9b"
# What Open-AutoGLM's phone agent sends (max_tokens kept small: the CPU engine is slow).
AGENT = dict(temperature=0.0, top_p=0.85, frequency_penalty=0.2)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("media")
    Image.new("RGB", (112, 224), (30, 60, 90)).save(path / "screen.png")
    return path


@pytest.fixture(scope="module")
def server(tiny_model_dir, media_dir):
    proc = start_serve(tiny_model_dir, "--max-model-len", "4096", "--allowed-local-media-path", str(media_dir),
                       "--max-pixels", "200000", api_key=KEY)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def png_data_url(size=(280, 560)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_startup_log_reports_devices_memory_kv_and_urls(server):
    log = server.output()
    for needle in ("devices:", "loaded in", "memory used", "dtype float32, quantization none, tp 1", "max-model-len ",
                   "KV cache ", "tokens", f"http://127.0.0.1:{server.port}/v1", f"grpc://127.0.0.1:{server.grpc_port}"):
        assert needle in log, (needle, log)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    assert "autoglm:kv_cache_usage_perc" in httpx.get(server.url + "/metrics").text


def test_openai_sync(client):
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Open the settings"}],
                                          max_tokens=8, **AGENT)
    choice = resp.choices[0]
    assert choice.finish_reason in ("length", "stop") and choice.message.role == "assistant"
    assert resp.usage.completion_tokens <= 8 and resp.usage.prompt_tokens > 0


def test_openai_streaming_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                            stream=True, stream_options={"include_usage": True}, logprobs=True,
                                            extra_body={"return_tokens_as_token_ids": True}, **AGENT)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    tokens = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish and len(tokens) == chunks[-1].usage.completion_tokens
    assert all(t.startswith("token_id:") for t in tokens)


def test_openai_async_concurrent(server):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        calls = [aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"task {i}"}],
                                                 max_tokens=4, n=2, **AGENT) for i in range(4)]
        return await asyncio.gather(*calls)

    for resp in asyncio.run(main()):
        assert [c.index for c in resp.choices] == [0, 1]


def test_openai_image_input(client, media_dir):
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}},
                                         {"type": "text", "text": "Where is the search button?"}]}]
    resp = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, **AGENT)
    # 280x560 at max_pixels 200000 -> a (10 x 20)-patch grid -> 50 image tokens at least
    assert resp.usage.prompt_tokens > 50
    small = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4,
                                           extra_body={"mm_processor_kwargs": {"max_pixels": 50_000}}, **AGENT)
    assert small.usage.prompt_tokens < resp.usage.prompt_tokens
    local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{media_dir}/screen.png"}},
                                          {"type": "text", "text": "describe"}]}]
    stream = client.chat.completions.create(model=MODEL, messages=local, max_tokens=3, stream=True, **AGENT)
    assert [c for c in stream][-1].choices[0].finish_reason is not None


def test_langchain_chat_openai(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key=KEY, max_tokens=6, temperature=0.0,
                     extra_body={"enable_thinking": True, "return_reasoning": True}, streaming=True, max_retries=0)
    msg = llm.invoke("Open WeChat")
    assert msg.response_metadata["finish_reason"] in ("length", "stop")
    chunks = list(llm.stream("Open WeChat"))
    assert chunks and any(c.response_metadata.get("finish_reason") for c in chunks)


def test_completions_endpoint(client):
    resp = client.completions.create(model=MODEL, prompt="The screen shows", max_tokens=5, temperature=0.0)
    assert resp.choices[0].finish_reason in ("length", "stop") and resp.usage.completion_tokens <= 5


def _post(server, body, key=KEY, raw=None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.url + "/v1/chat/completions", content=content,
                      headers={**headers, "Content-Type": "application/json"}, timeout=60)


def _err(resp: httpx.Response, status: int, *words: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]


def test_plain_http_errors_and_the_server_keeps_serving(server):
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    _err(_post(server, None, raw=b'{"model": "autoglm-phone-9b", "messages": [}'), 400, "JSON")
    _err(_post(server, {**ok, "max_tokens": "many"}), 400, "max_tokens")
    _err(_post(server, {**ok, "messages": "hi"}), 400, "messages")
    _err(_post(server, {**ok, "model": "gpt-4o"}), 404, "gpt-4o")  # OpenAI's and vLLM's model_not_found
    _err(_post(server, {**ok, "max_tokens": 4000, "messages": [{"role": "user", "content": "word " * 200}]}),
         400, "max_model_len is 4096", "4000")
    bad_image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}]}]
    _err(_post(server, {**ok, "messages": bad_image}), 400, "image 1")
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]
    _err(_post(server, {**ok, "messages": audio}), 400, "audio")
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]
    _err(_post(server, {**ok, "messages": remote}), 400, "allow-remote-media")
    outside = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}]}]
    _err(_post(server, {**ok, "messages": outside}), 400, "outside")
    many = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url((28, 28))}}] * 11}]
    _err(_post(server, {**ok, "messages": many}), 400, "at most 10")
    _err(_post(server, ok, key=None), 401)
    _err(_post(server, ok, key="wrong"), 401)
    _err(httpx.get(server.url + "/v1/nope", headers={"Authorization": f"Bearer {KEY}"}), 404)
    assert _post(server, ok).status_code == 200
    assert "autoglm:request_rejected_total" in httpx.get(server.url + "/metrics").text
