"""`autoglm-trt serve`: HTTP and gRPC listen first (/health is 503), the engine loads behind them.

One event loop runs uvicorn (OpenAI API), the grpc.aio server (KServe v2) and the async engine
client; the engine itself steps in its own thread. The options are checked and both ports bound
before anything loads, so a mistake or a taken port is one `error:` line and exit code 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket

import uvicorn
from rich.markup import escape

from autoglm_trt.config import EngineArgs
from autoglm_trt.errors import UserError
from autoglm_trt.serve.app import build_app
from autoglm_trt.serve.config import ServerConfig
from autoglm_trt.serve.grpc.server import GrpcServer
from autoglm_trt.serve.loader import LoadReport, load_engine
from autoglm_trt.serve.state import ServeState
from autoglm_trt.utils.limits import raise_open_files_limit
from autoglm_trt.utils.logging import configure_logging, log
from autoglm_trt.utils.progress import console

logger = logging.getLogger("autoglm_trt.serve")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the serve loop owns SIGINT/SIGTERM (so it can
    stop gRPC and the engine thread before the process exits)."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


def run_server(config: ServerConfig, args: EngineArgs, notes: list[str] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; raise UserError when the options are wrong, a port is taken or the
    model cannot be loaded."""
    configure_logging(config.log_format, config.log_level)
    console.quiet = config.log_format == "json"  # NOTE: no progress bars among JSON lines
    for note in notes or []:
        log(escape(note))
    check_engine_args(args)
    raise_open_files_limit()
    sock = bind_http(config.host, config.port)
    check_grpc_port(config.host, config.grpc_port)
    asyncio.run(_serve(config, args, sock))


def check_engine_args(args: EngineArgs) -> None:
    """The engine's configuration (config.json or the engine's manifest, and the options) before any port opens."""
    try:
        args.create_engine_config()
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEADDR only (a restart may bind over connections in
    TIME_WAIT), never SO_REUSEPORT (two servers would share the port); OSError when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def bind_http(host: str, port: int) -> socket.socket:
    """The HTTP socket, bound here so that a taken port is a clear error (uvicorn would exit with a traceback)."""
    try:
        sock = _bound_socket(host, port)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} for HTTP ({exc.strerror or exc}): is another server "
                        f"using it? Choose another --port") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def check_grpc_port(host: str, port: int) -> None:
    """Refuse a taken gRPC port before grpc tries it (its C core would log its own error lines first)."""
    if port <= 0:
        return
    wildcard = host in ("0.0.0.0", "::", "")
    try:
        _bound_socket("::" if wildcard and socket.has_ipv6 else host, port).close()  # NOTE: grpc binds [::] too
    except OSError as exc:
        raise UserError(f"cannot listen on port {port} for gRPC ({exc.strerror or exc}): is another server using "
                        f"it? Choose another --grpc-port, or -1 for no gRPC server") from None


def _url_host(host: str) -> str:
    return "localhost" if host in ("0.0.0.0", "::", "") else host


async def _start_grpc(state: ServeState, config: ServerConfig) -> tuple[GrpcServer | None, int | None]:
    if config.grpc_port < 0:
        return None, None
    server = GrpcServer(state)
    try:
        return server, await server.start(config.host, config.grpc_port)
    except Exception as exc:  # noqa: BLE001 - grpc raises RuntimeError (or returns port 0) on a bind failure
        raise UserError(f"cannot listen on port {config.grpc_port} for gRPC ({exc}): is another server using "
                        f"it? Choose another --grpc-port, or -1 for no gRPC server") from None


async def _start_http(uv: uvicorn.Server, sock: socket.socket) -> asyncio.Task:
    task = asyncio.ensure_future(uv.serve(sockets=[sock]))
    while not uv.started:
        if task.done():
            exc = task.exception() if not task.cancelled() else None
            raise UserError(f"could not start the HTTP server ({exc})")
        await asyncio.sleep(0.02)
    return task


async def _serve(config: ServerConfig, args: EngineArgs, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    state = ServeState.create(config)
    uv = _Uvicorn(uvicorn.Config(build_app(state), log_config=None, log_level=None,
                                 access_log=False, lifespan="off", timeout_graceful_shutdown=5))
    grpc_server, grpc_port = await _start_grpc(state, config)
    http_task = await _start_http(uv, sock)
    _install_signals(loop, uv)
    host, http_port = _url_host(config.host), sock.getsockname()[1]
    log(f"listening: OpenAI API http://{host}:{http_port}/v1"
        + (f", KServe v2 gRPC {host}:{grpc_port}" if grpc_port else "")
        + f"; /health answers 503 until {escape(args.model_dir)} is loaded")
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
    """Load the engine behind the listening servers; log what it took, or stop the server (whose exit
    prints the error, once)."""
    reports: list[LoadReport] = []

    def load() -> object:
        reports.append(load_engine(args))
        return reports[0].engine

    try:
        await state.client.launch(load)
        await asyncio.to_thread(lambda: state.prompt_char_limit)  # NOTE: reads the vocabulary once, off the loop
    except asyncio.CancelledError:
        raise
    except UserError as exc:
        state.client.load_error = str(exc)
    except Exception as exc:  # noqa: BLE001 - a bug: its traceback, then the server exits with it
        logger.exception("loading the engine failed")
        state.client.load_error = f"{type(exc).__name__}: {exc}"
    if state.client.load_error is not None:
        uv.should_exit = True
        return
    if grpc_server is not None:
        await grpc_server.set_serving(True)
    _log_loaded(reports[0], state, urls, metrics_url)


def _log_loaded(report: LoadReport, state: ServeState, urls: str, metrics_url: str) -> None:
    cfg = report.engine.config
    log(f"devices: {report.devices}")
    log(f"model loaded in {report.seconds:.1f} s: dtype {report.dtype}, quantization {report.quant}, tp {report.tp}; "
        f"memory used: {report.memory}")
    log(f"max-model-len {report.max_model_len} (set by {escape(report.max_model_len_source)}); KV cache "
        f"{report.kv_tokens} tokens; max-num-seqs {cfg.scheduler.max_num_seqs}, max-num-batched-tokens "
        f"{cfg.scheduler.max_num_batched_tokens}, max-queue {state.config.max_queue}")
    log(f"ready: serving `{escape(state.config.served_model_name)}` at {urls}; metrics at {metrics_url}")
