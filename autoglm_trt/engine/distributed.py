"""Tensor parallelism: one process per GPU; rank 0 (the engine process) drives, ranks 1.. follow.

Start-up is a handshake in phases; each worker reports each phase over its own pipe and rank 0
waits for every rank with a deadline, so a worker that dies or hangs is named with its cause:
    hello   the process runs (spawned, torch imported, its device chosen)
    joined  the process groups exist: `device` (NCCL on GPUs, gloo on CPUs) for the model's
            collectives, `cpu` (gloo) for host-side exchanges; the custom all-reduce is installed
    loaded  its shard of the weights is in memory (each parameter's weight_loader shards)
    ready   its ModelRunner exists: KV cache of its KV heads (same block count on every rank),
            CUDA graphs captured (collectives included: every rank captures the same sizes)
A step: rank 0 schedules and builds the StepBatch, sends it as pickled bytes down a pipe to each
worker (a pipe wakes its reader sooner than a gloo broadcast, and tells it when rank 0 is gone), then
the step's image embeddings over `device` (the vision tower runs on rank 0 only: the workers load
no vision weights); every rank runs the same forward on its shard; rank 0 samples from the logits
that ParallelLMHead all-gathers. A worker exits when rank 0 says stop or when its parent dies.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import time
import weakref
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from autoglm_trt.config import EngineConfig, ModelConfig
from autoglm_trt.engine.batch import StepBatch
from autoglm_trt.errors import UserError
from autoglm_trt.layers.parallel import set_all_reduce, set_parallel_state
from autoglm_trt.utils.logging import log

# NOTE: NVLink multicast (NVLS) stays off: on shared hosts it can take the GPUs out of service.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

PHASES = ("spawned", "hello", "joined", "loaded", "ready")


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died, hung or failed: the engine is unhealthy and has been stopped."""


def startup_timeout_s() -> float:
    return float(os.environ.get("AUTOGLM_TRT_TP_STARTUP_TIMEOUT", "900"))


# ---- process groups (every rank) --------------------------------------------------------------------
@dataclass
class DistInit:
    """How a rank joins the group (picklable: sent to each worker)."""

    rank: int
    world_size: int
    backend: str  # "nccl" | "gloo"
    port: int  # rank 0's TCPStore on 127.0.0.1
    device_type: str  # "cuda" | "cpu"
    timeout_s: float


@dataclass
class TPGroups:
    device: object  # ProcessGroup for the model's collectives
    cpu: object  # gloo ProcessGroup: IPC handle exchange, barriers
    torch_device: torch.device
    custom: object | None = None  # CustomAllReduce when installed


_GROUPS: TPGroups | None = None


def init_distributed(init: DistInit, store=None) -> TPGroups:
    """Join the tensor-parallel group and set the layers' parallel state for this process."""
    global _GROUPS
    device = torch.device("cuda", init.rank) if init.device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=init.timeout_s)
    if store is None:
        store = dist.TCPStore("127.0.0.1", init.port, init.world_size, False, timeout=timeout)
    extra = {"device_id": device} if init.backend == "nccl" else {}
    dist.init_process_group(init.backend, store=store, rank=init.rank, world_size=init.world_size,
                            timeout=timeout, **extra)
    cpu = dist.new_group(backend="gloo", timeout=timeout)
    _GROUPS = TPGroups(dist.group.WORLD, cpu, device)
    set_parallel_state(init.rank, init.world_size, dist.group.WORLD)
    if device.type == "cuda" and init.backend == "nccl":
        _install_custom_all_reduce(_GROUPS, init)
        warm = torch.ones(1, device=device)
        dist.all_reduce(warm, group=_GROUPS.device)  # NOTE: communicator up before any graph capture
    return _GROUPS


def _install_custom_all_reduce(groups: TPGroups, init: DistInit) -> None:
    from autoglm_trt.plugins.custom_allreduce import CustomAllReduce

    custom, reason = CustomAllReduce.create(init.rank, init.world_size, groups.torch_device, groups.device,
                                            groups.cpu)
    if custom is None:
        if init.rank == 0:
            log(f"tensor parallel: NCCL all-reduce only ({reason})")
        return
    groups.custom = custom
    set_all_reduce(custom.all_reduce)
    if init.rank == 0:
        log(f"tensor parallel: one-shot peer-memory all-reduce up to {custom.max_bytes >> 10} KB, NCCL above")


