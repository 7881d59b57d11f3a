"""The FastAPI application: routes plus the error handlers that give every failure OpenAI's shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from autoglm_trt import __version__
from autoglm_trt.errors import RequestError
from autoglm_trt.serve.errors import body_for, error_body
from autoglm_trt.serve.middleware import ApiKeyMiddleware, RequestLogMiddleware
from autoglm_trt.serve.openai import protocol as P
from autoglm_trt.serve.openai.router import ClientGone, build_router
from autoglm_trt.serve.state import ServeState

log = logging.getLogger("autoglm_trt.serve")


def build_app(state: ServeState) -> FastAPI:
    app = FastAPI(title="autoglm-trt", version=__version__, docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.serve = state
    app.include_router(build_router(state))
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    if state.config.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=state.config.api_key)
    if state.config.log_requests:
        app.add_middleware(RequestLogMiddleware)
    _add_error_handlers(app, state)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, plus the request bodies the routes parse themselves (strictly, into 400s)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description="OpenAI-compatible API of autoglm-trt (`/v1/*` needs "
                                         "`Authorization: Bearer KEY` when the server has --api-key)")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(P.openapi_components())
        app.openapi_schema = schema
    return app.openapi_schema


def _add_error_handlers(app: FastAPI, state: ServeState) -> None:

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> Response:
        state.metrics.observe_rejected(exc.status)
        headers = {"Retry-After": str(exc.retry_after)} if getattr(exc, "retry_after", None) else None
        return JSONResponse(body_for(exc), status_code=exc.status, headers=headers)

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: Exception) -> Response:
        log.debug("client %s hung up during %s %s", request.client.host if request.client else "-",
                  request.method, request.url.path)
        return Response(status_code=499)  # nobody reads it; the engine requests are aborted

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return JSONResponse(error_body(message, exc.status_code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse(error_body(str(exc), 400), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error while serving %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}: {exc}", 500),
                            status_code=500)
