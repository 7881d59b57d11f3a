"""`serve --speculative` / vLLM's `--speculative-config`, and speculation's counters in /metrics under vLLM's names."""

from __future__ import annotations

import pytest

from autoglm_trt.config import SpeculativeConfig
from autoglm_trt.engine.outputs import EngineStats
from autoglm_trt.engine.speculative import SpecStats
from autoglm_trt.errors import UserError
from autoglm_trt.serve.cli_commands import _engine_args
from autoglm_trt.serve.metrics import ServeMetrics


def _opts(**over) -> dict:
    o = dict(model_dir="m", max_model_len=None, max_num_seqs=None, max_num_batched_tokens=None,
             gpu_memory_utilization=None, tp=None, num_kv_blocks=None, block_size=None, dtype="auto", device="auto",
             enforce_eager=False, prefix_caching=True, seed=0, image_preprocess_device="auto", quantization=None,
             speculative=None, speculative_config=None)
    return {**o, **over}


def test_flags_map_to_the_engine_config():
    assert _engine_args(_opts()).speculative is None
    assert _engine_args(_opts(speculative="suffix")).speculative["method"] == "suffix"
    args = _engine_args(_opts(speculative_config='{"method": "ngram", "num_speculative_tokens": 5, '
                                                 '"prompt_lookup_max": 3, "disable_by_batch_size": 4}'))
    cfg = SpeculativeConfig.parse(args.speculative)
    assert (cfg.method, cfg.num_speculative_tokens, cfg.prompt_lookup_max, cfg.max_batch_size) == ("ngram", 5, 3, 4)


@pytest.mark.parametrize("over, match", [
    ({"speculative": "eagle"}, "method must be one of off, ngram, suffix"),
    ({"speculative_config": '{"method": "ngram", "draft_model": "x"}'}, "unknown key"),
    ({"speculative_config": "{not json"}, "speculative"),
    ({"speculative_config": '{"method": "ngram", "num_speculative_tokens": 99}'}, r"\[1, 32\]"),
])
def test_bad_values_are_one_clear_error(over, match):
    with pytest.raises(UserError, match=match):
        _engine_args(_opts(**over))


def test_metrics_use_vllm_spec_decode_names():
    m = ServeMetrics("autoglm-phone-9b")
    spec = SpecStats(num_drafts=10, num_draft_tokens=40, num_accepted_tokens=25, accepted_per_pos=[9, 8, 5, 3])
    m.attach_engine(lambda: EngineStats(1, 0, 0.1, 90, 100, 0, 0, spec=spec), lambda: 1)
    text = m.render().decode()
    assert 'vllm:spec_decode_num_drafts_total{model_name="autoglm-phone-9b"} 10.0' in text
    assert 'vllm:spec_decode_num_draft_tokens_total{model_name="autoglm-phone-9b"} 40.0' in text
    assert 'vllm:spec_decode_num_accepted_tokens_total{model_name="autoglm-phone-9b"} 25.0' in text
    assert 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="autoglm-phone-9b",position="2"} 5.0' in text
    m2 = ServeMetrics("x")
    m2.attach_engine(lambda: EngineStats(1, 0, 0.1, 90, 100, 0, 0), lambda: 1)
    assert "spec_decode" not in m2.render().decode()
