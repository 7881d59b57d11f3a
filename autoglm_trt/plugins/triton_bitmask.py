"""Triton kernel of plugins/bitmask.py: one program per (constrained row, block of the vocabulary)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 4096  # vocabulary entries per program: 151,552 ids -> 38 programs per row


@triton.jit
def _apply_bitmask_kernel(logits_ptr, bitmask_ptr, rows_ptr, vocab, words, logits_stride, bitmask_stride,
                          HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + r).to(tl.int64)
    else:
        row = r.to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = offs < vocab
    word = offs // 32
    bits = tl.load(bitmask_ptr + r * bitmask_stride + word, mask=in_vocab & (word < words), other=0)
    allowed = (bits >> (offs % 32)) & 1
    tl.store(logits_ptr + row * logits_stride + offs, float("-inf"), mask=in_vocab & (allowed == 0))


def apply_token_bitmask_(logits: Tensor, bitmask: Tensor, rows: Tensor | None = None) -> None:
    num_rows = logits.shape[0] if rows is None else rows.numel()
    if num_rows == 0:
        return
    assert logits.stride(1) == 1 and bitmask.stride(1) == 1 and bitmask.dtype == torch.int32
    vocab = logits.shape[1]
    grid = (num_rows, triton.cdiv(vocab, _BLOCK))
    rows_arg = rows if rows is not None else bitmask  # NOTE: unread when HAS_ROWS is False
    _apply_bitmask_kernel[grid](logits, bitmask, rows_arg, vocab, bitmask.shape[1], logits.stride(0),
                                bitmask.stride(0), HAS_ROWS=rows is not None, BLOCK=_BLOCK)
