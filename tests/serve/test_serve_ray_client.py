"""RayEngineClient's retry rule with a scripted handle (no cluster): a replica that dies before any output reached
the handler is replaced for that request, unseen; one that dies after ends the request with a 503 error."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray", reason="Ray Serve is the [ray] extra")
from ray.exceptions import ActorDiedError  # noqa: E402

from autoglm_trt.engine.outputs import RequestOutput  # noqa: E402
from autoglm_trt.serve.async_engine import merge_outputs  # noqa: E402
from autoglm_trt.serve.errors import ServeError  # noqa: E402
from autoglm_trt.serve.metrics import ServeMetrics  # noqa: E402
from autoglm_trt.serve.ray.client import RayEngineClient  # noqa: E402
from autoglm_trt.serve.ray.replica import Admitted, Outputs, Refused  # noqa: E402


def _out(rid: str, token: int, finished: bool) -> RequestOutput:
    return RequestOutput(rid, [token], f"t{token}", finished, "length" if finished else None, 3, token, 0)


class _Call:
    """One generate stream: its messages, then optionally a dead replica."""

    def __init__(self, messages: list, die: bool) -> None:
        self.messages, self.die, self.cancelled = messages, die, False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for m in self.messages:
            await asyncio.sleep(0)
            yield m
        if self.die:
            raise ActorDiedError()

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedHandle:
    """handle.options(stream=True).generate.remote(items, session=...) -> the next scripted call."""

    def __init__(self, calls: list[_Call]) -> None:
        self.calls, self.sessions = calls, []
        self.generate = SimpleNamespace(remote=self._remote)

    def options(self, **_):
        return self

    def _remote(self, items, session=None):
        self.sessions.append(session)
        return self.calls.pop(0)


def _client(calls: list[_Call]) -> tuple[RayEngineClient, ScriptedHandle]:
    handle = ScriptedHandle(calls)
    return RayEngineClient(handle, ServeMetrics("m"), frontend=SimpleNamespace()), handle


def _items(rid="r1"):
    return [(rid, SimpleNamespace(prompt_token_ids=[1, 2, 3]), None)]


async def _texts(client, streams) -> str:
    return "".join([out.new_text async for _, out in merge_outputs(client, streams)])


def test_a_replica_lost_before_any_output_is_replaced_unseen():
    async def main():
        client, handle = _client([
            _Call([], die=True),  # died before admitting
            _Call([Admitted("b")], die=True),  # admitted, died before any token
            _Call([Admitted("c"), Outputs([(0, _out("r1", 1, False))]), Outputs([(0, _out("r1", 2, True))])], False),
        ])
        streams = await client.add_requests(_items())
        assert await _texts(client, streams) == "t1t2"
        assert len(handle.sessions) == 3 and not client._streams and not client._groups

    asyncio.run(main())


def test_a_replica_lost_after_output_ends_the_request_with_503():
    async def main():
        client, _ = _client([_Call([Admitted("a"), Outputs([(0, _out("r1", 1, False))])], die=True),
                             _Call([Admitted("never")], die=False)])
        streams = await client.add_requests(_items())
        with pytest.raises(ServeError) as info:
            await _texts(client, streams)
        assert info.value.status == 503 and "started answering" in str(info.value)

    asyncio.run(main())


def test_refusals_and_exhausted_retries_reach_add_requests():
    async def main():
        client, _ = _client([_Call([Refused("the server is at capacity", 429, retry_after=1)], die=False)])
        with pytest.raises(ServeError) as info:
            await client.add_requests(_items())
        assert info.value.status == 429 and info.value.retry_after == 1 and not client._streams
        client, _ = _client([_Call([], die=True) for _ in range(3)])
        with pytest.raises(ServeError) as info:
            await client.add_requests(_items("r2"))
        assert info.value.status == 503 and not client._streams

    asyncio.run(main())


def test_a_consumer_that_leaves_cancels_the_replica_stream():
    async def main():
        gate = asyncio.Event()

        class Endless(_Call):
            async def _run(self):
                yield Admitted("a")
                await gate.wait()

        call = Endless([], die=False)
        client, _ = _client([call])
        streams = await client.add_requests(_items())
        client.abort(streams[0].request_id)
        await asyncio.sleep(0.01)
        assert call.cancelled and not client._groups

    asyncio.run(main())
