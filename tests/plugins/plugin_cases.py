"""Shared case builders and checks for the plugin tests.

Used three ways: by the CPU reference tests, by the GPU tests (Triton vs reference on CUDA) and by
`interp_checks.py`, which runs the same checks under TRITON_INTERPRET=1 in a subprocess.
Everything here is plain torch; the kernel modules are passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 on the CPU; NaN/inf anywhere in out gives inf."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return math.inf
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


@dataclass
class PagedBatch:
    q: Tensor  # [T, H, D]
    k_cache: Tensor  # [num_blocks, block_size, kvH, D]
    v_cache: Tensor  # [num_blocks, block_size, kvH, D]
    cu_seqlens_q: Tensor  # [B+1] int32
    seq_lens: Tensor  # [B] int32
    block_tables: Tensor  # [B, M] int32, -1 padded
    max_seqlen_q: int
    max_seqlen_k: int
    scale: float

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.cu_seqlens_q, self.seq_lens,
                self.block_tables, self.max_seqlen_q, self.max_seqlen_k, self.scale)

    def decode_args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.seq_lens, self.block_tables, self.scale)


def make_batch(
    seq_lens: list[int], q_lens: list[int], *, heads: int, kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
    spare_cols: int = 2,
) -> PagedBatch:
    """Random paged batch: blocks handed out in shuffled order, tables -1 padded, caches random
    everywhere (so reading an unowned block or a token past seq_len shows up as an error)."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    cols = max(need + [1]) + spare_cols
    table = torch.full((len(seq_lens), cols), -1, dtype=torch.int32)
    used = 0
    for b, nb in enumerate(need):
        table[b, :nb] = torch.tensor(perm[used : used + nb], dtype=torch.int32)
        used += nb

    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    cu = torch.tensor([0] + q_lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    return PagedBatch(
        q=rnd(sum(q_lens), heads, head_dim), k_cache=rnd(*cache_shape), v_cache=rnd(*cache_shape),
        cu_seqlens_q=cu.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device),
        block_tables=table.to(device), max_seqlen_q=max(q_lens + [0]),
        max_seqlen_k=max(seq_lens + [0]), scale=head_dim**-0.5,
    )


def dense_attention(batch: PagedBatch) -> Tensor:
    """Oracle: gather each sequence's KV contiguously, float64 SDPA with an explicit causal mask
    (query j at position seq_len - q_len + j sees keys [0, that position])."""
    q, kc, vc = batch.q, batch.k_cache, batch.v_cache
    heads, kv_heads = q.shape[1], kc.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    cu, lens = batch.cu_seqlens_q.tolist(), batch.seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q_len = cu[b + 1] - cu[b]
        if q_len == 0 or seq_len == 0:
            continue
        slots = torch.arange(seq_len)
        blocks = batch.block_tables[b].cpu().long()[slots // kc.shape[1]]
        k = kc.cpu()[blocks, slots % kc.shape[1]].double()  # [L, kvH, D]
        v = vc.cpu()[blocks, slots % kc.shape[1]].double()
        k = k.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)  # [H, L, D]
        v = v.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
        qb = q[cu[b] : cu[b + 1]].cpu().double().transpose(0, 1)  # [H, q_len, D]
        q_pos = torch.arange(q_len) + seq_len - q_len
        mask = torch.arange(seq_len)[None, :] <= q_pos[:, None]  # [q_len, L]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=batch.scale)
        out[cu[b] : cu[b + 1]] = o.transpose(0, 1)
    return out


def hf_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Hugging Face Glm4RMSNorm.forward, transcribed."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


# ---- Triton-vs-reference checks: each returns a relative error (inf for NaN / unwritten) ----

def check_store_kv(mod, ref, *, device: str, dtype: torch.dtype, kv_heads: int, head_dim: int,
                   block_size: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    num_blocks, tokens = 5, 2 * block_size + 3
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::4] = -1  # "do not store"
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
    want = cache.clone()
    ref.store_kv(k, v, want[0], want[1], slots)
    got = cache.to(device)
    mod.store_kv(k.to(device), v.to(device), got[0], got[1], slots.to(device))
    return 0.0 if torch.equal(got.cpu(), want) else math.inf


