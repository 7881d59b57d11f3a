"""The Ray Serve application: `autoglm-trt serve MODEL --replicas N`, or `serve run autoglm_trt.serve.ray_app:app
model=DIR replicas=N` (and the same keys under `args:` of a Serve config file).

Two deployments: OpenAIIngress runs the OpenAI routes (the same FastAPI app as plain `serve`) over a
RayEngineClient; EngineReplica owns one engine each (its GPUs through Ray's resources; on a CPU, num_cpus).
The ingress's handle routes every request with SessionAffinityRouter. Ray is imported here and in serve/ray/
only, and only when this module is used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading
import typing
from dataclasses import dataclass
from typing import Any

from autoglm_trt.config import EngineArgs
from autoglm_trt.errors import UserError
from autoglm_trt.serve.config import ServerConfig

APP_NAME = "autoglm"
_INGRESS_MAX_ONGOING = 100_000  # NOTE: Ray Serve's default of 5 would queue the sixth request in the proxy
logger = logging.getLogger("autoglm_trt.serve")


@dataclass
class ReplicaOptions:
    """How many engine replicas, what each one takes from the cluster, and when to add or drop replicas."""

    replicas: int = 1  # replicas at start (the minimum when autoscaling)
    max_replicas: int | None = None  # autoscale between `replicas` and this on ongoing requests per replica
    target_ongoing_requests: int | None = None  # per replica, for the autoscaler (default: max-num-seqs)
    saturation: int | None = None  # ongoing requests at which a session's replica is passed over (max-num-seqs)
    num_gpus: float | None = None  # per replica (default: the tensor-parallel size where the cluster has GPUs, else 0)
    num_cpus: float | None = None  # per replica (default: 1 without GPUs, else 0)
    ingress_replicas: int = 1  # OpenAI front ends (they build prompts and decode images: add some for many replicas)

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.ingress_replicas < 1:
            raise ValueError(f"replicas and ingress_replicas must be >= 1, got {self.replicas} and "
                             f"{self.ingress_replicas}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas must be >= replicas ({self.replicas}), got {self.max_replicas}")
        for name in ("target_ongoing_requests", "saturation"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class OpenAIIngress:
    """The OpenAI routes (serve/app.py) over the engine replicas; a Ray Serve ASGI ingress."""

    async def __init__(self, engine: Any, config: ServerConfig) -> None:
        from autoglm_trt.serve.metrics import ServeMetrics
        from autoglm_trt.serve.ray.client import Frontend, RayEngineClient
        from autoglm_trt.serve.state import ServeState

        info = await engine.describe.remote()
        frontend = await asyncio.to_thread(Frontend, info)
        metrics = ServeMetrics(config.served_model_name)
        self.state = ServeState(config, RayEngineClient(engine, metrics, frontend), metrics)
        self.grpc = await self._start_grpc(config) if config.grpc_port >= 0 else None

    async def _start_grpc(self, config: ServerConfig) -> Any:
        """Our KServe v2 server (health, reflection, API key, streaming) on --grpc-port, in this ingress replica
        over the same RayEngineClient. NOTE: beside Ray Serve's gRPC proxy, not through it: see README."""
        from autoglm_trt.serve.grpc.server import GrpcServer

        server = GrpcServer(self.state)
        try:
            await server.start(config.host, config.grpc_port)
        except Exception as exc:  # noqa: BLE001 - another ingress replica on this node holds the port
            logger.warning("no KServe gRPC endpoint in this ingress replica (port %d: %s)", config.grpc_port, exc)
            return None
        await server.set_serving(True)
        return server

    def __serve_build_asgi_app__(self) -> Any:
        from autoglm_trt.serve.app import build_app
        from autoglm_trt.serve.ray.client import RouteMiddleware

        return RouteMiddleware(build_app(self.state))


def _replica_resources(args: EngineArgs, opts: ReplicaOptions, tp: int) -> dict:
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    on_gpu = args.device == "cuda" or (args.device == "auto" and cluster_gpus > 0)
    gpus = opts.num_gpus if opts.num_gpus is not None else (tp if on_gpu else 0)
    cpus = opts.num_cpus if opts.num_cpus is not None else (0 if gpus else 1)
    return {"num_gpus": gpus, "num_cpus": cpus}


