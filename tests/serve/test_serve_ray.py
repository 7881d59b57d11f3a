"""`serve --replicas 2` on a local Ray cluster (started by the CLI, torn down when it stops) against one plain
`serve`: eight agent-style sessions of several steps through the openai client, each session's steps on one
replica, its prefix-cache hits as on one server, greedy outputs equal; then a replica killed mid-run."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import time
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from PIL import Image

from autoglm_trt.engine.distributed import free_port
from serve_harness import CliServer, start_serve

pytest.importorskip("ray.serve", reason="Ray Serve is the [ray] extra")

SESSIONS, STEPS, MAX_TOKENS = 8, 4, 12
SYSTEM = ("You operate an Android phone for the user. Today is 2026-12-08. Reply as <think>why</think>"
          "<answer>do(action=...)</answer>; actions: Launch, Tap, Type, Swipe, Back, Home, Wait, finish. ") * 3
MODEL_LEN = ["--max-model-len", "4096", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def ray_server(tiny_model_dir):
    port, grpc_port = free_port(), free_port()
    server = CliServer(["serve", str(tiny_model_dir), "--replicas", "2", "--host", "127.0.0.1", "--port", str(port),
                        "--grpc-port", str(grpc_port), *MODEL_LEN], port, grpc_port, timeout=300)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def single_server(tiny_model_dir):
    server = start_serve(tiny_model_dir, *MODEL_LEN)
    yield server
    server.stop()


def screenshot(session: int, step: int) -> str:
    img = Image.new("RGB", (112, 224), ((40 * session) % 256, (70 * step) % 256, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Step:
    replica: str | None
    tokens: list[str] = field(default_factory=list)  # from logprobs: one entry per generated token
    content: str = ""
    cached: int = 0
    error: str | None = None  # an error event after `tokens` arrived


async def one_step(client: openai.AsyncOpenAI, messages: list, session: int, use_header: bool) -> Step:
    headers = {"x-session-id": f"phone-{session}"} if use_header else {}
    raw = await client.chat.completions.with_raw_response.create(
        model="autoglm-phone-9b", messages=messages, stream=True, max_tokens=MAX_TOKENS, temperature=0.0,
        top_p=0.85, frequency_penalty=0.2, logprobs=True, stream_options={"include_usage": True},
        extra_headers=headers)
    step = Step(raw.headers.get("x-autoglm-replica"))
    try:
        async for chunk in raw.parse():
            if chunk.usage is not None:
                details = chunk.usage.prompt_tokens_details
                step.cached = (details.cached_tokens or 0) if details else 0
            for choice in chunk.choices:
                step.content += choice.delta.content or ""
                if choice.logprobs and choice.logprobs.content:
                    step.tokens += [t.token for t in choice.logprobs.content]
    except openai.APIError as exc:  # an error event in the stream
        step.error = str(exc)
    return step


async def run_session(client, session: int, steps: int, first_step: int = 0, retry: bool = False) -> list[Step]:
    """Open-AutoGLM's loop: system prompt, task + screenshot, then screen info + screenshot per step; the
    screenshot is stripped from a user turn once it has been answered."""
    messages, out = [{"role": "system", "content": SYSTEM}], []
    for k in range(steps):
        text = f"Task {session}: open the app number {session} and check the weather" if k == 0 else \
            f'** Screen Info **\n{{"current_app": "App{session}-{k}"}}'
        shot = {"type": "image_url", "image_url": {"url": screenshot(session, k + first_step)}}
        messages.append({"role": "user", "content": [{"type": "text", "text": text}, shot]})
        step = await one_step(client, messages, session, use_header=session % 2 == 0)
        if step.error is not None and retry:  # the agent sends a failed step again
            out.append(step)
            step = await one_step(client, messages, session, use_header=session % 2 == 0)
        out.append(step)
        messages[-1] = {"role": "user", "content": text}
        messages.append({"role": "assistant", "content": step.content})
    return out


async def run_sessions(url: str, sessions: int, steps: int, first_step: int = 0, retry: bool = False):
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120) as client:
        return await asyncio.gather(*(run_session(client, s, steps, first_step, retry) for s in range(sessions)))


def test_sessions_stick_to_a_replica_with_single_server_outputs_and_cache_hits(ray_server, single_server):
    t0 = time.monotonic()
    on_ray = asyncio.run(run_sessions(ray_server.url, SESSIONS, STEPS))
    ray_seconds = time.monotonic() - t0
    alone = asyncio.run(run_sessions(single_server.url, SESSIONS, STEPS))
    for s, (ray_steps, one_steps) in enumerate(zip(on_ray, alone)):
        replicas = {step.replica for step in ray_steps}
        assert len(replicas) == 1 and None not in replicas, f"session {s} moved between replicas: {replicas}"
        assert [st.tokens for st in ray_steps] == [st.tokens for st in one_steps], f"session {s}: outputs differ"
        assert all(len(st.tokens) == MAX_TOKENS and st.error is None for st in ray_steps)
        # NOTE: from the second step on, a step's hits are its own session's previous prompt (block-aligned);
        # step one's depend on which other session ran first.
        ray_hits, one_hits = [st.cached for st in ray_steps[1:]], [st.cached for st in one_steps[1:]]
        assert ray_hits == one_hits and min(one_hits) > 0, (s, ray_hits, one_hits)
    print(f"\n{SESSIONS} sessions x {STEPS} steps on 2 replicas: {ray_seconds:.1f} s; replicas used: "
          f"{sorted({st[0].replica for st in on_ray})}")


def test_plain_serve_metrics_carry_vllm_gauges_for_gateways(single_server):
    text = httpx.get(single_server.url + "/metrics").text
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:cache_config_info"):
        assert f"\n{name}{{" in text, name
    hits = [line for line in text.splitlines() if line.startswith("vllm:prefix_cache_hits_total{")]
    assert float(hits[0].split()[-1]) > 0  # the sessions above hit the cache


def test_kserve_grpc_through_the_ray_ingress_equals_a_single_server(ray_server, single_server):
    """tritonclient's ModelInfer and decoupled ModelStreamInfer on the replicas, greedy, as on one `serve`."""
    import queue

    import tritonclient.grpc as grpcclient
    from test_serve_e2e_grpc import ensemble_inputs

    def infer(server) -> tuple[bytes, list, list]:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        assert client.is_server_ready() and client.is_model_ready("ensemble")
        whole = client.infer("ensemble", ensemble_inputs("Go home", 5, False))
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            client.async_stream_infer("ensemble", ensemble_inputs("Go home", 5, True))
            pieces, logprobs = [], []
            while True:
                result, error = results.get(timeout=60)
                assert error is None, error
                pieces.append(result.as_numpy("text_output")[0, 0])
                logprobs += result.as_numpy("output_log_probs").reshape(-1).tolist()
                if result.get_response().parameters["triton_final_response"].bool_param:
                    break
        finally:
            client.stop_stream()
        return whole.as_numpy("text_output")[0, 0], pieces, logprobs

    (ray_text, ray_pieces, ray_lp), (text, pieces, lp) = infer(ray_server), infer(single_server)
    assert ray_text == text and ray_pieces == pieces and len(pieces) == 5
    assert ray_lp == pytest.approx(lp, abs=1e-4)


