"""The engine (paged KV, continuous batching, chunked prefill, preemption, prefix cache) gives exactly the
tokens of a lone sequence, and those equal transformers' greedy generate."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from autoglm_trt.engine.llm import LLM
from autoglm_trt.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=32)


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def _conversations() -> list[list[dict]]:
    img_a, img_b = _image(120, 90, 1), _image(60, 200, 2)
    return [
        [{"role": "user", "content": "Hello, who are you?"}],
        [{"role": "user", "content": [{"type": "image", "image": img_a}, {"type": "text", "text": "Tap the icon"}]}],
        [{"role": "system", "content": "You are a phone agent."},
         {"role": "user", "content": [{"type": "text", "text": "compare"}, {"type": "image", "image": img_a},
                                      {"type": "image", "image": img_b}, {"type": "text", "text": "which?"}]}],
        [{"role": "user", "content": "短一点"}],
    ]


@pytest.fixture(scope="module")
def llm(tiny_model_dir, our_model):
    return LLM(str(tiny_model_dir), device="cpu", dtype="float32", max_model_len=2048, num_blocks=256)


@pytest.fixture(scope="module")
def single_tokens(llm):
    """Reference: each conversation run alone."""
    return [llm.chat(c, GREEDY)[0].token_ids for c in _conversations()]


def _engine_blocks_free(llm: LLM) -> None:
    stats = llm.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "KV blocks leaked"
    assert stats.num_running == 0 and stats.num_waiting == 0


def test_greedy_equals_transformers(llm, hf_model):
    convs = _conversations()[:2]
    for conv in convs:
        prompt = llm.engine.processor.process_chat(conv)
        ours = llm.generate(prompt, GREEDY)[0].token_ids
        ids = torch.tensor([prompt.prompt_token_ids])
        kwargs = {}
        if prompt.images:
            kwargs = dict(pixel_values=torch.cat([torch.as_tensor(i.pixel_values) for i in prompt.images]),
                          image_grid_thw=torch.tensor([list(i.grid_thw) for i in prompt.images]),
                          mm_token_type_ids=(ids == 151343).int())
        with torch.no_grad():
            ref = hf_model.generate(ids, max_new_tokens=32, do_sample=False, **kwargs)[0, ids.shape[1]:].tolist()
        assert ours == ref[:len(ours)] and (len(ours) == 32 or len(ref) == len(ours))


def test_batched_equals_single(llm, single_tokens):
    outs = llm.chat(_conversations(), GREEDY)
    assert [o.token_ids for o in outs] == single_tokens
    _engine_blocks_free(llm)


def test_chunked_prefill_and_preemption(tiny_model_dir, single_tokens):
    # 12-token budget forces chunked prefill; 14 blocks of 16 cannot hold all four sequences: preemption.
    small = LLM(str(tiny_model_dir), device="cpu", dtype="float32", max_model_len=2048, num_blocks=14,
                max_num_batched_tokens=12)
    outs = small.chat(_conversations(), GREEDY)
    assert [o.token_ids for o in outs] == single_tokens
    _engine_blocks_free(small)


def test_prefix_cache_hits_give_same_tokens(llm, single_tokens):
    conv = _conversations()[2]
    first = llm.chat(conv, GREEDY)[0]
    again = llm.chat(conv, GREEDY)[0]
    assert again.num_cached_tokens >= 16 and again.token_ids == first.token_ids == single_tokens[2]
    # same placeholder tokens, different image: must not hit the image's blocks
    other = [{"role": "user", "content": [{"type": "text", "text": "compare"}, {"type": "image", "image": _image(60, 200, 9)},
                                          {"type": "image", "image": _image(60, 200, 2)}, {"type": "text", "text": "which?"}]}]
    assert llm.chat([{"role": "system", "content": "You are a phone agent."}, *other], GREEDY)[0].num_cached_tokens < 32
    _engine_blocks_free(llm)


def test_abort_frees_blocks(llm):
    engine = llm.engine
    for i in range(3):
        engine.add_request(f"abort-{i}", engine.processor.process_text("abort me " * (i + 1)), GREEDY)
    engine.step()
    for i in range(3):
        engine.abort_request(f"abort-{i}")
    _engine_blocks_free(llm)


def test_stop_string_and_max_tokens(llm, single_tokens):
    full = llm.chat(_conversations()[0], GREEDY)[0]
    assert full.finish_reason in ("length", "stop")
    text = full.text
    if len(text) > 6:
        stop = text[3:6]
        cut = llm.chat(_conversations()[0], SamplingParams(temperature=0.0, max_tokens=32, stop=[stop]))[0]
        assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]
    short = llm.chat(_conversations()[0], SamplingParams(temperature=0.0, max_tokens=5))[0]
    assert short.token_ids == single_tokens[0][:5] and short.finish_reason in ("length", "stop")
