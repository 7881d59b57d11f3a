import random

import pytest

from autoglm_trt.config import CacheConfig, SchedulerConfig
from autoglm_trt.engine.sampling_params import SamplingParams
from autoglm_trt.engine.scheduler import Scheduler
from autoglm_trt.engine.sequence import Sequence, SequenceStatus
from autoglm_trt.errors import RequestError

EOS = 2
BS = 8


def make_sched(num_blocks=64, budget=64, max_seqs=8, max_model_len=1024, prefix=True):
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                     max_model_len=max_model_len),
                     CacheConfig(block_size=BS, enable_prefix_caching=prefix), num_blocks,
                     eos_token_ids=[EOS])


def make_seq(rid, n, arrival, base=10, **params):
    params.setdefault("max_tokens", 4)
    return Sequence(rid, [base + i for i in range(n)], SamplingParams(**params), arrival_time=arrival)


def fake_model(seq):
    """Deterministic 'next token' from the whole context (never EOS unless a test wants it)."""
    return 100 + (sum(seq.token_ids) * 31 + seq.num_tokens) % 900


def step(sched, model=fake_model):
    out = sched.schedule()
    sampled = [[model(s.seq)] if s.samples else [] for s in out.scheduled]
    finished = sched.update(out, sampled)
    sched.check_invariants()
    return out, finished


def run_all(sched, model=fake_model, max_steps=1000):
    outputs = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        outputs.append(step(sched, model))
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    return outputs


def test_single_sequence_prefill_then_decode():
    sched = make_sched()
    seq = make_seq("a", 10, 0.0, max_tokens=3)
    sched.add(seq)
    out, fin = step(sched)
    assert [(s.seq.request_id, s.start, s.num_new_tokens) for s in out.scheduled] == [("a", 0, 10)]
    assert not out.is_decode and out.num_batched_tokens == 10 and seq.num_output_tokens == 1
    out, fin = step(sched)
    assert out.is_decode and out.scheduled[0].start == 10 and out.sampling_seqs == [seq]
    out, fin = step(sched)
    assert fin == [seq] and seq.status is SequenceStatus.FINISHED_LENGTH
    assert seq.finish_reason == "length" and seq.num_output_tokens == 3 and seq.block_table == []
    assert sched.block_manager.num_free_blocks == 64


def test_eos_stop_tokens_and_ignore_eos():
    sched = make_sched()
    a = make_seq("a", 4, 0.0, max_tokens=10)
    b = make_seq("b", 4, 1.0, max_tokens=3, ignore_eos=True)
    c = make_seq("c", 4, 2.0, max_tokens=10, stop_token_ids=[7])
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    fin = sched.update(out, [[EOS], [EOS], [7]])
    assert fin == [a, c] and a.finish_reason == "stop" and c.finish_reason == "stop"
    assert a.output_token_ids == [EOS] and b.status is SequenceStatus.RUNNING
    run_all(sched, model=lambda s: EOS)
    assert b.output_token_ids == [EOS] * 3 and b.finish_reason == "length"


def test_max_model_len_finishes_with_length():
    sched = make_sched(max_model_len=12)
    seq = make_seq("a", 10, 0.0, max_tokens=100)
    sched.add(seq)
    run_all(sched)
    assert seq.num_tokens == 12 and seq.finish_reason == "length"


def test_chunked_prefill_splits_long_prompt():
    sched = make_sched(budget=16)
    seq = make_seq("a", 40, 0.0, max_tokens=2)
    sched.add(seq)
    chunks = []
    for _ in range(3):
        out, _ = step(sched)
        chunks.append((out.scheduled[0].start, out.scheduled[0].num_new_tokens, out.scheduled[0].samples))
    assert chunks == [(0, 16, False), (16, 16, False), (32, 8, True)]
    assert seq.output_token_ids == [fake_model(Sequence("x", list(range(10, 50))))]
    run_all(sched)


def test_unsampled_chunks_ignore_tokens_and_sampling_chunks_need_one():
    sched = make_sched(budget=16)
    seq = make_seq("a", 20, 0.0)
    sched.add(seq)
    out = sched.schedule()
    sched.update(out, [[123]])  # a token for an unfinished chunk is ignored
    assert seq.num_output_tokens == 0 and seq.num_computed_tokens == 16
    out = sched.schedule()
    with pytest.raises(ValueError, match="needs a sample"):
        sched.update(out, [[]])
    with pytest.raises(ValueError, match="token lists"):
        sched.update(out, [])


