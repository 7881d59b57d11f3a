"""Checks of the fused rotary/KV-store and SiLU-mul kernels against the references (run on CUDA, or on the
CPU under TRITON_INTERPRET=1 in a subprocess). Prints OK or raises."""

from __future__ import annotations

import sys

import torch

from autoglm_trt.plugins import reference


def check(device: str, dtype: torch.dtype, tol: float) -> None:
    from autoglm_trt.plugins import triton_fused

    g = torch.Generator().manual_seed(0)
    # t = 7: one token per program; t = 150: 4 per program, the last block ragged (plugins.triton_fused._rope_tokens)
    for heads, kv, d, half, page, t in ((4, 2, 32, 8, 16, 7), (32, 2, 128, 32, 16, 7), (3, 1, 24, 6, 8, 7),
                                        (4, 2, 32, 8, 16, 150)):
        blocks = -(-t // page) + 4
        qkv = torch.randn(t, (heads + 2 * kv) * d, generator=g).to(device, dtype)
        ang = torch.randn(t, half, generator=g).to(device)
        cos, sin = ang.cos(), ang.sin()
        slots = torch.randperm(blocks * page, generator=g)[:t].to(device)
        slots[2] = slots[-1] = -1
        caches = [torch.full((blocks, page, kv, d), float("nan"), dtype=dtype, device=device) for _ in range(4)]
        bias = torch.randn(qkv.shape[1], generator=g).to(device, dtype) if heads != 32 else None
        q = triton_fused.rope_qkv_store(qkv, cos, sin, caches[0], caches[1], slots, heads, kv, d, bias)
        q_ref = reference.rope_qkv_store(qkv, cos, sin, caches[2], caches[3], slots, heads, kv, d, bias)
        torch.testing.assert_close(q.float(), q_ref.float(), atol=tol, rtol=tol)
        for a, b in ((caches[0], caches[2]), (caches[1], caches[3])):
            torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol, equal_nan=True)
        x = torch.randn(5, 2 * 1500, generator=g).to(device, dtype)
        torch.testing.assert_close(triton_fused.silu_mul(x).float(), reference.silu_mul(x).float(), atol=tol, rtol=tol)
        gate, up = x[:, :1500], x[:, 1500:].contiguous()  # the vision MLP's two projections, apart
        torch.testing.assert_close(triton_fused.silu_mul(gate, up).float(), reference.silu_mul(x).float(), atol=tol,
                                   rtol=tol)
    check_vision_rope(device, dtype, tol, g)
    print("OK")


def check_vision_rope(device: str, dtype: torch.dtype, tol: float, g: torch.Generator) -> None:
    """The tower's in-place 2D rotary: q and k rotated like the reference, v untouched; ragged row counts."""
    from autoglm_trt.plugins import triton_fused

    for n, heads, d in ((37, 12, 128), (5, 2, 16)):
        qkv = torch.randn(n, 3, heads, d, generator=g).to(device, dtype)
        ang = torch.randn(n, d, generator=g).to(device)
        cos, sin = ang.cos(), ang.sin()
        want = qkv.clone()
        reference.vision_rope_(want, cos, sin)
        got = qkv.clone()
        triton_fused.vision_rope_(got, cos, sin)
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
        assert torch.equal(got[:, 2], qkv[:, 2])


if __name__ == "__main__":
    check(sys.argv[1] if len(sys.argv) > 1 else "cpu", torch.float32, 1e-5)
