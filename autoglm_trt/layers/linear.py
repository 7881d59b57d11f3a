"""Linear layers that know how to load (and shard) their own checkpoint weights.

Each parameter carries a `weight_loader(param, loaded, shard_id=None)`, so the checkpoint loader is a
short loop and tensor parallelism lives here: column-parallel layers split the output dim, row-parallel
layers split the input dim and all-reduce their output.
"""

from __future__ import annotations

import torch
from torch import nn

from autoglm_trt import plugins
from autoglm_trt.layers.parallel import all_reduce, get_tp_rank, get_tp_size


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what}={n} does not divide by the tensor-parallel size {d}")
    return n // d


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class LinearBase(nn.Module):
    """y = x W^T (+ b). `quant_method` (None for plain weights) may replace the matmul (INT8)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp_dim: int | None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.tp_dim = in_features, out_features, tp_dim
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        self.quant_method = None

    def _shard(self, loaded: torch.Tensor, dim: int) -> torch.Tensor:
        size = get_tp_size()
        if size == 1:
            return loaded
        return loaded.chunk(size, dim=dim)[get_tp_rank()]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if self.tp_dim is not None and not (param is self.bias and self.tp_dim == 1):
            loaded = self._shard(loaded, self.tp_dim)
        default_weight_loader(param, loaded)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x)
        return plugins.linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks; the output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, _divide(out_features, get_tp_size(), "out_features"), bias, tp_dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored in one checkpoint tensor (e.g. gate_up_proj).

    The checkpoint holds [sum(out_sizes), in]; each rank keeps its slice of every part.
    """

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        self.out_sizes = list(out_sizes)
        super().__init__(in_features, sum(out_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        parts = loaded.split(self.out_sizes, dim=0)
        default_weight_loader(param, torch.cat([self._shard(p, 0) for p in parts], dim=0))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused into one matmul; loads the separate q_proj/k_proj/v_proj tensors.

    Each rank keeps its query heads and its KV heads (KV heads are replicated when there are fewer
    KV heads than ranks).
    """

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        tp = get_tp_size()
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp, "num_attention_heads")
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.kv_replicas = max(1, tp // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden, out, bias, tp_dim=0)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard_id]
        rank = get_tp_rank() if shard_id == "q" else get_tp_rank() // self.kv_replicas
        shard = loaded.narrow(0, rank * size, size)
        if param.data[offset:offset + size].shape != shard.shape:
            raise ValueError(f"{shard_id}_proj shape {tuple(loaded.shape)} does not fit this config")
        param.data[offset:offset + size].copy_(shard)


class RowParallelLinear(LinearBase):
    """Input features split over ranks; partial outputs are summed by an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(_divide(in_features, get_tp_size(), "in_features"), out_features, bias, tp_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            y = self.quant_method.apply(self, x)
        else:
            y = plugins.linear(x, self.weight)
        y = all_reduce(y)
        return y if self.bias is None else y + self.bias
