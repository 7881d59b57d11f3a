"""Per-request output text: incremental detokenization plus stop strings.

Text that could still turn into a stop string is held back until it cannot, so a client never sees
part of a stop string; when one completes, the text is cut just before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autoglm_trt.processing.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class TextState:
    detok: IncrementalDetokenizer
    stops: list[str]
    text: str = ""  # all text decoded so far (untrimmed)
    sent: int = 0  # characters of `text` already handed out
    stopped_by: str | None = None
    held: int = field(init=False)

    def __post_init__(self) -> None:
        self.held = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, token_ids: list[int]) -> str:
        """Append tokens; returns text safe to emit now. Sets `stopped_by` when a stop string completes."""
        for tok in token_ids:
            self.text += self.detok.step([tok])
        cut = self._first_stop()
        if cut is not None:
            return self._emit(cut)
        return self._emit(max(self.sent, len(self.text) - self.held))

    def flush(self) -> str:
        """At finish: whatever is left (nothing past a stop string)."""
        cut = self._first_stop()
        return self._emit(len(self.text) if cut is None else cut)

    def _first_stop(self) -> int | None:
        best = None
        for s in self.stops:
            i = self.text.find(s, max(0, self.sent - len(s) + 1))
            if i >= 0 and (best is None or i < best):
                best, self.stopped_by = i, s
        return best

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out, self.sent = self.text[self.sent:upto], upto
        return out


def new_text_state(tokenizer: Tokenizer, prompt_ids: list[int], stops: list[str], skip_special: bool) -> TextState:
    return TextState(IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special), list(stops))
