"""One engine replica of the Ray Serve application: an LLMEngine under the same AsyncEngineClient that plain
`serve` uses, answering the ingress's `generate` calls with a stream of ReplicaMessages."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from autoglm_trt.config import EngineArgs, EngineConfig
from autoglm_trt.errors import RequestError
from autoglm_trt.serve.async_engine import AsyncEngineClient, merge_outputs
from autoglm_trt.serve.loader import load_engine
from autoglm_trt.serve.metrics import ServeMetrics


@dataclass
class ReplicaInfo:
    """What the ingress needs to build prompts as the replicas' engines expect them."""

    replica_id: str
    pid: int
    config: EngineConfig  # the loaded engine's (max_model_len fitted to its KV cache)
    pixels_in_preprocess: bool  # False on a GPU: the engine resizes screenshots there


@dataclass
class Admitted:
    """First message of a generate stream: the engine took the requests."""

    replica_id: str


@dataclass
class Refused:
    """The engine refused the requests (the error the HTTP layer turns into OpenAI's JSON)."""

    message: str
    status: int
    param: str | None = None
    code: str | None = None
    retry_after: int | None = None


@dataclass
class Outputs:
    """RequestOutputs that arrived together: (choice index, RequestOutput)."""

    items: list[tuple[int, Any]] = field(default_factory=list)


class EngineReplica:
    """A Ray Serve deployment class (decorated in ray_app.py): loads the engine in its constructor, so Ray Serve
    counts the replica as running once the model is loaded."""

    async def __init__(self, args: EngineArgs, max_queue: int, model_name: str) -> None:
        from ray import serve

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.client = AsyncEngineClient(ServeMetrics(model_name), max_queue)
        self.engine = await self.client.launch(lambda: load_engine(args).engine)

    def describe(self) -> ReplicaInfo:
        return ReplicaInfo(self.replica_id, os.getpid(), self.engine.config,
                           self.engine.processor.image_processor.pixels_in_preprocess)

    def record_routing_stats(self) -> dict:
        """Polled by Ray Serve's controller for the routers (RunningReplica.routing_stats)."""
        s = self.client.stats()
        return {"num_running": s.num_running, "num_waiting": s.num_waiting, "kv_usage": s.kv_usage}

    async def generate(self, items: list[tuple[str, Any, Any]], session: str | None = None) -> AsyncIterator[Any]:
        """Admitted (or Refused), then Outputs until every request finished. `session` is read by the router only.
        A caller that cancels the stream aborts its requests (merge_outputs' cleanup)."""
        try:
            streams = await self.client.add_requests(items)
        except RequestError as exc:
            yield Refused(str(exc), exc.status, exc.param, getattr(exc, "code", None),
                          getattr(exc, "retry_after", None))
            return
        yield Admitted(self.replica_id)
        async for i, out in merge_outputs(self.client, streams):
            yield Outputs([(i, out)])

    def __del__(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.shutdown()
