"""Tensor-parallel group state, read by the layers (set once per process by the engine's workers)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    group: object | None = None  # torch.distributed ProcessGroup, None when world_size == 1


_STATE = ParallelState()


def set_parallel_state(rank: int, world_size: int, group: object | None = None) -> None:
    global _STATE
    _STATE = ParallelState(rank, world_size, group)


@contextmanager
def parallel_state(rank: int, world: int):
    """Set the tensor-parallel state while building one rank's model; restore the caller's afterwards."""
    saved = _STATE
    set_parallel_state(rank, world)
    try:
        yield
    finally:
        set_parallel_state(saved.rank, saved.world_size, saved.group)


def get_tp_rank() -> int:
    return _STATE.rank


def get_tp_size() -> int:
    return _STATE.world_size


_ALL_REDUCE_OVERRIDE = None  # a callable(tensor) -> tensor, e.g. the custom one-shot all-reduce


def set_all_reduce(fn) -> None:
    global _ALL_REDUCE_OVERRIDE
    _ALL_REDUCE_OVERRIDE = fn


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel group (in place where possible); identity on one rank."""
    if _STATE.world_size == 1:
        return x
    if _ALL_REDUCE_OVERRIDE is not None:
        return _ALL_REDUCE_OVERRIDE(x)
    dist.all_reduce(x, group=_STATE.group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's shard along the last dim: [..., n] -> [..., n * world]."""
    if _STATE.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.world_size)]
    dist.all_gather(parts, x.contiguous(), group=_STATE.group)
    return torch.cat(parts, dim=-1)