def _engine_replica_pids(root: int) -> list[int]:
    """Ray's EngineReplica worker processes below the `serve` process `root` (Ray names them by proctitle)."""
    parents, titles = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                titles[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue

    def below_root(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == root:
                return True
        return False

    return [pid for pid, title in titles.items() if "ServeReplica:autoglm:EngineReplica" in title and below_root(pid)]


def test_killing_a_replica_mid_run_loses_no_unstarted_request(ray_server):
    pids = _engine_replica_pids(ray_server.proc.pid)
    assert len(pids) == 2, pids

    async def main():
        run = asyncio.ensure_future(run_sessions(ray_server.url, SESSIONS, STEPS, first_step=10, retry=True))
        await asyncio.sleep(1.0)  # NOTE: the first steps are in flight (prefill or decode) on both replicas
        os.kill(pids[0], signal.SIGKILL)
        return await asyncio.wait_for(run, 240)

    sessions = asyncio.run(main())
    steps = [st for session in sessions for st in session]
    failed = [st for st in steps if st.error is not None]
    # an error event only ever ends a stream that had already carried tokens; everything else was retried
    assert all(st.tokens for st in failed), [st.error for st in failed if not st.tokens]
    for session in sessions:  # every session ran to its end: each step has a complete answer
        answered = [st for st in session if st.error is None]
        assert len(answered) == STEPS and all(len(st.tokens) == MAX_TOKENS for st in answered)
    retried = ray_server.output(tail=None).count("sending it to another replica")
    assert failed or retried, "the kill hit no request: nothing was shown"
    print(f"\nreplica {pids[0]} killed: {retried} requests retried on the other replica before any token; "
          f"{len(failed)} streams ended with an error event after their first tokens, "
          f"{len(steps) - len(failed)} answered")
    deadline = time.monotonic() + 120  # Ray Serve starts a replacement
    while len(_engine_replica_pids(ray_server.proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert len(_engine_replica_pids(ray_server.proc.pid)) == 2


@pytest.mark.parametrize("args,message", [(["--replicas", "0"], "replicas"),
                                          (["--replicas", "2", "--max-replicas", "1"], "max_replicas")])
def test_bad_replica_options_are_one_error_line(tiny_model_dir, args, message):
    import subprocess

    from serve_harness import cli_command

    result = subprocess.run([*cli_command(), "serve", str(tiny_model_dir), "--port", str(free_port()), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
