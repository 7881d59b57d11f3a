"""Per-step attention metadata: set by the engine before a forward pass, read by attention layers.

Keeping it out of forward() arguments means `forward(input_ids, positions)` has one signature for eager,
CUDA-graph and tensor-parallel runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionContext:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token's K/V (-1: do not store)
    cu_seqlens_q: torch.Tensor  # [B+1] int32: query tokens of each sequence in this step
    seq_lens: torch.Tensor  # [B] int32: KV length of each sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, -1 padded
    max_seqlen_q: int
    max_seqlen_k: int
    is_decode: bool  # every sequence has exactly one query token
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer


_CONTEXT: AttentionContext | None = None


def set_context(ctx: AttentionContext | None) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def get_context() -> AttentionContext | None:
    return _CONTEXT


def reset_context() -> None:
    set_context(None)
