"""PagedAttention.attend_cached: one sequence with many new tokens (a whole prompt, or its rest after a cached
prefix or an earlier chunk) goes through SDPA on K/V gathered back from the paged cache, everything else through
plugins.paged_attention; both give the same attention."""

from __future__ import annotations

import pytest
import torch

from autoglm_trt import plugins
from autoglm_trt.layers import attention as A
from autoglm_trt.layers.attention import PagedAttention, gather_kv, is_long_single_prefill
from autoglm_trt.layers.context import AttentionContext, reset_context, set_context


def _setup(t: int, cached: int, device: str, dtype: torch.dtype, heads=8, kv_heads=2, dim=32, page=16):
    """One sequence of `cached + t` tokens whose last t are this step's queries; K/V already in the cache."""
    g = torch.Generator().manual_seed(t)
    n = cached + t
    blocks = -(-n // page)
    table = torch.randperm(blocks + 5, generator=g)[:blocks].to(torch.int32)  # scattered pages
    k_cache = torch.randn(blocks + 5, page, kv_heads, dim, generator=g).to(device, dtype)
    v_cache = torch.randn(blocks + 5, page, kv_heads, dim, generator=g).to(device, dtype)
    q = torch.randn(t, heads, dim, generator=g).to(device, dtype)
    ctx = AttentionContext(
        slot_mapping=torch.full((t,), -1, dtype=torch.int64, device=device),
        cu_seqlens_q=torch.tensor([0, t], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        block_tables=table[None].to(device), max_seqlen_q=t, max_seqlen_k=n, is_decode=False,
        kv_caches=[(k_cache, v_cache)])
    return q, ctx, PagedAttention(0, heads, kv_heads, dim)


def _paged(q, ctx, attn):
    k_cache, v_cache = ctx.kv_caches[0]
    return plugins.paged_attention(q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.seq_lens, ctx.block_tables,
                                   ctx.max_seqlen_q, ctx.max_seqlen_k, attn.scale)


def _attend(q, ctx, attn):
    set_context(ctx)
    try:
        return attn.attend_cached(q)
    finally:
        reset_context()


def test_gather_kv_reads_the_pages_in_table_order():
    cache = torch.arange(6 * 4 * 1 * 2, dtype=torch.float32).view(6, 4, 1, 2)  # [blocks, page, kvH, D]
    table = torch.tensor([5, 0, 3, -1], dtype=torch.int32)
    got = gather_kv(cache, table, 10)
    want = torch.cat([cache[5], cache[0], cache[3]])[:10]
    assert torch.equal(got, want) and got.shape == (10, 1, 2)


@pytest.fixture
def small_dense(monkeypatch):
    """Whole prompts of 8+ tokens go dense, padded to multiples of 32 (the real sizes: 1024 and 256)."""
    monkeypatch.setattr(A, "DENSE_MIN_TOKENS", 8)
    monkeypatch.setattr(A, "DENSE_BUCKET", 32)


@pytest.mark.parametrize("t", [8, 17, 64, 80])
def test_whole_prompt_through_sdpa_equals_the_paged_kernel(t, small_dense):
    q, ctx, attn = _setup(t, 0, "cpu", torch.float32)
    assert is_long_single_prefill(ctx)
    got, want = _attend(q, ctx, attn), _paged(q, ctx, attn)
    assert got.shape == q.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_short_prompts_keep_the_paged_kernel(small_dense, monkeypatch):
    q, ctx, attn = _setup(7, 0, "cpu", torch.float32)
    assert not is_long_single_prefill(ctx)
    monkeypatch.setattr(PagedAttention, "_dense_prefill", lambda *a: pytest.fail("dense path taken"))
    torch.testing.assert_close(_attend(q, ctx, attn), _paged(q, ctx, attn))


@pytest.mark.parametrize("t, cached", [(9, 20), (40, 7), (33, 64)])
def test_rest_after_a_prefix_hit_through_sdpa_equals_the_paged_kernel(t, cached, small_dense):
    """An agent step: its history came from the prefix cache (or an earlier chunk), its new tokens go dense."""
    q, ctx, attn = _setup(t, cached, "cpu", torch.float32)
    assert is_long_single_prefill(ctx)
    got, want = _attend(q, ctx, attn), _paged(q, ctx, attn)
    assert got.shape == q.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_batches_keep_the_paged_kernel(small_dense, monkeypatch):
    q, ctx, attn = _setup(9, 20, "cpu", torch.float32)
    two = AttentionContext(ctx.slot_mapping, torch.tensor([0, 4, 9], dtype=torch.int32),
                           torch.tensor([24, 5], dtype=torch.int32), ctx.block_tables.expand(2, -1), 5, 24, False)
    assert not is_long_single_prefill(two)


@pytest.mark.gpu
@pytest.mark.parametrize("t, cached", [(1024, 0), (3814, 0), (3300, 2048)])
def test_gpu_whole_prompt_matches_the_triton_kernel_at_9b_heads(t, cached):
    q, ctx, attn = _setup(t, cached, "cuda", torch.bfloat16, heads=32, kv_heads=2, dim=128)
    assert is_long_single_prefill(ctx)
    got, want = _attend(q, ctx, attn), _paged(q, ctx, attn)
    assert float((got.float() - want.float()).abs().max()) < 2e-2


@pytest.mark.gpu
def test_gpu_preferred_sdpa_backend_matches_the_math_path_at_the_towers_shape():
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from autoglm_trt.layers.attention import SDPA_BACKENDS

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 12, 2100, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
        got = F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel([SDPBackend.MATH]):
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert float((got.float() - want).abs().max()) < 2e-2


def test_warm_dense_plans_runs_every_bucket_length(small_dense, monkeypatch):
    seen = []
    real = A.dense_causal
    monkeypatch.setattr(A, "dense_causal", lambda q, k, v, s: seen.append((q.shape, k.shape)) or real(q, k, v, s))
    attn = PagedAttention(0, 8, 2, 32)
    assert A.warm_dense_plans(attn, 100, torch.device("cpu"), torch.float32) == 4  # 32, 64, 96, 128
    assert [q[0] for q, _ in seen] == [32, 64, 96, 128] and seen[0] == ((32, 8, 32), (32, 2, 32))
    assert A.warm_dense_plans(attn, 7, torch.device("cpu"), torch.float32) == 0  # below DENSE_MIN_TOKENS
    monkeypatch.setattr(A, "WARM_LENGTHS", 2)
    assert A.warm_dense_plans(attn, 1000, torch.device("cpu"), torch.float32) == 2  # the first lengths only
