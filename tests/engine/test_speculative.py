"""Speculative decoding from n-gram matches (engine/speculative.py): exactly plain greedy decoding's tokens on
the tiny model, with penalties, stop strings, max_tokens inside a draft, aborts, preemption, prefix-cache hits,
images and batches that mix speculating and sampled rows; and more than one token per step where the text
repeats."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from autoglm_trt.config import SpeculativeConfig
from autoglm_trt.engine.llm import LLM
from autoglm_trt.engine.sampling_params import SamplingParams
from autoglm_trt.engine.speculative import NgramIndex, Proposer, SuffixCache

KW = dict(device="cpu", dtype="float32", max_model_len=1024, num_blocks=96)
PROMPTS = ["Open the settings app", "打开微信，给妈妈发消息", "a b c d e f g h " * 5, "Swipe up twice"]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return LLM(str(tiny_model_dir), **KW)


@pytest.fixture(scope="module")
def spec(tiny_model_dir):
    return LLM(str(tiny_model_dir), speculative="ngram", **KW)


def _free(llm: LLM) -> None:
    s = llm.engine.get_stats()
    assert s.num_free_blocks == s.num_total_blocks and s.num_running == s.num_waiting == 0


def test_ngram_index_finds_the_latest_longest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3]
    idx = NgramIndex(1, 3)
    idx.extend(tokens, len(tokens) - 1)
    assert idx.continuation(tokens, 3) == [7, 5, 1]  # after the latest earlier "1 2 3"
    assert idx.continuation([4, 4], 2) == []
    loop = [8, 1, 2, 1, 2]  # "1 2" last seen 2 tokens back: the loop goes on
    idx = NgramIndex(1, 2)
    idx.extend(loop, len(loop) - 1)
    assert idx.continuation(loop, 5) == [1, 2, 1, 2, 1]


def test_suffix_cache_matches_other_requests_and_evicts():
    cache = SuffixCache(capacity=1, n_min=1, n_max=2)
    cache.add("a", [5, 6, 7, 8])
    assert cache.continuation([1, 5, 6], 2) == [7, 8]
    cache.add("b", [9, 10, 11])
    assert cache.continuation([1, 5, 6], 2) == [] and cache.continuation([9], 2) == [10, 11]


def test_draft_length_adapts_to_acceptance():
    p = Proposer(SpeculativeConfig(method="ngram", num_speculative_tokens=8))
    seq = type("S", (), {"request_id": "r", "token_ids": [1, 2, 3, 1, 2, 3, 1, 2], "finish_reason": None,
                         "output_token_ids": []})()
    assert p.propose(seq, 8) == [3, 1, 2, 3, 1, 2, 3, 1]
    p.record(seq, 3, 0)
    assert p.rows["r"].k == 2 and len(p.propose(seq, 8)) == 2
    p.record(seq, 2, 2)
    assert p.rows["r"].k == 4 and p.stats.num_accepted_tokens == 2 and p.stats.accepted_per_pos[:2] == [1, 1]


def test_same_tokens_as_plain_greedy_with_penalties_and_a_sampled_row(plain, spec):
    params = [greedy(60), greedy(47, frequency_penalty=0.2), greedy(50, presence_penalty=0.5, repetition_penalty=1.1),
              SamplingParams(temperature=0.8, seed=3, max_tokens=30, ignore_eos=True)]
    a, b = plain.generate(PROMPTS, params), spec.generate(PROMPTS, params)
    assert [x.token_ids for x in b] == [x.token_ids for x in a]
    assert [len(x.token_ids) for x in b] == [60, 47, 50, 30]  # max_tokens kept inside drafts
    assert spec.engine.get_stats().spec.num_draft_tokens > 0, "nothing was speculated"
    _free(spec)


def test_repeating_text_accepts_more_than_one_token_per_step(plain, tiny_model_dir):
    llm = LLM(str(tiny_model_dir), speculative="ngram", **KW)
    prompt = "1 2 3 4 " * 20  # random weights answer a repeating prompt with a loop
    ref = plain.generate(prompt, greedy(120))[0].token_ids
    assert llm.generate(prompt, greedy(120))[0].token_ids == ref
    s = llm.engine.get_stats().spec
    assert s.num_accepted_tokens / s.num_drafts > 1.0, s


class _IdText:
    """Detokenizer stand-in: token t reads "<t>" (the tiny model's random ids mostly decode to "")."""

    def step(self, ids: list[int]) -> str:
        return "".join(f"<{t}>" for t in ids)


def _run_with_stop(llm: LLM, prompt: str, stop: str) -> tuple[list[int], str, str]:
    engine = llm.engine
    engine.add_request("stop", engine.processor.process_text(prompt), greedy(100, stop=[stop]))
    engine.output.text_state("stop").detok = _IdText()
    ids, text, reason = [], "", None
    while engine.has_unfinished_requests():
        for o in engine.step():
            ids, text, reason = ids + o.new_token_ids, text + o.new_text, o.finish_reason
    return ids, text, reason


def test_stop_strings_and_stop_tokens_inside_a_draft(plain, spec):
    prompt = "1 2 3 4 " * 20
    ref = plain.generate(prompt, greedy(100))[0].token_ids
    k = next(i for i in range(30, 100) if ref[i] in ref[:i])  # a token the drafts predict, late in the reply
    first = ref.index(ref[k])
    out = spec.generate(prompt, greedy(100, stop_token_ids=[ref[k]]))[0]
    assert out.token_ids == ref[:first + 1] and out.finish_reason == "stop"
    stop = f"<{ref[k]}>"
    for llm in (plain, spec):
        ids, text, reason = _run_with_stop(llm, prompt, stop)
        assert (ids, text, reason) == (ref[:first + 1], "".join(f"<{t}>" for t in ref[:first]), "stop")
    _free(spec)


def test_image_prompts_prefix_hits_and_aborts(plain, spec):
    g = torch.Generator().manual_seed(5)
    image = Image.fromarray(torch.randint(0, 256, (90, 120, 3), generator=g, dtype=torch.uint8).numpy())
    conv = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Tap it"}]}]
    ref = plain.chat(conv, greedy(40))[0].token_ids
    assert spec.chat(conv, greedy(40))[0].token_ids == ref
    again = spec.chat(conv, greedy(40))[0]  # the prompt's blocks come from the prefix cache now
    assert again.token_ids == ref and again.num_cached_tokens > 0
    engine = spec.engine
    for i, p in enumerate(PROMPTS[:2]):
        engine.add_request(f"ab{i}", engine.processor.process_text(p), greedy(60))
    got: dict[str, list[int]] = {}
    for _ in range(6):
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    engine.abort_request("ab0")
    while engine.has_unfinished_requests():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert got["ab1"] == plain.generate(PROMPTS[1], greedy(60))[0].token_ids
    _free(spec)


def test_preemption_keeps_the_tokens(plain, tiny_model_dir):
    small = LLM(str(tiny_model_dir), speculative="suffix", device="cpu", dtype="float32", max_model_len=1024,
                num_blocks=12)  # 192 tokens of KV for 4 requests of up to ~100: someone is preempted
    sched, preempted = small.engine.scheduler, []
    preempt = sched._preempt
    sched._preempt = lambda seq: (preempted.append(seq.request_id), preempt(seq))
    params = [greedy(70), greedy(64, frequency_penalty=0.3), greedy(70), greedy(50)]
    a, b = plain.generate(PROMPTS, params), small.generate(PROMPTS, params)
    assert [x.token_ids for x in b] == [x.token_ids for x in a]
    assert preempted and small.engine.get_stats().spec.num_draft_tokens > 0
    _free(small)


def test_rows_whose_drafts_do_not_pay_mostly_stop_speculating():
    p = Proposer(SpeculativeConfig(method="ngram", num_speculative_tokens=4))
    seq = type("S", (), {"request_id": "r", "token_ids": [1, 2, 1, 2, 1], "finish_reason": None,
                         "output_token_ids": []})()
    assert p.wants(seq) and p.propose(seq, 8)
    for _ in range(4):
        p.record(seq, 2, 0)  # four verifications, nothing accepted
    assert not p.wants(seq)
    drafts = [p.propose(seq, 8) for _ in range(16)]
    assert sum(1 for d in drafts if d) == 2  # a probe every 8 steps
    good = type("S", (), {"request_id": "g", "token_ids": [1, 2, 1, 2, 1], "finish_reason": None,
                          "output_token_ids": []})()
    p.propose(good, 8)
    for _ in range(4):
        p.record(good, 2, 2)
    assert p.wants(good) and p.propose(good, 8)


def test_verification_is_a_decode_batch_of_one_row_per_position(tiny_model_dir, plain):
    """So a GPU verifies inside the decode CUDA graphs: each position a row, seq_len its index + 1."""
    llm = LLM(str(tiny_model_dir), speculative="ngram", **KW)
    runner, seen = llm.engine.runner, []
    forward = runner.forward_logits

    def spy(batch):
        if batch.is_decode and len(set(map(tuple, batch.block_tables))) < len(batch.block_tables):
            seen.append(list(batch.seq_lens))  # several rows share a sequence: a verification
        return forward(batch)

    runner.forward_logits = spy
    prompt = "1 2 3 4 " * 20
    assert llm.generate(prompt, greedy(60))[0].token_ids == plain.generate(prompt, greedy(60))[0].token_ids
    assert seen and all(lens == list(range(lens[0], lens[0] + len(lens))) for lens in seen)
