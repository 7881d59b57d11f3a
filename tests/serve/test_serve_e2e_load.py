"""End to end under load (real engine, tiny checkpoint, CPU): 32 concurrent greedy streams get
exactly a lone request's tokens; 100 streams dropped mid-way leave no KV block in use; the bench
tool runs against the server."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from autoglm_trt.serve.bench import run_bench

from serve_harness import start_serve

pytestmark = pytest.mark.slow
PROMPTS = ["Open the settings app", "Search for coffee nearby", "Send a message to Li Lei", "Go back home"]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc = start_serve(tiny_model_dir, "--max-model-len", "512", "--max-num-seqs", "64", "--max-queue", "256")
    yield proc
    proc.stop()


def body(prompt: str, max_tokens: int) -> dict:
    return {"model": "autoglm-phone-9b", "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "logprobs": True,
            "return_tokens_as_token_ids": True}


async def stream_tokens(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int,
                        stop_after: int | None = None) -> list[str]:
    """Token ids (as "token_id:N") of one streamed request; with stop_after, hang up after that many."""
    tokens: list[str] = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body(prompt, max_tokens)) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            tokens += [t["token"] for t in (choice["logprobs"] or {}).get("content", [])]
            if stop_after is not None and len(tokens) >= stop_after:
                return tokens  # leaving the context closes the connection mid-stream
    return tokens


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    match = re.search(rf"^autoglm:{name}{{[^}}]*}} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_32_concurrent_streams_match_lone_greedy_requests(server):
    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            lone = {p: await stream_tokens(client, server.url, p, 24) for p in PROMPTS}
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
            together = await asyncio.gather(*(stream_tokens(client, server.url, p, 24) for p in prompts))
            return lone, prompts, together

    lone, prompts, together = asyncio.run(main())
    assert all(len(t) == 24 for t in lone.values())
    for prompt, tokens in zip(prompts, together):
        assert tokens == lone[prompt], prompt


def test_100_cancelled_streams_free_every_kv_block(server):
    async def main():
        limits = httpx.Limits(max_connections=128, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            prompts = [f"{PROMPTS[i % 4]} #{i}" for i in range(100)]
            got = await asyncio.gather(*(stream_tokens(client, server.url, p, 400, stop_after=3) for p in prompts))
            return got

    got = asyncio.run(main())
    assert all(len(t) >= 3 for t in got)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if (metric(server.url, "kv_blocks_in_use") == 0 and metric(server.url, "num_requests_running") == 0
                and metric(server.url, "num_requests_waiting") == 0):
            break
        time.sleep(0.1)
    assert metric(server.url, "kv_blocks_in_use") == 0
    assert metric(server.url, "num_requests_in_server") == 0
    assert metric(server.url, "generation_tokens_total") < 100 * 400 / 4  # they really stopped early
    # and the engine still answers correctly afterwards
    again = asyncio.run(_lone(server.url, PROMPTS[0]))
    assert len(again) == 8


async def _lone(url: str, prompt: str) -> list[str]:
    async with httpx.AsyncClient(timeout=60) as client:
        return await stream_tokens(client, url, prompt, 8)


def test_bench_against_the_server(server, tmp_path):
    out = tmp_path / "bench.json"
    # NOTE: the random checkpoint's tokens mostly decode to no text: time them through logprobs
    report = run_bench(server.url, [1, 4], prompt_len=64, gen_len=8, json_out=out, num_requests=4, max_seconds=60,
                       logprobs=True)
    assert json.dumps(json.loads(out.read_text())["levels"]) == json.dumps(report["levels"])
    for level in report["levels"]:
        assert level["failed"] == 0 and level["mean_output_tokens"] == 8
        assert 0 < level["ttft_p50_ms"] <= level["ttft_p99_ms"] and 0 < level["itl_p50_ms"] <= level["itl_p99_ms"]
        assert abs(level["mean_prompt_tokens"] - 64) <= 16
        # the real engine's phases, read from /metrics around the level: queue + prefill make the server's TTFT
        ms = level["server_ms"]
        assert min(ms[p] for p in ("preprocess", "queue", "prefill")) > 0
        assert ms["queue"] + ms["prefill"] == pytest.approx(ms["ttft"], rel=0.05, abs=1.0)
        assert ms["ttft"] < level["ttft_p99_ms"]
