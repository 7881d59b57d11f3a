"""Loading the engine for the server, and the start-up facts the log reports."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from autoglm_trt.config import EngineArgs
from autoglm_trt.errors import UserError


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


def load_engine(args: EngineArgs) -> LoadReport:
    """Build the LLMEngine (blocking: weights, KV cache, CUDA graphs) and describe what it took."""
    from autoglm_trt.engine.llm_engine import LLMEngine

    try:
        config = args.create_engine_config()
    except ValueError as exc:
        raise UserError(str(exc)) from None
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
                      max_model_len_source=engine.config.max_model_len_origin)


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