def check_decode(mod, ref, *, device: str, dtype: torch.dtype, seq_lens: list[int], heads: int,
                 kv_heads: int, head_dim: int, block_size: int, num_splits: int | None,
                 seed: int, knobs: dict | None = None) -> float:
    batch = make_batch(seq_lens, [1] * len(seq_lens), heads=heads, kv_heads=kv_heads,
                       head_dim=head_dim, block_size=block_size, dtype=dtype, device=device,
                       seed=seed)
    want = ref.decode_attention(*batch.decode_args())
    out = torch.full_like(batch.q, float("nan"))  # poison: every element must be written
    extra = knobs if mod is not ref else {}  # NOTE: the benchmarks' tuning knobs (Triton only)
    got = mod.decode_attention(*batch.decode_args(), num_splits=num_splits, out=out, **(extra or {}))
    return rel_err(got, want)


def check_decode_repeat(mod, ref, *, device: str, dtype: torch.dtype, seq_lens: list[int],
                        heads: int, kv_heads: int, head_dim: int, block_size: int,
                        num_splits: int | None, seed: int) -> float:
    """Decode twice on the same inputs with another batch shape and split count in between: each
    result must match the reference and the first bit for bit (the merge order is fixed whichever
    program merges), and every arrival counter must be back at 0 afterwards."""
    kw = {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "block_size": block_size,
          "dtype": dtype, "device": device}
    batch = make_batch(seq_lens, [1] * len(seq_lens), seed=seed, **kw)
    other = make_batch(seq_lens[::-1] + [300], [1] * (len(seq_lens) + 1), seed=seed + 1, **kw)
    want = ref.decode_attention(*batch.decode_args())
    outs = []
    for i in range(3):
        if i == 1:
            mod.decode_attention(*other.decode_args(), num_splits=9 if num_splits != 9 else 5)
            continue
        out = torch.full_like(batch.q, float("nan"))
        outs.append(mod.decode_attention(*batch.decode_args(), num_splits=num_splits, out=out))
    counters = getattr(mod, "_COUNTERS", {}).get(batch.q.device, [])
    if not torch.equal(outs[0], outs[1]) or any(c.any() for c in counters):
        return math.inf
    return max(rel_err(o, want) for o in outs)


def check_prefill(mod, ref, *, device: str, dtype: torch.dtype, seq_lens: list[int],
                  q_lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int,
                  seed: int) -> float:
    batch = make_batch(seq_lens, q_lens, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       block_size=block_size, dtype=dtype, device=device, seed=seed)
    want = ref.paged_attention(*batch.args())
    out = torch.full_like(batch.q, float("nan"))
    got = mod.paged_attention(*batch.args(), out=out)
    return rel_err(got, want)


