"""`autoglm-trt serve` as a drop-in for `vllm serve` / SGLang in Open-AutoGLM's set-up (subprocess, CPU, tiny).

Their README's command lines run with only the program's name changed: the model is the hub id
`zai-org/AutoGLM-Phone-9B`, found in a Hugging Face cache we lay out in a temporary directory (the
tiny random checkpoint under that id). Two values change because tests share the machine: `--port 8000`
becomes a free port, and the gRPC port (not on their command line) comes from AUTOGLM_GRPC_PORT.
Then the phone agent's request shape runs 10 steps with its own defaults.
"""

from __future__ import annotations

import base64
import io
import json
import random
import time

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image, ImageDraw

from serve_harness import CliServer, cli_has, free_port

pytestmark = pytest.mark.slow
HUB_ID = "zai-org/AutoGLM-Phone-9B"
VLLM_LINE = ["--served-model-name", "autoglm-phone-9b", "--allowed-local-media-path", "/", "--mm-encoder-tp-mode",
             "data", "--mm_processor_cache_type", "shm", "--mm_processor_kwargs", '{"max_pixels":5000000}',
             "--max-model-len", "25480", "--chat-template-content-format", "string", "--limit-mm-per-prompt",
             '{"image":10}', "--model", HUB_ID, "--port", "8000"]
SGLANG_LINE = ["--model-path", HUB_ID, "--served-model-name", "autoglm-phone-9b", "--context-length", "25480",
               "--mm-enable-dp-encoder", "--mm-process-config", '{"image":{"max_pixels":5000000}}', "--port", "8000"]
IMAGE_TOKENS_5MP = 3108  # a 1080x2400 screenshot at max_pixels 5,000,000 (3,354 at the processor's default)
# NOTE: the random checkpoint never says EOS on its own terms: greedy with frequency_penalty 0.2 runs ~2,500
# tokens per reply (minutes per step on a CPU; the real model answers in 100-300). The agent's test checkpoint
# lists 5% of the vocabulary as stop ids in its generation_config.json, so replies end after a few dozen tokens.
STOP_FRACTION = 20


@pytest.fixture(scope="module")
def hf_cache(tiny_model_dir, tmp_path_factory):
    """HF_HUB_CACHE holding the tiny checkpoint as zai-org/AutoGLM-Phone-9B (huggingface_hub's layout)."""
    hub = tmp_path_factory.mktemp("hf") / "hub"
    repo = hub / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    for f in tiny_model_dir.iterdir():
        if f.name != "generation_config.json":
            (snapshot / f.name).symlink_to(f)
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["text_config"]["vocab_size"]
    stops = random.Random(0).sample(range(vocab), vocab // STOP_FRACTION)
    gen["eos_token_id"] = list(gen["eos_token_id"]) + sorted(set(stops) - set(gen["eos_token_id"]))
    (snapshot / "generation_config.json").write_text(json.dumps(gen))
    return hub


def start_line(line: list[str], hf_cache) -> CliServer:
    if not cli_has("serve"):
        pytest.skip("autoglm_trt.cli has no `serve` command yet")
    port, grpc_port = free_port(), free_port()
    args = ["serve", *[str(port) if a == "8000" else a for a in line]]
    env = {"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1", "AUTOGLM_GRPC_PORT": str(grpc_port)}
    return CliServer(args, port, grpc_port, env=env)


@pytest.fixture(scope="module")
def vllm_server(hf_cache):
    server = start_line(VLLM_LINE, hf_cache)
    yield server
    server.stop()


def screenshot(step: int) -> str:
    """A 1080x2400 PNG data URL of about 1 MB (noise keeps it near a real screenshot's size)."""
    rng = np.random.default_rng(step)
    img = Image.new("RGB", (1080, 2400), (245, 245, 245))
    img.paste(Image.fromarray(rng.integers(0, 255, (300, 1080, 3), dtype=np.uint8)), (0, 400))
    draw = ImageDraw.Draw(img)
    for row in range(12):
        draw.rectangle([60, 900 + 110 * row, 1020, 980 + 110 * row], fill=(40 + 15 * row, 120, 200 - 10 * step))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_tokens(client: OpenAI, max_pixels: int | None = None) -> int:
    """Prompt tokens a screenshot adds (the same text with and without it)."""
    extra = {"mm_processor_kwargs": {"max_pixels": max_pixels}} if max_pixels else {}

    def prompt_tokens(content) -> int:
        resp = client.chat.completions.create(model="autoglm-phone-9b", max_tokens=1, extra_body=extra,
                                              messages=[{"role": "user", "content": content}])
        return resp.usage.prompt_tokens

    text = {"type": "text", "text": "What is on the screen?"}
    return prompt_tokens([{"type": "image_url", "image_url": {"url": screenshot(0)}}, text]) - prompt_tokens([text])


def test_vllm_command_line_starts_the_server(vllm_server):
    log = vllm_server.output(tail=None)
    for flag in ("--mm-encoder-tp-mode data", "--mm-processor-cache-type shm", "--chat-template-content-format string"):
        assert sum(f"accepted {flag}: no effect here" in line for line in log.splitlines()) == 1, log
    assert f"{HUB_ID}: found in the Hugging Face cache" in log and "max-model-len 25480 (set by --max-model-len)" in log
    listening = next(line for line in log.splitlines() if "listening:" in line)
    assert len(listening) > 80 and listening.rstrip().endswith("is loaded"), log  # one line, not wrapped at 80
    models = httpx.get(f"{vllm_server.url}/v1/models").json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in models] == [("autoglm-phone-9b", 25480)]
    client = OpenAI(base_url=f"{vllm_server.url}/v1", api_key="EMPTY")
    probe = client.chat.completions.create(model="autoglm-phone-9b", max_tokens=5,  # the agent's readiness probe
                                           messages=[{"role": "user", "content": "Hi"}])
    assert probe.choices[0].finish_reason in ("stop", "length")
    # --mm_processor_kwargs '{"max_pixels":5000000}' took effect: the agent's screenshots cost 3,108 tokens
    assert image_tokens(client) - IMAGE_TOKENS_5MP in (0, 1, 2)


