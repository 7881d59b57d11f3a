"""Structured outputs in the engine's step: each constrained request carries a grammar state (processing/
structured), whose token bitmask is applied to its logits row before sampling.

Single steps mask every constrained row: the masks are computed on the CPU while the device runs the forward
pass (the runner asks for them after launching it). Multi-step windows keep their CUDA graphs and mask
nothing: a greedy row's unmasked argmax, where the grammar allows it, is exactly the masked argmax, so after a
window each constrained row keeps the prefix of its tokens that the grammar accepts; a row whose prefix was cut
takes its next token from a masked single step. Rows without a constraint never touch any of this.
"""

from __future__ import annotations

from collections.abc import Callable

from autoglm_trt.engine.batch import ModelStep
from autoglm_trt.engine.scheduler import SchedulerOutput
from autoglm_trt.engine.sequence import Sequence
from autoglm_trt.errors import RequestError


class Constraints:
    def __init__(self, tokenizer, vocab_size: int, max_rows: int, device) -> None:
        self.tokenizer, self.vocab_size, self.max_rows, self.device = tokenizer, vocab_size, max_rows, device
        self._compiler = self._masks = None  # llguidance is imported on the first constrained request

    def attach(self, seq: Sequence) -> None:
        """Give a request with SamplingParams.structured_outputs its grammar state (RequestError if invalid)."""
        so = seq.params.structured_outputs
        if so is None:
            return
        from autoglm_trt.processing.structured import StructuredOutputError, compiler_for

        if self._compiler is None:
            self._compiler = compiler_for(self.tokenizer, self.vocab_size)
        try:
            seq.grammar = self._compiler.new_state(so, seq.prompt_token_ids)
        except StructuredOutputError as exc:
            raise RequestError(str(exc), param="structured_outputs") from None

    def mask_fn(self, step: ModelStep) -> Callable | None:
        """For a single step with constrained sampling rows: what fills their bitmasks (called by the runner
        after it launched the forward pass) -> (bitmask, logits rows) on the device, or None."""
        if step.is_window or step.drafts is not None or not step.sampling:
            return None
        rows = [(seq.grammar, i) for i, seq in enumerate(step.sampling) if seq.grammar is not None]
        if not rows:
            return None
        if self._masks is None:
            from autoglm_trt.processing.structured import StepBitmasks

            self._masks = StepBitmasks(self.max_rows, self.vocab_size, self.device)
        return lambda: self._masks.fill(rows)

    def accept(self, out: SchedulerOutput, produced: list[list[int]]) -> list[list[int]]:
        """Advance each constrained row's grammar by its tokens; a window's row keeps only the prefix the
        grammar allows (and takes its next token from a masked step). -> the tokens each row keeps."""
        kept = []
        for sch, tokens in zip(out.scheduled, produced):
            state = sch.seq.grammar
            if state is None or not tokens:
                kept.append(tokens)
                continue
            n = state.validate_tokens(tokens) if out.num_steps > 1 or out.continues else len(tokens)
            state.accept_tokens(tokens[:n])
            sch.seq.mask_next = n < len(tokens)
            kept.append(tokens[:n])
        return kept
