"""What Ray Serve's hop costs per request: `serve` against `serve --replicas 1` on the same engine, on any machine.

Sequential requests (one at a time, so the figures are the path's latency, not the engine's batching): a
non-streamed chat request with max_tokens 1 (the whole round trip), and a streamed one with max_tokens 32 and
logprobs (TTFT, and the time per streamed token). Both servers run at once and the rounds alternate between them
(a shared machine's load drifts); both engines get OMP_NUM_THREADS=1, as Ray gives a replica of num_cpus 1.
  python benchmarks/bench_ray_overhead.py [--model DIR] [--requests 60] [--json out.json]
Without --model a tiny random checkpoint is written to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "system", "content": "You operate a phone for the user. " * 20},
            {"role": "user", "content": "Open the weather app and tell me tomorrow's forecast."}]


def start(args: list[str], port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "autoglm_trt.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port),
           "--grpc-port", "-1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("serve did not become ready")


BODY = {"model": "autoglm-phone-9b", "messages": MESSAGES, "temperature": 0.0}


def one_round(client: httpx.Client, samples: dict) -> None:
    t0 = time.perf_counter()
    client.post("/v1/chat/completions", json={**BODY, "max_tokens": 1}).raise_for_status()
    samples["round_trip"].append(time.perf_counter() - t0)
    t0, first, tokens = time.perf_counter(), None, 0
    payload = {**BODY, "max_tokens": 32, "stream": True, "logprobs": True, "ignore_eos": True}
    with client.stream("POST", "/v1/chat/completions", json=payload) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {") and '"logprobs":{' in line:
                tokens += 1
                first = first or time.perf_counter()
    end = time.perf_counter()
    samples["ttft"].append(first - t0)
    samples["per_token"].append((end - first) / max(tokens - 1, 1))


def summary(samples: dict) -> dict:
    ms = lambda xs, q: round(1e3 * statistics.quantiles(xs, n=100)[q - 1], 3)  # noqa: E731
    return {"round_trip_p50_ms": ms(samples["round_trip"], 50), "round_trip_p90_ms": ms(samples["round_trip"], 90),
            "ttft_p50_ms": ms(samples["ttft"], 50), "ttft_p90_ms": ms(samples["ttft"], 90),
            "per_token_p50_ms": ms(samples["per_token"], 50)}


def measure(urls: dict[str, str], n: int) -> dict:
    clients = {name: httpx.Client(base_url=url, timeout=120) for name, url in urls.items()}
    samples = {name: {"round_trip": [], "ttft": [], "per_token": []} for name in urls}
    for client in clients.values():  # warm-up: prefix cache, first-call paths
        for _ in range(5):
            client.post("/v1/chat/completions", json={**BODY, "max_tokens": 1}).raise_for_status()
    for i in range(n):
        for name in (list(urls) if i % 2 == 0 else list(urls)[::-1]):
            one_round(clients[name], samples[name])
    return {name: summary(s) for name, s in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    opts = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    model = opts.model
    if model is None:
        model = str(tmp / "tiny")
        subprocess.run([sys.executable, "-m", "autoglm_trt.cli", "init-random", model, "--preset", "tiny"],
                       check=True, stdout=subprocess.DEVNULL)
    engine = [model, "--device", opts.device, "--max-model-len", "4096"]
    procs = {}
    try:
        for name, port, extra in (("serve", 18500, []), ("ray_1_replica", 18501, ["--replicas", "1"])):
            procs[name] = (start([*engine, *extra], port, tmp / f"{name}.log"), port)
        results = measure({name: f"http://127.0.0.1:{port}" for name, (_, port) in procs.items()}, opts.requests)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(60)
    a, b = results["serve"], results["ray_1_replica"]
    results["added_ms"] = {k: round(b[k] - a[k], 3) for k in a}
    results["machine"] = (f"{platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}, "
                          f"Python {platform.python_version()}")
    results["date"] = time.strftime("%Y-%m-%d")
    results["command"] = " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    print(json.dumps(results, indent=2))
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