SYSTEM = ("Today's date is 2026-12-07, Monday. You are a phone-operating agent. Each turn shows you the current "
          "screen and asks for one next action. Reply as <think>your short reasoning</think><answer>ACTION"
          "</answer>, where ACTION is one of do(action=\"Launch\", app=\"...\"), do(action=\"Tap\", element=[x,y]) on a "
          "0-999 grid from the top left, do(action=\"Type\", text=\"...\"), do(action=\"Swipe\", start=[x1,y1], "
          "end=[x2,y2]), do(action=\"Back\"), do(action=\"Home\"), do(action=\"Wait\") or finish(message=\"...\"). ")


def agent_step(client: OpenAI, messages: list[dict]) -> tuple[str, str | None, float]:
    """One request exactly as the phone agent makes it (its ModelConfig defaults), streamed."""
    t0, text, finish = time.perf_counter(), "", None
    stream = client.chat.completions.create(messages=messages, model="autoglm-phone-9b", max_tokens=3000,
                                            temperature=0.0, top_p=0.85, frequency_penalty=0.2, extra_body={},
                                            stream=True)
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish, time.perf_counter() - t0


def test_phone_agent_runs_ten_steps_with_its_defaults(vllm_server):
    client = OpenAI(base_url=f"{vllm_server.url}/v1", api_key="EMPTY", max_retries=0)
    messages = [{"role": "system", "content": SYSTEM * 6}]  # ~2.4k characters, as the agent's English prompt
    seconds = []
    for step in range(10):
        info = json.dumps({"current_app": "Settings" if step else "System Home"})
        text = f"Open Settings and turn on Wi-Fi\n\n{info}" if step == 0 else f"** Screen Info **\n\n{info}"
        messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": screenshot(step)}},
                                                     {"type": "text", "text": text}]})
        reply, finish, took = agent_step(client, messages)
        assert finish in ("stop", "length"), (step, finish)
        seconds.append(round(took, 1))
        messages[-1]["content"] = [p for p in messages[-1]["content"] if p["type"] == "text"]  # images stripped
        messages.append({"role": "assistant", "content": f"<think></think><answer>{reply}</answer>"})
    print(f"agent step seconds: {seconds}")


def test_sglang_command_line_starts_the_server(hf_cache):
    server = start_line(SGLANG_LINE, hf_cache)
    try:
        log = server.output(tail=None)
        assert "accepted --mm-enable-dp-encoder: no effect here" in log
        assert "max-model-len 25480 (set by --max-model-len)" in log
        client = OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY")
        # --mm-process-config '{"image":{"max_pixels":5000000}}' took effect
        assert image_tokens(client) - IMAGE_TOKENS_5MP in (0, 1, 2)
    finally:
        server.stop()
