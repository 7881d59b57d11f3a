"""Executors: how rank 0 runs a ModelStep on every rank. `LocalExecutor` (one rank) calls its ModelRunner;
`TPExecutor` starts the tensor-parallel workers, joins their groups and makes every call on every rank
(`collective_rpc`: rank 0 sends the call down the step channel, then makes it itself). engine/distributed.py
has the groups and the step channel, engine/worker.py the other ranks' loop."""

from __future__ import annotations

import atexit
import contextlib
import os
import time
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

from autoglm_trt.config import EngineConfig, ModelConfig
from autoglm_trt.engine.batch import ModelStep
from autoglm_trt.engine.distributed import (DistInit, StepMessage, TensorParallelError, TPGroups, abort_group,
                                            destroy_distributed, init_distributed, send_message, set_step_channel,
                                            startup_timeout_s)
from autoglm_trt.engine.outputs import StepFuture
from autoglm_trt.errors import UserError
from autoglm_trt.utils.logging import log


def check_tp_size(cfg: ModelConfig, tp: int, device: torch.device, model_dir: str | None = None) -> None:
    """Refuse a TP size the model's shapes or this machine's GPUs cannot take (naming the rebuild for an engine)."""
    t = cfg.text
    for name in ("num_attention_heads", "intermediate_size"):
        if getattr(t, name) % tp:
            raise UserError(f"tensor_parallel_size {tp} does not divide {name} {getattr(t, name)}")
    if t.num_key_value_heads % tp and tp % t.num_key_value_heads:
        raise UserError(f"tensor_parallel_size {tp} and num_key_value_heads {t.num_key_value_heads}: one must "
                        "divide the other")
    if device.type == "cuda" and torch.cuda.device_count() < tp:
        raise UserError(f"tensor_parallel_size {tp} needs {tp} GPUs; {torch.cuda.device_count()} visible"
                        + _rebuild_hint(model_dir, tp, torch.cuda.device_count()))


def _rebuild_hint(model_dir: str | None, tp: int, gpus: int) -> str:
    """For an engine directory built for `tp` ranks: what to rebuild it with on this machine ('' otherwise)."""
    from dataclasses import asdict

    from autoglm_trt.formats.manifest import is_engine_dir, read_manifest, rebuild_command

    if model_dir is None or not is_engine_dir(model_dir):
        return ""
    fixed = rebuild_command(model_dir, asdict(read_manifest(model_dir)), tp=max(gpus, 1))
    return (f": {model_dir} holds one pre-sharded rank file per GPU for --tp {tp}; rebuild it for this machine "
            f"with `{fixed}` (to a new directory)")


