"""The OpenAI-compatible routes: thin wrappers that parse, call a handler and pick the response."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from autoglm_trt import __version__
from autoglm_trt.serve.errors import ServeError, error_body
from autoglm_trt.serve.metrics import CONTENT_TYPE
from autoglm_trt.serve.openai import protocol as P
from autoglm_trt.serve.openai.chat import create_chat_completion
from autoglm_trt.serve.openai.completions import create_completion
from autoglm_trt.serve.openai.sse import SSEResponse, StreamingResult
from autoglm_trt.serve.state import ServeState


class ClientGone(Exception):
    """The client closed the connection before the response was ready (the work is aborted)."""


_PARSE_IN_THREAD_BYTES = 256 << 10  # NOTE: parsing a body of megabytes on the event loop would stall every stream


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (by Content-Length before reading, or while
    reading a chunked one); a client that hangs up mid-body is ClientGone, not an error."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(int(length), limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> ServeError:
    return ServeError(f"the request body has {size} bytes or more; this server accepts at most {limit} "
                      f"(--max-request-bytes)", status=413)


async def parse_body(request: Request, state: ServeState, cls: type) -> Any:
    body = await read_body(request, state.config.max_request_bytes)
    if len(body) > _PARSE_IN_THREAD_BYTES:
        return await asyncio.to_thread(P.parse_request, cls, body)
    return P.parse_request(cls, body)


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`, cancelling it (and so aborting its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientGone()
    return task.result()


async def _respond(request: Request, work: Awaitable[Any]) -> Response:
    result = await _until_disconnect(request, work)
    if isinstance(result, StreamingResult):
        return SSEResponse(result)
    return JSONResponse(result)


def build_router(state: ServeState) -> APIRouter:
    v1 = APIRouter(prefix="/v1")  # NOTE: the API key is checked by ApiKeyMiddleware, for every /v1 path

    @v1.post("/chat/completions", openapi_extra=P.openapi_body(P.ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        req = await parse_body(request, state, P.ChatCompletionRequest)
        return await _respond(request, create_chat_completion(state, req))

    @v1.post("/completions", openapi_extra=P.openapi_body(P.CompletionRequest))
    async def completions(request: Request) -> Response:
        req = await parse_body(request, state, P.CompletionRequest)
        return await _respond(request, create_completion(state, req))

    @v1.get("/models")
    async def models() -> dict:
        max_len = state.max_model_len if state.client.ready else None
        return P.model_list(state.config.served_model_name, state.started, max_len)

    root = APIRouter()

    @root.get("/health")
    async def health() -> Response:
        if state.client.ready:
            return Response(status_code=200)
        detail = state.client.load_error or "the model is still loading"
        return JSONResponse(error_body(detail, 503), status_code=503, headers={"Retry-After": "5"})

    @root.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @root.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    root.include_router(v1)
    return root

