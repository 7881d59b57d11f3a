"""Packed token bitmasks applied to logits: the torch reference against a plain loop, and the Triton
kernel against the reference under the Triton interpreter (CPU) and on a GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoglm_trt.plugins.bitmask import apply_token_bitmask_reference_, unpack_bitmask

REPO = Path(__file__).resolve().parents[2]


def _case(batch: int, vocab: int, words: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=gen)
    bitmask = torch.randint(-2**31, 2**31 - 1, (batch, words), generator=gen, dtype=torch.int64).to(torch.int32)
    return logits, bitmask


def _expected(logits, bitmask, rows):
    out = logits.clone()
    for r, row in enumerate(rows):
        for t in range(logits.shape[1]):
            w = t // 32
            if w >= bitmask.shape[1] or not (int(bitmask[r, w]) >> (t % 32)) & 1:
                out[row, t] = float("-inf")
    return out


@pytest.mark.parametrize("vocab, words", [(100, 4), (96, 3), (130, 4), (70, 2)])  # 70 > 2 * 32: tail forbidden
def test_reference_matches_loop(vocab, words) -> None:
    logits, bitmask = _case(3, vocab, words)
    got = logits.clone()
    apply_token_bitmask_reference_(got, bitmask)
    assert torch.equal(got, _expected(logits, bitmask, [0, 1, 2]))


def test_reference_rows_subset_leaves_other_rows() -> None:
    logits, bitmask = _case(5, 100, 4)
    got = logits.clone()
    apply_token_bitmask_reference_(got, bitmask[:2], torch.tensor([3, 1]))
    want = _expected(logits, bitmask[:2], [3, 1])
    assert torch.equal(got, want)
    assert torch.equal(got[[0, 2, 4]], logits[[0, 2, 4]])


def test_unpack_bitmask_bits() -> None:
    words = torch.tensor([[1 - 2**31, 0b100]], dtype=torch.int32)  # bits 0 and 31; bit 2 of word 1
    allowed = unpack_bitmask(words, 64)[0].nonzero().flatten().tolist()
    assert allowed == [0, 31, 34]


@pytest.mark.triton_interp
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernel_under_interpreter() -> None:
    code = """
import torch
from autoglm_trt.plugins import triton_bitmask
from autoglm_trt.plugins.bitmask import apply_token_bitmask_reference_
gen = torch.Generator().manual_seed(1)
for vocab, words, rows in ((5000, 157, None), (4200, 120, [2, 0]), (70, 2, None)):
    logits = torch.randn(3, vocab, generator=gen)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, words), generator=gen, dtype=torch.int64).to(torch.int32)
    r = None if rows is None else torch.tensor(rows)
    want, got = logits.clone(), logits.clone()
    apply_token_bitmask_reference_(want, bitmask, r)
    triton_bitmask.apply_token_bitmask_(got, bitmask, r)
    assert torch.equal(got, want), (vocab, words, rows)
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.gpu
def test_triton_kernel_on_gpu_bf16() -> None:
    from autoglm_trt.plugins.bitmask import apply_token_bitmask_

    logits, bitmask = _case(8, 151552, 4736)
    logits = logits.to("cuda", torch.bfloat16)
    rows = torch.tensor([7, 2, 5], device="cuda")
    want = logits.clone()
    apply_token_bitmask_reference_(want, bitmask[:3].cuda(), rows)
    apply_token_bitmask_(logits, bitmask[:3].cuda(), rows)
    assert torch.equal(logits, want)
