"""`autoglm-trt bench --workload agent`: the session builder's message shapes (Open-AutoGLM's), one streamed step
parsed from a scripted server, per-depth statistics, CLI mistakes, and a real run against the tiny model."""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import json
import re
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from autoglm_trt.serve.agent_prompts import APPS, TASKS, system_prompt
from autoglm_trt.serve.agent_session import (SCREEN_INFO, new_session, parse_screen_size, render_screenshots,
                                             synthetic_reply)
from autoglm_trt.serve.bench_agent import (AgentOptions, AgentTarget, StepRecord, depth_stats, one_step,
                                           spec_delta, summarize_level)

DAY = datetime.date(2026, 12, 8)
URL = "data:image/png;base64,AAAA"


def _images(messages: list[dict]) -> list[int]:
    """Indices of the messages that carry an image part."""
    return [i for i, m in enumerate(messages) if isinstance(m["content"], list)
            and any(p.get("type") == "image_url" for p in m["content"])]


@pytest.mark.parametrize("lang,date,lo,hi", [("en", "Today is 2026-12-08, Tuesday.", 2200, 2700),
                                             ("zh", "今天是2026年12月08日 星期二。", 3100, 3700)])
def test_system_prompt_is_dated_and_sized_like_open_autoglms(lang, date, lo, hi):
    text = system_prompt(lang, DAY)
    assert text.startswith(date + "\n") and lo <= len(text) <= hi
    for action in ("Launch", "Tap", "Type", "Swipe", "Long Press", "Back", "Home", "Wait", "Take_over"):
        assert f'do(action="{action}"' in text
    assert "finish(message=" in text and "<think>" in text and "<answer>" in text and "999" in text


def test_session_messages_take_open_autoglms_shape():
    s = new_session(3, "en", seed=7, day=DAY)
    assert s.messages == [{"role": "system", "content": system_prompt("en", DAY)}] and s.task == TASKS["en"][2]
    for step in range(4):
        s.add_user_turn(f"{URL}{step}")
        turn = s.messages[-1]
        assert _images(s.messages) == [len(s.messages) - 1]  # only the newest turn, its screenshot first
        assert [p["type"] for p in turn["content"]] == ["image_url", "text"]
        assert turn["content"][0]["image_url"]["url"] == f"{URL}{step}"
        head, info = turn["content"][1]["text"].split("\n\n")
        assert head == (s.task if step == 0 else SCREEN_INFO)
        assert set(json.loads(info)) == {"current_app"} and json.loads(info)["current_app"] in APPS["en"]
        s.strip_images()
        assert _images(s.messages) == [] and turn["content"] == [{"type": "text", "text": f"{head}\n\n{info}"}]
        s.add_reply(f"<think>step {step}</think><answer>do(action=\"Back\")</answer>")
    roles = [m["role"] for m in s.messages]
    assert roles == ["system"] + ["user", "assistant"] * 4
    assert s.messages[0]["role"] == "system" and roles.count("system") == 1


def test_synthetic_replies_have_an_agents_shape_and_length():
    import random

    for lang, (lo, hi) in (("en", (350, 1000)), ("zh", (100, 400))):
        replies = [synthetic_reply(random.Random(i), lang) for i in range(20)]
        for r in replies:
            m = re.fullmatch(r"<think>(.+)</think><answer>(do\(action=.+\))</answer>", r, re.S)
            assert m and lo <= len(m.group(1)) <= hi, r
        assert len(set(replies)) == 20 and synthetic_reply(random.Random(1), lang) == replies[1]


def test_screenshots_differ_and_have_the_asked_size():
    urls = render_screenshots(list(range(8)) + [100_000], (72, 160))
    assert len(set(urls)) == 9 and all(u.startswith("data:image/png;base64,") for u in urls)
    img = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1])))
    assert img.size == (72, 160) and img.format == "PNG"
    assert parse_screen_size("1080X2400") == (1080, 2400)
    for bad in ("1080", "axb", "10x2400"):
        with pytest.raises(ValueError, match="--screen-size"):
            parse_screen_size(bad)


def _sse(*chunks: dict) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def _delta(text: str | None = None, **extra) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text} if text is not None else {"role": "assistant",
                                                                                              "content": ""},
                         "finish_reason": None, **extra}], "usage": None}


def _run_step(body: bytes, ignore_eos: bool = True) -> tuple[StepRecord, str, dict]:
    sent = {}

    def answer(request: httpx.Request) -> httpx.Response:
        sent.update(json.loads(request.content))
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def main():
        target = AgentTarget("http://x", "m", AgentOptions([1], 1, max_tokens=200, ignore_eos=ignore_eos))
        rec = StepRecord(session=0, depth=1)
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            text = await one_step(client, target, [{"role": "user", "content": "hi"}], rec)
        return rec, text

    rec, text = asyncio.run(main())
    return rec, text, sent


