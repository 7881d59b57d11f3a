"""`autoglm-trt bench`: its statistics, SSE parsing, and one bounded run over loopback."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from autoglm_trt.serve.bench import (RequestResult, make_prompt, normalize_url, parse_sse_line, percentile,
                                     run_bench, summarize)

from autoglm_trt.serve.bench_metrics import parse_totals, phase_means_ms

from serve_fakes import FakeEngine
from serve_harness import InProcessServer


@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4, 0.35]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert math.isnan(percentile([], q))


def test_summarize():
    results = [RequestResult(True, latency=1.0, ttft=0.1, itls=[0.01, 0.03], prompt_tokens=100, output_tokens=10),
               RequestResult(True, latency=2.0, ttft=0.3, itls=[0.02], prompt_tokens=100, output_tokens=20),
               RequestResult(False, error="HTTP 429")]
    s = summarize(8, results, duration_s=2.0)
    assert (s.requests, s.failed, s.first_error) == (3, 1, "HTTP 429")
    assert s.requests_per_s == pytest.approx(1.0) and s.output_tokens_per_s == pytest.approx(15.0)
    assert s.ttft_p50_ms == pytest.approx(200.0) and s.itl_p50_ms == pytest.approx(20.0)
    assert s.tpot_mean_ms == pytest.approx(1e3 * ((0.9 / 9) + (1.7 / 19)) / 2)


def test_sse_lines_and_urls():
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert parse_sse_line("data: [DONE]") is None and parse_sse_line("") is None
    assert parse_sse_line(": keep-alive") is None
    assert normalize_url("localhost:8000/v1/") == "http://localhost:8000"
    assert make_prompt(5, 1) == make_prompt(5, 1) != make_prompt(5, 2)


def test_bench_run_over_loopback(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("autoglm_trt.serve.bench.PROGRESS_EVERY_S", 0.05)
    engine = FakeEngine(script="abcdefgh" * 100, step_delay=0.001)
    with InProcessServer(engine, max_queue=64) as server:
        out = tmp_path / "bench.json"
        report = run_bench(server.url, [1, 4], prompt_len=60, gen_len=16, json_out=out, num_requests=8,
                           max_seconds=30)
    saved = json.loads(out.read_text())
    assert json.dumps(saved["levels"]) == json.dumps(report["levels"]) and [lv["concurrency"] for lv in saved["levels"]] == [1, 4]
    for lv in saved["levels"]:
        assert lv["requests"] == 8 and lv["failed"] == 0 and lv["mean_output_tokens"] == 16
        assert lv["output_tokens_per_s"] > 0 and lv["ttft_p50_ms"] > 0 and lv["itl_p99_ms"] >= lv["itl_p50_ms"]
        assert abs(lv["mean_prompt_tokens"] - 60) <= 12  # calibrated (char tokenizer: ~6 tokens a word)
        ms = lv["server_ms"]  # the server's own phases, from its /metrics
        assert set(ms) == {"ttft", "preprocess", "queue", "prefill"} and min(ms.values()) >= 0
        assert ms["prefill"] >= 1.0  # one fake step of 1 ms at least
        assert ms["queue"] + ms["prefill"] == pytest.approx(ms["ttft"], abs=2.0)
        assert ms["ttft"] <= lv["ttft_p99_ms"]
    captured = capsys.readouterr()
    assert "TTFT p50 ms" in captured.out and "server side" in captured.out
    progress = captured.err  # NOTE: a CPU run of the defaults takes minutes: it must say how far it is
    assert "level 1/2: concurrency 1, 8 requests" in progress and "level 2/2: concurrency 4" in progress
    assert "concurrency 4: 8 requests (0 failed) in" in progress and "requests done" in progress


def test_metrics_totals_ours_and_vllms():
    page = """# HELP autoglm:request_queue_time_seconds x
autoglm:request_queue_time_seconds_bucket{le="0.1",model_name="m"} 1.0
autoglm:request_queue_time_seconds_sum{model_name="a } b"} 0.5 1700000000000
autoglm:request_queue_time_seconds_count{model_name="a } b"} 2.0
autoglm:request_prefill_time_seconds_count{model_name="m"} 7.0
vllm:time_to_first_token_seconds_sum 3.0
vllm:request_prefill_time_seconds_sum{engine="0",model_name="a"} 1.0
vllm:request_prefill_time_seconds_count{engine="0",model_name="a"} 4.0
vllm:request_prefill_time_seconds_sum{engine="1",model_name="a"} 3.0
vllm:request_prefill_time_seconds_count{engine="1",model_name="a"} 4.0
"""
    before = parse_totals(page)
    assert before == {"autoglm:request_queue_time_seconds": (0.5, 2.0), "vllm:request_prefill_time_seconds": (4.0, 8.0)}
    after = dict(before, **{"autoglm:request_queue_time_seconds": (2.5, 6.0)})
    assert phase_means_ms(before, after) == {"queue": pytest.approx(500.0)}  # prefill: no new requests
    assert phase_means_ms({}, before) == {"queue": 250.0, "prefill": 500.0}
    assert phase_means_ms(None, before) is None  # (a sum without its count, or a count alone, is left out)


def test_scrape_says_why_there_is_no_breakdown():
    import asyncio

    import httpx

    from autoglm_trt.serve.bench_metrics import scrape

    def answer(request):
        if request.url.path == "/metrics" and request.url.host == "open":
            return httpx.Response(200, text="autoglm:request_queue_time_seconds_sum 1.0\n"
                                             "autoglm:request_queue_time_seconds_count 4\n")
        return httpx.Response(401 if request.url.host == "locked" else 200, text="# nothing of ours\n")

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            return [await scrape(client, f"http://{host}", {}) for host in ("open", "locked", "other")]

    got = asyncio.run(main())
    assert got[0] == ({"autoglm:request_queue_time_seconds": (1.0, 4.0)}, None)
    assert got[1][0] is None and "HTTP 401" in got[1][1]
    assert got[2][0] is None and "no latency histograms" in got[2][1]


def test_unique_images_differ_and_decode(tmp_path):
    import base64
    import hashlib
    import io

    from PIL import Image

    from autoglm_trt.serve.bench import BenchTarget, image_variants

    src = tmp_path / "shot.png"
    Image.new("RGB", (64, 128), (200, 10, 10)).save(src)
    urls = image_variants(src, 300)
    raw = [base64.b64decode(u.split(",", 1)[1]) for u in urls]
    assert len({hashlib.sha256(r).hexdigest() for r in raw}) == 300
    img = Image.open(io.BytesIO(raw[299]))
    assert img.size == (64, 128) and img.getpixel((10, 10)) == (200, 10, 10)
    target = BenchTarget("http://x", "m", None, 4, None, image_variants=urls[:3])
    sent = [target.payload("hi", 4)["messages"][0]["content"][0]["image_url"]["url"] for _ in range(3)]
    assert sent == urls[:3]