def build_application(config: ServerConfig, args: EngineArgs, opts: ReplicaOptions) -> Any:
    """The Ray Serve Application (ingress bound to the engine deployment); nothing starts until it is run."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from autoglm_trt.serve.ray.replica import EngineReplica
    from autoglm_trt.serve.ray.router import SessionAffinityRouter

    engine_config = args.create_engine_config()
    seqs = engine_config.scheduler.max_num_seqs
    scaling: dict[str, Any] = {"num_replicas": opts.replicas}
    if opts.max_replicas is not None and opts.max_replicas > opts.replicas:
        scaling = {"autoscaling_config": {
            "min_replicas": opts.replicas, "initial_replicas": opts.replicas, "max_replicas": opts.max_replicas,
            "target_ongoing_requests": opts.target_ongoing_requests or seqs,
            "upscale_delay_s": 30, "downscale_delay_s": 600}}
    engine = serve.deployment(
        EngineReplica, name="EngineReplica",
        max_ongoing_requests=seqs + config.max_queue,
        ray_actor_options=_replica_resources(args, opts, engine_config.parallel.tensor_parallel_size),
        request_router_config=RequestRouterConfig(
            request_router_class=SessionAffinityRouter,
            request_router_kwargs={"saturation": opts.saturation or seqs},
            request_routing_stats_period_s=2),
        health_check_period_s=5, graceful_shutdown_timeout_s=10, **scaling,
    ).bind(args, config.max_queue, config.served_model_name)
    # NOTE: on the head node, so that the gRPC endpoint (one per node) is at a known address
    ingress = serve.deployment(serve.ingress()(OpenAIIngress), name="OpenAIIngress", num_replicas=opts.ingress_replicas,
                               max_ongoing_requests=_INGRESS_MAX_ONGOING,
                               ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}})
    return ingress.bind(engine, config)


# ---- `serve run autoglm_trt.serve.ray_app:app key=value ...` ------------------------------------------------------
def app(raw: dict[str, Any]) -> Any:
    """Ray Serve's application builder: keys of EngineArgs (`model` for model_dir: a directory, or a hub id in the
    node's Hugging Face cache), ServerConfig (served_model_name, max_queue, ...) and ReplicaOptions; values as
    typed YAML or as command-line strings."""
    from autoglm_trt.utils.hub import resolve_model

    config, args, opts = parse_app_args(raw)
    return build_application(config, dataclasses.replace(args, model_dir=str(resolve_model(args.model_dir))), opts)


def parse_app_args(raw: dict[str, Any]) -> tuple[ServerConfig, EngineArgs, ReplicaOptions]:
    """The builder's arguments, typed and checked (ValueError naming the key); nothing is loaded."""
    raw = dict(raw)
    if "model" in raw:
        raw["model_dir"] = raw.pop("model")
    if "model_dir" not in raw:
        raise ValueError("the application needs `model` (a checkpoint or engine directory, or a hub id)")
    classes = (ServerConfig, EngineArgs, ReplicaOptions)
    unknown = set(raw) - set().union(*(_fields(cls) for cls in classes))
    if unknown:
        raise ValueError(f"unknown application arguments: {', '.join(sorted(unknown))}")
    config, args, opts = (cls(**_typed(cls, {k: v for k, v in raw.items() if k in _fields(cls)})) for cls in classes)
    return config, args, opts


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _typed(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    from pydantic import TypeAdapter

    hints = typing.get_type_hints(cls)
    return {k: TypeAdapter(hints[k]).validate_python(v) for k, v in values.items()}


# ---- `autoglm-trt serve MODEL --replicas N` ------------------------------------------------------------------------
def run_ray(config: ServerConfig, args: EngineArgs, opts: ReplicaOptions, address: str | None,
            notes: list[str] | None = None) -> None:
    """Start (or join, with `address`) a Ray cluster, deploy the application and serve until SIGINT/SIGTERM."""
    from autoglm_trt.serve.server import bind_http, check_engine_args, check_grpc_port
    from autoglm_trt.utils.logging import configure_logging, log

    configure_logging(config.log_format, config.log_level)
    for note in notes or []:
        log(note)
    check_engine_args(args)
    bind_http(config.host, config.port).close()  # NOTE: a taken port is one error line, not Ray's traceback
    check_grpc_port(config.host, config.grpc_port)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UserError("--replicas runs the replicas on Ray Serve, which is not installed: "
                        "pip install 'autoglm-trt[ray]'") from None
    local = {} if address else {"num_cpus": max(os.cpu_count() or 1, opts.replicas * int(opts.num_cpus or 1))}
    # NOTE: "local" always starts a new cluster (None would join one that `ray start` left on this machine)
    ray.init(address=address or "local", namespace=APP_NAME, logging_level=logging.WARNING, include_dashboard=False,
             **local)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        log(f"deploying {opts.replicas} replica(s) of {args.model_dir} on Ray "
            f"({'cluster ' + address if address else 'a local cluster'})")
        serve.run(build_application(config, args, opts), name=APP_NAME, route_prefix="/")
        grpc = f" and KServe v2 gRPC {config.host}:{config.grpc_port}" if config.grpc_port >= 0 else ""
        log(f"ready: serving `{config.served_model_name}` at http://{config.host}:{config.port}/v1{grpc} "
            f"with {opts.replicas} replica(s)")
        _wait_for_signal()
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