def test_token_budget_and_max_num_seqs_respected():
    sched = make_sched(num_blocks=256, budget=20, max_seqs=3)
    rng = random.Random(0)
    for i in range(10):
        sched.add(make_seq(f"r{i}", rng.randint(1, 30), float(i), max_tokens=rng.randint(1, 6)))
    for out, _ in run_all(sched):
        assert 0 < out.num_batched_tokens <= 20
        assert len(out.scheduled) <= 3 and len({s.seq.request_id for s in out.scheduled}) == len(out.scheduled)


def test_running_first_then_waiting_in_priority_and_arrival_order():
    sched = make_sched(budget=100, max_seqs=2)
    sched.add(make_seq("late", 4, 3.0))
    sched.add(make_seq("early", 4, 1.0))
    sched.add(make_seq("urgent", 4, 5.0, priority=-1))
    out, _ = step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["urgent", "early"]
    sched.add(make_seq("vip", 4, 6.0, priority=-5))
    out, _ = step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["urgent", "early"]  # running first, full
    assert [s.request_id for s in sched.waiting] == ["vip", "late"]


def test_decode_batch_mixes_with_new_prefill():
    sched = make_sched(budget=10)
    sched.add(make_seq("a", 4, 0.0, max_tokens=5))
    step(sched)
    sched.add(make_seq("b", 20, 1.0))
    out, _ = step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 9)]
    assert not out.is_decode


