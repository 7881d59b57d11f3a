"""`make demo`: serve a tiny random checkpoint on the CPU and answer one real chat request with an image.

Starts `autoglm-trt serve` as a subprocess, waits for /health, sends the request the way Open-AutoGLM's
phone agent does (openai SDK, streaming, a PNG screenshot as a data: URL), prints the reply, stops.
The weights are random, so the reply is gibberish; the point is that every piece runs for real.
"""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image, ImageDraw


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshot_data_url() -> str:
    img = Image.new("RGB", (270, 600), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((20, 40, 250, 90), fill="#1677ff")
    draw.text((40, 55), "Settings", fill="white")
    for i in range(6):
        draw.rectangle((20, 120 + 70 * i, 250, 170 + 70 * i), outline="gray")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"demo: the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit("demo: the server did not become ready in time")


def main(model_dir: str) -> None:
    from openai import OpenAI

    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "autoglm_trt.cli", "serve", model_dir, "--host", "127.0.0.1", "--port",
           str(port), "--grpc-port", str(grpc_port), "--served-model-name", "autoglm-phone-9b"]
    proc = subprocess.Popen(cmd)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc)
        client = OpenAI(base_url=base + "/v1", api_key="EMPTY")
        content = [{"type": "image_url", "image_url": {"url": screenshot_data_url()}},
                   {"type": "text", "text": "打开设置 (open Settings)"}]
        stream = client.chat.completions.create(model="autoglm-phone-9b", stream=True, max_tokens=24,
                                                temperature=0.0, messages=[{"role": "user", "content": content}],
                                                stream_options={"include_usage": True})
        # NOTE: random weights mostly pick token ids that the tiny tokenizer decodes to nothing.
        print("\nassistant (random weights: expect gibberish or empty text): ", end="", flush=True)
        chunks, finish, usage = 0, None, None
        for chunk in stream:
            chunks += 1
            usage = chunk.usage or usage
            if chunk.choices:
                finish = chunk.choices[0].finish_reason or finish
                print(chunk.choices[0].delta.content or "", end="", flush=True)
        print(f"\n{chunks} stream chunks, finish_reason={finish}, usage: {usage.prompt_tokens} prompt tokens "
              f"(with the screenshot's image tokens), {usage.completion_tokens} completion tokens")
        print("demo: a real request was answered by `autoglm-trt serve` on", base)
        exe = Path(sys.executable).with_name("autoglm-trt")  # NOTE: it lives in the venv, not on PATH
        print(f"demo: run it yourself: {exe} serve {model_dir}  (or `source {exe.parent}/activate`, then "
              f"`autoglm-trt --help`)")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo-model")
