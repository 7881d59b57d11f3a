"""On a GPU: the engine (Triton kernels, CUDA graphs) gives the CPU reference's greedy tokens on the tiny
model, and a CUDA-graph replay gives the eager step's logits."""

from __future__ import annotations

import pytest
import torch

from autoglm_trt.engine.llm import LLM
from autoglm_trt.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = ["Open the settings app", "打开微信，给妈妈发消息", "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 6]


def _tokens(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    return [o.token_ids for o in llm.generate(PROMPTS, params)]


def test_gpu_engine_matches_cpu(tiny_model_dir):
    cpu = _tokens(LLM(str(tiny_model_dir), device="cpu", dtype="float32", num_blocks=64, max_model_len=1024))
    gpu = LLM(str(tiny_model_dir), device="cuda", dtype="float32", max_model_len=1024,
              num_blocks=256, cuda_graph_batch_sizes=(1, 2, 4))
    assert gpu.engine.runner.graphs is not None
    assert _tokens(gpu) == cpu


def test_cuda_graph_replay_equals_eager(tiny_model_dir):
    kw = dict(device="cuda", dtype="float32", max_model_len=1024, num_blocks=256)
    graphs = LLM(str(tiny_model_dir), cuda_graph_batch_sizes=(1, 2, 4), **kw)
    eager = LLM(str(tiny_model_dir), enforce_eager=True, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=5)
    a = graphs.generate(PROMPTS, params)
    b = eager.generate(PROMPTS, params)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        diffs = [abs(p.logprob - q.logprob) for p, q in zip(x.logprobs, y.logprobs)]
        assert max(diffs) < 1e-3


def test_bf16_engine_tracks_fp32(tiny_model_dir):
    ref = _tokens(LLM(str(tiny_model_dir), device="cuda", dtype="float32", max_model_len=1024,
                      num_blocks=256, cuda_graph_batch_sizes=(1, 2, 4)))
    bf16 = _tokens(LLM(str(tiny_model_dir), device="cuda", dtype="bfloat16", max_model_len=1024,
                       num_blocks=256, cuda_graph_batch_sizes=(1, 2, 4)))
    agree = sum(a == b for r, s in zip(ref, bf16) for a, b in zip(r, s)) / sum(len(r) for r in ref)
    assert agree >= 0.5, f"bf16 greedy agrees with fp32 on only {agree:.0%} of tokens"


def test_multi_step_decode_equals_single_step(tiny_model_dir):
    """K greedy tokens per CPU round trip give the single-step tokens, penalties and early stops included."""
    kw = dict(device="cuda", dtype="float32", max_model_len=1024, num_blocks=256, cuda_graph_batch_sizes=(1, 2, 4))
    single = LLM(str(tiny_model_dir), num_decode_steps=1, **kw)
    multi = LLM(str(tiny_model_dir), num_decode_steps=8, **kw)
    params = [SamplingParams(temperature=0.0, max_tokens=29, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=21, frequency_penalty=0.2, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=40, presence_penalty=0.5)]
    a = single.generate(PROMPTS, params)
    b = multi.generate(PROMPTS, params)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    assert [x.text for x in a] == [y.text for y in b]
    assert [len(x.token_ids) for x in b][:2] == [29, 21]
    stats = multi.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_speculation_in_cuda_graphs_gives_greedy_tokens(tiny_model_dir):
    """Drafts verified through the decode CUDA graphs (one row per position) and structured outputs on the GPU
    keep plain greedy decoding's tokens / the grammar."""
    from autoglm_trt.processing.structured import StructuredOutputs

    kw = dict(device="cuda", dtype="float32", max_model_len=1024, num_blocks=256, cuda_graph_batch_sizes=(1, 2, 4, 8, 16))
    plain, spec = LLM(str(tiny_model_dir), **kw), LLM(str(tiny_model_dir), speculative="ngram", **kw)
    prompts = ["1 2 3 4 " * 20, *PROMPTS]
    params = [SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=40, frequency_penalty=0.2, ignore_eos=True)]
    for p in params:
        assert [o.token_ids for o in spec.generate(prompts, p)] == [o.token_ids for o in plain.generate(prompts, p)]
    assert spec.engine.get_stats().spec.num_accepted_tokens > 0
    so = StructuredOutputs.regex(r"(Tap|Swipe) \[[0-9]{1,3},[0-9]{1,3}\]")
    outs = plain.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=so))
    import re

    assert all(re.fullmatch(r"(Tap|Swipe) \[[0-9]{1,3},[0-9]{1,3}\]", o.text) for o in outs)