def outputs_of(sched_factory, prompts):
    sched = sched_factory()
    seqs = [make_seq(f"r{i}", n, float(i), base=10 * i, max_tokens=m) for i, (n, m) in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    steps = run_all(sched)
    return [s.output_token_ids for s in seqs], steps


def test_preemption_by_recompute_and_resumption():
    prompts = [(8, 20), (8, 20)]
    expected, _ = outputs_of(lambda: make_sched(num_blocks=64), prompts)
    got, steps = outputs_of(lambda: make_sched(num_blocks=5, prefix=False), prompts)
    assert got == expected  # recompute keeps outputs identical
    preempted = [p.request_id for out, _ in steps for p in out.preempted]
    assert preempted and set(preempted) == {"r1"}  # the most recently arrived goes


def test_preempted_sequence_state_and_requeue():
    sched = make_sched(num_blocks=4, prefix=False)  # 32 token slots
    a, b = make_seq("a", 8, 0.0, max_tokens=50), make_seq("b", 8, 1.0, max_tokens=50)
    sched.add(a)
    sched.add(b)
    for _ in range(20):
        out, _ = step(sched)
        if out.preempted:
            break
    assert out.preempted == [b] and b.status is SequenceStatus.PREEMPTED
    assert b.num_computed_tokens == 0 and b.block_table == [] and b.num_output_tokens > 0
    assert sched.waiting == [b] and [s.seq for s in out.scheduled] == [a]
    first_scheduled = b.first_scheduled_time
    assert first_scheduled is not None and a.first_scheduled_time <= first_scheduled
    tokens_before = b.num_tokens
    sched.abort("a")
    out, _ = step(sched)
    assert out.scheduled[0].seq is b and out.scheduled[0].num_new_tokens == tokens_before
    assert out.scheduled[0].samples and b.num_tokens == tokens_before + 1
    assert b.num_cached_tokens == 0  # only the first admission reports cached tokens
    assert b.first_scheduled_time == first_scheduled  # its queue time ended at its first admission


def test_preemption_prefers_lower_priority():
    sched = make_sched(num_blocks=4, prefix=False)
    a = make_seq("a", 8, 0.0, max_tokens=50, priority=5)
    b = make_seq("b", 8, 1.0, max_tokens=50)
    sched.add(a)
    sched.add(b)
    outs = [step(sched)[0] for _ in range(20)]
    assert [p.request_id for o in outs for p in o.preempted][0] == "a"


def test_abort_waiting_and_running_frees_blocks_at_once():
    sched = make_sched(budget=16, max_seqs=1)
    run, wait = make_seq("run", 20, 0.0), make_seq("wait", 5, 1.0)
    sched.add(run)
    sched.add(wait)
    step(sched)
    assert run.block_table and sched.block_manager.num_free_blocks < 64
    assert sched.abort("wait") is wait and sched.abort("run") is run
    assert sched.abort("run") is None and sched.abort("nope") is None
    assert sched.block_manager.num_free_blocks == 64 and not sched.has_unfinished()
    assert wait.status is SequenceStatus.FINISHED_ABORTED and run.finish_reason == "abort"
    out = sched.schedule()
    assert out.scheduled == [] and out.finished_aborted == [wait, run]
    assert sched.schedule().finished_aborted == []
    sched.check_invariants()


def test_update_skips_sequences_aborted_after_schedule():
    sched = make_sched()
    seq = make_seq("a", 4, 0.0)
    sched.add(seq)
    out = sched.schedule()
    sched.abort("a")
    assert sched.update(out, [[5]]) == [] and seq.num_output_tokens == 0


def test_finish_for_stop_strings():
    sched = make_sched()
    seq = make_seq("a", 4, 0.0, max_tokens=10)
    sched.add(seq)
    step(sched)
    sched.finish(seq, "stop")
    assert seq.finish_reason == "stop" and sched.block_manager.num_free_blocks == 64
    sched.finish(seq, "abort")  # already finished: no-op
    assert seq.finish_reason == "stop"
    with pytest.raises(ValueError, match="finish reason"):
        sched.finish(seq, "done")


def test_add_rejects_impossible_requests():
    sched = make_sched(num_blocks=2, max_model_len=30)
    with pytest.raises(RequestError, match="KV cache holds only 16"):
        sched.add(make_seq("big", 17, 0.0))
    with pytest.raises(RequestError, match="max_model_len"):
        make_sched(max_model_len=10).add(make_seq("long", 10, 0.0))
    sched.add(make_seq("a", 3, 0.0))
    with pytest.raises(RequestError, match="already in use"):
        sched.add(make_seq("a", 3, 1.0))


def test_lone_sequence_at_kv_capacity_finishes_instead_of_looping():
    sched = make_sched(num_blocks=2)  # 16 token slots
    seq = make_seq("a", 16, 0.0, max_tokens=100)
    sched.add(seq)
    run_all(sched, max_steps=5)
    assert seq.finish_reason == "length" and seq.num_tokens == 17


def test_prefix_cache_through_scheduler():
    sched = make_sched()
    a = make_seq("a", 30, 0.0, max_tokens=1)
    sched.add(a)
    run_all(sched)
    b = make_seq("b", 30, 1.0, max_tokens=1)
    sched.add(b)
    out, _ = step(sched)
    assert b.num_cached_tokens == 24 and out.scheduled[0].start == 24
    assert out.scheduled[0].num_new_tokens == 6
    assert sched.block_manager.prefix_cache_hits == 24
    assert sched.block_manager.prefix_cache_queries == 60


def test_random_workload_never_leaks_blocks():
    rng = random.Random(1234)
    sched = make_sched(num_blocks=8, budget=24, max_seqs=4)
    live, n, preemptions = [], 0, 0
    for _ in range(400):
        if rng.random() < 0.3 and n < 60:
            seq = make_seq(f"r{n}", rng.randint(1, 40), float(n), base=rng.choice([0, 10]),
                           max_tokens=rng.randint(1, 24), priority=rng.randint(0, 2))
            sched.add(seq)
            live.append(seq)
            n += 1
        if live and rng.random() < 0.05:
            sched.abort(rng.choice(live).request_id)
        if sched.has_unfinished():
            out, _ = step(sched)
            assert out.num_batched_tokens <= 24
            preemptions += len(out.preempted)
    run_all(sched)
    assert all(s.is_finished for s in live) and n > 30
    assert preemptions > 0 and sched.block_manager.prefix_cache_hits > 0  # the paths were exercised
    assert any(s.finish_reason == "abort" for s in live)


def test_preempted_sequence_resumes_from_its_cached_blocks():
    sched = make_sched(num_blocks=4, prefix=True)
    a, b = make_seq("a", 8, 0.0, max_tokens=50), make_seq("b", 8, 1.0, base=500, max_tokens=50)
    sched.add(a)
    sched.add(b)
    while not step(sched)[0].preempted:
        pass
    sched.abort("a")
    out, _ = step(sched)
    resumed = out.scheduled[0]
    assert resumed.seq is b and resumed.start > 0 and resumed.start % BS == 0
    assert resumed.start + resumed.num_new_tokens == b.num_tokens - 1
