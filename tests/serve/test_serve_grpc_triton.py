"""Triton's discovery RPCs (what perf_analyzer / genai-perf read before they send a request: repository index,
model config, statistics) through tritonclient, and malformed tensors: every one INVALID_ARGUMENT.

perf_analyzer and genai-perf do not install on a CPU machine from PyPI (perf-analyzer there is a 2 kB
placeholder; genai-perf drives the perf_analyzer binary), so tritonclient makes their calls here.
"""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from autoglm_trt.serve.grpc import inference_pb2 as pb
from autoglm_trt.serve.grpc import inference_pb2_grpc as pb_grpc

from serve_fakes import FakeEngine
from serve_harness import InProcessServer
from test_serve_grpc import HEADERS, triton_inputs

NAMES = {"autoglm-phone-9b", "ensemble", "tensorrt_llm_bls"}


@pytest.fixture(scope="module")
def client(fake_server):
    c = grpcclient.InferenceServerClient(fake_server.grpc_url)
    yield c
    c.close()


def test_repository_index_lists_the_model_and_its_aliases(client):
    index = client.get_model_repository_index(headers=HEADERS, as_json=True)
    assert {(m["name"], m["version"], m["state"]) for m in index["models"]} == {(n, "1", "READY") for n in NAMES}


def test_repository_index_while_loading():
    with InProcessServer(FakeEngine(), start_engine=False) as server:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        models = c.get_model_repository_index(as_json=True)["models"]
        assert {m["state"] for m in models} == {"UNAVAILABLE"} and "loading" in models[0]["reason"]
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc_url))
        assert not stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
        c.close()


def test_model_config_is_a_decoupled_ensemble(client, fake_engine):
    config = client.get_model_config("ensemble", headers=HEADERS).config  # tritonclient's own ModelConfig message
    assert config.name == "ensemble" and config.platform == "ensemble"
    assert config.max_batch_size == fake_engine.config.scheduler.max_num_seqs
    assert config.model_transaction_policy.decoupled  # ModelStreamInfer answers one request with many responses
    inputs = {i.name: i for i in config.input}
    text = inputs["text_input"]
    assert (grpcclient.model_config_pb2.DataType.Name(text.data_type), list(text.dims), text.optional) == \
        ("TYPE_STRING", [1], False)
    assert grpcclient.model_config_pb2.DataType.Name(inputs["max_tokens"].data_type) == "TYPE_INT32"
    assert inputs["max_tokens"].optional and list(inputs["stop_words"].dims) == [-1]
    assert [o.name for o in config.output][0] == "text_output"
    with pytest.raises(InferenceServerException) as info:
        client.get_model_config("nope", headers=HEADERS)
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_model_statistics_count_requests(client):
    before = client.get_inference_statistics("tensorrt_llm_bls", headers=HEADERS, as_json=True)["model_stats"][0]
    for _ in range(2):
        client.infer("tensorrt_llm_bls", triton_inputs("hi", 3), headers=HEADERS)
    with pytest.raises(InferenceServerException):
        client.infer("tensorrt_llm_bls", triton_inputs("hi", 10**6), headers=HEADERS)
    after = client.get_inference_statistics("tensorrt_llm_bls", headers=HEADERS, as_json=True)["model_stats"][0]

    def count(stats: dict, key: str) -> int:
        return int(stats.get("inference_stats", {}).get(key, {}).get("count", 0))

    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 2
    assert count(after, "success") - count(before, "success") == 2 and count(after, "fail") - count(before, "fail") == 1
    assert int(after["inference_stats"]["compute_infer"]["ns"]) > 0 and int(after["last_inference"]) > 0
    everything = client.get_inference_statistics(headers=HEADERS, as_json=True)["model_stats"]
    assert {s["name"] for s in everything} == NAMES


def tensor(name: str, datatype: str, shape: list[int], **contents) -> pb.ModelInferRequest.InferInputTensor:
    t = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(t.contents, field).extend(values)
    return t


def text_input(shape=(1, 1)) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes]:
    return tensor("text_input", "BYTES", list(shape)), struct.pack("<I", 2) + b"hi"


def raw_request(*tensors: tuple) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="ensemble")
    for t, raw in tensors:
        req.inputs.append(t)
        req.raw_input_contents.append(raw)
    return req


MALFORMED = {
    "65 dimensions": raw_request(text_input([1] * 65)),
    "dimensions whose product overflows int64": raw_request(text_input([2**40, 2**40])),
    "a negative dimension": raw_request(text_input([1, -1])),
    "a truncated BYTES element": raw_request((tensor("text_input", "BYTES", [1, 1]), struct.pack("<I", 9) + b"hi")),
    "raw bytes not a whole number of INT32": raw_request(text_input(), (tensor("max_tokens", "INT32", [1, 1]), b"\0\0\0")),
    "an unknown datatype": raw_request(text_input(), (tensor("max_tokens", "FP128", [1, 1]), b"\0" * 16)),
    "too few elements for the shape": raw_request(text_input([2, 1])),
    "text_input as INT32": raw_request((tensor("text_input", "INT32", [1, 1]), b"\0\0\0\0")),
    "max_tokens as text": raw_request(text_input(), (tensor("max_tokens", "BYTES", [1, 1]), struct.pack("<I", 3) + b"abc")),
    "a negative max_tokens": raw_request(text_input(), (tensor("max_tokens", "INT32", [1, 1]),
                                                       np.array([-5], np.int32).tobytes())),
    "a NaN temperature": raw_request(text_input(), (tensor("temperature", "FP32", [1, 1]),
                                                   np.array([np.nan], np.float32).tobytes()),
                                     (tensor("top_k", "INT32", [1, 1]), np.array([5], np.int32).tobytes())),
    "an unknown input": raw_request(text_input(), (tensor("prompt_table", "FP32", [1, 1]), b"\0" * 4)),
    "a missing text_input": raw_request((tensor("max_tokens", "INT32", [1, 1]), b"\5\0\0\0")),
    "an input given twice": raw_request(text_input(), text_input()),
}


def typed_request(*tensors) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="ensemble", inputs=list(tensors))


MALFORMED_TYPED = {
    "an INT8 value out of range": typed_request(tensor("text_input", "BYTES", [1, 1], bytes_contents=[b"hi"]),
                                                tensor("min_length", "INT8", [1, 1], int_contents=[1000])),
    "FP16 in typed contents": typed_request(tensor("text_input", "BYTES", [1, 1], bytes_contents=[b"hi"]),
                                            tensor("temperature", "FP16", [1, 1])),
    "raw contents for only some inputs": pb.ModelInferRequest(
        model_name="ensemble", inputs=[tensor("text_input", "BYTES", [1, 1]), tensor("max_tokens", "INT32", [1, 1])],
        raw_input_contents=[struct.pack("<I", 2) + b"hi"]),
}


@pytest.mark.parametrize("case", sorted({**MALFORMED, **MALFORMED_TYPED}))
def test_every_malformed_tensor_is_invalid_argument(fake_server, case):
    request = {**MALFORMED, **MALFORMED_TYPED}[case]
    with grpc.insecure_channel(fake_server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, metadata=tuple(HEADERS.items()), timeout=20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, info.value.details())
