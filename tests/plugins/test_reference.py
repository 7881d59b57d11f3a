"""CPU tests of the torch references against a naive dense oracle (float64 SDPA, explicit mask)."""

from __future__ import annotations

import pytest
import torch

from autoglm_trt.plugins import reference
from plugin_cases import dense_attention, hf_rms_norm, make_batch, rel_err

GQA = [(4, 4), (4, 2), (8, 2), (16, 1), (32, 2)]  # (heads, kv_heads): ratios 1, 2, 4, 16, 16


@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("block_size", [1, 16, 32, 64, 128])
def test_paged_attention_full_prefill(heads: int, kv_heads: int, block_size: int) -> None:
    lens = [1, 37, 130]
    batch = make_batch(lens, lens, heads=heads, kv_heads=kv_heads, head_dim=16,
                       block_size=block_size, seed=block_size + heads)
    assert rel_err(reference.paged_attention(*batch.args()), dense_attention(batch)) < 1e-5


@pytest.mark.parametrize("seed", range(6))
def test_paged_attention_chunked_random(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads = GQA[seed % len(GQA)]
    n = int(torch.randint(1, 6, (1,), generator=gen))
    lens = torch.randint(1, 200, (n,), generator=gen).tolist()
    q_lens = [int(torch.randint(0, s + 1, (1,), generator=gen)) for s in lens]  # 0..seq_len
    block_size = [16, 32, 64, 128][seed % 4]
    batch = make_batch(lens, q_lens, heads=heads, kv_heads=kv_heads, head_dim=32,
                       block_size=block_size, seed=seed)
    if sum(q_lens) == 0:
        pytest.skip("no query tokens drawn")
    assert rel_err(reference.paged_attention(*batch.args()), dense_attention(batch)) < 1e-5


def test_paged_attention_query_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = make_batch([300, 90], [200, 90], heads=8, kv_heads=2, head_dim=16, block_size=16)
    whole = reference.paged_attention(*batch.args())
    monkeypatch.setattr(reference, "_MAX_SCORE_ELEMS", 8 * 300 * 7)  # 7 query rows per chunk
    assert torch.allclose(reference.paged_attention(*batch.args()), whole, atol=1e-6)


def test_paged_attention_bf16() -> None:
    batch = make_batch([50, 200], [20, 200], heads=32, kv_heads=2, head_dim=128, block_size=16,
                       dtype=torch.bfloat16)
    out = reference.paged_attention(*batch.args())
    assert out.dtype == torch.bfloat16
    assert rel_err(out, dense_attention(batch)) < 1e-2


@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("block_size", [16, 64, 128])
def test_decode_attention_dense(heads: int, kv_heads: int, block_size: int) -> None:
    lens = [1, 300, 17, 128]
    batch = make_batch(lens, [1] * len(lens), heads=heads, kv_heads=kv_heads, head_dim=32,
                       block_size=block_size, seed=heads * block_size)
    out = reference.decode_attention(*batch.decode_args())
    assert rel_err(out, dense_attention(batch)) < 1e-5
    paged = reference.paged_attention(*batch.args())
    assert torch.allclose(out, paged, atol=1e-6)


def test_decode_attention_padding_and_batch_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    lens = [40, 0, 75, 0, 3]  # seq_len 0 = CUDA-graph padding: attends to nothing, yields zeros
    batch = make_batch(lens, [1] * 5, heads=4, kv_heads=2, head_dim=16, block_size=16)
    batch.block_tables[1] = -1
    out = reference.decode_attention(*batch.decode_args())
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0 and out[3].abs().max() == 0
    assert rel_err(out, dense_attention(batch)) < 1e-5
    monkeypatch.setattr(reference, "_MAX_SCORE_ELEMS", 1)  # one sequence per chunk
    assert torch.allclose(reference.decode_attention(*batch.decode_args()), out, atol=1e-6)


def test_decode_attention_bf16() -> None:
    lens = [1000, 33]
    batch = make_batch(lens, [1, 1], heads=32, kv_heads=2, head_dim=128, block_size=64,
                       dtype=torch.bfloat16)
    out = reference.decode_attention(*batch.decode_args())
    assert out.dtype == torch.bfloat16 and rel_err(out, dense_attention(batch)) < 1e-2


@pytest.mark.parametrize("block_size", [16, 128])
def test_store_kv_then_attend(block_size: int) -> None:
    """Write a prompt through store_kv (with -1 slots), read it back through attention."""
    gen = torch.Generator().manual_seed(block_size)
    seq_len, kv_heads, head_dim = 2 * block_size + 5, 2, 16
    k_cache = torch.randn(6, block_size, kv_heads, head_dim, generator=gen)
    v_cache, before = torch.randn_like(k_cache), k_cache.clone()
    blocks = torch.tensor([4, 1, 3], dtype=torch.int32)
    pos = torch.arange(seq_len)
    slots = blocks.long()[pos // block_size] * block_size + pos % block_size
    k = torch.randn(seq_len + 2, kv_heads, head_dim, generator=gen)
    v = torch.randn_like(k)
    slot_mapping = torch.cat([slots, torch.tensor([-1, -1])])  # two padded tokens
    reference.store_kv(k, v, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache[blocks.long()].flatten(0, 1)[:seq_len], k[:seq_len])
    assert torch.equal(v_cache[blocks.long()].flatten(0, 1)[:seq_len], v[:seq_len])
    untouched = torch.ones(6, dtype=torch.bool)
    untouched[blocks.long()] = False
    assert torch.equal(k_cache[untouched], before[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [64, 1536, 4096])
def test_rms_norm_matches_hf(dtype: torch.dtype, hidden: int) -> None:
    x = (torch.randn(5, hidden) * 4).to(dtype)
    w = torch.randn(hidden).to(dtype)
    out = reference.rms_norm(x, w, 1e-5)
    assert out.dtype == dtype and torch.equal(out, hf_rms_norm(x, w, 1e-5))


def test_rms_norm_float32_weight_keeps_input_dtype() -> None:
    x, w = torch.randn(3, 64).bfloat16(), torch.randn(64)
    out = reference.rms_norm(x, w, 1e-5)
    assert out.dtype == torch.bfloat16 and torch.equal(out, hf_rms_norm(x, w, 1e-5).bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_add_norm_is_the_sandwich(dtype: torch.dtype) -> None:
    x, r = torch.randn(7, 256).to(dtype), torch.randn(7, 256).to(dtype)
    w_a, w_b = torch.randn(256).to(dtype), torch.randn(256).to(dtype)
    h, y = reference.norm_add_norm(x, r, w_a, w_b, 1e-5)
    h_ref = r + hf_rms_norm(x, w_a, 1e-5)
    assert torch.equal(h, h_ref) and torch.equal(y, hf_rms_norm(h_ref, w_b, 1e-5))
