"""End to end: /health is 503 while the engine loads, and a full queue answers 429 + Retry-After
(real `autoglm-trt serve`, tiny checkpoint, --max-num-seqs 1 --max-queue 0)."""

from __future__ import annotations

import time

import httpx
import pytest

from serve_harness import start_serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc = start_serve(tiny_model_dir, "--max-model-len", "1024", "--max-num-seqs", "1", "--max-queue", "0")
    yield proc
    proc.stop()


def test_health_was_503_while_loading(server):
    assert server.saw_503, server.output()
    assert httpx.get(server.url + "/health").status_code == 200


def test_full_queue_is_429_with_retry_after_then_recovers(server):
    url = server.url + "/v1/chat/completions"
    long = {"messages": [{"role": "user", "content": "hold the only slot"}], "max_tokens": 900, "ignore_eos": True,
            "stream": True, "logprobs": True}
    with httpx.stream("POST", url, json=long, timeout=60) as held:
        lines = held.iter_lines()  # NOTE: keep the iterator: dropping it closes the connection
        while "logprobs\":{" not in next(lines):
            pass  # the long request is running now
        resp = httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=60)
        assert resp.status_code == 429, resp.text
        assert resp.headers["Retry-After"].isdigit()
        err = resp.json()["error"]
        assert err["type"] == "rate_limit_error" and "capacity" in err["message"]
    deadline = time.monotonic() + 10  # the hung-up request is aborted; its slot frees
    while time.monotonic() < deadline:
        resp = httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=60)
        if resp.status_code == 200:
            break
        time.sleep(0.1)
    assert resp.status_code == 200, resp.text


def test_unloadable_model_exits_2_with_one_clear_line(tmp_path):
    import subprocess

    from serve_harness import cli_command, free_port

    proc = subprocess.run([*cli_command(), "serve", str(tmp_path / "missing"), "--host", "127.0.0.1", "--port",
                           str(free_port()), "--grpc-port", str(free_port())], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag,value,says", [("--quantization", "int4", "--quantization must be one of none"),
                                             ("--image-preprocess-device", "gpu", "must be auto or cpu"),
                                             ("--mm-processor-kwargs", "{max", "must be a JSON object")])
def test_bad_serve_options_exit_2_before_loading(tiny_model_dir, flag, value, says):
    import subprocess

    from serve_harness import cli_command

    proc = subprocess.run([*cli_command(), "serve", str(tiny_model_dir), flag, value], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