def check_norms(mod, ref, *, device: str, dtype: torch.dtype, tokens: int, hidden: int,
                seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    x, r = rnd(tokens, hidden, scale=3.0), rnd(tokens, hidden)
    w_a, w_b = rnd(hidden, scale=0.5), rnd(hidden, scale=0.5)
    y_out = torch.full_like(x, float("nan"))
    errs = [rel_err(mod.rms_norm(x, w_a, 1e-5, out=y_out), ref.rms_norm(x, w_a, 1e-5))]
    h_out, y2_out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    h, y = mod.norm_add_norm(x, r, w_a, w_b, 1e-5, out=(h_out, y2_out))
    h_ref, y_ref = ref.norm_add_norm(x, r, w_a, w_b, 1e-5)
    errs += [rel_err(h, h_ref), rel_err(y, y_ref)]
    h, y = mod.norm_add_norm(x, r, None, w_b, 1e-5)  # the pre-norm junction: h = r + x (the vision tower)
    h_ref, y_ref = ref.norm_add_norm(x, r, None, w_b, 1e-5)
    errs += [rel_err(h, h_ref), rel_err(y, y_ref), rel_err(h_ref, (r.float() + x.float()).to(dtype))]
    return max(errs)


def small_cases() -> list[tuple[str, str, dict]]:
    """(name, check, kwargs) covering GQA ratios, block sizes, ragged and chunked lengths, small
    enough for the Triton interpreter."""
    cases: list[tuple[str, str, dict]] = []
    for bs in (16, 32):
        cases.append((f"store_kv-bs{bs}", "store_kv",
                      dict(kv_heads=2, head_dim=16, block_size=bs, seed=bs)))
    decode_shapes = [  # (seq_lens, heads, kv_heads, head_dim, block_size, num_splits)
        ([5, 70, 1, 33], 4, 2, 16, 16, None),
        ([130, 7], 8, 2, 32, 32, 1),
        ([130, 0, 64], 8, 2, 32, 16, 3),  # seq_len 0 = graph padding -> zeros
        ([200], 16, 1, 16, 64, 4),  # GQA 16:1, one kv head
        ([96, 17], 6, 6, 16, 16, 2),  # MHA
        ([150, 3], 12, 4, 24, 16, 2),  # head_dim not a power of two, group 3
        ([200, 1, 129], 32, 2, 128, 128, 5),  # the model's shape: 32 q heads, 2 kv heads, D 128
        ([260, 45], 32, 2, 128, 16, None),  # heuristic split count
        # NOTE: more used splits than _MERGE_FAN (8) take the two-level in-kernel merge; splits of
        # BLOCK_N-aligned length past seq_len are empty and must not count towards the merge.
        # (Used-split counts below are for float32 tiles, BLOCK_N 32.)
        ([700, 1, 0, 65, 257], 32, 2, 16, 16, 20),  # group 16: 11 used (8 + 3), 9 used (8 + 1)
        ([1100, 300, 9], 4, 2, 16, 64, 64),  # group 2, page 64: up to 35 used splits (5 chunks)
        ([2000, 3], 32, 2, 128, 64, 64),  # the model's shape, 63 used splits (8 chunks)
        ([40, 0, 1], 32, 2, 16, 16, 64),  # short: at most one used split, no merge at all
    ]
    for i, (lens, h, kvh, d, bs, ns) in enumerate(decode_shapes):
        cases.append((f"decode-{i}", "decode", dict(seq_lens=lens, heads=h, kv_heads=kvh,
                      head_dim=d, block_size=bs, num_splits=ns, seed=100 + i)))
    knob_cases = [  # decode_attention's benchmark knobs: fewer keys per split, a wider merge, other tiles
        ([700, 1, 0, 65, 257], 32, 2, 16, 16, 20, {"min_split": 128}),
        ([1100, 300, 9], 4, 2, 16, 64, 64, {"merge_fan": 16}),
        ([260, 45], 32, 2, 128, 16, None, {"block_n": 16, "min_split": 48}),
        ([700, 1, 0, 65, 257], 32, 2, 16, 16, 20, {"separate": True}),  # a second launch merges
        ([2000, 3, 0], 32, 2, 128, 64, 64, {"separate": True, "min_split": 256}),
    ]
    for i, (lens, h, kvh, d, bs, ns, knobs) in enumerate(knob_cases):
        cases.append((f"decode_knobs-{i}", "decode", dict(seq_lens=lens, heads=h, kv_heads=kvh, head_dim=d,
                      block_size=bs, num_splits=ns, seed=130 + i, knobs=knobs)))
    for i, (lens, ns) in enumerate([([700, 0, 1, 257], 20), ([130, 7], 3)]):
        cases.append((f"decode_repeat-{i}", "decode_repeat", {
            "seq_lens": lens, "heads": 8, "kv_heads": 2, "head_dim": 16, "block_size": 16,
            "num_splits": ns, "seed": 150 + i}))
    prefill_shapes = [  # (seq_lens, q_lens, heads, kv_heads, head_dim, block_size)
        ([37, 80], [37, 80], 4, 2, 16, 16),  # full prefill, ragged
        ([100, 50, 9], [30, 1, 9], 8, 2, 32, 32),  # chunked: query offset seq_len - q_len
        ([70, 20], [0, 20], 16, 1, 16, 16),  # a sequence with no query tokens this step
        ([65, 140], [65, 12], 3, 3, 16, 64),  # MHA, group 1
        ([90], [40], 12, 4, 24, 16),  # head_dim 24, group 3
        ([100, 40], [60, 40], 32, 2, 128, 64),  # the model's shape, chunked + full
    ]
    for i, (lens, ql, h, kvh, d, bs) in enumerate(prefill_shapes):
        cases.append((f"prefill-{i}", "prefill", dict(seq_lens=lens, q_lens=ql, heads=h,
                      kv_heads=kvh, head_dim=d, block_size=bs, seed=200 + i)))
    for i, (t, n) in enumerate([(3, 64), (2, 96), (1, 1536)]):
        cases.append((f"norms-{t}x{n}", "norms", dict(tokens=t, hidden=n, seed=300 + i)))
    return cases


CHECKS = {"store_kv": check_store_kv, "decode": check_decode,
          "decode_repeat": check_decode_repeat, "prefill": check_prefill, "norms": check_norms}
