"""Small pieces: API keys, SSE framing, token text/bytes, sampling params, metrics, server config."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from autoglm_trt.layers.sampler import TokenLogprob
from autoglm_trt.serve.auth import bearer_ok, check_bearer
from autoglm_trt.serve.config import ServerConfig
from autoglm_trt.serve.errors import ServeError
from autoglm_trt.serve.metrics import ServeMetrics
from autoglm_trt.serve.openai import protocol as P
from autoglm_trt.serve.openai.logprobs import CompletionLogprobs, TokenText, chat_logprobs, token_id_text
from autoglm_trt.serve.openai.sampling import sampling_params
from autoglm_trt.serve.openai.sse import DONE, event


def test_bearer_tokens():
    assert bearer_ok(None, None) and bearer_ok("anything", None)
    assert bearer_ok("Bearer k1", "k1") and bearer_ok("bearer  k1 ", "k1")
    for header in (None, "", "k1", "Bearer", "Bearer k2", "Basic k1", "Bearer k1x"):
        assert not bearer_ok(header, "k1")
    with pytest.raises(ServeError) as info:
        check_bearer("Bearer nope", "k1")
    assert info.value.status == 401 and info.value.code == "invalid_api_key"


def test_sse_framing():
    assert event({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert DONE == b"data: [DONE]\n\n"


def test_token_text_byte_level_pieces():
    class Backend:
        def id_to_token(self, i):
            return {1: "Ġhello", 2: "âĢ", 3: "<|user|>"}.get(i)

    tok = SimpleNamespace(backend=Backend(), added_token_ids=frozenset({3}),
                          decode=lambda ids, skip_special_tokens=True: "<|user|>")
    tt = TokenText(tok)
    assert tt(1) == (" hello", list(b" hello"))
    text, raw = tt(2)  # the first two bytes of a 3-byte UTF-8 character
    assert raw == [0xE2, 0x80] and text == "\ufffd"
    assert tt(3) == ("<|user|>", list(b"<|user|>"))
    assert token_id_text(42) == ("token_id:42", list(b"token_id:42"))


def test_logprob_formats():
    entries = [TokenLogprob(65, -0.1, [(65, -0.1), (66, -2.5)]), TokenLogprob(66, float("-inf"), [])]
    text = lambda i: (chr(i), [i])  # noqa: E731
    chat = chat_logprobs(entries, text, 1)
    assert chat["content"][0] == {"token": "A", "logprob": -0.1, "bytes": [65],
                                  "top_logprobs": [{"token": "A", "logprob": -0.1, "bytes": [65]}]}
    assert chat["content"][1]["logprob"] == -9999.0  # JSON has no -inf
    comp = CompletionLogprobs(text, 2, offset=3)
    out = comp.format(entries)
    assert out["tokens"] == ["A", "B"] and out["text_offset"] == [3, 4]
    assert out["top_logprobs"][0] == {"A": -0.1, "B": -2.5}
    json.dumps(chat), json.dumps(out)


def _chat(**fields) -> P.ChatCompletionRequest:
    return P.ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                   **fields})


def test_sampling_params_from_request():
    req = _chat(temperature=0.0, top_p=0.85, frequency_penalty=0.2, stop="END", seed=5, n=3, top_k=4,
                min_p=0.1, repetition_penalty=1.1, ignore_eos=True, skip_special_tokens=False)
    params = sampling_params(req, 3000, None, 10, 25480)
    assert len(params) == 3 and [p.seed for p in params] == [5, 6, 7]
    p = params[0]
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (3000, 0.0, 0.85, 4, 0.1)
    assert p.stop == ["END"] and p.ignore_eos and not p.skip_special_tokens and p.frequency_penalty == 0.2


def test_sampling_defaults_fill_the_context():
    (p,) = sampling_params(_chat(), None, 2, 100, 1000)
    assert p.max_tokens == 900 and p.logprobs == 2 and p.temperature == 1.0


def test_prompt_longer_than_the_context_names_both_numbers():
    with pytest.raises(ServeError, match="prompt has 120 tokens, but max_model_len is 100") as info:
        sampling_params(_chat(), None, None, 120, 100)
    assert info.value.param == "messages"


@pytest.mark.parametrize("fields,param", [({"top_p": 0.0}, "top_p"), ({"temperature": -1.0}, "temperature"),
                                          ({"frequency_penalty": 3.0}, "frequency_penalty"),
                                          ({"logit_bias": {"5": 1.0}}, "logit_bias"),
                                          ({"stop": [""]}, "stop")])
def test_sampling_range_errors_are_400(fields, param):
    with pytest.raises(ServeError) as info:
        sampling_params(_chat(**fields), 10, None, 5, 100)
    assert info.value.status == 400 and info.value.param == param


def test_metrics_exposition():
    m = ServeMetrics("autoglm-phone-9b")
    stats = SimpleNamespace(num_running=2, num_waiting=1, kv_usage=0.25, num_free_blocks=75,
                            num_total_blocks=100, prefix_cache_queries=40, prefix_cache_hits=10, spec=None)
    m.attach_engine(lambda: stats, lambda: 3)
    m.observe_first_token(0.05)
    m.observe_inter_token(0.02, 2)
    m.observe_finished(1.5, 100, 20, "stop")
    text = m.render().decode()
    for line in ('autoglm:num_requests_running{model_name="autoglm-phone-9b"} 2.0',
                 'autoglm:num_requests_waiting{model_name="autoglm-phone-9b"} 1.0',
                 'autoglm:kv_cache_usage_perc{model_name="autoglm-phone-9b"} 0.25',
                 'autoglm:kv_blocks_in_use{model_name="autoglm-phone-9b"} 25.0',
                 'autoglm:prefix_cache_hit_rate{model_name="autoglm-phone-9b"} 0.25',
                 'autoglm:prefix_cache_queries_total{model_name="autoglm-phone-9b"} 40.0',
                 'autoglm:prefix_cache_hits_total{model_name="autoglm-phone-9b"} 10.0',
                 'autoglm:prompt_tokens_total{model_name="autoglm-phone-9b"} 100.0',
                 'autoglm:generation_tokens_total{model_name="autoglm-phone-9b"} 20.0',
                 'autoglm:time_to_first_token_seconds_count{model_name="autoglm-phone-9b"} 1.0',
                 'autoglm:inter_token_latency_seconds_count{model_name="autoglm-phone-9b"} 2.0',
                 'autoglm:e2e_request_latency_seconds_count{model_name="autoglm-phone-9b"} 1.0',
                 'autoglm:num_requests_in_server{model_name="autoglm-phone-9b"} 3.0'):
        assert line in text, line


def test_metrics_before_the_engine_loads():
    m = ServeMetrics("x")
    m.attach_engine(lambda: None, lambda: 0)
    assert "autoglm:num_requests_running" not in m.render().decode()


@pytest.mark.parametrize("kwargs", [{"port": 70000}, {"grpc_port": -2}, {"max_queue": -1},
                                    {"reasoning_parser": "deepseek"}, {"served_model_name": ""},
                                    {"allowed_local_media_path": "/no/such/dir"}, {"max_pixels": 0}])
def test_server_config_validation(kwargs):
    with pytest.raises(ValueError):
        ServerConfig(**kwargs)
