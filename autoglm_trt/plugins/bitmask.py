"""Packed token bitmasks applied to logits: a grammar's forbidden tokens get -inf before sampling.

`bitmask[r]` (int32 words, processing/structured/state.py's layout: token t allowed when bit t % 32 of word
t // 32 is set) belongs to logits row `rows[r]`; rows not listed are left alone, so a batch that mixes
constrained and free rows only touches the constrained ones. CUDA tensors go to one Triton launch
(plugins/triton_bitmask.py, imported on first use), everything else to the torch reference below.
"""

from __future__ import annotations

import torch
from torch import Tensor

from autoglm_trt.plugins import _load, triton_disabled


def apply_token_bitmask_(logits: Tensor, bitmask: Tensor, rows: Tensor | None = None) -> None:
    """In place: logits `[B, V]`, bitmask `[>=R, ceil(V/32)]` int32 on logits' device, rows `[R]` int
    (None: R = B, row r of the bitmask for logits row r). Tokens past the bitmask's width are forbidden."""
    if logits.is_cuda and not triton_disabled():
        mod = _load("triton_bitmask")
        if mod is not None:
            mod.apply_token_bitmask_(logits, bitmask, rows)
            return
    apply_token_bitmask_reference_(logits, bitmask, rows)


def unpack_bitmask(bitmask: Tensor, vocab_size: int) -> Tensor:
    """`[R, W]` int32 words -> `[R, vocab_size]` bool, True where allowed."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1).bool()  # [R, W * 32]
    if allowed.shape[1] < vocab_size:  # NOTE: ids the bitmask does not cover are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]), value=False)
    return allowed[:, :vocab_size]


def apply_token_bitmask_reference_(logits: Tensor, bitmask: Tensor, rows: Tensor | None = None) -> None:
    num_rows = logits.shape[0] if rows is None else rows.numel()
    allowed = unpack_bitmask(bitmask[:num_rows], logits.shape[1])  # [R, V]
    if rows is None:
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        rows = rows.to(device=logits.device, dtype=torch.long)
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
