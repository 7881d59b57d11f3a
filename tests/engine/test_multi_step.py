"""Multi-step greedy decode with pipelined windows, on the CPU (the decode "graphs" run eagerly there):
the engine launches window N+1 before it applies window N's tokens, and must still give exactly the
single-step tokens when sequences stop mid-window, are aborted while a window is in flight, or
new requests arrive; and it must leak no KV block."""

from __future__ import annotations

import pytest

from autoglm_trt.engine.llm import LLM
from autoglm_trt.engine.sampling_params import SamplingParams

PROMPTS = ["Open the settings app", "打开微信，给妈妈发消息", "a b c d e f g h " * 5, "Swipe up twice"]
KW = dict(device="cpu", dtype="float32", max_model_len=512, num_blocks=128, cuda_graph_batch_sizes=(1, 2, 4))


@pytest.fixture(scope="module")
def single(tiny_model_dir, our_model):
    return LLM(str(tiny_model_dir), num_decode_steps=1, **KW)


@pytest.fixture(scope="module")
def multi(tiny_model_dir, our_model):
    llm = LLM(str(tiny_model_dir), num_decode_steps=4, **KW)  # on the CPU the multi-step buffers run eagerly
    calls = {"continued": 0}
    graphs = llm.engine.runner.graphs
    cont = graphs.continue_multi

    def counting(*a, **k):
        calls["continued"] += 1
        return cont(*a, **k)

    graphs.continue_multi = counting
    llm.calls = calls
    return llm


def _free(llm: LLM) -> None:
    stats = llm.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "KV blocks leaked"
    assert stats.num_running == stats.num_waiting == 0
    assert llm.engine._inflight is None


def test_windows_equal_single_step(single, multi):
    params = [SamplingParams(temperature=0.0, max_tokens=23, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=17, frequency_penalty=0.4, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=30, presence_penalty=0.5, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)]
    before = multi.calls["continued"]
    a, b = single.generate(PROMPTS, params), multi.generate(PROMPTS, params)
    assert [x.token_ids for x in b] == [x.token_ids for x in a]
    assert [x.text for x in b] == [x.text for x in a]
    assert [len(x.token_ids) for x in b] == [23, 17, 30, 9]
    assert multi.calls["continued"] > before, "no window was pipelined"
    _free(multi)


def test_stop_token_mid_window(single, multi):
    ref = single.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0].token_ids
    stop_at = next(i for i in range(6, 24) if ref[i] not in ref[:i])  # first occurrence, mid-stream
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[ref[stop_at]])
    out = multi.generate([PROMPTS[0], PROMPTS[2]], [params, SamplingParams(temperature=0.0, max_tokens=24,
                                                                            ignore_eos=True)])
    assert out[0].token_ids == ref[:stop_at + 1] and out[0].finish_reason == "stop"
    _free(multi)


class _IdText:
    """Detokenizer stand-in: token t reads "<t>" (the tiny model's random ids mostly decode to "")."""

    def step(self, ids: list[int]) -> str:
        return "".join(f"<{t}>" for t in ids)


def _run_with_stop(llm: LLM, prompt: str, stop: str) -> tuple[list[int], str, str]:
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop])
    engine.add_request("stop", engine.processor.process_text(prompt), params)
    engine.output.text_state("stop").detok = _IdText()
    ids, text, reason = [], "", None
    while engine.has_unfinished_requests():
        for o in engine.step():
            ids, text, reason = ids + o.new_token_ids, text + o.new_text, o.finish_reason
    return ids, text, reason


def test_stop_string_while_next_window_runs(single, multi):
    ref = single.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0].token_ids
    k = next(i for i in range(6, 30) if ref[i] not in ref[:i])
    want = "".join(f"<{t}>" for t in ref[:k])
    for llm in (single, multi):
        ids, text, reason = _run_with_stop(llm, PROMPTS[2], f"<{ref[k]}>")
        assert reason == "stop" and text == want and ids[:k + 1] == ref[:k + 1]
    _free(multi)


def test_abort_and_arrival_while_a_window_is_in_flight(single, multi):
    engine, greedy = multi.engine, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i, p in enumerate(PROMPTS[:3]):
        engine.add_request(f"r{i}", engine.processor.process_text(p), greedy)
    got: dict[str, list[int]] = {}
    for _ in range(4):  # prefill, then windows; the last call leaves the next window on the device
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert engine._inflight is not None and engine._inflight.out.continues, "expected a window in flight"
    engine.abort_request("r1")
    engine.add_request("late", engine.processor.process_text(PROMPTS[3]), greedy)
    while engine.has_unfinished_requests():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    ref = [o.token_ids for o in single.generate([PROMPTS[0], PROMPTS[2], PROMPTS[3]], greedy)]
    assert [got["r0"], got["r2"], got["late"]] == ref
    assert len(got.get("r1", [])) < 40
    _free(multi)
