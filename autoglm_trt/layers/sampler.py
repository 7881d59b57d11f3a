"""Token sampling over a batch of logits: penalties, temperature, min-p / top-k / top-p, logprobs.

Everything is vectorised over the batch; the only per-row Python loop draws the noise of seeded rows
from their own generators. Sampling uses the exponential race (argmax of probs / Exp(1) noise), which
draws exactly from `probs` without a CUDA sync or a cumulative-sum search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence as SequenceLike

import torch
from torch import nn

# NOTE: the same threshold as engine.sampling_params.GREEDY_TEMPERATURE_EPS (layers may not import
# engine); temperatures below it are greedy.
_GREEDY_EPS = 1e-5
_MASK64 = (1 << 64) - 1


@dataclass
class TokenLogprob:
    token_id: int  # the sampled token
    logprob: float  # its log-probability (see Sampler.forward for which distribution)
    top: list[tuple[int, float]]  # the `logprobs` most likely (token_id, logprob), best first


@dataclass
class SamplerOutput:
    token_ids: list[int]  # [B] one sampled token per row
    logprobs: list[TokenLogprob | None] | None  # [B]; None when no row asked for logprobs


@dataclass
class SamplingMetadata:
    """Per-row sampling tensors for one step; rows follow the logits rows. Optional tensors are
    None when no row of the batch uses that feature, so their work is skipped."""

    temperature: torch.Tensor  # [B] fp32; 1.0 on greedy rows (never divides by 0)
    greedy: torch.Tensor  # [B] bool: temperature 0 -> exact argmax
    all_greedy: bool
    top_p: torch.Tensor | None = None  # [B] fp32, 1.0 = off
    top_k: torch.Tensor | None = None  # [B] int64, vocab size = off
    max_top_k: int = 0  # max of top_k (vocab size when any row is off): bounds the sort
    min_p: torch.Tensor | None = None  # [B] fp32, 0.0 = off
    frequency_penalty: torch.Tensor | None = None  # [B] fp32 (with output_counts)
    presence_penalty: torch.Tensor | None = None  # [B] fp32 (with output_counts)
    output_counts: torch.Tensor | None = None  # [B, V] fp32: occurrences among generated tokens
    repetition_penalty: torch.Tensor | None = None  # [B] fp32 (with seen_mask)
    seen_mask: torch.Tensor | None = None  # [B, V] bool: token in prompt or generated tokens
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> seeded RNG
    num_logprobs: list[int | None] = field(default_factory=list)  # [B] top-N asked, None = none

    @classmethod
    def from_sequences(cls, seqs: SequenceLike[Any], vocab_size: int,
                       device: torch.device | str = "cpu") -> "SamplingMetadata":
        """Build from engine Sequences (duck-typed: .params, .token_ids, .output_token_ids)."""
        params = [s.params for s in seqs]
        greedy = [p.temperature < _GREEDY_EPS for p in params]
        fp32 = dict(dtype=torch.float32, device=device)
        meta = cls(
            temperature=torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], **fp32),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=all(greedy),
            num_logprobs=[p.logprobs for p in params],
        )
        if any(p.top_p < 1.0 for p in params):
            meta.top_p = torch.tensor([p.top_p for p in params], **fp32)
        if any(0 < p.top_k < vocab_size for p in params):
            ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
            meta.top_k, meta.max_top_k = torch.tensor(ks, dtype=torch.int64, device=device), max(ks)
        if any(p.min_p > 0 for p in params):
            meta.min_p = torch.tensor([p.min_p for p in params], **fp32)
        if any(p.frequency_penalty or p.presence_penalty for p in params):
            meta.frequency_penalty = torch.tensor([p.frequency_penalty for p in params], **fp32)
            meta.presence_penalty = torch.tensor([p.presence_penalty for p in params], **fp32)
            meta.output_counts = token_counts([s.output_token_ids for s in seqs], vocab_size, device)
        if any(p.repetition_penalty != 1.0 for p in params):
            meta.repetition_penalty = torch.tensor([p.repetition_penalty for p in params], **fp32)
            meta.seen_mask = token_counts([s.token_ids for s in seqs], vocab_size, device) > 0
        meta.generators = {i: seeded_generator(p.seed, s.num_output_tokens, device)
                           for i, (s, p, g) in enumerate(zip(seqs, params, greedy))
                           if p.seed is not None and not g}
        return meta


def token_counts(token_lists: SequenceLike[SequenceLike[int]], vocab_size: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, V] fp32 occurrence counts of each token id per row (ids outside the vocab are ignored)."""
    width = max((len(ids) for ids in token_lists), default=0)
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.float32, device=device)
    if width:
        padded = [list(ids) + [vocab_size] * (width - len(ids)) for ids in token_lists]
        ids = torch.tensor(padded, dtype=torch.int64).clamp_(0, vocab_size).to(device)  # [B, width]
        counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab_size]  # NOTE: column V collected padding and out-of-vocab ids