def test_one_step_times_text_and_action_and_reads_cached_tokens():
    usage = {"prompt_tokens": 5400, "completion_tokens": 3,
             "prompt_tokens_details": {"cached_tokens": 2112}}
    rec, text, sent = _run_step(_sse(_delta(), _delta("<think>ok</think><answer>do(act"),
                                     _delta('ion="Back")</answer>'), {"choices": [], "usage": usage}))
    assert sent["stream"] and sent["stream_options"] == {"include_usage": True} and sent["max_tokens"] == 200
    assert (sent["temperature"], sent["top_p"], sent["frequency_penalty"], sent["ignore_eos"]) == (0.0, 0.85, 0.2, True)
    assert rec.ok and text == '<think>ok</think><answer>do(action="Back")</answer>'
    assert (rec.prompt_tokens, rec.cached_tokens, rec.output_tokens) == (5400, 2112, 3)
    assert 0 < rec.ttft_ms <= rec.action_ms <= rec.step_ms  # the marker straddled two chunks


def test_one_step_without_text_reports_missing_not_zero():
    rec, text, sent = _run_step(_sse(_delta(), {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}),
                                ignore_eos=False)
    assert "ignore_eos" not in sent and rec.ok and text == ""
    assert rec.ttft_ms is None and rec.action_ms is None and rec.cached_tokens == 0 and rec.step_ms > 0
    err, _, _ = _run_step(_sse({"error": {"message": "boom", "code": 500}}))
    assert not err.ok and err.error == "boom"


def test_depth_stats_and_level_summary():
    recs = [StepRecord(s, d, True, 1000 + 500 * d, 300 * d, 200, ttft_ms=100.0 + s, step_ms=1000.0 + s,
                       action_ms=500.0 if s == 0 else None) for s in range(3) for d in range(2)]
    recs.append(StepRecord(3, 0, False, error="HTTP 429"))
    lv = summarize_level(4, 2, recs, duration_s=2.0)
    assert (lv.steps, lv.failed, lv.first_error, lv.steps_per_s) == (7, 1, "HTTP 429", 3.0)
    d0, d1 = lv.depths
    assert (d0.steps, d0.failed, d1.steps, d1.failed) == (4, 1, 3, 0)
    assert (d0.cached_tokens_mean, d1.cached_tokens_mean, d1.prompt_tokens_mean) == (0, 300, 1500)
    assert d1.ttft_p50_ms == 101.0 and d1.step_p99_ms == pytest.approx(1001.98)
    assert d1.action_p50_ms == 500.0 and d1.action_missing == 2
    assert depth_stats([StepRecord(0, 0, True, step_ms=5.0)], 1)[0].action_p50_ms is None  # missing, not 0


def test_speculation_counters_per_level():
    before = 'vllm:spec_decode_num_drafts_total{model_name="m"} 10.0\nvllm:spec_decode_num_draft_tokens_total 40\n' \
             'vllm:spec_decode_num_accepted_tokens_total 8\n'
    after = before.replace("10.0", "20.0").replace(" 40", " 100").replace(" 8\n", " 23\n")
    assert spec_delta(before, after) == {"drafts": 10, "draft_tokens": 60, "accepted_tokens": 15,
                                         "acceptance_rate": 0.25, "accepted_per_draft": 1.5}
    assert spec_delta("", "autoglm:x 1\n") is None and spec_delta(None, before) is None


def _bench_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoglm_trt.cli", "bench", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args,says", [(["--workload", "agent", "--image", "x.png"], "--image is an option of --workload text"),
                                       (["--sessions", "2"], "--sessions is an option of --workload agent"),
                                       (["--workload", "agent", "--screen-size", "big"], "--screen-size must be WIDTHxHEIGHT")])
def test_cli_mistakes_are_one_line(args, says):
    out = _bench_cli("http://127.0.0.1:9", *args)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(errors) == 1 and says in errors[0], out.stderr


@pytest.mark.slow
def test_agent_bench_against_the_tiny_model(tiny_model_dir, tmp_path):
    from serve_harness import start_serve

    server = start_serve(tiny_model_dir, "--max-model-len", "4096")
    try:
        out = _bench_cli(server.url, "--workload", "agent", "--sessions", "1,2", "--steps", "2", "--gen", "6",
                         "--ignore-eos", "--screen-size", "112x252", "--json", str(tmp_path / "a.json"))
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "a.json").read_text())
    assert (report["workload"], report["steps"], report["max_tokens"], report["screen_size"]) == ("agent", 2, 6, "112x252")
    assert [lv["sessions"] for lv in report["levels"]] == [1, 2]
    for lv in report["levels"]:
        assert lv["steps"] == 2 * lv["sessions"] and lv["failed"] == 0 and lv["steps_per_s"] > 0
        assert lv["server_ms"]["prefill"] > 0 and lv["step_p50_ms"] > 0
        assert lv["synthetic_replies"] == lv["steps"]  # random weights print no action
        d0, d1 = lv["depths"]
        assert d0["action_p50_ms"] is None and d1["action_missing"] == lv["sessions"]  # missing, not 0
        assert d1["prompt_tokens_mean"] > d0["prompt_tokens_mean"] + 100  # the history grew by a reply
        for rec in lv["records"]:
            assert rec["output_tokens"] == 6 and rec["cached_tokens"] < rec["prompt_tokens"]
            if rec["depth"] >= 1:  # the prefix cache holds the history (the system prompt at least)
                assert rec["cached_tokens"] > 0
    assert report["levels"][0]["depths"][1]["server_ms"]["ttft"] > 0  # one session: the server's own, per step
    assert any("synthetic reply" in n for n in report["notes"])
    assert "[4/4] session" in out.stderr and "2 sessions x 2 steps" in out.stdout  # progress, then tables
