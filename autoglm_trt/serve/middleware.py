"""ASGI middleware of the HTTP server: the API key on every /v1 path (routed or not), and --log-requests.

Pure ASGI (not Starlette's BaseHTTPMiddleware), so streamed responses pass through untouched.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from autoglm_trt.serve.auth import bearer_ok
from autoglm_trt.serve.errors import error_body

request_log = logging.getLogger("autoglm_trt.serve.requests")
_DENIED = json.dumps(error_body("invalid or missing API key: send `Authorization: Bearer <key>`", 401,
                                code="invalid_api_key")).encode()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class ApiKeyMiddleware:
    """401 for any /v1 path without the key, before routing (an unknown /v1 route says nothing without it)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or not (path == "/v1" or path.startswith("/v1/"))
                or bearer_ok(_header(scope, b"authorization"), self.api_key)):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": _DENIED})


class RequestLogMiddleware:
    """One INFO line per HTTP request when it ends: method, path, status, body size, time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, seen = time.perf_counter(), {"status": None, "bytes": 0}

        async def counting_receive() -> Message:
            message = await receive()
            seen["bytes"] += len(message.get("body", b""))
            return message

        async def status_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, counting_receive, status_send)
        finally:
            client: Any = scope.get("client") or ("-", 0)
            request_log.info("%s %s %s -> %s (%d request bytes, %.3f s)", client[0], scope.get("method"),
                             scope.get("path"), seen["status"] or "no response", seen["bytes"],
                             time.perf_counter() - t0)
