"""Draft tokens without a draft model: n-gram matches in text the session has already seen. Pure Python.

An agent step's reply repeats a lot of what its prompt holds (the action language, app names, the last
step's reasoning): after the last n tokens of a sequence (n from prompt_lookup_max down to prompt_lookup_min),
the tokens that followed the latest earlier occurrence of those n tokens are the draft ("ngram", vLLM's prompt
lookup). "suffix" also looks them up in the outputs of recent requests (the SuffixDecoding idea, as an n-gram
index over a bounded window of outputs), for text that other sessions produced.

The drafts are only proposals: the scheduler asks for them, the model runner checks them in one forward pass
and keeps the longest prefix that greedy decoding itself produces, plus the token after it. The number of
drafts per row adapts to the acceptance that row has seen.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from autoglm_trt.config import SpeculativeConfig
from autoglm_trt.engine.sequence import Sequence


class NgramIndex:
    """n-gram (n_min..n_max) -> the position just after its latest occurrence, over a growing token list."""

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max
        self.last: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # tokens whose n-grams ending there are in `last`

    def extend(self, tokens: list[int], upto: int) -> None:
        """Index the n-grams ending at positions [indexed, upto) of `tokens`."""
        for end in range(max(self.indexed, 1), upto + 1):
            for n in range(self.n_min, min(self.n_max, end) + 1):
                self.last[tuple(tokens[end - n:end])] = end
        self.indexed = max(self.indexed, upto)

    def continuation(self, tokens: list[int], k: int) -> list[int]:
        """k tokens that followed the latest earlier occurrence of the longest matching suffix; where they
        run into the present, the text repeats with that period (a loop of p tokens continues as one)."""
        for n in range(min(self.n_max, len(tokens) - 1), self.n_min - 1, -1):
            end = self.last.get(tuple(tokens[-n:]))
            if end is not None and end < len(tokens):
                out: list[int] = []
                for i in range(end, end + k):
                    out.append(tokens[i] if i < len(tokens) else out[i - len(tokens)])
                return out
        return []


class SuffixCache:
    """The outputs of the last `capacity` finished requests, n-gram indexed, for drafts across requests."""

    def __init__(self, capacity: int, n_min: int, n_max: int) -> None:
        self.capacity, self.n_min, self.n_max = capacity, n_min, n_max
        self.outputs: OrderedDict[str, list[int]] = OrderedDict()
        self.index: dict[tuple[int, ...], tuple[str, int]] = {}  # n-gram -> (request, position after it)
        self.grams: dict[str, list[tuple[int, ...]]] = {}  # request -> its n-grams (to evict them)

    def add(self, request_id: str, output: list[int]) -> None:
        if len(output) < 2 or request_id in self.outputs:
            return
        self.outputs[request_id], grams = output, []
        for end in range(1, len(output)):
            for n in range(self.n_min, min(self.n_max, end) + 1):
                grams.append(tuple(output[end - n:end]))
                self.index[grams[-1]] = (request_id, end)
        self.grams[request_id] = grams
        while len(self.outputs) > self.capacity:
            old, _ = self.outputs.popitem(last=False)
            for g in self.grams.pop(old):
                if self.index.get(g, ("",))[0] == old:
                    del self.index[g]

    def continuation(self, tokens: list[int], k: int) -> list[int]:
        for n in range(min(self.n_max, len(tokens)), self.n_min - 1, -1):
            hit = self.index.get(tuple(tokens[-n:]))
            if hit is not None:
                rid, end = hit
                return self.outputs[rid][end:end + k]
        return []


TRIAL_VERIFICATIONS = 4  # a row's verifications before its acceptance decides whether it keeps speculating
PROBE_EVERY = 8  # a row whose drafts do not pay proposes again only every this many steps


@dataclass
class _RowState:
    index: NgramIndex
    k: int  # drafts to ask for next time
    proposed: int = 0
    accepted: int = 0
    verifications: int = 0
    since_probe: int = 0

    @property
    def pays(self) -> bool:
        """Tried a few times and gained less than one token a verification: speculation costs it time (a
        verification is an eager step, ~2.5x a decode step's graph on an H100), so it mostly stays off."""
        return self.verifications < TRIAL_VERIFICATIONS or self.accepted >= self.verifications


@dataclass
class SpecStats:
    """vLLM's spec_decode counters."""

    num_drafts: int = 0  # rows that were verified with at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [k]: drafts accepted at position i


class Proposer:
    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.cfg = cfg
        self.rows: dict[str, _RowState] = {}
        self.suffix = SuffixCache(cfg.suffix_cache_requests, cfg.prompt_lookup_min, cfg.prompt_lookup_max) \
            if cfg.method == "suffix" else None
        self.stats = SpecStats(accepted_per_pos=[0] * cfg.num_speculative_tokens)

    def propose(self, seq: Sequence, room: int) -> list[int]:
        """Draft tokens for seq's next step: at most its adaptive k and `room` (max_tokens, max_model_len)."""
        row = self.rows.get(seq.request_id)
        if row is None:
            row = self.rows[seq.request_id] = _RowState(
                NgramIndex(self.cfg.prompt_lookup_min, self.cfg.prompt_lookup_max), self.cfg.num_speculative_tokens)
        k = min(row.k, room)
        if k < 1 or not self._probe(row):
            return []
        tokens = seq.token_ids
        row.index.extend(tokens, len(tokens) - 1)  # NOTE: the last n-gram is the query, not a match
        draft = row.index.continuation(tokens, k)
        if not draft and self.suffix is not None:
            draft = self.suffix.continuation(tokens, k)
        return draft

    @staticmethod
    def _probe(row: _RowState) -> bool:
        if row.pays:
            return True
        row.since_probe = (row.since_probe + 1) % PROBE_EVERY
        return row.since_probe == 0

    def wants(self, seq: Sequence) -> bool:
        """Whether seq should leave a multi-step window for a step that can speculate."""
        row = self.rows.get(seq.request_id)
        return row is None or row.pays

    def record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """One verification of `proposed` drafts, `accepted` of which greedy decoding confirmed."""
        s = self.stats
        s.num_drafts += 1
        s.num_draft_tokens += proposed
        s.num_accepted_tokens += accepted
        for i in range(accepted):
            s.accepted_per_pos[i] += 1
        row = self.rows.get(seq.request_id)
        if row is not None:
            row.proposed += proposed
            row.accepted += accepted
            row.verifications += 1
            # NOTE: all accepted: ask for more next time; else a little more than what was accepted
            row.k = min(self.cfg.num_speculative_tokens, 2 * row.k if accepted == proposed else accepted + 2)

    def finish(self, seq: Sequence) -> None:
        self.rows.pop(seq.request_id, None)
        if self.suffix is not None and seq.finish_reason != "abort":
            self.suffix.add(seq.request_id, list(seq.output_token_ids))
