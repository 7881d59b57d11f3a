"""The ingress side: an AsyncEngineClient whose engine is a set of Ray Serve replicas.

The OpenAI routes (and their prompt building: chat template, tokenizer, image decoding) run unchanged in the
ingress over this client; each API request's engine requests go, together, to one replica chosen by the
session-affinity router. A replica that dies before any output of a request reached the handler is replaced by
another for that request (the client sees nothing: a stream's role chunk carries no tokens); after that, the
request ends with an error (an error event in a stream), never a hang.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from autoglm_trt.serve.async_engine import AsyncEngineClient, RequestStream
from autoglm_trt.serve.errors import ServeError
from autoglm_trt.serve.metrics import ServeMetrics
from autoglm_trt.serve.ray.affinity import REPLICA_HEADER, SESSION_HEADER, session_key
from autoglm_trt.serve.ray.replica import Admitted, Outputs, Refused, ReplicaInfo

log = logging.getLogger("autoglm_trt.serve")
_PARSE_IN_THREAD_BYTES = 256 << 10


class Frontend:
    """What the API handlers read from `state.engine`, without the model: the replicas' engine config, the
    tokenizer and the input processor (loaded from the same model directory)."""

    supports_structured_outputs = True

    def __init__(self, info: ReplicaInfo) -> None:
        from autoglm_trt.config import ModelConfig
        from autoglm_trt.processing.inputs import InputProcessor
        from autoglm_trt.processing.tokenizer import Tokenizer

        self.config = info.config
        self.model_config = ModelConfig.from_dir(info.config.model_dir)
        self.tokenizer = Tokenizer.from_dir(info.config.model_dir)
        self.processor = InputProcessor.from_dir(info.config.model_dir)
        self.processor.image_processor.pixels_in_preprocess = info.pixels_in_preprocess


# ---- per HTTP request: the session key in, the serving replica out ---------------------------------------------
@dataclass
class RouteContext:
    session_header: str | None
    body: list[bytes] = field(default_factory=list)  # the request body's chunks, as the app read them
    replica: str | None = None  # the replica that admitted the request

    async def key(self) -> str | None:
        body = b"".join(self.body) if self.session_header is None else None
        if body is not None and len(body) > _PARSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(session_key, None, body)
        return session_key(self.session_header, body)


_route: contextvars.ContextVar[RouteContext | None] = contextvars.ContextVar("autoglm_route", default=None)


class RouteMiddleware:
    """Gives each HTTP request a RouteContext (its x-session-id, its body) and adds x-autoglm-replica to the
    response. NOTE: the context object is shared by reference, so tasks the handlers spawn fill it in too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        wanted = SESSION_HEADER.encode()
        header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == wanted), None)
        ctx = RouteContext(header)

        async def recording_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and header is None:
                ctx.body.append(message.get("body", b""))
            return message

        async def tagging_send(message: Message) -> None:
            if message["type"] == "http.response.start" and ctx.replica is not None:
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REPLICA_HEADER.encode(), ctx.replica.encode())]}
            await send(message)

        token = _route.set(ctx)
        try:
            await self.app(scope, recording_receive, tagging_send)
        finally:
            _route.reset(token)


# ---- the client ------------------------------------------------------------------------------------------------
@dataclass
class _Group:
    """The engine requests of one API request (its n choices): sent, retried and cancelled together."""

    items: list[tuple[str, Any, Any]]
    streams: list[RequestStream]
    admitted: asyncio.Future
    delivered: bool = False  # some output reached a handler: a retry would repeat it
    task: asyncio.Task | None = None


_REPLICA_LOST = "the replica serving this request stopped after it had started answering ({}); send it again"


