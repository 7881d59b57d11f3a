"""glm45 reasoning parser: text inside <think>...</think> is reasoning, everything else content.

Same split as vLLM's `glm45` parser and SGLang's Glm45Detector: <answer>...</answer> stays in the
content; output without any <think> is all content; when the prompt already opened the think block
(`starts_in_reasoning=True`), the output starts as reasoning until </think>.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"


def split(text: str, starts_in_reasoning: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole generated text."""
    stream = ReasoningStream(starts_in_reasoning)
    reasoning, content = stream.feed(text)
    tail_reasoning, tail_content = stream.finish()
    reasoning, content = reasoning + tail_reasoning, content + tail_content
    return (reasoning if stream.saw_reasoning else None), content


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (0 if none)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningStream:
    """Streaming split: `feed(delta) -> (reasoning_delta, content_delta)`.

    A tag may arrive split over deltas ("<thi", "nk>"); the possible start of a tag is held back
    until the next delta decides it, and `finish()` releases whatever is still held.
    """

    def __init__(self, starts_in_reasoning: bool = False):
        self.in_reasoning = starts_in_reasoning
        self.saw_reasoning = starts_in_reasoning  # a think block was opened at some point
        self._pending = ""  # text that may be the beginning of a tag

    def feed(self, delta: str) -> tuple[str, str]:
        text = self._pending + delta
        self._pending = ""
        reasoning, content = [], []
        while text:
            tag = THINK_END if self.in_reasoning else THINK_START
            out = reasoning if self.in_reasoning else content
            at = text.find(tag)
            if at >= 0:
                out.append(text[:at])
                text = text[at + len(tag):]
                self.in_reasoning = not self.in_reasoning
                self.saw_reasoning = True
                continue
            keep = _partial_tag_suffix(text, tag)
            out.append(text[:len(text) - keep])
            self._pending = text[len(text) - keep:]
            break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """Release held-back text at the end of the output."""
        held, self._pending = self._pending, ""
        return (held, "") if self.in_reasoning else ("", held)


class ReasoningParser:
    """The `glm45` reasoning parser: `split(text)` for whole outputs, `stream()` for deltas."""

    name = "glm45"

    def __init__(self, starts_in_reasoning: bool = False):
        self.starts_in_reasoning = starts_in_reasoning

    @classmethod
    def for_prompt(cls, prompt_text: str | None) -> "ReasoningParser":
        """A parser that starts inside reasoning when the prompt left a <think> block open."""
        text = prompt_text or ""
        return cls(starts_in_reasoning=text.rfind(THINK_START) > text.rfind(THINK_END))

    def split(self, text: str) -> tuple[str | None, str]:
        return split(text, self.starts_in_reasoning)

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self.starts_in_reasoning)
