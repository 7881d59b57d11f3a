"""Server-sent events exactly as OpenAI streams them: `data: {json}\n\n` ... `data: [DONE]\n\n`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class StreamingResult:
    """What a handler returns for stream=True: the events, and how to abort the requests if the
    response never runs to the end (client gone before the first event, server shutting down)."""

    events: AsyncIterator[bytes]
    close: Callable[[], None]


def event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class SSEResponse(StreamingResponse):
    """A streaming response that stops (and so aborts the request) as soon as the client leaves.

    NOTE: Starlette only listens for http.disconnect on ASGI spec < 2.4 and otherwise notices a
    gone client at the next write; here we always listen, so a request waiting in the queue or in
    a long prefill is aborted at once too.
    """

    media_type = "text/event-stream"

    def __init__(self, result: StreamingResult, headers: dict | None = None) -> None:
        super().__init__(result.events, headers={**SSE_HEADERS, **(headers or {})})
        self.on_close = result.close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def run(func) -> None:
                    await func()
                    tg.cancel_scope.cancel()

                tg.start_soon(run, partial(self._stream_quietly, send))
                await run(partial(self.listen_for_disconnect, receive))
        finally:
            self.on_close()  # NOTE: idempotent; aborts whatever did not finish

    async def _stream_quietly(self, send: Send) -> None:
        try:
            await self.stream_response(send)
        except OSError:  # the client went away between two events: nothing to report to anyone
            pass
