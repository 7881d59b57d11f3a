"""Loading the engine for the server, and the start-up facts the log reports."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class EngineArgs:
    """The engine options `autoglm-trt serve` exposes (None = the engine's default)."""

    model_dir: str
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int | None = None  # None: an engine directory's, else 1
    num_kv_blocks: int | None = None
    block_size: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    seed: int = 0
    image_preprocess_device: str = "auto"
    quant: str | None = None  # none | int8-wo | w8a8 | fp8 at load (a checkpoint); None: the engine dir's own


@dataclass
class LoadReport:
    """What the start-up log says about the loaded engine."""

    engine: Any
    seconds: float
    devices: str
    memory: str
    kv_tokens: int  # tokens the KV cache holds (all sequences together)
    dtype: str  # the weights' float dtype as loaded ("bfloat16")
    quant: str  # none | int8-wo | w8a8 | fp8
    tp: int
    max_model_len: int
    max_model_len_source: str  # why max_model_len has its value


def max_model_len_source(args: EngineArgs, engine: Any) -> str:
    """Who set max-model-len: the flag, else what the engine says about its own choice (if it says)."""
    if args.max_model_len is not None:
        return "--max-model-len"
    from autoglm_trt.builder.manifest import is_engine_dir  # NOTE: a torch-free leaf module

    if is_engine_dir(args.model_dir):
        return "the engine's build (build --max-seq-len)"
    # NOTE: the engine may explain its default (the model's maximum, lowered to the KV cache's capacity)
    return str(getattr(engine, "max_model_len_source", None) or "the engine's default")


def engine_config(args: EngineArgs) -> Any:
    from autoglm_trt.engine.llm import engine_config_from_kwargs

    optional = {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
                "max_num_batched_tokens": args.max_num_batched_tokens,
                "gpu_memory_utilization": args.gpu_memory_utilization, "num_blocks": args.num_kv_blocks,
                "block_size": args.block_size, "quant": args.quant, "tensor_parallel_size": args.tensor_parallel_size}
    kwargs = {k: v for k, v in optional.items() if v is not None}
    return engine_config_from_kwargs(args.model_dir, dtype=args.dtype, device=args.device,
                                     enforce_eager=args.enforce_eager, seed=args.seed,
                                     enable_prefix_caching=args.enable_prefix_caching,
                                     image_preprocess_device=args.image_preprocess_device, **kwargs)


def load_engine(args: EngineArgs) -> LoadReport:
    """Build the LLMEngine (blocking: weights, KV cache, CUDA graphs) and describe what it took."""
    from autoglm_trt.engine.llm_engine import LLMEngine

    config = engine_config(args)
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    seconds = time.perf_counter() - t0
    stats = engine.get_stats()
    kv_tokens = stats.num_total_blocks * engine.config.cache.block_size
    dtype = getattr(getattr(engine, "runner", None), "dtype", None) or engine.config.dtype
    return LoadReport(engine, seconds, describe_devices(), describe_memory(), kv_tokens,
                      dtype=str(dtype).replace("torch.", ""), quant=str(engine.config.quant),
                      tp=engine.config.parallel.tensor_parallel_size,
                      max_model_len=engine.config.scheduler.max_model_len,
                      max_model_len_source=max_model_len_source(args, engine))


def describe_devices() -> str:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return f"CPU ({os.cpu_count()} cores)"
    if not torch.cuda.is_available():
        return f"no CUDA device; CPU ({os.cpu_count()} cores)"
    names = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return ", ".join(names)


def describe_memory() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            parts = []
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                parts.append(f"cuda:{i} {(total - free) / 2**30:.1f} / {total / 2**30:.1f} GiB")
            return ", ".join(parts)
    except Exception:  # noqa: BLE001 - a report, never a failure
        pass
    return f"process RSS {_rss_bytes() / 2**30:.2f} GiB"


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
