"""KServe v2 gRPC over the scripted FakeEngine: tensor codec, TensorRT-LLM ensemble names,
tritonclient unary and decoupled streaming, API key, health, reflection; generated code in sync."""

from __future__ import annotations

import functools
import queue
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from autoglm_trt.serve.errors import ServeError
from autoglm_trt.serve.grpc import ensemble
from autoglm_trt.serve.grpc import inference_pb2 as pb
from autoglm_trt.serve.grpc.tensors import deserialize_bytes, input_arrays, serialize_bytes

from serve_fakes import FakeEngine
from serve_harness import InProcessServer

REPO = Path(__file__).resolve().parents[2]
HEADERS = {"authorization": "Bearer test-key"}


def triton_inputs(prompt: str, max_tokens: int = 8, stream: bool = False, **extra) -> list:
    ins = []

    def add(name, arr, dtype):
        tensor = grpcclient.InferInput(name, list(arr.shape), dtype)
        tensor.set_data_from_numpy(arr)
        ins.append(tensor)

    add("text_input", np.array([[prompt.encode()]], dtype=object), "BYTES")
    add("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32")
    add("stream", np.array([[stream]], dtype=bool), "BOOL")
    add("bad_words", np.array([[b""]], dtype=object), "BYTES")
    add("stop_words", np.array([[b""]], dtype=object), "BYTES")
    add("end_id", np.array([[0]], dtype=np.int32), "INT32")
    add("pad_id", np.array([[0]], dtype=np.int32), "INT32")
    for name, (value, dtype) in extra.items():
        np_dtype = {"FP32": np.float32, "INT32": np.int32, "UINT64": np.uint64, "BOOL": bool}[dtype]
        add(name, np.array([[value]], dtype=np_dtype), dtype)
    return ins


@pytest.fixture(scope="module")
def client(fake_server):
    c = grpcclient.InferenceServerClient(fake_server.grpc_url)
    yield c
    c.close()


# ---- codec ------------------------------------------------------------------------------------------
def test_bytes_codec_roundtrip():
    items = [b"", b"hello", "é".encode()]
    assert deserialize_bytes(serialize_bytes(items)) == items
    with pytest.raises(ServeError, match="truncated"):
        deserialize_bytes(b"\x05\x00")
    with pytest.raises(ServeError, match="longer"):
        deserialize_bytes(b"\x05\x00\x00\x00ab")


def test_input_arrays_raw_and_typed_contents():
    req = pb.ModelInferRequest(model_name="ensemble")
    t = req.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    req.raw_input_contents.append(serialize_bytes([b"hi"]))
    req.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1])
    req.raw_input_contents.append(np.array([[7]], dtype="<i4").tobytes())
    arrays = input_arrays(req)
    assert arrays["text_input"].tolist() == [[b"hi"]] and arrays["max_tokens"].tolist() == [[7]]
    typed = pb.ModelInferRequest()
    t = typed.inputs.add(name="temperature", datatype="FP32", shape=[1])
    t.contents.fp32_contents.append(0.5)
    assert input_arrays(typed)["temperature"].tolist() == [0.5]
    bad = pb.ModelInferRequest()
    bad.inputs.add(name="max_tokens", datatype="INT32", shape=[2, 1]).contents.int_contents.append(1)
    with pytest.raises(ServeError, match="needs 2 elements"):
        input_arrays(bad)


def test_ensemble_mapping_follows_tensorrt_llm_rules():
    arrays = {"text_input": np.array([[b"a"], [b"bb"]], dtype=object), "max_tokens": np.array([[5], [6]], np.int32),
              "stop_words": np.array([[b"END", b""], [b"", b""]], dtype=object),
              "random_seed": np.array([[9], [9]], np.uint64), "end_id": np.array([[2], [2]], np.int32)}
    parsed = ensemble.parse(arrays, [], False, [1, 2], 100)
    p0, p1 = parsed.params
    assert parsed.prompts == ["a", "bb"] and (p0.max_tokens, p1.max_tokens) == (5, 6)
    assert p0.temperature == 0.0 and p0.stop == ["END"] and p1.stop == [] and p0.seed == 9
    assert p0.stop_token_ids == [2] and parsed.outputs == ["text_output"]
    sampled = ensemble.parse({**arrays, "top_p": np.array([[0.85]], np.float32),
                              "temperature": np.array([[0.7]], np.float32)}, [], False, [1, 2], 100)
    assert sampled.params[0].top_p == pytest.approx(0.85) and sampled.params[1].temperature == pytest.approx(0.7)
    for extra, match in [({"beam_width": np.array([[2]], np.int32)}, "beam_width"),
                         ({"bad_words": np.array([[b"x"]], dtype=object)}, "bad_words"),
                         ({"prompt_embedding_table": np.zeros((1, 1), np.float32)}, "unexpected inputs")]:
        with pytest.raises(ServeError, match=match):
            ensemble.parse({**arrays, **extra}, [], False, [1, 2], 100)
    with pytest.raises(ServeError, match="one prompt"):
        ensemble.parse({**arrays, "stream": np.array([[True]])}, [], True, [1, 2], 100)


