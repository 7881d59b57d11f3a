"""The async engine client: one engine thread, per-request queues, aborts, capacity, failures."""

from __future__ import annotations

import asyncio
import threading

import pytest

from autoglm_trt.engine.sampling_params import SamplingParams
from autoglm_trt.errors import RequestError
from autoglm_trt.serve.async_engine import AsyncEngineClient, merge_outputs
from autoglm_trt.serve.errors import NotReadyError, QueueFullError, ServeError
from autoglm_trt.serve.metrics import ServeMetrics

from serve_fakes import FakeEngine, FakePrompt


def run(coro_fn, engine: FakeEngine, max_queue: int = 4):
    async def main():
        client = AsyncEngineClient(ServeMetrics("m"), max_queue)
        client.start(engine, asyncio.get_running_loop())
        try:
            return await coro_fn(client)
        finally:
            client.shutdown()

    return asyncio.run(main())


def prompt(n: int = 5) -> FakePrompt:
    return FakePrompt(list(range(65, 65 + n)))


async def collect(client, stream) -> list:
    return [out async for out in client.outputs(stream)]


def test_outputs_arrive_in_order_and_finish():
    engine = FakeEngine(script="abcdef")

    async def body(client):
        (s,) = await client.add_requests([("r1", prompt(), SamplingParams(max_tokens=4))])
        return await collect(client, s)

    outs = run(body, engine)
    assert "".join(o.new_text for o in outs) == "abcd"
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert engine.thread_ids and len(engine.thread_ids) == 1
    assert engine.thread_ids != {threading.get_ident()}  # never the caller's thread


def test_engine_errors_reach_the_caller_and_nothing_stays():
    engine = FakeEngine(max_model_len=10)

    async def body(client):
        with pytest.raises(RequestError, match="max_model_len is 10"):
            await client.add_requests([("ok", prompt(), SamplingParams(max_tokens=2)),
                                       ("long", prompt(), SamplingParams(max_tokens=50))])
        await asyncio.sleep(0.05)
        return client.in_flight

    assert run(body, engine) == 0
    assert "ok" in engine.aborted or "ok" not in engine.requests


def test_leaving_early_aborts_and_frees_blocks():
    engine = FakeEngine(script="x" * 1000, step_delay=0.002)

    async def body(client):
        (s,) = await client.add_requests([("r", prompt(), SamplingParams(max_tokens=900, ignore_eos=True))])
        async for out in client.outputs(s):
            if out.num_output_tokens >= 5:
                break  # the async generator is closed here -> abort
        for _ in range(100):
            if engine.blocks_in_use() == 0 and client.stats().kv_usage == 0:
                break
            await asyncio.sleep(0.01)
        return client.in_flight

    assert run(body, engine) == 0
    assert engine.aborted == ["r"] and engine.blocks_in_use() == 0


def test_cancelled_task_aborts():
    engine = FakeEngine(script="x" * 1000, step_delay=0.002)

    async def body(client):
        (s,) = await client.add_requests([("r", prompt(), SamplingParams(max_tokens=900, ignore_eos=True))])
        task = asyncio.ensure_future(collect(client, s))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        return client.in_flight

    assert run(body, engine) == 0 and engine.aborted == ["r"]


def test_capacity_is_max_num_seqs_plus_max_queue():
    engine = FakeEngine(script="x" * 1000, max_num_seqs=2, step_delay=0.005)

    async def body(client):
        params = SamplingParams(max_tokens=500, ignore_eos=True)
        await client.add_requests([(f"r{i}", prompt(), params) for i in range(2)])
        with pytest.raises(QueueFullError) as info:  # n=2 choices do not fit: none is admitted
            await client.add_requests([("r2", prompt(), params), ("r3", prompt(), params)])
        assert info.value.status == 429 and info.value.retry_after
        assert client.in_flight == 2
        await client.add_requests([("r2", prompt(), params)])  # exactly fits 2 + 1
        with pytest.raises(QueueFullError):
            await client.add_requests([("r3", prompt(), params)])
        for rid in ("r0", "r1", "r2"):
            client.abort(rid)
        return client.in_flight

    assert run(body, engine, max_queue=1) == 0


def test_step_failure_fails_requests_but_the_loop_survives():
    engine = FakeEngine(script="abc")

    async def body(client):
        engine.fail_next_step = True
        (s,) = await client.add_requests([("bad", prompt(), SamplingParams(max_tokens=3))])
        with pytest.raises(ServeError) as info:
            await collect(client, s)
        assert info.value.status == 500
        (s2,) = await client.add_requests([("good", prompt(), SamplingParams(max_tokens=3))])
        return "".join(o.new_text for o in await collect(client, s2))

    assert run(body, engine) == "abc"


def test_merge_outputs_of_n_choices():
    engine = FakeEngine(script="hello")

    async def body(client):
        streams = await client.add_requests([(f"r-{i}", prompt(), SamplingParams(max_tokens=5)) for i in range(3)])
        texts = ["", "", ""]
        async for i, out in merge_outputs(client, streams):
            texts[i] += out.new_text
        return texts

    assert run(body, engine) == ["hello"] * 3


def test_not_ready_before_start():
    client = AsyncEngineClient(ServeMetrics("m"), 1)
    with pytest.raises(NotReadyError):
        client.check_ready()
    client.load_error = "boom"
    with pytest.raises(ServeError, match="failed to load: boom"):
        client.check_ready()


def test_metrics_recorded():
    engine = FakeEngine(script="abcdef")
    metrics = {}

    async def body(client):
        (s,) = await client.add_requests([("r", prompt(7), SamplingParams(max_tokens=6))])
        await collect(client, s)
        metrics["text"] = client.metrics.render().decode()

    run(body, engine)
    text = metrics["text"]
    assert 'autoglm:generation_tokens_total{model_name="m"} 6.0' in text
    assert 'autoglm:prompt_tokens_total{model_name="m"} 7.0' in text
    assert 'autoglm:inter_token_latency_seconds_count{model_name="m"} 5.0' in text
    assert 'autoglm:request_success_total{finished_reason="length",model_name="m"} 1.0' in text


def test_shutdown_stops_the_engine_too():
    """At TP > 1 the engine owns worker processes: the client's shutdown must reach engine.shutdown()."""
    engine = FakeEngine(script="ab")
    calls = []
    engine.shutdown = lambda: calls.append(threading.current_thread().name)

    async def body(client):
        return await collect(client, (await client.add_requests([("r", prompt(), SamplingParams(max_tokens=2))]))[0])

    outs = run(body, engine)
    assert outs and len(calls) == 1
