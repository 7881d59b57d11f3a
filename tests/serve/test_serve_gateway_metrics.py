"""/metrics carries the engine state under vLLM's names, as Kubernetes gateways read it (the Gateway API
inference extension's endpoint picker, llm-d): exposition checked here; a real `serve` in test_serve_ray.py."""

from __future__ import annotations

import re
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from autoglm_trt.serve.metrics import ServeMetrics


def _stats(**kw):
    base = dict(num_running=3, num_waiting=2, kv_usage=0.4, num_free_blocks=60, num_total_blocks=100,
                prefix_cache_queries=400, prefix_cache_hits=250, spec=None)
    return SimpleNamespace(**{**base, **kw})


def _samples(text: str) -> dict[str, float]:
    """name{labels} -> value, parsed by Prometheus' own parser (so the exposition is valid)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def test_gateway_gauges_under_vllm_names():
    m = ServeMetrics("autoglm-phone-9b")
    m.attach_engine(lambda: _stats(), lambda: 5)
    m.describe_cache(16, True)
    got = _samples(m.render().decode())
    name = 'model_name="autoglm-phone-9b"'
    assert got[f"vllm:num_requests_running{{{name}}}"] == 3
    assert got[f"vllm:num_requests_waiting{{{name}}}"] == 2
    assert got[f"vllm:kv_cache_usage_perc{{{name}}}"] == 0.4
    assert got[f"vllm:gpu_cache_usage_perc{{{name}}}"] == 0.4
    assert got[f"vllm:prefix_cache_queries_total{{{name}}}"] == 400
    assert got[f"vllm:prefix_cache_hits_total{{{name}}}"] == 250
    assert got['vllm:cache_config_info{block_size="16",enable_prefix_caching="true",num_gpu_blocks="100"}'] == 1


def test_gateway_metrics_follow_the_engine_and_wait_for_it():
    stats = {"now": None}
    m = ServeMetrics("m")
    m.attach_engine(lambda: stats["now"], lambda: 0)
    assert "vllm:" not in m.render().decode()  # still loading: no engine numbers at all
    stats["now"] = _stats(num_waiting=7, kv_usage=0.9)
    text = m.render().decode()
    assert re.search(r'^vllm:num_requests_waiting\{model_name="m"\} 7\.0$', text, re.M)
    assert re.search(r'^vllm:kv_cache_usage_perc\{model_name="m"\} 0\.9$', text, re.M)
    assert "vllm:cache_config_info" not in text  # no block size described yet
