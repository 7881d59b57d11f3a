"""KV cache allocation and sizing.

On a GPU the number of blocks comes from the memory left after the weights, a profile forward pass of
the largest step and the CUDA-graph reserve, so graph capture can never run out of memory afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autoglm_trt.config import CacheConfig, ModelConfig, SchedulerConfig

GRAPH_RESERVE_BYTES = 768 << 20  # CUDA-graph pools and allocator slack, measured well under this on H100


def graph_output_bytes(batch_sizes: list[int], vocab: int, multi_step: bool) -> int:
    """What decode graphs keep beyond the reserve: each bucket's float32 logits stay allocated in the
    shared pool, and multi-step decode adds per-row token counts [max batch, vocab] float32."""
    if not batch_sizes:
        return 0
    rows = sum(batch_sizes) + (max(batch_sizes) if multi_step else 0)
    return rows * vocab * 4


@dataclass
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int  # per tensor-parallel rank
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize


def cpu_num_blocks(spec: KVCacheSpec, sched: SchedulerConfig, limit_bytes: int = 1 << 30) -> int:
    """Enough blocks for max_num_seqs full-length sequences, capped at `limit_bytes`."""
    want = sched.max_num_seqs * -(-sched.max_model_len // spec.block_size)
    return max(1, min(want, limit_bytes // spec.bytes_per_block))


def gpu_num_blocks(spec: KVCacheSpec, cache: CacheConfig, device: torch.device, peak_bytes: int,
                   graph_bytes: int = 0) -> int:
    """Blocks that fit in gpu_memory_utilization of the card after `peak_bytes` (weights + activations)
    and `graph_bytes` (graph_output_bytes)."""
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    budget = (total * cache.gpu_memory_utilization - used_by_others - peak_bytes - GRAPH_RESERVE_BYTES
              - graph_bytes)
    blocks = int(budget // spec.bytes_per_block)
    if blocks < 1:
        raise RuntimeError(
            f"no GPU memory left for the KV cache: the card has {total / 2**30:.1f} GiB, weights and "
            f"activations take {peak_bytes / 2**30:.1f} GiB at gpu_memory_utilization "
            f"{cache.gpu_memory_utilization}; raise it, lower max_num_batched_tokens, or use INT8 weights")
    return blocks


def allocate_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One allocation [layers, 2, blocks, block_size, kv_heads, head_dim]; returns per-layer (k, v) views."""
    cache = torch.zeros(spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim,
                        dtype=spec.dtype, device=device)
    return [(cache[i, 0], cache[i, 1]) for i in range(spec.num_layers)]


def spec_for(model_cfg: ModelConfig, cache: CacheConfig, num_kv_heads_per_rank: int, dtype: torch.dtype) -> KVCacheSpec:
    t = model_cfg.text
    return KVCacheSpec(t.num_hidden_layers, num_kv_heads_per_rank, t.head_dim, cache.block_size, dtype)
