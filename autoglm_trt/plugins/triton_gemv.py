"""Triton GEMV for decode (M = 1..8 rows): y[M, N] = x[M, K] @ W[N, K]^T (* scale[N]) (+ bias[N]).

W is bf16 / fp16 / fp32, or int8 / float8_e4m3fn with one fp32 scale per output channel. Decode is memory-bound: the
weight bytes are the whole cost, so there is no tl.dot (batch 1 would pad M to 16 rows of mma) and no
split-K (its reduce launch or memset costs more than it saves here). One launch: each program owns
BLOCK_N output channels (few, so N / BLOCK_N programs fill every SM several times over) and walks all
of K in BLOCK_K steps, reading W as 16-byte vectors along the contiguous K (V elements each):

    w [BN, BK/V, V] -> fp32;  for each row m of x:  acc_m += x[m, k-step] * w  (summed per GemvConfig.reduce)

Each row of x has its own accumulator (acc0..acc7, unused ones are dead code), and x is loaded through
pointers of W's tile shape (equal along BN): every load then has one shape, so Triton gives x and W the
same register layout and nothing is shuffled through shared memory inside the loop (checked by
tests/plugins/gemv_checks.py aot). int8 becomes fp32 through the exponent trick: bits 0x4B000000 | (q ^ 0x80)
are the float 2**23 + 128 + q, exact, so one FADD finishes it (I2F, 16 per clock per SM, is about all
that the int8 byte rate leaves).
silu_mul=True reads x as [M, 2K] = [gate | up] and feeds silu(gate) * up, rounded to x's dtype like
`plugins.silu_mul`, to down_proj without that launch.
Launch configs come from the shapes only (CUDA-graph safe): `gemv_config` looks up `TABLE` (pasted from
`benchmarks/bench_gemv.py`) and falls back to `_rule`; `candidates(m, kind)` lists what the sweep times.
This module imports triton: import it lazily. The oracle is `gemv_reference` (plain torch).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

_ONE_BYTE = (torch.int8, torch.float8_e4m3fn)  # W with a per-channel scale
MAX_BLOCK_M = 8  # rows of x per program; larger M runs ceil(M / 8) programs per channel tile (W re-read)
REDUCE = ("step", "vec", "end")
I8_CVT = ("prmt", "magic", "cvt")
_MAGIC = tl.constexpr(8388736.0)  # 2**23 + 128: float(0x4B000000 | (q ^ 0x80)) - _MAGIC == q for int8 q
# 4 int8 in one register -> 4 fp32 bit patterns 0x4B0000hh, hh = byte ^ 0x80: one XOR per 4, one PRMT each
_PRMT_ASM = tl.constexpr("""{
.reg .b32 t;
xor.b32 t, $4, 0x80808080;
prmt.b32 $0, t, 0x4B000000, 0x7440;
prmt.b32 $1, t, 0x4B000000, 0x7441;
prmt.b32 $2, t, 0x4B000000, 0x7442;
prmt.b32 $3, t, 0x4B000000, 0x7443;
}""")


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # output channels per program
    block_k: int  # K elements per step (a multiple of V)
    num_warps: int = 4
    num_stages: int = 1  # 1: register loads; >= 2: a cp.async pipeline of that depth (x is staged too)
    # "step": acc [BN], each K step summed across lanes at once; "vec": acc [BN, BK/V], each vector's V
    # products summed inside its thread; "end": acc [BN, BK/V, V], FFMA only. "vec" and "end" reduce
    # lanes and warps once, after the loop.
    reduce: str = "vec"
    # int8 -> fp32: "prmt" (inline PTX, CUDA only: the interpreter runs "magic"), "magic" (the same
    # trick in Triton integer ops: PRMT + LOP3 + FADD), "cvt" (I2F)
    i8: str = "prmt"

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two >= 1, got {v}")
        if self.block_k < 16 or not 1 <= self.num_stages <= 6:
            raise ValueError(f"GemvConfig: block_k >= 16 and num_stages in 1..6, got {self}")
        if self.reduce not in REDUCE or self.i8 not in I8_CVT:
            raise ValueError(f"GemvConfig: reduce in {REDUCE} and i8 in {I8_CVT}, got {self.reduce!r}, {self.i8!r}")

    @property
    def tag(self) -> str:
        i8 = "" if self.i8 == "prmt" else f"-{self.i8}"
        return f"n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}-{self.reduce}{i8}"

    @classmethod
    def from_tag(cls, tag: str) -> GemvConfig:
        """'n4k2048w4s1-vec' or 'n8k512w4s1-end-magic' (what .tag prints) -> the config."""
        found = re.fullmatch(r"n(\d+)k(\d+)w(\d+)s(\d+)-(\w+?)(?:-(\w+))?", tag)
        if not found:
            raise ValueError(f"GemvConfig tag {tag!r} is not like 'n4k2048w4s1-vec' or 'n8k512w4s1-end-magic'")
        bn, bk, warps, stages, reduce, i8 = found.groups()
        return cls(int(bn), int(bk), int(warps), int(stages), reduce, i8 or "prmt")


# Winners of `python benchmarks/bench_gemv.py` per (kind, BLOCK_M, N, K, silu_mul), kind = weight_kind(W
# dtype), where they differ from _rule (which already holds the H100 sweep's M = 1 winners).
TABLE: dict[tuple[str, int, int, int, bool], GemvConfig] = {}


def weight_kind(dtype: torch.dtype) -> str:
    """Launch-config family of a weight dtype: 1-byte (int8 and fp8 share the int8 configs), 16- or 32-bit."""
    return "int8" if dtype in _ONE_BYTE else "w32" if dtype == torch.float32 else "w16"


def block_m_for(m: int) -> int:
    return min(MAX_BLOCK_M, triton.next_power_of_2(max(m, 1)))


def _vec(kind: str) -> int:
    return {"int8": 16, "w16": 8, "w32": 4}[kind]  # W elements per 16-byte vector


def _rule(m: int, kind: str) -> GemvConfig:
    """M <= 2, 16-bit or int8 W: the H100 sweep's winners (2 or 4 channels, 4 warps side by side along K);
    otherwise 4 channels, the warps along K for M <= 2 (x, and silu, shared by the channels of a
    thread), one warp each for larger M (fewer x registers per row)."""
    v = _vec(kind)
    if block_m_for(m) <= 2 and kind != "w32":  # the H100 sweep's winners at M = 1 (every decoder shape)
        return GemvConfig(2, 1024, 4, 1, "vec") if kind == "w16" else GemvConfig(4, 512, 4, 1, "vec")
    return GemvConfig(4, (128 if block_m_for(m) <= 2 else 32) * v, 4, 1, "vec")


def gemv_config(m: int, n: int, k: int, dtype: torch.dtype, silu_mul: bool = False) -> GemvConfig:
    """The launch config for x [m, k] @ W [n, k]^T with W of `dtype`: a function of the shapes only."""
    kind = weight_kind(dtype)
    return TABLE.get((kind, block_m_for(m), n, k, silu_mul)) or _rule(m, kind)


def _fits(cfg: GemvConfig, bm: int, vec: int, silu_mul: bool) -> bool:
    """fp32 W values and accumulators per thread within what compiled for sm_90 without spills
    (tests/plugins/gemv_checks.py aot); silu_mul's x, up and exp temporaries take the rest."""
    threads = 32 * cfg.num_warps
    w = cfg.block_n * cfg.block_k // threads
    acc = bm * cfg.block_n * {"step": 1, "vec": cfg.block_k // vec, "end": cfg.block_k}[cfg.reduce] // threads
    return w <= 64 and (w * bm <= 128 and acc <= 64 if silu_mul else w * bm <= 256 and w + acc <= 160)


def candidates(m: int, kind: str, silu_mul: bool = False) -> list[GemvConfig]:
    """The configs `benchmarks/bench_gemv.py` times for rows m (BLOCK_M = block_m_for(m)) and a weight kind."""
    bm, v = block_m_for(m), _vec(kind)
    # lanes along K (1 or 2 vectors each per step), warps along N; then all 4 warps along K (a thread keeps
    # every channel of the tile, so x, and silu, are loaded and computed once for all of them)
    out = [GemvConfig(bn, lanes * v, 4, 1, "vec") for bn in (4, 8, 16) for lanes in (32, 64)]
    out += [GemvConfig(bn, 128 * v, 4, 1, "vec") for bn in (2, 4, 8)]
    out += [GemvConfig(4, 128 * v, 4, 1, "end"), GemvConfig(4, 32 * v, 4, 1, "end"), GemvConfig(8, 32 * v, 4, 1, "end"),
            GemvConfig(8, 32 * v, 4, 1, "step"), GemvConfig(16, 32 * v, 4, 1, "step"),
            GemvConfig(2, 32 * v, 1, 1, "vec"), GemvConfig(4, 32 * v, 2, 1, "vec"), GemvConfig(32, 32 * v, 8, 1, "vec")]
    if bm <= 2:  # NOTE: the cp.async pipeline stages x as well, once per channel of W's tile: small tiles only
        out += [GemvConfig(4, 32 * v, 4, 3, "vec"), GemvConfig(8, 32 * v, 4, 3, "vec"), GemvConfig(4, 128 * v, 4, 2, "vec")]
    if kind == "int8":
        out += [GemvConfig(4, bk, 4, 1, "vec", i8) for bk in (32 * v, 128 * v) for i8 in ("magic", "cvt")]
    return [c for c in out if _fits(c, bm, v, silu_mul)]


# ---- kernel ---------------------------------------------------------------------------------------
@triton.jit
def _w_f32(w, W_CVT: tl.constexpr):
    """W tile -> fp32. W_CVT 0: float W; 1: int8 by PRMT (inline PTX); 2: int8 by the magic in Triton ops; 3: I2F."""
    if W_CVT == 1:
        bits = tl.inline_asm_elementwise(_PRMT_ASM, "=r,=r,=r,=r,r", [w], dtype=tl.int32, is_pure=True, pack=4)
        wf = bits.to(tl.float32, bitcast=True) - _MAGIC
    elif W_CVT == 2:
        bits = (w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x80) | 0x4B000000
        wf = bits.to(tl.float32, bitcast=True) - _MAGIC
    else:
        wf = w.to(tl.float32)
    return wf


@triton.jit
def _row(acc, x_row, ks, wf, K, MASKED: tl.constexpr, SILU_MUL: tl.constexpr, REDUCE: tl.constexpr):
    """acc += x[row, ks] * wf for one row of x; ks, wf [BN, BK/V, V] (ks equal along BN)."""
    if MASKED:
        x = tl.load(x_row + ks, mask=ks < K, other=0.0).to(tl.float32)
        if SILU_MUL:
            up = tl.load(x_row + K + ks, mask=ks < K, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_row + ks).to(tl.float32)
        if SILU_MUL:
            up = tl.load(x_row + K + ks).to(tl.float32)
    if SILU_MUL:  # NOTE: rounded to x's dtype, as the separate silu_mul kernel would store it
        x = (x / (1.0 + tl.exp(-x)) * up).to(x_row.dtype.element_ty).to(tl.float32)
    if REDUCE == 2:
        acc += x * wf  # [BN, BK/V, V]
    elif REDUCE == 1:
        acc += tl.sum(x * wf, axis=2)  # [BN, BK/V]: inside each thread
    else:
        acc += tl.sum(tl.sum(x * wf, axis=2), axis=1)  # [BN]: across lanes (and warps) every step
    return acc


@triton.jit
def _step(a0, a1, a2, a3, a4, a5, a6, a7, x_ptr, r0, r1, r2, r3, r4, r5, r6, r7, w_rows, ks, K, MASKED: tl.constexpr,
          SILU_MUL: tl.constexpr, W_CVT: tl.constexpr, REDUCE: tl.constexpr, BLOCK_M: tl.constexpr):
    """One BLOCK_K step for every row: w_rows [BN, 1, 1] pointers, ks [BN, BK/V, V] offsets, r* x row offsets."""
    if MASKED:  # NOTE: W streams through once: first out of L2
        w = tl.load(w_rows + ks, mask=ks < K, other=0.0, eviction_policy="evict_first")
    else:
        w = tl.load(w_rows + ks, eviction_policy="evict_first")
    wf = _w_f32(w, W_CVT)  # [BN, BK/V, V] fp32
    a0 = _row(a0, x_ptr + r0, ks, wf, K, MASKED, SILU_MUL, REDUCE)
    if BLOCK_M > 1:
        a1 = _row(a1, x_ptr + r1, ks, wf, K, MASKED, SILU_MUL, REDUCE)
    if BLOCK_M > 2:
        a2 = _row(a2, x_ptr + r2, ks, wf, K, MASKED, SILU_MUL, REDUCE)
        a3 = _row(a3, x_ptr + r3, ks, wf, K, MASKED, SILU_MUL, REDUCE)
    if BLOCK_M > 4:
        a4 = _row(a4, x_ptr + r4, ks, wf, K, MASKED, SILU_MUL, REDUCE)
        a5 = _row(a5, x_ptr + r5, ks, wf, K, MASKED, SILU_MUL, REDUCE)
        a6 = _row(a6, x_ptr + r6, ks, wf, K, MASKED, SILU_MUL, REDUCE)
        a7 = _row(a7, x_ptr + r7, ks, wf, K, MASKED, SILU_MUL, REDUCE)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _store_row(y_ptr, row, M, acc, s, b, offs_n, N, stride_ym, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
               REDUCE: tl.constexpr):
    if REDUCE == 2:
        y = tl.sum(tl.sum(acc, axis=2), axis=1)  # [BN]
    elif REDUCE == 1:
        y = tl.sum(acc, axis=1)
    else:
        y = acc
    if HAS_SCALE:
        y = y * s
    if HAS_BIAS:
        y = y + b
    n_lim = tl.where(row < M, N, 0)  # NOTE: a scalar limit, never scalar & block booleans
    tl.store(y_ptr + row.to(tl.int64) * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < n_lim)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, W_CVT: tl.constexpr,
                 REDUCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 VEC: tl.constexpr, NUM_STAGES: tl.constexpr):
    """y[m, n] = sum_k act(x)[m, k] * w[n, k] (* s[n]) (+ b[n]); act = silu(gate) * up when SILU_MUL."""
    pid_n, m0 = tl.program_id(0), tl.program_id(1) * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_safe = tl.minimum(offs_n, N - 1)  # NOTE: clamped rows keep the loop's loads unmasked; stores mask them
    w_rows = w_ptr + (n_safe.to(tl.int64) * stride_wn)[:, None, None]  # [BN, 1, 1]
    ks = tl.arange(0, BLOCK_K // VEC)[None, :, None] * VEC + tl.arange(0, VEC)[None, None, :]  # [1, BK/V, V]
    ks = ks + tl.zeros((BLOCK_N, 1, 1), dtype=tl.int32)  # [BN, BK/V, V]: x's pointers get W's tile shape
    r0, r1, r2, r3 = _xrow(m0, 0, M, stride_xm), _xrow(m0, 1, M, stride_xm), _xrow(m0, 2, M, stride_xm), \
        _xrow(m0, 3, M, stride_xm)
    r4, r5, r6, r7 = _xrow(m0, 4, M, stride_xm), _xrow(m0, 5, M, stride_xm), _xrow(m0, 6, M, stride_xm), \
        _xrow(m0, 7, M, stride_xm)
    if REDUCE == 2:
        a0 = tl.zeros((BLOCK_N, BLOCK_K // VEC, VEC), dtype=tl.float32)
    elif REDUCE == 1:
        a0 = tl.zeros((BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
    else:
        a0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
    k_full = K - K % BLOCK_K
    for k0 in tl.range(0, k_full, BLOCK_K, num_stages=NUM_STAGES):
        a0, a1, a2, a3, a4, a5, a6, a7 = _step(a0, a1, a2, a3, a4, a5, a6, a7, x_ptr, r0, r1, r2, r3, r4, r5, r6,
                                               r7, w_rows, ks + k0, K, False, SILU_MUL, W_CVT, REDUCE, BLOCK_M)
    if k_full < K:  # the ragged last step, masked
        a0, a1, a2, a3, a4, a5, a6, a7 = _step(a0, a1, a2, a3, a4, a5, a6, a7, x_ptr, r0, r1, r2, r3, r4, r5, r6,
                                               r7, w_rows, ks + k_full, K, True, SILU_MUL, W_CVT, REDUCE, BLOCK_M)
    s = tl.full((BLOCK_N,), 1.0, tl.float32)
    b = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_SCALE:
        s = tl.load(s_ptr + n_safe)
    if HAS_BIAS:
        b = tl.load(b_ptr + n_safe).to(tl.float32)
    _store_row(y_ptr, m0, M, a0, s, b, offs_n, N, stride_ym, HAS_SCALE, HAS_BIAS, REDUCE)
    if BLOCK_M > 1:
        _store_row(y_ptr, m0 + 1, M, a1, s, b, offs_n, N, stride_ym, HAS_SCALE, HAS_BIAS, REDUCE)
    if BLOCK_M > 2:
        _store_row(y_ptr, m0 + 2, M, a2, s, b, offs_n, N, stride_ym, HAS_SCALE, HAS_BIAS, REDUCE)
        _store_row(y_ptr, m0 + 3, M, a3, s, b, offs_n, N, stride_ym, HAS_SCALE, HAS_BIAS, REDUCE)
    if BLOCK_M > 4:
        _store_row(y_ptr, m0 + 4, M, a4, s, b, offs_n, N, stride_ym, HAS_SCALE, HAS_BIAS, REDUCE)
        _store_row(y_ptr, m0 + 5, M, a5, s, b, offs_n, N, stride_ym, HAS_SCALE, HAS_BIAS, REDUCE)
        _store_row(y_ptr, m0 + 6, M, a6, s, b, offs_n, N, stride_ym, HAS_SCALE, HAS_BIAS, REDUCE)
        _store_row(y_ptr, m0 + 7, M, a7, s, b, offs_n, N, stride_ym, HAS_SCALE, HAS_BIAS, REDUCE)


@triton.jit
def _xrow(m0, i, M, stride_xm):
    return tl.minimum(m0 + i, M - 1).to(tl.int64) * stride_xm  # clamped: rows past M load row M-1


# ---- host ---------------------------------------------------------------------------------------
def _check(x: Tensor, w: Tensor, scale: Tensor | None, bias: Tensor | None, silu_mul: bool) -> None:
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"expected x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    n, k = w.shape
    if x.shape[1] != (2 * k if silu_mul else k):
        raise ValueError(f"x has {x.shape[1]} columns for w's K={k}" + (" (silu_mul: x is [M, 2K])" if silu_mul else ""))
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("x and w must be contiguous along K")
    if w.dtype in _ONE_BYTE and (scale is None or scale.dtype != torch.float32):
        raise ValueError(f"{w.dtype} w needs a float32 per-channel scale [N]")
    for name, t in (("scale", scale), ("bias", bias)):
        if t is not None and (t.numel() != n or not t.is_contiguous()):
            raise ValueError(f"{name} must be contiguous [N={n}], got {tuple(t.shape)}")


def _w_cvt(w: Tensor, cfg: GemvConfig) -> int:
    if w.dtype != torch.int8:
        return 0
    if cfg.i8 == "prmt" and (not w.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return 2  # NOTE: inline PTX has no interpreter (or CPU) form; "magic" is the same arithmetic
    return I8_CVT.index(cfg.i8) + 1


def gemv(x: Tensor, w: Tensor, scale: Tensor | None = None, bias: Tensor | None = None, silu_mul: bool = False,
         config: GemvConfig | None = None) -> Tensor:
    """x [M, K] (or [M, 2K] = [gate | up] with silu_mul) @ w [N, K]^T (* scale [N]) (+ bias [N]) -> [M, N], x's dtype.

    w: bf16 / fp16 / fp32, or int8 / float8_e4m3fn with a float32 scale per output channel. fp32 accumulation, one rounding.
    """
    _check(x, w, scale, bias, silu_mul)
    (m, n), k = (x.shape[0], w.shape[0]), w.shape[1]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    cfg = config or gemv_config(m, n, k, w.dtype, silu_mul)
    vec, bm = 16 // w.element_size(), block_m_for(m)
    if cfg.block_k % vec:
        raise ValueError(f"block_k {cfg.block_k} is not a multiple of {vec} ({w.dtype}: 16-byte vectors)")
    dummy = scale if scale is not None else y  # NOTE: a valid pointer; disabled options never read it
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, bm))
    _gemv_kernel[grid](x, w, dummy, bias if bias is not None else dummy, y, m, n, k, x.stride(0), w.stride(0),
                       y.stride(0), scale is not None, bias is not None, silu_mul, _w_cvt(w, cfg),
                       REDUCE.index(cfg.reduce), bm, cfg.block_n, cfg.block_k, vec, cfg.num_stages,
                       num_warps=cfg.num_warps)
    return y


def gemv_reference(x: Tensor, w: Tensor, scale: Tensor | None = None, bias: Tensor | None = None,
                   silu_mul: bool = False) -> Tensor:
    """What gemv computes, in fp32 torch (any device): the test oracle."""
    xf = x.float()
    if silu_mul:
        gate, up = xf.chunk(2, dim=-1)
        xf = (torch.nn.functional.silu(gate) * up).to(x.dtype).float()
    y = xf @ w.float().t()  # [M, N]
    if scale is not None:
        y = y * scale.float()
    return (y if bias is None else y + bias.float()).to(x.dtype)


__all__ = [
    "TABLE",
    "GemvConfig",
    "block_m_for",
    "candidates",
    "gemv",
    "gemv_config",
    "gemv_reference",
    "weight_kind",
]