# ---- tritonclient end to end (fake engine) ----------------------------------------------------------
def test_health_and_metadata(client):
    assert client.is_server_live(headers=HEADERS) and client.is_server_ready(headers=HEADERS)
    for name in ("ensemble", "autoglm-phone-9b"):
        assert client.is_model_ready(name, headers=HEADERS)
    assert not client.is_model_ready("other", headers=HEADERS)
    meta = client.get_model_metadata("ensemble", headers=HEADERS)
    assert {"text_input", "max_tokens", "stream", "temperature", "top_p", "top_k", "stop_words", "bad_words",
            "end_id", "pad_id", "beam_width", "random_seed"} <= {i.name for i in meta.inputs}
    assert [o.name for o in meta.outputs][0] == "text_output"
    assert client.get_server_metadata(headers=HEADERS).name == "autoglm-trt"


def test_model_infer(client, fake_server):
    result = client.infer("ensemble", triton_inputs("hi", 4), headers=HEADERS)
    assert result.as_numpy("text_output").tolist() == [[fake_server.engine.script[:4].encode()]]
    lp = client.infer("ensemble", triton_inputs("hi", 3, return_log_probs=(True, "BOOL")), headers=HEADERS)
    assert lp.as_numpy("output_log_probs").shape == (1, 1, 3)
    assert lp.as_numpy("cum_log_probs")[0, 0] == pytest.approx(-1.5)
    whole = client.infer("ensemble", triton_inputs("hi", 2, exclude_input_in_output=(False, "BOOL")), headers=HEADERS)
    assert whole.as_numpy("text_output")[0, 0].decode().startswith("hi")


def test_model_infer_errors(client):
    with pytest.raises(InferenceServerException) as info:
        client.infer("nope", triton_inputs("hi"), headers=HEADERS)
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        client.infer("ensemble", triton_inputs("hi", 100_000), headers=HEADERS)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "max_model_len" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer("ensemble", triton_inputs("hi"))  # no key
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"


def test_model_stream_infer_decoupled(client, fake_server):
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=functools.partial(lambda q, result, error: q.put((result, error)), results), headers=HEADERS)
    try:
        client.async_stream_infer("ensemble", triton_inputs("hi", 5, stream=True), request_id="a")
        client.async_stream_infer("ensemble", triton_inputs("yo", 3, stream=True), request_id="b")
        client.async_stream_infer("ensemble", triton_inputs("x", 10**6, stream=True), request_id="bad")
        texts, finals, errors = {"a": "", "b": ""}, set(), []
        while len(finals) < 2 or not errors:
            result, error = results.get(timeout=20)
            if error is not None:
                errors.append(error)
                continue
            resp = result.get_response()
            texts[resp.id] += result.as_numpy("text_output")[0, 0].decode()
            if resp.parameters["triton_final_response"].bool_param:
                finals.add(resp.id)
    finally:
        client.stop_stream()
    script = fake_server.engine.script
    assert texts == {"a": script[:5], "b": script[:3]}
    assert "max_model_len" in str(errors[0])


def test_grpc_health_service_and_reflection(fake_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(fake_server.grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")])))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        assert answers[1].file_descriptor_response.file_descriptor_proto


# ---- generated code -------------------------------------------------------------------------------
def test_generated_modules_match_the_proto(tmp_path):
    """inference_pb2.py must be regenerated (scripts/gen_protos.sh) whenever inference.proto changes."""
    grpc_tools = pytest.importorskip("grpc_tools")
    from google.protobuf import descriptor_pb2

    out = tmp_path / "set.pb"
    rc = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(REPO), f"--descriptor_set_out={out}",
                         "autoglm_trt/serve/grpc/inference.proto"], capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    fresh.ClearField("source_code_info")
    _clear_json_names(fresh.message_type)  # NOTE: protoc embeds descriptors without json_name
    checked_in = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert fresh == checked_in
    assert grpc_tools is not None


def _clear_json_names(messages) -> None:
    for msg in messages:
        for field in msg.field:
            field.ClearField("json_name")
        _clear_json_names(msg.nested_type)


def test_generated_code_has_no_runtime_version_pin():
    """Loadable with protobuf 5.26 ... 7.x and grpcio >= 1.62 (see scripts/gen_protos.sh)."""
    src = (REPO / "autoglm_trt/serve/grpc/inference_pb2.py").read_text()
    grpc_src = (REPO / "autoglm_trt/serve/grpc/inference_pb2_grpc.py").read_text()
    assert "ValidateProtobufRuntimeVersion" not in src and "GRPC_GENERATED_VERSION" not in grpc_src
    assert "POOL = _descriptor_pool.DescriptorPool()" in src  # private pool: coexists with tritonclient
    assert pb.ModelInferRequest.DESCRIPTOR.file.pool is pb.POOL


def test_cancelled_grpc_requests_are_aborted():
    engine = FakeEngine(script="z" * 10_000, step_delay=0.005)
    with InProcessServer(engine) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException) as info:  # unary: the deadline passes mid-generation
            client.infer("ensemble", triton_inputs("hi", 3000), client_timeout=0.3)
        assert "Deadline" in str(info.value) or "DEADLINE" in str(info.value.status())
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=functools.partial(lambda q, result, error: q.put((result, error)), results))
        client.async_stream_infer("ensemble", triton_inputs("hi", 3000, stream=True), request_id="long")
        results.get(timeout=10)  # it is generating
        client.stop_stream(cancel_requests=True)
        deadline = time.time() + 5
        while (engine.requests or server.state.client.in_flight) and time.time() < deadline:
            time.sleep(0.02)
        assert len(engine.aborted) == 2 and not engine.requests
        client.close()
