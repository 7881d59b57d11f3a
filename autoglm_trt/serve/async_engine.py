"""One async client over the synchronous LLMEngine, shared by the HTTP and gRPC adapters.

The engine loop runs in its own thread (engine.step() blocks for a whole forward pass); the event
loop talks to it through a command queue (add / abort) and gets outputs back with
call_soon_threadsafe, each request on its own asyncio queue. Only the engine thread touches the
engine, so the engine itself needs no locks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from autoglm_trt.errors import RequestError
from autoglm_trt.serve.errors import NotReadyError, QueueFullError, ServeError
from autoglm_trt.serve.metrics import ServeMetrics

log = logging.getLogger("autoglm_trt.serve")


@dataclass
class _Add:
    request_id: str
    prompt: Any  # ProcessedPrompt
    params: Any  # SamplingParams
    done: concurrent.futures.Future  # result None, or the engine's exception (RequestError)


@dataclass
class _Abort:
    request_id: str


_STOP = object()


@dataclass
class RequestStream:
    """The outputs of one engine request, in order, plus the timings the metrics need."""

    request_id: str
    arrival: float = field(default_factory=time.monotonic)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    last_token_time: float | None = None
    first_token_time: float | None = None


class AsyncEngineClient:
    """add_requests() -> RequestStream(s); stream(s) -> RequestOutput async iterator; abort()."""

    def __init__(self, metrics: ServeMetrics, max_queue: int) -> None:
        self.metrics = metrics
        self.max_queue = max_queue
        self.engine: Any = None  # LLMEngine, set by start()
        self.load_error: str | None = None
        self._streams: dict[str, RequestStream] = {}
        self._commands: queue.Queue = queue.Queue()
        self._stats: Any = None  # latest EngineStats, written on the event loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()  # set once the engine is adopted on the event loop
        self._last_stats: Any = None
        metrics.attach_engine(lambda: self._stats, lambda: len(self._streams))

    # ---- lifecycle ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.engine is not None and self._thread is not None and self._thread.is_alive()

    @property
    def capacity(self) -> int:
        return self.engine.config.scheduler.max_num_seqs + self.max_queue

    def start(self, engine: Any, loop: asyncio.AbstractEventLoop) -> None:
        """Adopt an engine that is loaded already and start its loop thread (on the event loop)."""
        self._adopt(engine, loop)
        self._thread = threading.Thread(target=self._run, name="autoglm-engine", daemon=True)
        self._thread.start()

    async def launch(self, load: Callable[[], Any]) -> Any:
        """Build the engine with load() in the engine thread itself, then step it there.

        NOTE: one thread creates and drives the engine, so CUDA state that torch keeps per thread
        (current device and stream, graph pools) is the same at load time and at step time.
        Returns the engine; raises what load() raised.
        """
        loop = asyncio.get_running_loop()
        loaded: asyncio.Future = loop.create_future()

        def main() -> None:
            try:
                engine = load()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                loop.call_soon_threadsafe(_settle, loaded, None, exc)
                return
            loop.call_soon_threadsafe(_settle, loaded, engine, None)
            self._run()

        self._thread = threading.Thread(target=main, name="autoglm-engine", daemon=True)
        self._thread.start()
        engine = await loaded
        self._adopt(engine, loop)
        return engine

    def _adopt(self, engine: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stats = engine.get_stats()
        cache = engine.config.cache
        self.metrics.describe_cache(cache.block_size, getattr(cache, "enable_prefix_caching", True))
        self.engine = engine
        self._started.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread, then the engine itself (its tensor-parallel workers, if any)."""
        if self._thread is not None:
            self._commands.put(_STOP)
            self._started.set()  # NOTE: a thread still loading exits after load() returns
            self._thread.join(timeout)
        stop = getattr(self.engine, "shutdown", None)
        if stop is not None:
            stop()

    def stats(self) -> Any:
        return self._stats

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    # ---- requests (event loop side) -------------------------------------------------------------
    def check_ready(self) -> None:
        if self.load_error is not None:
            raise ServeError(f"the model failed to load: {self.load_error}", status=503)
        if not self.ready:
            raise NotReadyError()

    async def add_requests(self, items: list[tuple[str, Any, Any]]) -> list[RequestStream]:
        """Admit [(request_id, prompt, params)] together (the n choices of one API request).

        Raises QueueFullError when they do not fit, or the engine's RequestError (e.g. the prompt
        is longer than max_model_len); then none of them stays in the engine.
        """
        self.check_ready()
        if len(self._streams) + len(items) > self.capacity:
            raise QueueFullError(len(self._streams), self.capacity)
        streams, waits = [], []
        for request_id, prompt, params in items:
            if request_id in self._streams:
                raise ServeError(f"request id {request_id!r} is already in use", status=400)
            stream = RequestStream(request_id, num_prompt_tokens=len(prompt.prompt_token_ids))
            self._streams[request_id] = stream
            done: concurrent.futures.Future = concurrent.futures.Future()
            self._commands.put(_Add(request_id, prompt, params, done))
            streams.append(stream)
            waits.append(asyncio.wrap_future(done))
        try:
            results = await asyncio.gather(*waits, return_exceptions=True)
        except asyncio.CancelledError:
            for stream in streams:
                self.abort(stream.request_id)
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for stream in streams:
                self.abort(stream.request_id)
            raise errors[0]
        return streams

    async def outputs(self, stream: RequestStream) -> AsyncIterator[Any]:
        """RequestOutputs of one request until it finishes; aborts it if the consumer goes away."""
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not stream.finished:
                self.abort(stream.request_id)

    def abort(self, request_id: str) -> None:
        """Forget the request and free its KV blocks (at the engine thread's next iteration)."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        if not stream.finished:
            stream.finished = True
            self._commands.put(_Abort(request_id))
            self._record_finished(stream, "abort")

    # ---- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        self._started.wait()
        engine = self.engine
        if engine is None:  # shut down while loading
            return
        while True:
            if not self._drain(block=not engine.has_unfinished_requests()):
                return
            outputs: list = []
            error: BaseException | None = None
            if engine.has_unfinished_requests():
                try:
                    outputs = engine.step()
                except Exception as exc:  # NOTE: an engine bug must not kill the server
                    log.exception("engine step failed; failing the requests in flight")
                    error = exc
            stats = engine.get_stats()
            if outputs or error is not None or stats != self._last_stats:
                self._last_stats = stats
                self._publish(outputs, error, stats)
            elif engine.has_unfinished_requests():
                time.sleep(0.0005)  # NOTE: nothing schedulable right now; do not spin the CPU

    def _drain(self, block: bool) -> bool:
        """Apply queued commands; False when asked to stop."""
        try:
            cmd = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if cmd is _STOP:
                return False
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, cmd: _Add | _Abort) -> None:
        if isinstance(cmd, _Abort):
            try:
                self.engine.abort_request(cmd.request_id)
            except Exception:  # NOTE: aborting a request that just finished is not an error
                log.debug("abort of %s ignored", cmd.request_id, exc_info=True)
            return
        if cmd.done.cancelled():
            return
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params)
        except Exception as exc:
            cmd.done.set_exception(exc if isinstance(exc, RequestError) else
                                   ServeError(f"the engine refused the request: {exc}", status=400))
        else:
            cmd.done.set_result(None)

    def _publish(self, outputs: list, error: BaseException | None, stats: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._dispatch, outputs, error, stats)
        except RuntimeError:  # loop closed while shutting down
            pass

    # ---- back on the event loop -----------------------------------------------------------------
    def _dispatch(self, outputs: list, error: BaseException | None, stats: Any) -> None:
        self._stats = stats
        now = time.monotonic()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None or stream.finished:
                continue  # aborted meanwhile
            self._record_tokens(stream, out, now)
            if out.finished:
                stream.finished = True
                self._streams.pop(out.request_id, None)
                self._record_finished(stream, out.finish_reason)
            stream.queue.put_nowait(out)
        if error is not None:
            self._fail_all(error)

    def _fail_all(self, error: BaseException) -> None:
        exc = ServeError(f"the engine failed while running this request: {error}", status=500)
        for request_id in list(self._streams):
            stream = self._streams[request_id]
            self.abort(request_id)
            stream.queue.put_nowait(exc)

    def _record_tokens(self, stream: RequestStream, out: Any, now: float) -> None:
        n = len(out.new_token_ids)
        stream.num_prompt_tokens = out.num_prompt_tokens
        if n == 0:
            return
        if stream.first_token_time is None:
            stream.first_token_time = now
            self.metrics.observe_first_token(now - stream.arrival)
            if out.first_scheduled_time is not None:
                self.metrics.observe_phase("queue", out.first_scheduled_time - stream.arrival)
                self.metrics.observe_phase("prefill", now - out.first_scheduled_time)
            if n > 1:
                self.metrics.observe_inter_token(0.0, n - 1)
        else:
            self.metrics.observe_inter_token(now - stream.last_token_time, n)
        stream.last_token_time = now
        stream.num_output_tokens += n

    def _record_finished(self, stream: RequestStream, finish_reason: str | None) -> None:
        if stream.first_token_time is not None and finish_reason != "abort":
            self.metrics.observe_phase("decode", stream.last_token_time - stream.first_token_time)
        self.metrics.observe_finished(time.monotonic() - stream.arrival, stream.num_prompt_tokens,
                                      stream.num_output_tokens, finish_reason)


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


async def merge_outputs(client: AsyncEngineClient,
                        streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, RequestOutput) of several requests (the n choices) as they arrive."""
    if len(streams) == 1:
        async with contextlib.aclosing(client.outputs(streams[0])) as outs:
            async for out in outs:
                yield 0, out
        return
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async with contextlib.aclosing(client.outputs(stream)) as outs:
                async for out in outs:
                    merged.put_nowait((i, out))
        except Exception as exc:
            merged.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            i, item = await merged.get()
            if isinstance(item, BaseException):
                raise item
            yield i, item
            remaining -= bool(item.finished)
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            client.abort(stream.request_id)