def seeded_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """RNG for one row at one step: a function of (seed, number of tokens generated so far) only,
    so a seeded request draws the same tokens whatever the batch, and again after preemption."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64  # splitmix64 finaliser
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    gen = torch.Generator(device=device)
    gen.manual_seed((x ^ (x >> 31)) >> 1)  # 63 bits
    return gen


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition (HF: positive logits / r, negative * r, over prompt + generated), then frequency
    and presence (OpenAI: minus f * count and p * [count > 0], over generated tokens)."""
    if meta.seen_mask is not None:
        r = meta.repetition_penalty[:, None]  # [B, 1]
        logits = torch.where(meta.seen_mask, torch.where(logits > 0, logits / r, logits * r), logits)
    if meta.output_counts is not None:
        counts = meta.output_counts  # [B, V]
        logits = logits - meta.frequency_penalty[:, None] * counts
        logits = logits - meta.presence_penalty[:, None] * (counts > 0).float()
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor | None) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's highest probability."""
    if min_p is None:
        return logits
    probs = logits.softmax(-1)  # [B, V]
    threshold = min_p[:, None] * probs.amax(-1, keepdim=True)  # [B, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                      max_top_k: int | None = None) -> torch.Tensor:
    """Keep the top_k most likely tokens, then the smallest set whose mass reaches top_p.

    `max_top_k` (>= every row's top_k) lets every row sort only its max_top_k best tokens."""
    if top_k is None and top_p is None:
        return logits
    vocab = logits.shape[-1]
    if top_k is not None and max_top_k is not None and max_top_k < vocab:
        sorted_logits, order = logits.topk(max_top_k, dim=-1)  # [B, K], best first
    else:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    if top_k is not None:
        ranks = torch.arange(sorted_logits.shape[-1], device=logits.device)  # [K]
        sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(-1)  # [B, V]
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop = (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]  # the first token never drops
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Sample one token per row: argmax(probs / q), q ~ Exp(1); seeded rows draw q themselves."""
    q = torch.empty_like(probs)  # [B, V]
    if len(generators) < probs.shape[0]:  # NOTE: the rows without a seed share the global generator
        q.exponential_()
    for row, gen in generators.items():
        q[row].exponential_(generator=gen)
    return probs.div(q.clamp_min_(1e-20)).argmax(-1)  # [B]


def gather_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor,
                    num_logprobs: list[int | None]) -> list[TokenLogprob | None]:
    rows = [i for i, n in enumerate(num_logprobs) if n is not None]
    max_n = max(num_logprobs[i] for i in rows)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()  # [B]
    top_vals, top_ids = logprobs.topk(max(max_n, 1), dim=-1)  # [B, max_n]
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    token_list = tokens.tolist()
    out: list[TokenLogprob | None] = [None] * len(num_logprobs)
    for i in rows:
        n = num_logprobs[i]
        out[i] = TokenLogprob(token_list[i], chosen[i], list(zip(top_ids[i][:n], top_vals[i][:n])))
    return out


class Sampler(nn.Module):
    @torch.no_grad()
    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits [B, V] (fp32 preferred) -> one token per row, plus logprobs for the rows that ask.

        Logprobs are the log-softmax of the logits AFTER penalties and BEFORE temperature and the
        min-p/top-k/top-p filters. NOTE: vLLM by default returns the raw model's logprobs (before
        penalties too); ours differ from that only on rows with penalties.
        """
        if logits.shape[0] == 0:
            return SamplerOutput([], None)
        logits = apply_penalties(logits.float(), meta)  # [B, V]
        want_logprobs = any(n is not None for n in meta.num_logprobs)
        logprobs = logits.log_softmax(-1) if want_logprobs else None  # [B, V]
        tokens = logits.argmax(-1)  # [B] greedy
        if not meta.all_greedy:
            scaled = logits / meta.temperature[:, None]
            scaled = apply_min_p(scaled, meta.min_p)
            scaled = apply_top_k_top_p(scaled, meta.top_k, meta.top_p, meta.max_top_k)
            sampled = exponential_race(scaled.softmax(-1), meta.generators)
            tokens = torch.where(meta.greedy, tokens, sampled)
        out_logprobs = gather_logprobs(logprobs, tokens, meta.num_logprobs) if want_logprobs else None
        return SamplerOutput(tokens.tolist(), out_logprobs)