def destroy_distributed(healthy: bool = True) -> None:
    """Leave the group and reset the layers to one rank (safe to call twice)."""
    global _GROUPS
    groups, _GROUPS = _GROUPS, None
    set_all_reduce(None)
    set_parallel_state(0, 1, None)
    if groups is None:
        return
    if groups.custom is not None:
        try:
            groups.custom.close(barrier=healthy)
        except Exception as exc:  # noqa: BLE001 - a dead peer must not stop the shutdown
            log(f"tensor parallel: custom all-reduce close: {exc}")
    if groups.torch_device.type == "cuda":
        _abort(groups.device)  # NOTE: a plain destroy can hang on a communicator used in CUDA graphs
    if dist.is_initialized():
        dist.destroy_process_group()


def _abort(group) -> None:
    """Unblock NCCL collectives waiting on a dead peer (best effort; the API moved between releases)."""
    try:
        group._get_backend(torch.device("cuda")).abort()  # NOTE: made to be called from another thread
    except Exception as exc:  # noqa: BLE001
        log(f"tensor parallel: could not abort the NCCL group ({exc})")


def min_over_tp_ranks(n: int) -> int:
    """The smallest n over the ranks (e.g. KV blocks: every rank must hold the same count)."""
    if _GROUPS is None:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=_GROUPS.torch_device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_GROUPS.device)
    return int(t.item())


# ---- step messages ------------------------------------------------------------------------------
@dataclass
class StepMessage:
    """What rank 0 broadcasts before every forward pass; batch None tells the workers to stop."""

    batch: StepBatch | None
    image_rows: int = 0  # rows of image embeddings that follow over the device group
    steps: int = 0  # > 0: run_multi (greedy decode of `steps` tokens in the multi-step CUDA graphs)
    penalties: list | None = None  # run_multi's per-row (frequency, presence, generated ids)


_CHANNEL: list = []  # rank 0: a pipe to each worker (send end); a worker: its pipe from rank 0 (receive end)


def set_step_channel(conns: list) -> None:
    """The pipes that carry step messages (a pipe wakes its reader sooner than a gloo broadcast)."""
    global _CHANNEL
    _CHANNEL = list(conns)


def send_message(msg: StepMessage) -> None:
    """Rank 0: the pickled message down every worker's pipe."""
    if msg.batch is not None:  # NOTE: a numpy array pickles ~10x faster than a torch tensor
        msg = replace(msg, batch=replace(msg.batch, positions=msg.batch.positions.numpy()))
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    for conn in _CHANNEL:
        conn.send_bytes(data)


def recv_message() -> StepMessage:
    """A worker: the next message (EOFError when rank 0 is gone)."""
    msg = pickle.loads(_CHANNEL[0].recv_bytes())
    if msg.batch is not None:
        msg.batch.positions = torch.from_numpy(msg.batch.positions)
    return msg


