"""The gRPC server: KServe v2 inference service, grpc.health.v1 and server reflection, API key."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from autoglm_trt.serve.auth import bearer_ok
from autoglm_trt.serve.grpc import inference_pb2 as pb
from autoglm_trt.serve.grpc import inference_pb2_grpc as pb_grpc
from autoglm_trt.serve.grpc.servicer import InferenceServicer
from autoglm_trt.serve.state import ServeState

log = logging.getLogger("autoglm_trt.serve")
SERVICE = "inference.GRPCInferenceService"
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes need no key
MAX_MESSAGE_BYTES = 64 << 20


class _ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

        async def deny(request: Any, context: Any) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "invalid or missing API key: send metadata `authorization: Bearer <key>`")

        async def deny_stream(request_iterator: Any, context: Any) -> None:
            await deny(None, context)

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny_stream)

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        if details.method.startswith(_OPEN_PREFIXES):
            return await continuation(details)
        meta = {k.lower(): v for k, v in (details.invocation_metadata or ())}
        if bearer_ok(meta.get("authorization"), self.api_key):
            return await continuation(details)
        return self._deny_stream if details.method.endswith("/ModelStreamInfer") else self._deny_unary


def _reflection_pool() -> Any:
    """Our private descriptor pool plus the health service's file, so reflection can serve both."""
    from google.protobuf import descriptor_pb2

    for file_desc in (health_pb2.DESCRIPTOR,):
        proto = descriptor_pb2.FileDescriptorProto()
        file_desc.CopyToProto(proto)
        try:
            pb.POOL.Add(proto)
        except (TypeError, ValueError):  # already added (a second server in one process)
            pass
    return pb.POOL


class GrpcServer:
    """Owns the grpc.aio server; health turns SERVING once the engine is ready."""

    def __init__(self, state: ServeState) -> None:
        interceptors = [_ApiKeyInterceptor(state.config.api_key)] if state.config.api_key else []
        # NOTE: gRPC sets SO_REUSEPORT by default: a second server would share the port silently
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)]
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(state), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server, pool=_reflection_pool())
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        bind = f"[::]:{port}" if host in ("0.0.0.0", "::", "") else f"{host}:{port}"
        self.port = self.server.add_insecure_port(bind)
        if self.port == 0:
            raise OSError(f"could not bind the gRPC server to {bind}")
        await self.server.start()
        await self.set_serving(False)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
