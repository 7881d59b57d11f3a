"""Weights into L2 ahead of their GEMV, while the GPU's memory would otherwise sit idle.

A batch-1 decode step alternates bandwidth-bound GEMVs with latency-bound kernels (rotary, attention,
norms) during which HBM moves almost nothing. `l2_prefetch(w, nbytes)` launched before such a kernel
asks the copy engine (`cp.async.bulk.prefetch.L2`, sm_90+) to pull the first `nbytes` of the next
weight into L2; the GEMV then finds them there. One thread per program issues the requests and
returns; the copies complete on their own (nothing waits for them), so the launch costs one short
kernel. The hardware may drop a prefetch: it is a hint, never a correctness matter.
This module imports triton: import it lazily (plugins/__init__.py does).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

CHUNK = 64 * 1024  # bytes per prefetch request (16-byte multiple)
_PREFETCH_ASM = tl.constexpr("""{
.reg .pred p;
.reg .u32 t;
mov.u32 t, %tid.x;
setp.eq.u32 p, t, 0;
@p cp.async.bulk.prefetch.L2.global [$1], $2;
mov.u32 $0, 0;
}""")


@triton.jit
def issue_l2_prefetch(base, nbytes):
    """Thread 0 of the program asks for bytes [base, base + nbytes) in L2 (nbytes a multiple of 16, base 16-aligned)."""
    return tl.inline_asm_elementwise(_PREFETCH_ASM, "=r,l,r", [base.to(tl.int64), nbytes.to(tl.int32)],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_kernel(ptr, nbytes, per_program, CHUNK_B: tl.constexpr):
    """Program p asks for bytes [p * per_program, ...) of ptr (a byte pointer), in CHUNK_B requests."""
    lo = tl.program_id(0).to(tl.int64) * per_program
    hi = tl.minimum(lo + per_program, nbytes)
    for off in range(lo, hi, CHUNK_B):
        issue_l2_prefetch((ptr + off).to(tl.int64, bitcast=True), tl.minimum(hi - off, CHUNK_B))


@functools.cache
def _sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def supported(t: Tensor) -> bool:
    """The copy engine's L2 prefetch: CUDA on sm_90 or newer."""
    return t.is_cuda and _sm90(t.device.index if t.device.index is not None else torch.cuda.current_device())


def l2_prefetch(t: Tensor, nbytes: int | None = None, programs: int = 8) -> None:
    """Ask L2 for the first `nbytes` (default all) of contiguous `t`; a no-op where unsupported. Graph-safe."""
    if not supported(t) or not t.is_contiguous():
        return
    total = t.numel() * t.element_size()
    nbytes = total if nbytes is None else min(total, nbytes)
    nbytes -= nbytes % 16
    if nbytes <= 0 or t.data_ptr() % 16:
        return
    per = triton.cdiv(triton.cdiv(nbytes, programs), CHUNK) * CHUNK
    _prefetch_kernel[(triton.cdiv(nbytes, per),)](t.view(torch.uint8).view(-1), nbytes, per, CHUNK, num_warps=1)


__all__ = ["CHUNK", "issue_l2_prefetch", "l2_prefetch", "supported"]
