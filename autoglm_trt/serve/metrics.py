"""Prometheus metrics of the server: request latencies and tokens (recorded by the async engine
client as outputs arrive) plus engine gauges read from the latest EngineStats at scrape time."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 0.75,
                  1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0)


# The phases of a request, in order (vLLM's names for queue, prefill and decode). Preprocess is one observation per
# API request (all its prompts and n choices; worker-thread wait and remote image downloads included); the others
# are one per engine sequence. Queue + prefill = the server's TTFT; prefill ends when the event loop hands the first
# token on, and on a GPU it holds the image's resize (done in the engine step). Requests aborted before their first
# token record no queue time.
_PHASES = (
    ("preprocess", "Building the prompt: chat template, tokenizer, image decoding (and resizing on a CPU).",
     _PHASE_BUCKETS),
    ("queue", "Handed to the engine until its prompt first ran (waiting for a slot or KV blocks).",
     _PHASE_BUCKETS),
    ("prefill", "Its prompt's first step (vision tower included) until the first token.", _PHASE_BUCKETS),
    ("decode", "First token to last token.", _E2E_BUCKETS),
)


class _EngineCollector:
    """Gauges and counters copied from the engine's stats when Prometheus scrapes."""

    def __init__(self, model_name: str, get_stats: Callable[[], Any],
                 get_in_flight: Callable[[], int]) -> None:
        self.labels = {"model_name": model_name}
        self.get_stats = get_stats
        self.get_in_flight = get_in_flight
        self.block_size: int | None = None  # set by ServeMetrics.describe_cache once the engine is loaded
        self.prefix_caching = True

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=list(self.labels))
        g.add_metric(list(self.labels.values()), value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=list(self.labels))
        c.add_metric(list(self.labels.values()), value)
        return c

    def collect(self):
        yield self._gauge("autoglm:num_requests_in_server", "Requests admitted by the server and "
                          "not finished (running, waiting or being prepared).", self.get_in_flight())
        s = self.get_stats()
        if s is None:  # still loading
            return
        used = s.num_total_blocks - s.num_free_blocks
        hit_rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        yield self._gauge("autoglm:num_requests_running", "Sequences in the running batch.", s.num_running)
        yield self._gauge("autoglm:num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield self._gauge("autoglm:kv_cache_usage_perc", "Fraction of KV blocks in use (0..1).", s.kv_usage)
        yield self._gauge("autoglm:kv_blocks_in_use", "KV blocks held by sequences.", used)
        yield self._gauge("autoglm:kv_blocks_total", "KV blocks of the cache.", s.num_total_blocks)
        yield self._gauge("autoglm:prefix_cache_hit_rate", "Prefix cache hits / queries (tokens), "
                          "since start.", hit_rate)
        yield self._counter("autoglm:prefix_cache_queries", "Prompt tokens looked up in the prefix "
                            "cache.", s.prefix_cache_queries)
        yield self._counter("autoglm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                            s.prefix_cache_hits)
        yield from self._gateway(s)
        if getattr(s, "spec", None) is not None:
            yield from self._spec_decode(s.spec)

    def _gateway(self, s):
        """The engine state under vLLM's names: Kubernetes gateways that pick pods by them (the Gateway API
        inference extension's endpoint picker, llm-d's scorers) read a `serve` pod as they read vLLM's."""
        yield self._gauge("vllm:num_requests_running", "Requests in the running batch.", s.num_running)
        yield self._gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield self._gauge("vllm:kv_cache_usage_perc", "KV cache usage; 1 means 100 percent.", s.kv_usage)
        yield self._gauge("vllm:gpu_cache_usage_perc", "KV cache usage; 1 means 100 percent (vLLM's name before "
                          "0.10, still read by older endpoint pickers).", s.kv_usage)
        yield self._counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            s.prefix_cache_queries)
        yield self._counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        if self.block_size is not None:
            info = GaugeMetricFamily("vllm:cache_config_info", "The KV cache's configuration (in the labels).",
                                     labels=["block_size", "num_gpu_blocks", "enable_prefix_caching"])
            info.add_metric([str(self.block_size), str(s.num_total_blocks), str(self.prefix_caching).lower()], 1)
            yield info

    def _spec_decode(self, spec):
        """Speculative decoding's counters, under vLLM's names (accepted / drafts = tokens gained per step)."""
        yield self._counter("vllm:spec_decode_num_drafts", "Rows verified with draft tokens.", spec.num_drafts)
        yield self._counter("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.", spec.num_draft_tokens)
        yield self._counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                            spec.num_accepted_tokens)
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted, by "
                                      "position in the draft.", labels=[*self.labels, "position"])
        for pos, n in enumerate(spec.accepted_per_pos):
            per_pos.add_metric([*self.labels.values(), str(pos)], n)
        yield per_pos


class ServeMetrics:
    """One registry per server (not the process-global one), so tests can run several servers."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.ttft = Histogram("autoglm:time_to_first_token_seconds", "Time to the first generated "
                              "token.", labels, buckets=_TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("autoglm:inter_token_latency_seconds", "Time between two generated "
                             "tokens of one request.", labels, buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("autoglm:e2e_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=_E2E_BUCKETS, registry=self.registry)
        self.phases = {name: Histogram(f"autoglm:request_{name}_time_seconds", doc, labels, buckets=buckets,
                                       registry=self.registry) for name, doc, buckets in _PHASES}
        self.prompt_tokens = Counter("autoglm:prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=self.registry)
        self.generation_tokens = Counter("autoglm:generation_tokens", "Tokens generated.", labels,
                                         registry=self.registry)
        self.request_success = Counter("autoglm:request_success", "Requests finished, by reason.",
                                       labels + ["finished_reason"], registry=self.registry)
        self.request_rejected = Counter("autoglm:request_rejected", "Requests refused before the "
                                        "engine, by HTTP status.", labels + ["status"],
                                        registry=self.registry)

    def attach_engine(self, get_stats: Callable[[], Any], get_in_flight: Callable[[], int]) -> None:
        self._engine = _EngineCollector(self.model_name, get_stats, get_in_flight)
        self.registry.register(self._engine)

    def describe_cache(self, block_size: int, prefix_caching: bool) -> None:
        """The KV cache's block size for vllm:cache_config_info (gateways hash prompts in blocks of this size)."""
        self._engine.block_size, self._engine.prefix_caching = block_size, prefix_caching

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def observe_inter_token(self, seconds: float, num_tokens: int) -> None:
        # NOTE: a step that yields k tokens at once (e.g. after a stop-string hold-back) counts as
        # k gaps of seconds/k, so the histogram's count matches the tokens generated.
        per_token = seconds / max(num_tokens, 1)
        child = self.itl.labels(self.model_name)
        for _ in range(max(num_tokens, 1)):
            child.observe(per_token)

    def observe_phase(self, name: str, seconds: float) -> None:
        """name: preprocess | queue | prefill | decode (see _PHASES)."""
        self.phases[name].labels(self.model_name).observe(max(seconds, 0.0))

    def observe_finished(self, e2e_seconds: float, prompt_tokens: int, output_tokens: int,
                         finish_reason: str | None) -> None:
        self.e2e.labels(self.model_name).observe(e2e_seconds)
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        self.generation_tokens.labels(self.model_name).inc(output_tokens)
        self.request_success.labels(self.model_name, finish_reason or "abort").inc()

    def observe_rejected(self, status: int) -> None:
        self.request_rejected.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
