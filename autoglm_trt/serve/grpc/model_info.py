"""Triton's model-discovery RPCs over the ensemble model: RepositoryIndex, ModelConfig, ModelStatistics.

perf_analyzer and genai-perf read the model config (inputs, max_batch_size, whether the model is
decoupled) before they send a request, and the statistics after; tritonclient's
get_model_repository_index() lists the models.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from autoglm_trt.serve.grpc import ensemble
from autoglm_trt.serve.grpc import inference_pb2 as pb


def model_config(name: str, max_batch_size: int) -> pb.ModelConfig:
    """The ensemble's config: TensorRT-LLM's tensor names, batch dimension first (left out of dims, as
    Triton writes dims when max_batch_size > 0), decoupled: ModelStreamInfer sends a response per chunk."""
    config = pb.ModelConfig(name=name, platform=ensemble.MODEL_PLATFORM, backend="autoglm-trt",
                            max_batch_size=max_batch_size,
                            model_transaction_policy=pb.ModelTransactionPolicy(decoupled=True))
    for tensor_name, (dtype, shape) in ensemble.INPUTS.items():
        config.input.add(name=tensor_name, data_type=_data_type(dtype), dims=shape[1:],
                         optional=tensor_name != "text_input")
    for tensor_name, (dtype, shape) in ensemble.OUTPUTS.items():
        config.output.add(name=tensor_name, data_type=_data_type(dtype), dims=shape[1:])
    return config


def _data_type(kserve: str) -> int:
    return pb.DataType.Value("TYPE_STRING" if kserve == "BYTES" else f"TYPE_{kserve}")


def repository_index(names: list[str], ready: bool, reason: str, only_ready: bool) -> pb.RepositoryIndexResponse:
    resp = pb.RepositoryIndexResponse()
    if only_ready and not ready:
        return resp
    for name in names:
        resp.models.add(name=name, version="1", state="READY" if ready else "UNAVAILABLE",
                        reason="" if ready else reason)
    return resp


@dataclass
class _Totals:
    """One model's counters, as Triton's InferStatistics counts them (durations in ns)."""

    last_inference_ms: int = 0
    inference_count: int = 0  # batch rows
    execution_count: int = 0  # requests
    durations: dict[str, list[int]] = field(default_factory=lambda: {k: [0, 0] for k in _DURATIONS})


# NOTE: no separate queue figure: a request waits inside the engine's continuous batching, in compute_infer
_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


class ModelStats:
    """Per-model request statistics (thread-safe: the gRPC handlers may run on several threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, _Totals] = {}

    def record(self, name: str, rows: int, ok: bool, t_start: float, t_input: float, t_end: float) -> None:
        """One request of `rows` batch rows: parsed and tokenized by t_input, done at t_end (perf_counter)."""
        with self._lock:
            totals = self._models.setdefault(name, _Totals())
            totals.last_inference_ms = int(time.time() * 1000)
            d = totals.durations
            _add(d["success" if ok else "fail"], t_end - t_start)
            if ok:
                totals.inference_count += rows
                totals.execution_count += 1
                _add(d["compute_input"], t_input - t_start)
                _add(d["compute_infer"], t_end - t_input)

    def response(self, names: list[str]) -> pb.ModelStatisticsResponse:
        resp = pb.ModelStatisticsResponse()
        with self._lock:
            for name in names:
                t = self._models.get(name, _Totals())
                stats = resp.model_stats.add(name=name, version="1", last_inference=t.last_inference_ms,
                                             inference_count=t.inference_count, execution_count=t.execution_count)
                for key, (count, ns) in t.durations.items():
                    getattr(stats.inference_stats, key).CopyFrom(pb.StatisticDuration(count=count, ns=ns))
        return resp


def _add(duration: list[int], seconds: float) -> None:
    duration[0] += 1
    duration[1] += max(int(seconds * 1e9), 0)
