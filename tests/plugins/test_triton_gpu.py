"""Triton kernels vs the torch references on a CUDA GPU, at the model's shapes."""

from __future__ import annotations

import pytest
import torch

import autoglm_trt.plugins as plugins
from autoglm_trt.plugins import reference
from plugin_cases import (
    CHECKS, check_decode, check_decode_repeat, check_norms, check_prefill, make_batch, rel_err,
    small_cases,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}
MODEL = dict(heads=32, kv_heads=2, head_dim=128)  # GLM-4.1V text decoder


@pytest.fixture(scope="module")
def kernels():
    from autoglm_trt.plugins import triton_attention, triton_norm

    return triton_attention, triton_norm


@pytest.mark.parametrize("name,check,kwargs", small_cases(), ids=[c[0] for c in small_cases()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_cases(kernels, name: str, check: str, kwargs: dict, dtype: torch.dtype) -> None:
    mod = kernels[1] if check == "norms" else kernels[0]
    err = CHECKS[check](mod, reference, device="cuda", dtype=dtype, **kwargs)
    assert err <= TOL[dtype], f"{name}: rel err {err}"


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("batch", [1, 3, 8, 33, 64])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_model_shape(kernels, block_size, batch, num_splits, dtype) -> None:
    gen = torch.Generator().manual_seed(batch * block_size)
    lens = torch.randint(1, 2500, (batch,), generator=gen).tolist()
    err = check_decode(kernels[0], reference, device="cuda", dtype=dtype, seq_lens=lens,
                       block_size=block_size, num_splits=num_splits, seed=batch, **MODEL)
    assert err <= TOL[dtype]


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_model_shape(kernels, block_size, seed, dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 6, (1,), generator=gen))
    lens = torch.randint(1, 1500, (n,), generator=gen).tolist()
    q_lens = [s if i % 2 == 0 else int(torch.randint(1, s + 1, (1,), generator=gen))
              for i, s in enumerate(lens)]  # full prefill and chunked (offset) sequences mixed
    err = check_prefill(kernels[0], reference, device="cuda", dtype=dtype, seq_lens=lens,
                        q_lens=q_lens, block_size=block_size, seed=seed, **MODEL)
    assert err <= TOL[dtype]


@pytest.mark.parametrize("hidden", [64, 1536, 4096, 8192])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_norms_model_shape(kernels, hidden, tokens, dtype) -> None:
    err = check_norms(kernels[1], reference, device="cuda", dtype=dtype, tokens=tokens,
                      hidden=hidden, seed=hidden + tokens)
    assert err <= TOL[dtype]


def test_norms_round_like_hf(kernels) -> None:
    """bf16 results agree with the reference to a few bf16 ulps."""
    x = (torch.randn(64, 4096, device="cuda") * 3).bfloat16()
    r, w_a, w_b = torch.randn_like(x), torch.randn(4096, device="cuda").bfloat16(), \
        torch.randn(4096, device="cuda").bfloat16()
    h, y = kernels[1].norm_add_norm(x, r, w_a, w_b, 1e-5)
    h_ref, y_ref = reference.norm_add_norm(x, r, w_a, w_b, 1e-5)
    # NOTE: bit equality is not promised (rsqrt and summation order differ, and h = r + t cancels):
    # a few bf16 ulps of the operands is.
    torch.testing.assert_close(h.float(), h_ref.float(), rtol=2 ** -6, atol=2 ** -5)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2 ** -6, atol=2 ** -5)


def test_decode_matches_prefill_with_one_query(kernels) -> None:
    batch = make_batch([700, 5, 1300], [1, 1, 1], block_size=16, dtype=torch.bfloat16,
                       device="cuda", **MODEL)
    dec = kernels[0].decode_attention(*batch.decode_args())
    pre = kernels[0].paged_attention(*batch.args())
    assert rel_err(dec, pre) < 1e-2


