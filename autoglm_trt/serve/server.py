"""`autoglm-trt serve`: HTTP and gRPC listen first (/health is 503), the engine loads behind them.

One event loop runs uvicorn (OpenAI API), the grpc.aio server (KServe v2) and the async engine
client; the engine itself steps in its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import uvicorn

from autoglm_trt.config import EngineArgs
from autoglm_trt.errors import UserError
from autoglm_trt.serve.app import build_app
from autoglm_trt.serve.config import ServerConfig
from autoglm_trt.serve.grpc.server import GrpcServer
from autoglm_trt.serve.loader import LoadReport, load_engine
from autoglm_trt.serve.state import ServeState
from autoglm_trt.utils.limits import raise_open_files_limit
from autoglm_trt.utils.logging import log

logger = logging.getLogger("autoglm_trt.serve")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the serve loop owns SIGINT/SIGTERM (so it can
    stop gRPC and the engine thread before the process exits)."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


def run_server(config: ServerConfig, args: EngineArgs) -> None:
    """Serve until SIGINT/SIGTERM; raise UserError when the model cannot be loaded or a port is taken."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    raise_open_files_limit()
    asyncio.run(_serve(config, args))


def _url_host(host: str) -> str:
    return "localhost" if host in ("0.0.0.0", "::", "") else host


async def _start_http(uv: uvicorn.Server, config: ServerConfig) -> tuple[asyncio.Task, int]:
    task = asyncio.ensure_future(uv.serve())
    while not uv.started:
        if task.done():
            exc = task.exception() if not task.cancelled() else None
            raise UserError(f"could not start the HTTP server on {config.host}:{config.port} "
                            f"({exc or 'is the port in use?'})")
        await asyncio.sleep(0.02)
    port = uv.servers[0].sockets[0].getsockname()[1] if uv.servers else config.port
    return task, port


async def _serve(config: ServerConfig, args: EngineArgs) -> None:
    loop = asyncio.get_running_loop()
    state = ServeState.create(config)
    uv = _Uvicorn(uvicorn.Config(build_app(state), host=config.host, port=config.port,
                                 log_level="warning", access_log=config.log_requests, lifespan="off",
                                 timeout_graceful_shutdown=5))
    grpc_server = GrpcServer(state) if config.grpc_port >= 0 else None
    try:
        grpc_port = await grpc_server.start(config.host, config.grpc_port) if grpc_server else None
    except Exception as exc:
        raise UserError(f"could not start the gRPC server on port {config.grpc_port} ({exc})") from None
    http_task, http_port = await _start_http(uv, config)
    _install_signals(loop, uv)
    host = _url_host(config.host)
    log(f"listening: OpenAI API http://{host}:{http_port}/v1"
        + (f", KServe v2 gRPC {host}:{grpc_port}" if grpc_port else "")
        + f"; /health answers 503 until {args.model_dir} is loaded")
    urls = f"http://{host}:{http_port}/v1" + (f" and grpc://{host}:{grpc_port}" if grpc_port else "")
    load_task = asyncio.ensure_future(_load(state, args, grpc_server, uv, urls, f"http://{host}:{http_port}/metrics"))
    try:
        await http_task
    finally:
        load_task.cancel()
        if grpc_server is not None:
            await grpc_server.stop()
        state.client.shutdown()
    if state.client.load_error is not None:
        raise UserError(f"the model could not be loaded: {state.client.load_error}")


def _install_signals(loop: asyncio.AbstractEventLoop, uv: uvicorn.Server) -> None:
    def stop() -> None:
        if uv.should_exit:
            uv.force_exit = True  # second Ctrl-C: do not wait for open streams
        uv.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)


async def _load(state: ServeState, args: EngineArgs, grpc_server: GrpcServer | None, uv: uvicorn.Server,
                urls: str, metrics_url: str) -> None:
    """Load the engine behind the listening servers; log what it took, or stop the server."""
    reports: list[LoadReport] = []

    def load() -> object:
        reports.append(load_engine(args))
        return reports[0].engine

    try:
        await state.client.launch(load)
    except asyncio.CancelledError:
        raise
    except UserError as exc:
        state.client.load_error = str(exc)
    except Exception as exc:  # noqa: BLE001 - reported, then the server exits with it
        logger.exception("loading the engine failed")
        state.client.load_error = f"{type(exc).__name__}: {exc}"
    if state.client.load_error is not None:
        log(f"[red]error:[/red] {state.client.load_error}")
        uv.should_exit = True
        return
    report = reports[0]
    if grpc_server is not None:
        await grpc_server.set_serving(True)
    cfg = report.engine.config
    log(f"devices: {report.devices}")
    log(f"model loaded in {report.seconds:.1f} s; memory used: {report.memory}")
    log(f"KV cache: {report.kv_tokens} tokens; max-model-len {cfg.scheduler.max_model_len}, "
        f"max-num-seqs {cfg.scheduler.max_num_seqs}, max-queue {state.config.max_queue}")
    log(f"ready: serving `{state.config.served_model_name}` at {urls}; metrics at {metrics_url}")
