"""Custom kernels behind one set of signatures (docs/architecture.md, "plugins/").

Each function dispatches on its first tensor: CUDA tensors go to the Triton kernels (imported
lazily on first use, so this package imports without triton), everything else to the plain-torch
references in `reference.py`. AUTOGLM_TRT_DISABLE_TRITON=1 forces the references everywhere.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch.nn.functional as F
from torch import Tensor

from autoglm_trt.plugins import reference

_DISABLE_ENV = "AUTOGLM_TRT_DISABLE_TRITON"
_modules: dict[str, ModuleType | None] = {}


def triton_disabled() -> bool:
    return os.environ.get(_DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _load(name: str) -> ModuleType | None:
    """Import plugins.<name> once; None (with one warning) when triton cannot be imported."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"autoglm_trt.plugins.{name}")
        except ImportError as exc:  # NOTE: CUDA torch without triton: stay correct, just slower
            warnings.warn(f"Triton kernels unavailable ({exc}); using the torch references",
                          stacklevel=3)
            _modules[name] = None
    return _modules[name]


def kernels_for(name: str, t: Tensor) -> ModuleType | None:
    """plugins.<name> for a CUDA tensor (imported once), None on the CPU or without triton: the caller then
    runs its torch reference."""
    return _load(name) if t.is_cuda and not triton_disabled() else None


def _impl(name: str, t: Tensor) -> ModuleType:
    if t.is_cuda and not triton_disabled():
        mod = _load(name)
        if mod is not None:
            return mod
    return reference


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write k/v `[T, kvH, D]` into the paged caches at `slot_mapping [T]` (-1 = skip)."""
    _impl("triton_attention", k).store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, seq_lens: Tensor,
    block_tables: Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
) -> Tensor:
    """Varlen causal attention over the paged cache: q `[T, H, D]` -> `[T, H, D]`.

    Query j of sequence b sits at position seq_lens[b] - q_len_b + j and attends to KV [0, pos].
    """
    return _impl("triton_attention", q).paged_attention(
        q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, max_seqlen_q, max_seqlen_k,
        scale,
    )


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor, block_tables: Tensor,
    scale: float,
) -> Tensor:
    """One query per sequence: q `[B, H, D]` over its first seq_lens[b] cached tokens."""
    return _impl("triton_attention", q).decode_attention(
        q, k_cache, v_cache, seq_lens, block_tables, scale
    )


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Hugging Face RMSNorm of x `[T, N]` in x's dtype."""
    return _impl("triton_norm", x).rms_norm(x, weight, eps)


def norm_add_norm(
    x: Tensor, residual: Tensor, w_a: Tensor | None, w_b: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """h = residual + rms_norm(x, w_a) (residual + x when w_a is None); y = rms_norm(h, w_b). Returns (h, y)."""
    return _impl("triton_norm", x).norm_add_norm(x, residual, w_a, w_b, eps)


def rope_qkv_store(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                   slot_mapping: Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                   bias: Tensor | None = None) -> Tensor:
    """Add bias to a packed qkv `[T, (H + 2 kvH) * D]`, rotate q/k (M-RoPE cos/sin `[T, R/2]`), store k/v;
    -> q `[T, H, D]`."""
    return _impl("triton_fused", qkv).rope_qkv_store(qkv, cos, sin, k_cache, v_cache, slot_mapping,
                                                     num_heads, num_kv_heads, head_dim, bias)


def linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x `[M, K]` @ w `[N, K]`^T (+ bias). Batch-1 decode on CUDA (one row, 16-bit weights) goes to the
    Triton GEMV, which reads weights faster than cuBLAS' GEMV on an H100 (benchmarks/bench_gemv.py:
    2.5-3.2 vs 2.1-2.8 TB/s); every other case is F.linear."""
    if (x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype == w.dtype and w.element_size() == 2
            and x.stride(1) == 1 and not triton_disabled()):
        mod = _load("triton_gemv")
        if mod is not None:
            return mod.gemv(x, w, bias=bias)
    return F.linear(x, w, bias)


def silu_mul(x: Tensor, up: Tensor | None = None) -> Tensor:
    """x `[T, 2I]` = [gate | up] (or x = gate and `up`, both `[T, I]`) -> silu(gate) * up `[T, I]`."""
    return _impl("triton_fused", x).silu_mul(x, up)


def vision_rope_(qkv: Tensor, cos: Tensor, sin: Tensor) -> None:
    """The vision tower's 2D rotary on q and k of qkv `[N, 3, heads, D]`, in place (cos/sin `[N, D]` fp32)."""
    _impl("triton_fused", qkv).vision_rope_(qkv, cos, sin)


__all__ = [
    "linear", "rope_qkv_store", "silu_mul", "vision_rope_",
    "decode_attention", "norm_add_norm", "paged_attention", "rms_norm", "store_kv",
    "triton_disabled",
]
