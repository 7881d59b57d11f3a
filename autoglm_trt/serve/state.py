"""What every API handler shares: the server config, the async engine client and derived helpers."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from autoglm_trt.serve.async_engine import AsyncEngineClient
from autoglm_trt.serve.config import ServerConfig
from autoglm_trt.serve.errors import ServeError
from autoglm_trt.serve.media import MediaPolicy
from autoglm_trt.serve.metrics import ServeMetrics
from autoglm_trt.serve.openai.logprobs import TokenText

T = TypeVar("T")
request_log = logging.getLogger("autoglm_trt.serve.requests")


@dataclass
class ServeState:
    config: ServerConfig
    client: AsyncEngineClient
    metrics: ServeMetrics
    started: int = field(default_factory=lambda: int(time.time()))
    _token_text: TokenText | None = None
    _char_limit: int | None = None

    @classmethod
    def create(cls, config: ServerConfig) -> "ServeState":
        metrics = ServeMetrics(config.served_model_name)
        return cls(config, AsyncEngineClient(metrics, config.max_queue), metrics)

    @property
    def media(self) -> MediaPolicy:
        c = self.config
        return MediaPolicy(c.allowed_local_media_path, c.allow_remote_media, c.max_image_pixels,
                           c.max_image_bytes, c.remote_media_timeout_s)

    @property
    def engine(self) -> Any:
        self.client.check_ready()
        return self.client.engine

    async def preprocess(self, build: Callable[[], T]) -> T:
        """Build prompts (template, tokenizer, image decoding: blocking) in a worker thread, timed."""
        t0 = time.monotonic()
        result = await asyncio.to_thread(build)
        self.metrics.observe_phase("preprocess", time.monotonic() - t0)
        return result

    @property
    def max_model_len(self) -> int:
        return self.engine.config.scheduler.max_model_len

    @property
    def prompt_char_limit(self) -> int:
        """Characters of prompt text that could still fit max-model-len tokens; longer is refused before
        tokenizing (tokenizing 10 MB holds the GIL for seconds: every request and /health would wait)."""
        if self._char_limit is None:
            self._char_limit = self.max_model_len * self.engine.tokenizer.max_token_chars
        return self._char_limit

    def check_prompt_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.prompt_char_limit:
            raise ServeError(f"the prompt's {num_chars} characters cannot fit in max-model-len {self.max_model_len} "
                             f"tokens (one token covers at most {self.engine.tokenizer.max_token_chars} characters "
                             f"here); shorten it", param=param, code="context_length_exceeded")

    @property
    def token_text(self) -> TokenText:
        if self._token_text is None:
            self._token_text = TokenText(self.engine.tokenizer)
        return self._token_text

    def log_request(self, request_id: str, prompt: Any, params: Any, stream: bool) -> None:
        """--log-requests: what one generation request asked for (sizes and sampling, not the text)."""
        if self.config.log_requests:
            request_log.info("%s: %d prompt tokens, %d images, max_tokens %d, temperature %g, top_p %g, "
                             "frequency_penalty %g, stream %s", request_id, len(prompt.prompt_token_ids),
                             len(prompt.images), params.max_tokens, params.temperature, params.top_p,
                             params.frequency_penalty, stream)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise ServeError(f"the model `{model}` does not exist; this server serves "
                             f"`{self.config.served_model_name}`", status=404, param="model",
                             code="model_not_found")