class RayEngineClient(AsyncEngineClient):
    """AsyncEngineClient's interface (add_requests, outputs, abort, stats) over Ray Serve replicas."""

    def __init__(self, handle: Any, metrics: ServeMetrics, frontend: Frontend, max_attempts: int = 3) -> None:
        super().__init__(metrics, max_queue=0)
        self.handle = handle.options(stream=True)
        self.engine = frontend
        self.max_attempts = max_attempts
        self._groups: dict[str, _Group] = {}  # request id -> its group

    @property
    def ready(self) -> bool:
        return self.engine is not None

    @property
    def capacity(self) -> int:
        return 1 << 30  # NOTE: each replica enforces its own max-num-seqs + max-queue (429 from there)

    def shutdown(self, timeout: float = 10.0) -> None:
        for group in {id(g): g for g in self._groups.values()}.values():
            if group.task is not None:
                group.task.cancel()

    async def add_requests(self, items: list[tuple[str, Any, Any]]) -> list[RequestStream]:
        self.check_ready()
        for request_id, _, _ in items:
            if request_id in self._streams:
                raise ServeError(f"request id {request_id!r} is already in use", status=400)
        streams = [RequestStream(rid, num_prompt_tokens=len(prompt.prompt_token_ids)) for rid, prompt, _ in items]
        group = _Group(items, streams, asyncio.get_running_loop().create_future())
        for stream in streams:
            self._streams[stream.request_id] = stream
            self._groups[stream.request_id] = group
        ctx = _route.get()
        key = await ctx.key() if ctx is not None else None
        group.task = asyncio.ensure_future(self._pump(group, key))
        try:
            replica = await asyncio.shield(group.admitted)
        except BaseException:
            for stream in streams:
                self.abort(stream.request_id)
            raise
        if ctx is not None:
            ctx.replica = replica
        return streams

    def abort(self, request_id: str) -> None:
        """Forget the request; once none of its group is left, cancel the replica's stream (which aborts there)."""
        stream = self._streams.pop(request_id, None)
        group = self._groups.pop(request_id, None)
        if stream is not None and not stream.finished:
            stream.finished = True
            self._record_finished(stream, "abort")
        if group is not None and group.task is not None and not any(s.request_id in self._groups
                                                                   for s in group.streams):
            group.task.cancel()

    async def _pump(self, group: _Group, key: str | None) -> None:
        """Send the group to a replica and hand its outputs on; retry elsewhere while nothing was handed on."""
        for attempt in range(1, self.max_attempts + 1):
            gen = self.handle.generate.remote(group.items, session=key)
            try:
                async for message in gen:
                    self._on_message(group, message)
                return
            except asyncio.CancelledError:
                gen.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - a replica that died, or Ray's transport failing
                if not _replica_lost(exc):
                    log.exception("replica call failed")
                    self._fail(group, ServeError(f"internal error: {type(exc).__name__}: {exc}", status=500))
                    return
                if group.delivered or attempt == self.max_attempts:
                    self._fail(group, ServeError(_REPLICA_LOST.format(type(exc).__name__), status=503))
                    return
                log.warning("a replica stopped before answering %s (%s); sending it to another replica (try %d)",
                            group.streams[0].request_id, type(exc).__name__, attempt + 1)
            finally:
                self._groups_done(group)

    def _on_message(self, group: _Group, message: Any) -> None:
        if isinstance(message, Admitted):
            _settle(group.admitted, message.replica_id)
        elif isinstance(message, Refused):
            _settle(group.admitted, None, ServeError(message.message, message.status, message.param, message.code,
                                                     message.retry_after))
        elif isinstance(message, Outputs):
            group.delivered = True
            self._dispatch([out for _, out in message.items], None, self._stats)

    def _fail(self, group: _Group, exc: ServeError) -> None:
        if not group.admitted.done():
            _settle(group.admitted, None, exc)
            return
        for stream in group.streams:
            if self._streams.get(stream.request_id) is stream:
                self.abort(stream.request_id)
                stream.queue.put_nowait(exc)

    def _groups_done(self, group: _Group) -> None:
        for stream in group.streams:
            if stream.finished and self._groups.get(stream.request_id) is group:
                del self._groups[stream.request_id]


def _replica_lost(exc: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError) or type(exc).__name__ in ("ActorDiedError", "ActorUnavailableError")


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
