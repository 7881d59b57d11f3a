"""Per-request sampling knobs, validated once at the door so the scheduler and sampler can trust them."""

from __future__ import annotations

from dataclasses import dataclass, field

from autoglm_trt.processing.structured.spec import StructuredOutputs

# NOTE: temperatures below this are treated as greedy (argmax); dividing by them would overflow fp32.
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_LOGPROBS = 20


def _check_range(name: str, value: float, lo: float, hi: float, lo_open: bool = False,
                 hi_open: bool = False) -> None:
    above = value > lo if lo_open else value >= lo
    below = value < hi if hi_open else value <= hi
    if not (above and below):  # NOTE: written this way round so NaN fails too
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value}")


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")


@dataclass
class SamplingParams:
    max_tokens: int = 256  # generated tokens at most (finish_reason "length")
    temperature: float = 1.0  # 0 = greedy (exact argmax)
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    min_p: float = 0.0  # drop tokens with prob < min_p * max prob, [0, 1]
    seed: int | None = None  # per-request RNG: same seed -> same tokens, whatever the batch
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens, [-2, 2]
    presence_penalty: float = 0.0  # subtracted once if present in the generated tokens, [-2, 2]
    repetition_penalty: float = 1.0  # HF semantics over prompt + generated tokens, > 0
    stop: list[str] = field(default_factory=list)  # stop strings, checked by the engine on text
    stop_token_ids: list[int] = field(default_factory=list)  # finish (reason "stop") on any of these
    ignore_eos: bool = False  # keep going past the model's eos tokens
    logprobs: int | None = None  # None = none; N = sampled token's logprob plus the top N
    skip_special_tokens: bool = True  # detokenizer option
    priority: int = 0  # lower value is scheduled first; ties go first come, first served
    structured_outputs: StructuredOutputs | None = None  # the output's grammar (processing/structured)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self._validate_ints()
        self._validate_floats()
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            raise ValueError(f"structured_outputs must be a StructuredOutputs, got {self.structured_outputs!r}")

    def _validate_ints(self) -> None:
        for name in ("max_tokens", "top_k", "priority"):
            _check_int(name, getattr(self, name))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or -1 = off), got {self.top_k}")
        if self.seed is not None:
            _check_int("seed", self.seed)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs)
            _check_range("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        for tok in self.stop_token_ids:
            _check_int("stop_token_ids entries", tok)
            if tok < 0:
                raise ValueError(f"stop_token_ids entries must be >= 0, got {tok}")

    def _validate_floats(self) -> None:
        if not self.temperature >= 0:  # NOTE: also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS
