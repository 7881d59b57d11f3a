"""One request's grammar state: the token bitmask of its next position, and accepting / rolling back tokens.

Bitmasks are packed: row r of an int32 tensor `[rows, ceil(vocab / 32)]` allows token t when bit t % 32 of
word t // 32 is set (llguidance's and xgrammar's layout). They are filled on the CPU, written in place
through the tensor's data pointer (llguidance releases the GIL while it computes), and applied to the logits
with plugins/bitmask.py.

Reasoning-aware (vLLM's rule): with a gate, the tokens up to and including the model's `</think>` are not
given to the grammar and the row is unconstrained meanwhile; the grammar sees the tokens after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ALL_ALLOWED = -1  # an int32 word with every bit set


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(rows: int, vocab_size: int, pin_memory: bool = False) -> "torch.Tensor":
    """`[rows, ceil(vocab/32)]` int32, every token allowed (pin it when it is copied to a GPU each step)."""
    import torch

    return torch.full((rows, bitmask_width(vocab_size)), ALL_ALLOWED, dtype=torch.int32, pin_memory=pin_memory)


@dataclass
class ReasoningGate:
    think_end_id: int
    ended: bool = False  # the prompt already closed the think block, or the model has
    ended_at: int | None = None  # tokens accepted up to and including the model's </think> (None: not
    # yet, or the prompt closed the think block)


class GrammarState:
    """Per-request: `fill_bitmask`, `accept_token`, `rollback`, `is_terminated`; built by GrammarCompiler."""

    def __init__(self, matcher, gate: ReasoningGate | None, eos_token_ids: frozenset[int]) -> None:
        self.matcher = matcher  # llguidance.LLMatcher, this request's own copy
        self.gate = gate
        self.eos_token_ids = eos_token_ids
        # one flag per accepted token: whether the matcher recorded it (reasoning tokens are not given to it,
        # and llguidance does not record an eos taken once the grammar has stopped): rollback undoes those
        self._fed: list[bool] = []
        self.terminated_at: int | None = None  # tokens accepted up to and including the grammar's eos

    @property
    def constrained(self) -> bool:
        """Whether the next token is constrained (False while the model still reasons)."""
        return self.gate is None or self.gate.ended

    def fill_bitmask(self, bitmask: "torch.Tensor", row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (a CPU int32 tensor)."""
        if not self.constrained:
            bitmask[row].fill_(ALL_ALLOWED)
            return
        if self.matcher.is_error():
            self._eos_only(bitmask, row)
            return
        view = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * 4)

    def _eos_only(self, bitmask: "torch.Tensor", row: int) -> None:
        """A state in error (a token the mask did not allow was accepted) lets the row end, never NaNs."""
        bitmask[row].zero_()
        for token in self.eos_token_ids:
            word = int(bitmask[row, token // 32]) | (1 << (token % 32))
            bitmask[row, token // 32] = word - (1 << 32) if word >= 1 << 31 else word  # NOTE: int32 wrap

    def accept_token(self, token: int) -> bool:
        """Advance by one sampled token; False when the grammar refuses it (the state is then in error)."""
        if not self.constrained:
            self._fed.append(False)
            if token == self.gate.think_end_id:
                self.gate.ended, self.gate.ended_at = True, self.num_accepted
            return True
        is_eos = token in self.eos_token_ids
        self._fed.append(not (is_eos and self.matcher.is_stopped()))
        ok = self.matcher.consume_token(token)
        if ok and is_eos and self.terminated_at is None:
            self.terminated_at = self.num_accepted
        return ok

    @property
    def num_accepted(self) -> int:
        """Tokens accepted so far, reasoning included."""
        return len(self._fed)

    def accept_tokens(self, tokens: list[int]) -> int:
        """Accept in order; the number accepted (stops at the first refused token)."""
        for i, token in enumerate(tokens):
            if not self.accept_token(token):
                return i
        return len(tokens)

    def validate_tokens(self, tokens: list[int]) -> int:
        """How many of `tokens` (a speculative draft) the grammar would accept in order, without advancing."""
        if not self.constrained:
            end = next((i for i, t in enumerate(tokens) if t == self.gate.think_end_id), None)
            if end is None:
                return len(tokens)
            return end + 1 + self.matcher.validate_tokens(tokens[end + 1:])
        return self.matcher.validate_tokens(tokens)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (rejected speculative tokens, a discarded window)."""
        if num_tokens < 0 or num_tokens > self.num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} of {self.num_accepted} accepted tokens")
        target = self.num_accepted - num_tokens
        in_grammar = sum(self._fed[target:])
        del self._fed[target:]
        if in_grammar and not self.matcher.rollback(in_grammar):
            raise RuntimeError(f"the grammar could not roll back {in_grammar} tokens: {self.matcher.get_error()}")
        gate = self.gate
        if gate is not None and gate.ended_at is not None and target < gate.ended_at:
            gate.ended, gate.ended_at = False, None  # the </think> itself is undone: reasoning again
        if self.terminated_at is not None and target < self.terminated_at:
            self.terminated_at = None

    def is_terminated(self) -> bool:
        """The grammar took its eos token: the output is complete."""
        return self.terminated_at is not None

    def is_stopped(self) -> bool:
        """The grammar is complete: only an eos token may follow (the mask allows nothing else)."""
        return self.constrained and self.matcher.is_stopped()

    def is_accepting(self) -> bool:
        """The output so far is a complete match (it may still go on)."""
        return self.constrained and self.matcher.is_accepting()

    @property
    def error(self) -> str | None:
        return (self.matcher.get_error() or "error") if self.matcher.is_error() else None


_executor = None


def fill_bitmasks(rows: list[tuple[GrammarState, int]], bitmask: "torch.Tensor") -> None:
    """Fill many rows at once: the constrained ones in llguidance's thread pool (GIL released)."""
    global _executor
    pairs = []
    for state, row in rows:
        if state.constrained and not state.matcher.is_error():
            pairs.append((state.matcher, row))
        else:
            state.fill_bitmask(bitmask, row)  # all allowed while reasoning; eos only after an error
    if len(pairs) == 1:  # NOTE: no thread hand-off for a single row
        matcher, row = pairs[0]
        matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), bitmask.shape[1] * 4)
    elif pairs:
        if _executor is None:
            import llguidance

            _executor = llguidance.LLExecutor()
        if not bitmask.is_contiguous():
            raise ValueError("the bitmask must be contiguous")
        _executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])
