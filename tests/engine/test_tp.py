"""Tensor parallelism on CPUs (two processes over gloo): TP=2 computes what TP=1 computes, and a worker
that dies or hangs stops the engine with a message naming the rank, leaving no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from PIL import Image

from autoglm_trt.engine.batch import StepBatch, image_chunks_for
from autoglm_trt.engine.distributed import TensorParallelError
from autoglm_trt.engine.llm import LLM
from autoglm_trt.engine.sampling_params import SamplingParams
from autoglm_trt.engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
WINDOW_PROMPTS = ["Open the settings app", "打开微信，给妈妈发消息", "a b c d e f g h " * 5, "Swipe up twice"]
WINDOW_GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, frequency_penalty=0.2)
KW = dict(device="cpu", dtype="float32", max_model_len=1024, num_blocks=64)


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


CONVERSATIONS = [
    [{"role": "user", "content": "Open the settings app and turn on Wi-Fi"}],
    [{"role": "user", "content": [{"type": "image", "image": _image(120, 90, 1)},
                                  {"type": "text", "text": "Tap the icon"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "compare"}, {"type": "image", "image": _image(60, 200, 2)},
                                  {"type": "image", "image": _image(90, 90, 3)}, {"type": "text", "text": "which?"}]}],
]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")  # a zombie has exited
    except FileNotFoundError:
        return True


def _wait_gone(pids: list[int], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module", autouse=True)
def _no_engine_left():
    """Whatever fails here, no TP engine may outlive this module (later tests run TP=1 engines)."""
    yield
    from autoglm_trt.engine.executor import _shutdown_all

    _shutdown_all()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """TP=1 results, computed before any TP=2 engine exists.

    NOTE: the layers read the process-wide tensor-parallel state, so a TP=1 engine must not run while
    a TP=2 engine lives in the same process.
    """
    llm = LLM(str(tiny_model_dir), **KW)
    logits = [_prefill_logits(llm, conv) for conv in CONVERSATIONS[:2]]
    windows = [o.token_ids for o in llm.generate([WINDOW_PROMPTS[i] for i in (0, 2, 3)], WINDOW_GREEDY)]
    return logits, [o.token_ids for o in llm.chat(CONVERSATIONS, GREEDY)], windows


@pytest.fixture(scope="module")
def tp2(tiny_model_dir, reference):
    llm = LLM(str(tiny_model_dir), tensor_parallel_size=2, **KW)
    yield llm
    pids = [p.pid for p in llm.engine.executor.workers.procs.values()]
    llm.engine.shutdown()
    assert _wait_gone(pids), "a worker outlived shutdown()"


def _prefill_logits(llm: LLM, conv: list[dict]) -> torch.Tensor:
    """Logits of every prompt position, from one prefill step run through the engine's runner."""
    eng = llm.engine
    prompt = eng.processor.process_chat(conv)
    seq = Sequence.from_prompt("logits", prompt, GREEDY)
    n, bs = seq.num_prompt_tokens, eng.config.cache.block_size
    blocks = list(range(eng.runner.num_blocks - (-(-n // bs)), eng.runner.num_blocks))  # NOTE: top blocks: unused
    batch = StepBatch(seq.prompt_token_ids, torch.as_tensor(prompt.mrope_positions),
                      [blocks[i // bs] * bs + i % bs for i in range(n)], [0, n], [n], [blocks],
                      list(range(n)), image_chunks_for(seq, 0, n), False)
    eng.runner.encode_images([seq])
    return eng.executor.collective_rpc("forward_logits", batch)  # [n, vocab] fp32


def test_prefill_logits_equal(reference, tp2):
    for conv, ref in zip(CONVERSATIONS[:2], reference[0]):  # text; image (embeddings broadcast by rank 0)
        out = _prefill_logits(tp2, conv)
        assert out.shape == ref.shape and out.shape[1] == 151552
        assert (out - ref).abs().max().item() < 1e-4


def test_greedy_tokens_equal(reference, tp2):
    out = [o.token_ids for o in tp2.chat(CONVERSATIONS, GREEDY)]
    assert out == reference[1]
    assert tp2.engine.healthy
    stats = tp2.engine.get_stats()
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_windows_under_tp_equal_tp1(tiny_model_dir, reference, tp2):
    """Multi-step windows on both ranks (eager on the CPU), pipelined: a window is in flight while a
    request arrives and another aborts; the tokens are TP=1's single-step ones."""
    tp2.engine.shutdown()  # NOTE: one tensor-parallel engine per process at a time
    llm = LLM(str(tiny_model_dir), tensor_parallel_size=2, num_decode_steps=4, cuda_graph_batch_sizes=(1, 2, 4), **KW)
    engine, got, continued = llm.engine, {}, []
    graphs, cont = engine.runner.graphs, engine.runner.graphs.continue_multi
    graphs.continue_multi = lambda *a, **k: (continued.append(1), cont(*a, **k))[1]
    try:
        for i in range(3):
            engine.add_request(f"r{i}", engine.processor.process_text(WINDOW_PROMPTS[i]), WINDOW_GREEDY)
        for _ in range(4):  # the prefill, then windows; the last call leaves the next window in flight
            for o in engine.step():
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert engine._inflight is not None and engine._inflight.out.continues, "expected a window in flight"
        engine.abort_request("r1")
        engine.add_request("late", engine.processor.process_text(WINDOW_PROMPTS[3]), WINDOW_GREEDY)
        while engine.has_unfinished_requests():
            for o in engine.step():
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert [got["r0"], got["r2"], got["late"]] == reference[2]
        assert continued and engine.healthy and len(got.get("r1", [])) < 40
        stats = engine.get_stats()
        assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks
    finally:
        engine.shutdown()


def test_killed_worker_stops_engine(tiny_model_dir, tp2):
    tp2.engine.shutdown()  # NOTE: one tensor-parallel engine per process at a time
    llm = LLM(str(tiny_model_dir), tensor_parallel_size=2, **KW)
    proc = llm.engine.executor.workers.procs[1]
    assert llm.generate("hello", GREEDY)[0].token_ids
    os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) was killed by signal SIGKILL"):
        llm.generate("hello again", GREEDY)
    assert not llm.engine.healthy
    assert _wait_gone([proc.pid])
    with pytest.raises(TensorParallelError, match="stopped"):
        llm.generate("and again", GREEDY)


@pytest.mark.parametrize("fault, timeout, expect", [
    ("1:hello:hang", 3, r"rank 1 \(pid \d+\) did not report 'hello' within 3 s: the start-up handshake timed out"),
    ("1:loaded:raise", 120, r"rank 1 \(pid \d+\) exited with code 1: .*injected fault on rank 1 before 'loaded'"),
])
def test_startup_failure_names_rank(tiny_model_dir, tp2, monkeypatch, fault, timeout, expect):
    tp2.engine.shutdown()
    monkeypatch.setenv("AUTOGLM_TRT_TP_FAULT", fault)
    monkeypatch.setenv("AUTOGLM_TRT_TP_STARTUP_TIMEOUT", str(timeout))
    with pytest.raises(TensorParallelError, match=expect) as info:
        LLM(str(tiny_model_dir), tensor_parallel_size=2, **KW)
    pid = int(re.search(r"pid (\d+)", str(info.value)).group(1))
    assert _wait_gone([pid]), "the failed worker was left running"


PARENT = """
import sys, time
from autoglm_trt.engine.llm import LLM
if __name__ == "__main__":
    llm = LLM(sys.argv[1], tensor_parallel_size=2, device="cpu", dtype="float32", max_model_len=256, num_blocks=16)
    print("PIDS", *[p.pid for p in llm.engine.executor.workers.procs.values()], flush=True)
    time.sleep(600)
"""


def test_workers_exit_when_parent_dies(tiny_model_dir, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(PARENT))
    parent = subprocess.Popen([sys.executable, str(script), str(tiny_model_dir)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        line = ""
        while not line.startswith("PIDS"):
            line = parent.stdout.readline()
            assert line or parent.poll() is None, "the parent process died before its workers started"
        pids = [int(p) for p in line.split()[1:]]
        assert pids and not any(_gone(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
    assert _wait_gone(pids), "workers outlived their parent"


ONE_SHOT_CHECK = """
import torch
from autoglm_trt.plugins import custom_allreduce as car

def check(dtype, n, world, programs=4, block=64, cap=8192):
    # Rank 0's kernel, its peers simulated: each staged its data in half e % 2 and signalled epoch e.
    per_rank = car.FLAGS_BYTES + 2 * cap
    arena = torch.zeros(world * per_rank, dtype=torch.uint8)
    flags_of = [arena[r * per_rank:r * per_rank + car.FLAGS_BYTES].view(torch.int64) for r in range(world)]
    data_of = [arena[r * per_rank + car.FLAGS_BYTES:(r + 1) * per_rank].view(dtype) for r in range(world)]
    deltas = torch.tensor([r * per_rank for r in range(world)], dtype=torch.int64)
    counters, err = torch.zeros(car.MAX_PROGRAMS, dtype=torch.int64), torch.zeros(1, dtype=torch.int32)
    half = cap // data_of[0].element_size()
    for e in (1, 2, 3):
        xs = [torch.randn(n).to(dtype) for _ in range(world)]
        for r in range(1, world):
            data_of[r][(e % 2) * half:(e % 2) * half + n] = xs[r]
            flags_of[0][torch.arange(programs) * world + r] = e
        out = torch.empty_like(xs[0])
        car._one_shot_kernel[(programs,)](xs[0], out, data_of[0], flags_of[0], deltas, counters, err, n, 0, half,
                                          1000, WORLD=world, BLOCK=block)
        ref = xs[0].float()
        for x in xs[1:]:
            ref = ref + x.float()
        tol = 2 ** -7 * ref.abs().max().item() if dtype == torch.bfloat16 else 0.0  # interpreter truncates bf16
        assert (out.float() - ref.to(dtype).float()).abs().max().item() <= tol, (dtype, n, world, e)
        assert counters[:programs].tolist() == [e] * programs and int(err[0]) == 0
        assert all(flags_of[r][torch.arange(programs) * world].tolist() == [e] * programs for r in range(world))
        assert torch.equal(data_of[0][(e % 2) * half:(e % 2) * half + n], xs[0])
    car._one_shot_kernel[(programs,)](xs[0], out, data_of[0], flags_of[0], deltas, counters, err, n, 0, half,
                                      20, WORLD=world, BLOCK=block)  # no peer signals epoch 4: give up, flag it
    assert int(err[0]) == 1

for dtype in (torch.float32, torch.bfloat16):
    for n in (1, 63, 500):
        check(dtype, n, 2)
check(torch.float32, 300, 4)
print("ONE-SHOT OK")
"""


@pytest.mark.skipif(__import__("importlib").util.find_spec("triton") is None, reason="triton not installed")
def test_one_shot_kernel_protocol_under_interpreter():
    """The peer-memory all-reduce kernel on CPU (Triton interpreter), peers simulated in one arena:
    staging into half e % 2, signalling every rank, the rank-order sum, per-program epochs, give-up."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=repo)
    proc = subprocess.run([sys.executable, "-c", ONE_SHOT_CHECK], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "ONE-SHOT OK" in proc.stdout, proc.stderr[-3000:]