class TPExecutor:
    """Rank 0's side: starts ranks 1..N-1, joins their group, and wraps the ModelRunner so that every
    step is broadcast before it runs. `failure` is set (and the engine is stopped) when a rank dies."""

    def __init__(self, config: EngineConfig, device: torch.device, model_cfg: ModelConfig) -> None:
        from autoglm_trt.engine.worker import spawn_workers

        self.world = config.parallel.tensor_parallel_size
        self.failure: str | None = None
        self.runner = None  # rank 0's ModelRunner, once built
        self.timeout_s = startup_timeout_s()
        self._stopped = False
        self.groups: TPGroups | None = None  # set once this rank joined; None again after shutdown
        check_tp_size(model_cfg, self.world, device, config.model_dir)
        self._threads = torch.get_num_threads()
        if device.type == "cpu":  # NOTE: the ranks share the cores; oversubscribed threads crawl
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
        backend = config.parallel.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        store = dist.TCPStore("127.0.0.1", 0, self.world, True, timeout=timedelta(seconds=self.timeout_s),
                              wait_for_workers=False)
        self.init = DistInit(0, self.world, backend, store.port, device.type, self.timeout_s)
        self.workers = spawn_workers(config, self.init, self._on_death)
        _LIVE.add(self)
        try:
            self.workers.wait_phase("hello", self.timeout_s)
            self.groups = init_distributed(self.init, store)
            set_step_channel(self.workers.step_conns)
            self.workers.wait_phase("joined", self.timeout_s)
        except BaseException as exc:
            raise self._startup_error(exc) from exc
        log(f"tensor parallel: {self.world} ranks over {backend} (workers: pids "
            f"{', '.join(str(p.pid) for p in self.workers.procs.values())})")

    def build_runner(self, model, model_cfg: ModelConfig, config: EngineConfig):
        """Rank 0's ModelRunner, built in step with the workers' (profiling, KV sizing, graph capture)."""
        from autoglm_trt.engine.model_runner import ModelRunner

        try:
            self.workers.wait_phase("loaded", self.timeout_s)
            self.runner = ModelRunner(model, model_cfg, config, self.groups.torch_device)
            self.workers.wait_phase("ready", self.timeout_s)
        except BaseException as exc:
            raise self._startup_error(exc) from exc
        return self.runner

    # ---- steps ---------------------------------------------------------------------------------
    def execute(self, step: ModelStep) -> StepFuture:
        """Run the step on every rank -> rank 0's future (its tokens; a rank lost while the device
        works on it is reported when the future is read)."""
        future = self.collective_rpc("execute", step)
        return StepFuture(lambda: self._guarded(future.result))

    def collective_rpc(self, method: str, *args):
        """Call runner.<method>(*args) on every rank, workers first (a ModelStep goes to them without its
        sampling rows) -> rank 0's result."""
        self._check_alive()
        sent = tuple(a.for_workers() if isinstance(a, ModelStep) else a for a in args)

        def call():
            send_message(StepMessage(method, sent))
            return getattr(self.runner, method)(*args)

        return self._guarded(call)

    def _check_alive(self) -> None:
        custom = self.groups.custom if self.groups is not None else None
        if custom is not None and custom.error_seen() and self.failure is None:
            self.failure = "a rank did not answer the peer-memory all-reduce for a long time (it hangs)"
        if self.failure is not None:
            self.shutdown()
            raise TensorParallelError(f"tensor-parallel engine is stopped: {self.failure}")

    def _guarded(self, run):
        """run() -> its result; a failed collective or a peer lost meanwhile stops the engine, naming the rank."""
        custom = self.groups.custom if self.groups is not None else None
        try:
            out = run()
            if custom is not None:
                custom.fetch_error()  # NOTE: read at the next step, after this step's sync
        except Exception as exc:  # noqa: BLE001 - a collective failed: name the rank that caused it
            raise self._step_error(exc) from exc
        if self.failure is not None:  # NOTE: a peer died mid-step; this output is not to be trusted
            raise self._step_error(None)
        return out

    def _on_death(self, rank: int) -> None:
        """Monitor thread: a worker exited while the engine ran."""
        if self.failure is None:
            self.failure = self.workers.describe(rank)
        log(f"tensor parallel: {self.workers.describe(rank)}; the engine is unhealthy and stops")
        groups = self.groups
        if self.init.backend == "nccl" and groups is not None:
            abort_group(groups.device)  # NOTE: rank 0 may be blocked in a collective with the dead rank

    def _settle(self, seconds: float = 3.0) -> list[int]:
        """Ranks that died, after giving a just-killed process time to be noticed."""
        deadline = time.monotonic() + seconds
        while not self.workers.dead() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.workers.dead()

    def _startup_error(self, exc: BaseException) -> TensorParallelError:
        if isinstance(exc, TensorParallelError):
            err = exc
        else:
            dead = self._settle()
            cause = self.workers.describe(dead[0]) if dead else f"rank 0: {type(exc).__name__}: {exc}"
            err = TensorParallelError(f"tensor-parallel start-up failed: {cause}")
        self.failure = self.failure or str(err)
        log(f"{err}; stopping the workers")
        self.shutdown()
        return err

    def _step_error(self, exc: BaseException | None) -> TensorParallelError:
        dead = self._settle(3.0 if exc is not None else 0.0)
        cause = self.workers.describe(dead[0]) if dead else self.failure or f"{type(exc).__name__}: {exc}"
        self.failure = self.failure or cause
        self.shutdown()
        return TensorParallelError(f"tensor-parallel step failed: {cause}; the engine is stopped (restart it)")

    # ---- shutdown --------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.failure is None and not self._stopped

    def shutdown(self) -> None:
        """Stop the workers and leave the group; idempotent (also runs at exit)."""
        if self._stopped:
            return
        self._stopped = True
        _LIVE.discard(self)
        self.workers.closing = True  # NOTE: from here on, a worker exiting is expected
        healthy = self.failure is None and not self.workers.dead()
        joined, self.groups = self.groups is not None, None
        if healthy and joined:
            try:
                send_message(StepMessage(None))
            except Exception:  # noqa: BLE001
                healthy = False
        if self.runner is not None:
            self.runner.graphs = None  # NOTE: graphs hold NCCL work: drop them before the communicator
        set_step_channel([])
        destroy_distributed(healthy)
        self.workers.stop(grace_s=10.0 if healthy else 0.5)  # NOTE: told to stop, or not going to answer
        torch.set_num_threads(self._threads)
        self.failure = self.failure or "the engine was shut down"


class LocalExecutor:
    """One rank: the steps run on this process's ModelRunner."""

    failure = None
    healthy = True

    def __init__(self, device: torch.device) -> None:
        self.device, self.runner = device, None

    def build_runner(self, model, model_cfg: ModelConfig, config: EngineConfig):
        from autoglm_trt.engine.model_runner import ModelRunner

        self.runner = ModelRunner(model, model_cfg, config, self.device)
        return self.runner

    def execute(self, step: ModelStep) -> StepFuture:
        return self.runner.execute(step)

    def collective_rpc(self, method: str, *args):
        return getattr(self.runner, method)(*args)

    def shutdown(self) -> None:
        pass


def start_executor(config: EngineConfig, device: torch.device, model_cfg: ModelConfig) -> LocalExecutor | TPExecutor:
    """The executor that runs steps: TPExecutor (starting the workers) when tensor_parallel_size > 1."""
    if config.parallel.tensor_parallel_size == 1:
        return LocalExecutor(device)
    return TPExecutor(config, device, model_cfg)


@contextlib.contextmanager
def shutdown_on_error(executor: LocalExecutor | TPExecutor):
    """Stop the workers if rank 0's own start-up fails (no orphans, no half-formed group)."""
    try:
        yield
    except BaseException:
        executor.shutdown()
        raise


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for executor in list(_LIVE):
        executor.shutdown()
