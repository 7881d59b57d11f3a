"""Test harnesses: the real HTTP+gRPC server stack in a background thread over a given engine
(unit tests, with the FakeEngine), and the real `autoglm-trt serve` CLI as a subprocess (e2e)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from autoglm_trt.serve.app import build_app
from autoglm_trt.serve.config import ServerConfig
from autoglm_trt.serve.grpc.server import GrpcServer
from autoglm_trt.serve.state import ServeState
from autoglm_trt.engine.distributed import free_port

REPO = Path(__file__).resolve().parents[2]


class InProcessServer:
    """uvicorn + grpc.aio + AsyncEngineClient on one event loop in a daemon thread."""

    def __init__(self, engine: Any, start_engine: bool = True, **config: Any) -> None:
        self.engine = engine
        self.start_engine = start_engine
        self.config = ServerConfig(host="127.0.0.1", port=free_port(), grpc_port=free_port(), **config)
        self.state = ServeState.create(self.config)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config.port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.config.grpc_port}"

    def __enter__(self) -> "InProcessServer":
        self.thread.start()
        if not self.ready.wait(20) or self.error:
            raise RuntimeError(f"in-process server did not start: {self.error}")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.uv.should_exit = True
        self.thread.join(15)
        self.state.client.shutdown()

    def start_engine_now(self) -> None:
        """Adopt the engine later (to test the 'still loading' answers first)."""
        fut = asyncio.run_coroutine_threadsafe(self._adopt(), self.loop)
        fut.result(10)

    async def _adopt(self) -> None:
        self.state.client.start(self.engine, asyncio.get_running_loop())
        await self.grpc.set_serving(True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        try:
            self.uv = uvicorn.Server(uvicorn.Config(build_app(self.state), host="127.0.0.1",
                                                    port=self.config.port, log_level="warning",
                                                    lifespan="off", timeout_graceful_shutdown=2))
            self.uv.install_signal_handlers = lambda: None  # older uvicorn
            self.grpc = GrpcServer(self.state)
            await self.grpc.start("127.0.0.1", self.config.grpc_port)
            if self.start_engine:
                await self._adopt()
            task = asyncio.ensure_future(self.uv.serve())
            while not self.uv.started:
                await asyncio.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
            self.ready.set()
            raise
        self.ready.set()
        await task
        await self.grpc.stop(0.5)


# ---- the real CLI ---------------------------------------------------------------------------------
def cli_command() -> list[str]:
    exe = Path(sys.executable).with_name("autoglm-trt")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("autoglm-trt")
    return [found] if found else [sys.executable, "-m", "autoglm_trt.cli"]


def cli_has(command: str) -> bool:
    try:
        from autoglm_trt import cli
    except Exception:  # noqa: BLE001
        return False
    names = {c.name or c.callback.__name__.replace("_", "-") for c in cli.app.registered_commands}
    return command in names


class CliServer:
    """`autoglm-trt ARGS...` (a serve command line) as a subprocess, waited on until /health on `port` is 200."""

    def __init__(self, args: list[str], port: int, grpc_port: int | None = None, env: dict | None = None,
                 api_key: str | None = None, timeout: float = 180) -> None:
        self.port, self.grpc_port, self.api_key = port, grpc_port, api_key
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"autoglm-serve-{self.port}.log"
        self.log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
               **(env or {})}
        self.proc = subprocess.Popen([*cli_command(), *args], stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env=env)
        self.saw_503 = False
        self._wait_ready(timeout)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
                if r.status_code == 503:
                    self.saw_503 = True
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"serve was not ready in {timeout} s:\n{self.output()}")

    def output(self, tail: int | None = 6000) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace")
        return text[-tail:] if tail else text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


class ServeProcess(CliServer):
    """`autoglm-trt serve MODEL ...` on free ports (HTTP and gRPC), on the test device."""

    def __init__(self, model_dir: Path, *args: str, api_key: str | None = None, timeout: float = 180) -> None:
        port, grpc_port = free_port(), free_port()
        cmd = ["serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port),
               "--device", os.environ.get("AUTOGLM_SERVE_TEST_DEVICE", "cpu"), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        super().__init__(cmd, port, grpc_port, api_key=api_key, timeout=timeout)


def start_serve(model_dir: Path, *args: str, api_key: str | None = None) -> ServeProcess:
    """The real CLI as a subprocess; skips (saying why) until the CLI can serve."""
    import pytest

    if not cli_has("serve"):
        pytest.skip("autoglm_trt.cli has no `serve` command yet")
    return ServeProcess(model_dir, *args, api_key=api_key)
