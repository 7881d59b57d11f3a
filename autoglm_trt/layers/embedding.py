"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoglm_trt import plugins
from autoglm_trt.layers.parallel import all_gather_last_dim, all_reduce, get_tp_rank, get_tp_size
from autoglm_trt.layers.quant import w8a16


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        tp = get_tp_size()
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp)  # ceil: the last shard is padded
        self.start = get_tp_rank() * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.shape[0] != self.vocab_size:
            raise ValueError(f"embedding has {loaded.shape[0]} rows, config says vocab_size {self.vocab_size}")
        part = loaded[self.start:self.start + self.shard_size]
        param.data.zero_()
        param.data[: part.shape[0]].copy_(part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, dim]
        if get_tp_size() == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local >= 0) & (local < self.shard_size)
        out = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * mask.unsqueeze(-1)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """logits = h W^T over the vocabulary; shards are gathered so every rank sees full logits."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, dim] -> [B, vocab]
        if self.weight.dtype == torch.int8:  # INT8 builds: W8A16 (layers/quant.quantize_lm_head)
            logits = w8a16(h, self.weight, self.weight_scale, gemv_one_row=True)
        else:
            logits = plugins.linear(h, self.weight)
        if get_tp_size() > 1:
            logits = all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]
