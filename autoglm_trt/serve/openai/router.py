"""The OpenAI-compatible routes: thin wrappers that parse, call a handler and pick the response."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from autoglm_trt import __version__
from autoglm_trt.serve.auth import check_bearer
from autoglm_trt.serve.errors import error_body
from autoglm_trt.serve.metrics import CONTENT_TYPE
from autoglm_trt.serve.openai import protocol as P
from autoglm_trt.serve.openai.chat import create_chat_completion
from autoglm_trt.serve.openai.completions import create_completion
from autoglm_trt.serve.openai.sse import SSEResponse, StreamingResult
from autoglm_trt.serve.state import ServeState


class ClientGone(Exception):
    """The client closed the connection before the response was ready (the work is aborted)."""


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
    def auth(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), state.config.api_key)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = P.parse_request(P.ChatCompletionRequest, await request.body())
        return await _respond(request, create_chat_completion(state, req))

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        req = P.parse_request(P.CompletionRequest, await request.body())
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