def test_decode_cuda_graph_replay(kernels) -> None:
    """Capture once; replays must follow new seq_lens / block tables written into the buffers."""
    batch = make_batch([900, 40, 1, 300], [1] * 4, block_size=64, dtype=torch.bfloat16,
                       device="cuda", **MODEL)
    args = batch.decode_args()
    kernels[0].decode_attention(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels[0].decode_attention(*args)
    for lens in ([900, 40, 1, 300], [12, 33, 0, 299], [1, 1, 1, 1]):  # within each table
        batch.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        batch.q.normal_()
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, reference.decode_attention(*args)) <= TOL[torch.bfloat16]


LONG_LENS = [0, 1, 63, 64, 65, 700, 4000, 8191]  # empty, one split, chunk edges, 8 chunks


@pytest.mark.parametrize("group", [16, 2])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("num_splits", [64, 20, 9])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_in_kernel_merge(kernels, group, block_size, num_splits, dtype) -> None:
    """Many splits, most of them empty for the short sequences; > 8 used splits take both levels
    of the in-kernel merge."""
    shape = MODEL if group == 16 else {"heads": 4, "kv_heads": 2, "head_dim": 128}
    err = check_decode(kernels[0], reference, device="cuda", dtype=dtype, seq_lens=LONG_LENS,
                       block_size=block_size, num_splits=num_splits, seed=group + num_splits,
                       **shape)
    assert err <= TOL[dtype]


@pytest.mark.parametrize("num_splits", [64, 20, None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_repeat_resets_counters(kernels, num_splits, dtype) -> None:
    err = check_decode_repeat(kernels[0], reference, device="cuda", dtype=dtype,
                              seq_lens=[4000, 0, 1, 900, 129], block_size=64,
                              num_splits=num_splits, seed=7, **MODEL)
    assert err <= TOL[dtype]


def test_decode_merge_is_deterministic(kernels) -> None:
    """64 x 2 x 64 programs finishing in varying orders: every call is bit-identical (the merge
    reads the slots in a fixed order whichever program merges) and leaves the counters at 0."""
    gen = torch.Generator().manual_seed(3)
    lens = torch.randint(0, 3000, (64,), generator=gen).tolist()
    batch = make_batch(lens, [1] * 64, block_size=16, dtype=torch.bfloat16, device="cuda", **MODEL)
    first = kernels[0].decode_attention(*batch.decode_args(), num_splits=64)
    for _ in range(20):
        assert torch.equal(kernels[0].decode_attention(*batch.decode_args(), num_splits=64), first)
    assert not any(c.any() for c in kernels[0]._COUNTERS[batch.q.device])
    assert rel_err(first, reference.decode_attention(*batch.decode_args())) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("num_splits", [64, 20])
def test_decode_in_kernel_merge_cuda_graph(kernels, num_splits) -> None:
    """One launch per call inside a graph: replays with new seq_lens (more or fewer used splits,
    so other counters and other merging programs), with an eager call in between that shares the
    counters, all match the reference and leave the counters at 0."""
    batch = make_batch([8191, 3000, 1, 300], [1] * 4, block_size=64, dtype=torch.bfloat16,
                       device="cuda", **MODEL)
    args = batch.decode_args()
    kernels[0].decode_attention(*args, num_splits=num_splits)  # compile + counters, no capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels[0].decode_attention(*args, num_splits=num_splits)
    for lens in ([65, 3008, 0, 320], [8191, 1, 64, 1], [4000, 3000, 1, 300]):  # within tables
        batch.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        batch.q.normal_()
        graph.replay()
        eager = kernels[0].decode_attention(*args, num_splits=num_splits)
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        assert rel_err(out, reference.decode_attention(*args)) <= TOL[torch.bfloat16]
    assert not any(c.any() for c in kernels[0]._COUNTERS[batch.q.device])


def test_dispatch_uses_triton_on_cuda(monkeypatch) -> None:
    monkeypatch.delenv("AUTOGLM_TRT_DISABLE_TRITON", raising=False)
    x, w = torch.randn(4, 256, device="cuda"), torch.randn(256, device="cuda")
    assert plugins._impl("triton_norm", x).__name__.endswith("triton_norm")
    assert rel_err(plugins.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5)) < 1e-5
    monkeypatch.setenv("AUTOGLM_TRT_DISABLE_TRITON", "1")
    assert plugins._impl("triton_norm", x) is reference
