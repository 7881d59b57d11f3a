"""Multi-step windows in the scheduler (pure Python): which batches get a window of k greedy tokens, the
lookahead blocks they hold, continuing a window before its tokens are applied, and stops inside one."""

import random

from autoglm_trt.config import CacheConfig, SchedulerConfig
from autoglm_trt.engine.sampling_params import SamplingParams
from autoglm_trt.engine.scheduler import Scheduler
from autoglm_trt.engine.sequence import Sequence, SequenceStatus

EOS = 2
BS = 8


def make_sched(steps=4, rows=8, num_blocks=64, budget=64, max_seqs=8, max_model_len=1024):
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                          num_decode_steps=steps)
    return Scheduler(cfg, CacheConfig(block_size=BS), num_blocks, eos_token_ids=[EOS], max_window_rows=rows)


def make_seq(rid, n, arrival=0.0, base=10, **params):
    params.setdefault("max_tokens", 20)
    params.setdefault("temperature", 0.0)
    return Sequence(rid, [base + i for i in range(n)], SamplingParams(**params), arrival_time=arrival)


def next_token(tokens: list[int]) -> int:
    return 100 + (sum(tokens) * 31 + len(tokens)) % 900


def produce(out) -> list[list[int]]:
    """What the model would produce for each row: num_steps greedy tokens of its own context.

    NOTE: a continuation is planned before the last window's tokens are applied; `produce` is only
    called on outputs whose predecessors are applied (as the engine does before reading a window)."""
    rows = []
    for sch in out.scheduled:
        if not sch.samples:
            rows.append([])
            continue
        ctx = list(sch.seq.token_ids)
        for _ in range(out.num_steps):
            ctx.append(next_token(ctx))
        rows.append(ctx[sch.seq.num_tokens:])
    return rows


def run_engine_loop(sched: Scheduler, max_steps=500) -> int:
    """The engine's loop: launch, read, continue, apply. Returns how many windows were continued."""
    inflight, continued = None, 0
    for _ in range(max_steps):
        out = inflight or sched.schedule()
        if not out.scheduled:
            if not sched.has_unfinished():
                return continued
            continue
        tokens = produce(out)
        inflight = sched.schedule_continuation(out, tokens)
        continued += inflight is not None
        sched.update(out, tokens)
        sched.check_invariants()
    raise AssertionError("did not finish")


def test_greedy_decode_batch_gets_a_window_with_lookahead_blocks():
    sched = make_sched(steps=4)
    a, b = make_seq("a", 6), make_seq("b", 7)
    for s in (a, b):
        sched.add(s)
    first = sched.schedule()
    assert first.num_steps == 1  # a prefill never runs as a window
    sched.update(first, produce(first))
    out = sched.schedule()
    assert out.is_decode and out.num_steps == 4
    # blocks for the window's KV: token num_computed .. num_computed + 3
    assert all(len(s.block_table) * BS >= s.num_computed_tokens + 4 for s in (a, b))
    sched.update(out, produce(out))
    assert a.num_output_tokens == 5 and a.num_computed_tokens == a.num_tokens - 1
    sched.check_invariants()


def test_rows_off_the_greedy_path_get_no_window():
    for params in (dict(temperature=0.7), dict(logprobs=2), dict(repetition_penalty=1.2)):
        sched = make_sched()
        sched.add(make_seq("g", 5))
        sched.add(make_seq("x", 5, **params))
        out = sched.schedule()
        sched.update(out, produce(out))
        assert sched.schedule().num_steps == 1, params
    sched = make_sched(rows=1)  # more rows than the multi-step buffers hold
    for i in range(2):
        sched.add(make_seq(f"r{i}", 5))
    out = sched.schedule()
    sched.update(out, produce(out))
    assert sched.schedule().num_steps == 1
    sched = make_sched(rows=0)  # no multi-step buffers at all
    sched.add(make_seq("r", 5))
    out = sched.schedule()
    sched.update(out, produce(out))
    assert sched.schedule().num_steps == 1


def test_window_never_passes_max_tokens_or_max_model_len():
    sched = make_sched(steps=8, max_model_len=12)
    seq = make_seq("a", 6, max_tokens=100)
    sched.add(seq)
    out = sched.schedule()
    sched.update(out, produce(out))
    assert sched.schedule().num_steps == 5  # 12 - 7 known tokens
    sched = make_sched(steps=8)
    short = make_seq("s", 6, max_tokens=3)
    sched.add(short)
    out = sched.schedule()
    sched.update(out, produce(out))
    assert sched.schedule().num_steps == 2


def test_continuation_is_planned_before_tokens_are_applied():
    sched = make_sched(steps=4)
    seq = make_seq("a", 6)
    sched.add(seq)
    out = sched.schedule()
    sched.update(out, produce(out))
    win = sched.schedule()
    tokens = produce(win)
    nxt = sched.schedule_continuation(win, tokens)
    assert nxt is not None and nxt.continues and nxt.num_steps == 4
    assert nxt.scheduled[0].start == win.scheduled[0].start + 4 and seq.num_output_tokens == 1
    assert len(seq.block_table) * BS >= win.scheduled[0].start + 8  # both windows' KV
    sched.update(win, tokens)
    assert seq.num_computed_tokens == nxt.scheduled[0].start
    sched.update(nxt, produce(nxt))
    assert seq.num_output_tokens == 9
    sched.check_invariants()


def test_no_continuation_when_a_row_stops_or_a_request_waits():
    sched = make_sched(steps=4)
    seq = make_seq("a", 6)
    sched.add(seq)
    out = sched.schedule()
    sched.update(out, produce(out))
    win = sched.schedule()
    tokens = produce(win)
    stopping = [[tokens[0][0], EOS, 7, 7]]
    assert sched.schedule_continuation(win, stopping) is None
    sched.add(make_seq("late", 3))
    assert sched.schedule_continuation(win, tokens) is None


def test_stop_token_inside_a_window_drops_the_rest():
    sched = make_sched(steps=4)
    seq = make_seq("a", 6)
    sched.add(seq)
    out = sched.schedule()
    sched.update(out, produce(out))
    win = sched.schedule()
    finished = sched.update(win, [[300, EOS, 301, 302]])
    assert finished == [seq] and seq.output_token_ids[-2:] == [300, EOS] and seq.finish_reason == "stop"
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_finish_at_truncates_to_the_stop_string_token():
    sched = make_sched(steps=4)
    seq = make_seq("a", 6)
    sched.add(seq)
    out = sched.schedule()
    sched.update(out, produce(out))
    win = sched.schedule()
    sched.update(win, [[300, 301, 302, 303]])
    sched.finish_at(seq, 3)
    assert seq.output_token_ids[1:] == [300, 301] and seq.num_output_tokens == 3
    assert seq.status is SequenceStatus.FINISHED_STOPPED and seq.token_ids[-1] == 301


def test_windows_give_the_single_step_tokens_and_leak_nothing():
    rng = random.Random(7)
    specs = [(f"r{i}", rng.randint(1, 30), rng.randint(1, 40), rng.choice([0, 10])) for i in range(12)]

    def run(steps):
        sched = make_sched(steps=steps, num_blocks=48, budget=32, max_seqs=4)
        seqs = [make_seq(rid, n, float(i), base=base, max_tokens=m) for i, (rid, n, m, base) in enumerate(specs)]
        for s in seqs:
            sched.add(s)
        continued = run_engine_loop(sched)
        assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
        return [s.output_token_ids for s in seqs], continued

    single, _ = run(1)
    windows, continued = run(4)
    assert windows == single and continued > 0
