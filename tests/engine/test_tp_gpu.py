"""Tensor parallelism on two GPUs: the peer-memory all-reduce equals NCCL's sum (eager and inside CUDA
graphs), and the TP=2 engine with CUDA graphs gives the TP=1 engine's greedy tokens on the tiny model."""

from __future__ import annotations

import gc
import os
import signal

import pytest
import torch

from autoglm_trt.engine.sampling_params import SamplingParams
from autoglm_trt.engine.distributed import free_port, join_nccl_with_gloo

pytestmark = pytest.mark.multi_gpu

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NOTE: NVLink multicast stays off on shared hosts
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def _check_sums(car, rank: int, dtype: torch.dtype, sizes: list[int]) -> None:
    import torch.distributed as dist

    for n in sizes:
        gen = torch.Generator(device="cuda").manual_seed(7919 * rank + n)
        x = torch.randn(n, generator=gen, device="cuda").to(dtype)
        ref = x.clone()
        dist.all_reduce(ref)
        out = car.one_shot(x)
        torch.testing.assert_close(out, ref, msg=lambda m: f"{dtype} n={n}: {m}")
        both = [torch.empty_like(out) for _ in range(2)]
        dist.all_gather(both, out)
        assert torch.equal(both[0], both[1]), f"ranks disagree ({dtype}, n={n})"


def _check_graph(car, rank: int) -> None:
    """Two chained all-reduces captured in a graph, replayed with fresh inputs, eager calls in between."""
    import torch.distributed as dist

    x = torch.zeros(64, 4096, dtype=torch.bfloat16, device="cuda")  # a decode batch of 64 rows
    car.one_shot(x)  # warm-up (compiles) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = car.one_shot(x)
        z = car.one_shot(y * 0.5)
    for step in range(6):
        gen = torch.Generator(device="cuda").manual_seed(100 * step + rank)
        x.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
        graph.replay()
        ref_y = x.clone()
        dist.all_reduce(ref_y)
        ref_z = ref_y * 0.5
        dist.all_reduce(ref_z)
        torch.testing.assert_close(y, ref_y)
        torch.testing.assert_close(z, ref_z)
        torch.testing.assert_close(car.one_shot(x[:3]), ref_y[:3])  # eager between replays: epochs stay in step


def _all_reduce_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from autoglm_trt.plugins.custom_allreduce import CustomAllReduce

    cpu = join_nccl_with_gloo(rank, world, port)
    car, why = CustomAllReduce.create(rank, world, torch.device("cuda", rank), dist.group.WORLD, cpu,
                                      max_spins=1 << 24)  # NOTE: a protocol bug fails instead of hanging
    assert car is not None, why
    sizes = [1, 7, 1000, 4096, 4097, 65536, 262144]  # 262144 fp32 = 1 MB, the largest eligible
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        _check_sums(car, rank, dtype, sizes + ([524288] if dtype != torch.float32 else []))
    _check_graph(car, rank)
    big = torch.randn(1 << 20, device="cuda")  # 4 MB: not eligible, falls back to NCCL
    ref = big.clone()
    dist.all_reduce(ref)
    torch.testing.assert_close(car.all_reduce(big.clone()), ref)
    torch.cuda.synchronize()
    assert int(car.error.item()) == 0, "a peer never signalled"
    car.close()
    dist.destroy_process_group()


def test_custom_all_reduce_equals_nccl():
    torch.multiprocessing.spawn(_all_reduce_worker, args=(2, free_port()), nprocs=2, join=True)


PROMPTS = ["Open the settings app", "打开微信，给妈妈发消息", "a b c d e f g h i j k l m n o p " * 8]


def _conversations():
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    img = Image.fromarray(torch.randint(0, 256, (90, 120, 3), generator=g, dtype=torch.uint8).numpy())
    return [[{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Tap it"}]}]]


def _tokens(llm) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    text = [o.token_ids for o in llm.generate(PROMPTS, params)]
    return text + [o.token_ids for o in llm.chat(_conversations(), params)]


KW = dict(device="cuda", dtype="float32", max_model_len=1024, num_blocks=256, cuda_graph_batch_sizes=(1, 2, 4))


@pytest.fixture(scope="module", autouse=True)
def _no_engine_left():
    yield
    from autoglm_trt.engine.executor import _shutdown_all

    _shutdown_all()


@pytest.fixture(scope="module")
def tp1_tokens(tiny_model_dir):
    """TP=1 first: the layers read the process-wide TP state, so no TP=1 engine may run beside a TP=2 one."""
    from autoglm_trt.engine.llm import LLM

    llm = LLM(str(tiny_model_dir), **KW)
    tokens = _tokens(llm)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return tokens


@pytest.mark.parametrize("custom", ["1", "0"], ids=["peer-memory-all-reduce", "nccl-in-graphs"])
def test_tp2_equals_tp1_with_cuda_graphs(tiny_model_dir, tp1_tokens, monkeypatch, custom):
    from autoglm_trt.engine import distributed
    from autoglm_trt.engine.llm import LLM

    monkeypatch.setenv("AUTOGLM_TRT_CUSTOM_ALLREDUCE", custom)
    llm = LLM(str(tiny_model_dir), tensor_parallel_size=2, **KW)
    try:
        assert llm.engine.runner.graphs is not None
        assert (distributed._GROUPS.custom is not None) == (custom == "1")
        assert _tokens(llm) == tp1_tokens
    finally:
        llm.engine.shutdown()


@pytest.mark.timeout(180)
def test_killed_gpu_worker_stops_engine(tiny_model_dir, tp1_tokens):
    from autoglm_trt.engine.distributed import TensorParallelError
    from autoglm_trt.engine.llm import LLM

    llm = LLM(str(tiny_model_dir), tensor_parallel_size=2, **KW)
    proc = llm.engine.executor.workers.procs[1]
    params = SamplingParams(temperature=0.0, max_tokens=4)
    assert llm.generate("hello", params)[0].token_ids
    os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) was killed by signal SIGKILL"):
        for _ in range(50):  # NOTE: the monitor notices the death within milliseconds
            llm.generate("hello again", params)
    proc.join(5)
    assert not proc.is_alive()
