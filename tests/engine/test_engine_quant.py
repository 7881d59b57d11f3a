"""LLM(quant=...) quantizes after loading and still tracks the float model's greedy tokens (CPU)."""

from __future__ import annotations

import pytest

from autoglm_trt.engine.llm import LLM
from autoglm_trt.engine.sampling_params import SamplingParams

PROMPTS = ["Open the settings app", "打开微信，给妈妈发消息", "scroll down and tap the third item"]


@pytest.mark.parametrize("quant", ["int8-wo", "w8a8", "fp8"])
def test_quantized_engine_tracks_float(tiny_model_dir, quant):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    kw = dict(device="cpu", dtype="float32", max_model_len=512, num_blocks=64)
    ref = [o.token_ids for o in LLM(str(tiny_model_dir), **kw).generate(PROMPTS, params)]
    llm = LLM(str(tiny_model_dir), quant=quant, **kw)
    assert llm.engine.model.quant_config is not None
    got = [o.token_ids for o in llm.generate(PROMPTS, params)]
    first = sum(r[0] == g[0] for r, g in zip(ref, got))
    assert first >= 2, f"{quant}: first greedy token agrees on only {first}/3 prompts"
