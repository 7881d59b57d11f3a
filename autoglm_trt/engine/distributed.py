"""Tensor parallelism: one process per GPU; rank 0 (the engine process) drives, ranks 1.. follow.

Start-up is a handshake in phases; each worker reports each phase over its own pipe and rank 0
waits for every rank with a deadline, so a worker that dies or hangs is named with its cause:
    hello   the process runs (spawned, torch imported, its device chosen)
    joined  the process groups exist: `device` (NCCL on GPUs, gloo on CPUs) for the model's
            collectives, `cpu` (gloo) for host-side exchanges; the custom all-reduce is installed
    loaded  its shard of the weights is in memory (each parameter's weight_loader shards)
    ready   its ModelRunner exists: KV cache of its KV heads (same block count on every rank),
            CUDA graphs captured (collectives included: every rank captures the same sizes)
A step: rank 0 schedules and builds the ModelStep, sends the call `execute(step)` as pickled bytes down
a pipe to each worker (a pipe wakes its reader sooner than a gloo broadcast, and tells it when rank 0 is
gone) and makes the same call itself: every rank's ModelRunner runs the same forward on its shard (rank 0
sends the step's image embeddings over `device` inside it: the vision tower runs on rank 0 only, the
workers load no vision weights), a window of greedy steps included; rank 0 samples from the logits that
ParallelLMHead all-gathers. A worker exits when rank 0 says stop or when its parent dies.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

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
        abort_group(groups.device)  # NOTE: a plain destroy can hang on a communicator used in CUDA graphs
    if dist.is_initialized():
        dist.destroy_process_group()


def abort_group(group) -> None:
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
    """A call every rank makes on its ModelRunner, in the same order (rank 0 sends it before making it
    itself); method None tells the workers to stop."""

    method: str | None
    args: tuple = ()


_CHANNEL: list = []  # rank 0: a pipe to each worker (send end); a worker: its pipe from rank 0 (receive end)


def set_step_channel(conns: list) -> None:
    """The pipes that carry step messages (a pipe wakes its reader sooner than a gloo broadcast)."""
    global _CHANNEL
    _CHANNEL = list(conns)


def send_message(msg: StepMessage) -> None:
    """Rank 0: the pickled message down every worker's pipe."""
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    for conn in _CHANNEL:
        conn.send_bytes(data)


def recv_message() -> StepMessage:
    """A worker: the next message (EOFError when rank 0 is gone)."""
    return pickle.loads(_CHANNEL[0].recv_bytes())


def broadcast_rows(x: torch.Tensor | None, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Rank 0 passes x [rows, width]; the others get a copy (over the device group)."""
    if rows == 0:
        return None
    if x is None:
        x = torch.empty(rows, width, dtype=dtype, device=_GROUPS.torch_device)
    dist.broadcast(x.contiguous(), src=0, group=_GROUPS.device)
    return x


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
