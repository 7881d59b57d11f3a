"""End to end over gRPC: tritonclient.grpc ModelInfer and decoupled ModelStreamInfer against the
real `autoglm-trt serve` (tiny checkpoint, CPU), with the TensorRT-LLM ensemble's tensor names."""

from __future__ import annotations

import functools
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from serve_harness import start_serve

pytestmark = pytest.mark.slow
KEY = "grpc-key"
HEADERS = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc = start_serve(tiny_model_dir, "--max-model-len", "1024", api_key=KEY)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield c
    c.close()


def ensemble_inputs(prompt: str, max_tokens: int, stream: bool) -> list:
    """What TensorRT-LLM's end-to-end gRPC client sends to the "ensemble" model."""
    values = {"text_input": (np.array([[prompt.encode()]], dtype=object), "BYTES"),
              "max_tokens": (np.array([[max_tokens]], dtype=np.int32), "INT32"),
              "bad_words": (np.array([[b""]], dtype=object), "BYTES"),
              "stop_words": (np.array([[b""]], dtype=object), "BYTES"),
              "stream": (np.array([[stream]], dtype=bool), "BOOL"),
              "temperature": (np.array([[1.0]], dtype=np.float32), "FP32"),
              "top_k": (np.array([[1]], dtype=np.int32), "INT32"),
              "top_p": (np.array([[0.0]], dtype=np.float32), "FP32"),
              "beam_width": (np.array([[1]], dtype=np.int32), "INT32"),
              "random_seed": (np.array([[0]], dtype=np.uint64), "UINT64"),
              "end_id": (np.array([[151329]], dtype=np.int32), "INT32"),
              "pad_id": (np.array([[151329]], dtype=np.int32), "INT32"),
              "return_log_probs": (np.array([[True]], dtype=bool), "BOOL")}
    inputs = []
    for name, (arr, dtype) in values.items():
        tensor = grpcclient.InferInput(name, list(arr.shape), dtype)
        tensor.set_data_from_numpy(arr)
        inputs.append(tensor)
    return inputs


def test_server_and_model_ready(client):
    assert client.is_server_live(headers=HEADERS) and client.is_server_ready(headers=HEADERS)
    assert client.is_model_ready("ensemble", headers=HEADERS)
    assert client.get_model_metadata("ensemble", headers=HEADERS).outputs[0].name == "text_output"


def test_model_infer(client):
    outputs = [grpcclient.InferRequestedOutput("text_output"), grpcclient.InferRequestedOutput("output_log_probs")]
    result = client.infer("ensemble", ensemble_inputs("Open the settings", 6, False), outputs=outputs,
                          headers=HEADERS)
    assert result.as_numpy("text_output").shape == (1, 1)
    assert result.as_numpy("output_log_probs").shape == (1, 1, 6)  # greedy, ignore nothing: 6 tokens


def test_model_stream_infer_matches_model_infer(client):
    whole = client.infer("ensemble", ensemble_inputs("Go home", 5, False), headers=HEADERS)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=functools.partial(lambda q, result, error: q.put((result, error)), results),
                        headers=HEADERS)
    try:
        client.async_stream_infer("ensemble", ensemble_inputs("Go home", 5, True), request_id="s1")
        pieces, logprobs = [], []
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error
            pieces.append(result.as_numpy("text_output")[0, 0])
            logprobs += result.as_numpy("output_log_probs").reshape(-1).tolist()
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
    assert len(pieces) == 5  # one response per generated token (decoupled)
    assert b"".join(pieces) == whole.as_numpy("text_output")[0, 0]
    assert logprobs == pytest.approx(whole.as_numpy("output_log_probs").reshape(-1).tolist(), abs=1e-4)


def test_errors(client, server):
    with pytest.raises(InferenceServerException) as info:
        client.infer("ensemble", ensemble_inputs("x", 5000, False), headers=HEADERS)
    assert "max_model_len" in info.value.message() and info.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as info:
        client.infer("ensemble", ensemble_inputs("x", 2, False))
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