def broadcast_rows(x: torch.Tensor | None, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Rank 0 passes x [rows, width]; the others get a copy (over the device group)."""
    if rows == 0:
        return None
    if x is None:
        x = torch.empty(rows, width, dtype=dtype, device=_GROUPS.torch_device)
    dist.broadcast(x.contiguous(), src=0, group=_GROUPS.device)
    return x


# ---- rank 0: the executor ---------------------------------------------------------------------------
def check_tp_size(cfg: ModelConfig, tp: int, device: torch.device) -> None:
    t = cfg.text
    for name in ("num_attention_heads", "intermediate_size"):
        if getattr(t, name) % tp:
            raise UserError(f"tensor_parallel_size {tp} does not divide {name} {getattr(t, name)}")
    if t.num_key_value_heads % tp and tp % t.num_key_value_heads:
        raise UserError(f"tensor_parallel_size {tp} and num_key_value_heads {t.num_key_value_heads}: one must "
                        "divide the other")
    if device.type == "cuda" and torch.cuda.device_count() < tp:
        raise UserError(f"tensor_parallel_size {tp} needs {tp} GPUs; {torch.cuda.device_count()} visible")


class TPExecutor:
    """Rank 0's side: starts ranks 1..N-1, joins their group, and wraps the ModelRunner so that every
    step is broadcast before it runs. `failure` is set (and the engine is stopped) when a rank dies."""

    def __init__(self, config: EngineConfig, device: torch.device, model_cfg: ModelConfig) -> None:
        from autoglm_trt.engine.worker import spawn_workers

        self.world = config.parallel.tensor_parallel_size
        self.failure: str | None = None
        self.runner: TPRunner | None = None
        self.timeout_s = startup_timeout_s()
        self._stopped = False
        check_tp_size(model_cfg, self.world, device)
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
            init_distributed(self.init, store)
            set_step_channel(self.workers.step_conns)
            self.workers.wait_phase("joined", self.timeout_s)
        except BaseException as exc:
            raise self._startup_error(exc) from exc
        log(f"tensor parallel: {self.world} ranks over {backend} (workers: pids "
            f"{', '.join(str(p.pid) for p in self.workers.procs.values())})")

    def build_runner(self, model, model_cfg: ModelConfig, config: EngineConfig) -> "TPRunner":
        """Rank 0's ModelRunner, built in step with the workers' (profiling, KV sizing, graph capture)."""
        from autoglm_trt.engine.model_runner import ModelRunner

        try:
            self.workers.wait_phase("loaded", self.timeout_s)
            runner = ModelRunner(model, model_cfg, config, _GROUPS.torch_device)
            self.workers.wait_phase("ready", self.timeout_s)
        except BaseException as exc:
            raise self._startup_error(exc) from exc
        self.runner = TPRunner(runner, self)
        return self.runner

    # ---- steps ---------------------------------------------------------------------------------
    def execute(self, runner, batch: StepBatch) -> torch.Tensor:
        """Broadcast the step, run rank 0's shard -> logits [len(batch.logits_indices), vocab]."""
        embeds = runner._image_embeds(batch)  # [rows, hidden] from rank 0's encoder cache, or None
        rows = 0 if embeds is None else embeds.shape[0]

        def run() -> torch.Tensor:
            broadcast_rows(embeds, rows, 0, runner.dtype)
            return runner.run(batch, image_embeds=embeds)

        return self._broadcast_then(StepMessage(batch, rows), run)

    def execute_multi(self, runner, batch: StepBatch, steps: int, penalties) -> list[list[int]]:
        """Multi-step greedy decode on every rank (each replays its own graphs; tokens agree because
        every rank argmaxes the same all-gathered logits) -> tokens [steps][rows], from rank 0."""
        return self._broadcast_then(StepMessage(batch, 0, steps, penalties),
                                    lambda: runner.run_multi(batch, steps, penalties))

    def _broadcast_then(self, msg: StepMessage, run):
        custom = _GROUPS.custom if _GROUPS is not None else None
        if custom is not None and custom.error_seen() and self.failure is None:
            self.failure = "a rank did not answer the peer-memory all-reduce for a long time (it hangs)"
        if self.failure is not None:
            self.shutdown()
            raise TensorParallelError(f"tensor-parallel engine is stopped: {self.failure}")
        try:
            send_message(msg)
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
        if self.init.backend == "nccl" and _GROUPS is not None:
            _abort(_GROUPS.device)  # NOTE: rank 0 may be blocked in a collective with the dead rank

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
        if healthy and _GROUPS is not None:
            try:
                send_message(StepMessage(None))
            except Exception:  # noqa: BLE001
                healthy = False
        if self.runner is not None:
            self.runner.runner.graphs = None  # NOTE: graphs hold NCCL work: drop them before the communicator
        set_step_channel([])
        destroy_distributed(healthy)
        self.workers.stop(grace_s=10.0 if healthy else 0.5)  # NOTE: told to stop, or not going to answer
        torch.set_num_threads(self._threads)
        self.failure = self.failure or "the engine was shut down"


def start_executor(config: EngineConfig, device: torch.device, model_cfg: ModelConfig) -> TPExecutor | None:
    """The executor that starts the workers, or None when tensor_parallel_size is 1."""
    if config.parallel.tensor_parallel_size == 1:
        return None
    return TPExecutor(config, device, model_cfg)


@contextlib.contextmanager
def shutdown_on_error(executor: TPExecutor | None):
    """Stop the workers if rank 0's own start-up fails (no orphans, no half-formed group)."""
    try:
        yield
    except BaseException:
        if executor is not None:
            executor.shutdown()
        raise


class TPRunner:
    """Rank 0's runner: the ModelRunner's interface, with run() broadcasting the step first."""

    def __init__(self, runner, executor: TPExecutor) -> None:
        self.runner, self.executor = runner, executor

    def __getattr__(self, name: str):
        return getattr(self.__dict__["runner"], name)

    def run(self, batch: StepBatch) -> torch.Tensor:
        return self.executor.execute(self.runner, batch)

    def run_multi(self, batch: StepBatch, steps: int, penalties) -> list[list[int]]:
        return self.executor.execute_multi(self.runner, batch, steps, penalties)

    # NOTE: windows are not pipelined across ranks yet (each multi-step window is one broadcast call);
    # without this the inner runner's launch_multi would run on rank 0 alone.
    can_pipeline = False


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for executor in list(_LIVE):
        executor.shutdown()


def free_port() -> int:
    """A free TCP port on loopback (for a TCPStore or a local server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_nccl_with_gloo(rank: int, world: int, port: int):
    """Join an NCCL default group on cuda:rank; -> a gloo group (the custom all-reduce swaps IPC handles over it)."""
    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    return dist.new_group(backend="gloo")
