"""inference.GRPCInferenceService (KServe v2 + Triton's ModelStreamInfer) over the async engine client."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, AsyncIterator

import grpc
import numpy as np

from autoglm_trt import __version__
from autoglm_trt.errors import RequestError
from autoglm_trt.serve.async_engine import merge_outputs
from autoglm_trt.serve.errors import ServeError
from autoglm_trt.serve.grpc import ensemble
from autoglm_trt.serve.grpc import inference_pb2 as pb
from autoglm_trt.serve.grpc import inference_pb2_grpc as pb_grpc
from autoglm_trt.serve.grpc.model_info import ModelStats, model_config, repository_index
from autoglm_trt.serve.grpc.tensors import add_output, input_arrays
from autoglm_trt.serve.openai.prompt import run_processor
from autoglm_trt.serve.openai.structured import validate_constraint
from autoglm_trt.serve.state import ServeState

log = logging.getLogger("autoglm_trt.serve")
MODEL_ALIASES = ("ensemble", "tensorrt_llm_bls")  # the names Triton + TensorRT-LLM clients use
_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
           404: grpc.StatusCode.NOT_FOUND, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
           503: grpc.StatusCode.UNAVAILABLE}


def status_code(exc: RequestError) -> grpc.StatusCode:
    return _STATUS.get(exc.status, grpc.StatusCode.INTERNAL)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServeState) -> None:
        self.state = state
        self.stats = ModelStats()

    # ---- health and metadata ------------------------------------------------------------------
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.state.client.ready)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=self.state.client.ready and self._known(request.name))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name="autoglm-trt", version=__version__, extensions=[])

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        if not self._known(request.name):
            await context.abort(grpc.StatusCode.NOT_FOUND, self._unknown_message(request.name))
        meta = pb.ModelMetadataResponse(name=request.name, versions=["1"], platform=ensemble.MODEL_PLATFORM)
        for name, (dtype, shape) in ensemble.INPUTS.items():
            meta.inputs.add(name=name, datatype=dtype, shape=shape)
        for name, (dtype, shape) in ensemble.OUTPUTS.items():
            meta.outputs.add(name=name, datatype=dtype, shape=shape)
        return meta

    # ---- Triton's model discovery ---------------------------------------------------------------
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        client = self.state.client
        reason = client.load_error or "the model is still loading"
        return repository_index(self._names(), client.ready, reason, request.ready)

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        await self._check_known(request.name, context)
        try:
            max_batch = self.state.engine.config.scheduler.max_num_seqs
        except RequestError as exc:
            await context.abort(status_code(exc), str(exc))
        return pb.ModelConfigResponse(config=model_config(request.name, max_batch))

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        if request.name:
            await self._check_known(request.name, context)
        return self.stats.response([request.name] if request.name else self._names())

    # ---- inference ----------------------------------------------------------------------------
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        t0, t_input, rows = time.perf_counter(), None, 0
        try:
            parsed, prompts = await self._parse(request, streaming_rpc=False)
            t_input, rows = time.perf_counter(), len(prompts)
            resp = await self._run_whole(request, parsed, prompts)
        except RequestError as exc:
            self._record(request.model_name, rows, False, t0, t_input or t0, time.perf_counter())
            await context.abort(status_code(exc), str(exc))
        self._record(request.model_name, rows, True, t0, t_input, time.perf_counter())
        return resp

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        """Each request runs concurrently; its responses are interleaved on the one stream."""
        out: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.ensure_future(self._stream_one(request, out))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                out.put_nowait(None)

        reader = asyncio.ensure_future(read_requests())
        try:
            while (item := await out.get()) is not None:
                yield item
        finally:  # NOTE: the client went away or cancelled: abort everything still running
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _stream_one(self, request: Any, out: asyncio.Queue) -> None:
        t0, t_input, rows, ok = time.perf_counter(), None, 0, False
        try:
            parsed, prompts = await self._parse(request, streaming_rpc=True)
            t_input, rows = time.perf_counter(), len(prompts)
            if not parsed.stream:
                resp = await self._run_whole(request, parsed, prompts)
                resp.parameters["triton_final_response"].bool_param = True
                out.put_nowait(pb.ModelStreamInferResponse(infer_response=resp))
            else:
                async for resp in self._run_stream(request, parsed, prompts):
                    out.put_nowait(pb.ModelStreamInferResponse(infer_response=resp))
            ok = True
        except RequestError as exc:
            out.put_nowait(pb.ModelStreamInferResponse(error_message=str(exc)))
        except Exception as exc:  # NOTE: never let one request's bug end the whole stream
            log.exception("gRPC stream request failed")
            out.put_nowait(pb.ModelStreamInferResponse(error_message=f"internal error: {exc}"))
        finally:
            self._record(request.model_name, rows, ok, t0, t_input or t0, time.perf_counter())

    # ---- helpers ------------------------------------------------------------------------------
    def _names(self) -> list[str]:
        return [self.state.config.served_model_name, *MODEL_ALIASES]

    def _known(self, name: str) -> bool:
        return name in self._names()

    def _record(self, name: str, *args: Any) -> None:
        if self._known(name):  # NOTE: made-up model names must not grow the table
            self.stats.record(name, *args)

    async def _check_known(self, name: str, context: Any) -> None:
        if not self._known(name):
            await context.abort(grpc.StatusCode.NOT_FOUND, self._unknown_message(name))

    def _unknown_message(self, name: str) -> str:
        return (f"unknown model {name!r}; this server serves {self.state.config.served_model_name!r} "
                f"(also reachable as {', '.join(MODEL_ALIASES)})")

    async def _parse(self, request: Any, streaming_rpc: bool) -> tuple[ensemble.EnsembleRequest, list]:
        """Validate the tensors and tokenize the prompts (in a worker thread)."""
        if not self._known(request.model_name):
            raise ServeError(self._unknown_message(request.model_name), status=404)
        engine, max_len = self.state.engine, self.state.max_model_len

        def work() -> tuple[ensemble.EnsembleRequest, list]:
            arrays = input_arrays(request)
            texts = ensemble.prompts_of(arrays)
            self.state.check_prompt_chars(max(map(len, texts), default=0), "text_input")
            prompts = [run_processor(lambda t=t: engine.processor.process_text(t)) for t in texts]
            try:
                parsed = ensemble.parse(arrays, [o.name for o in request.outputs], streaming_rpc,
                                        [len(p.prompt_token_ids) for p in prompts], max_len)
            except (ValueError, TypeError, OverflowError) as exc:  # a value that is no number of its kind
                raise ServeError(f"malformed input tensor: {exc}") from None
            for params in parsed.params:
                validate_constraint(params.structured_outputs, engine, "guided_decoding_guide")
            return parsed, prompts

        return await self.state.preprocess(work)

    async def _submit(self, parsed: ensemble.EnsembleRequest, prompts: list) -> list:
        base = f"grpc-{uuid.uuid4().hex}"
        items = [(f"{base}-{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, parsed.params))]
        return await self.state.client.add_requests(items)

    def _response(self, request: Any) -> Any:
        return pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version or "1",
                                     id=request.id)

    async def _run_whole(self, request: Any, parsed: ensemble.EnsembleRequest, prompts: list) -> Any:
        streams = await self._submit(parsed, prompts)
        n = len(streams)
        texts = [p if parsed.include_input else "" for p in parsed.prompts]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        async for i, out in merge_outputs(self.state.client, streams):
            texts[i] += out.new_text
            logprobs[i] += [e.logprob for e in out.logprobs or []]
        resp = self._response(request)
        self._add_outputs(resp, parsed, texts, logprobs)
        return resp

    async def _run_stream(self, request: Any, parsed: ensemble.EnsembleRequest,
                          prompts: list) -> AsyncIterator[Any]:
        streams = await self._submit(parsed, prompts)
        async for _, out in merge_outputs(self.state.client, streams):
            if not out.new_token_ids and not out.finished:
                continue  # NOTE: like TensorRT-LLM, one response per generated step, text or not
            resp = self._response(request)
            self._add_outputs(resp, parsed, [out.new_text], [[e.logprob for e in out.logprobs or []]])
            resp.parameters["triton_final_response"].bool_param = out.finished
            yield resp

    def _add_outputs(self, resp: Any, parsed: ensemble.EnsembleRequest, texts: list[str],
                     logprobs: list[list[float]]) -> None:
        n = len(texts)
        for name in parsed.outputs:
            if name == "text_output":
                arr = np.array([t.encode() for t in texts], dtype=object)
                add_output(resp, name, arr.reshape(n, 1) if parsed.text_ndim > 1 else arr, "BYTES")
            elif name == "cum_log_probs":
                add_output(resp, name, np.array([[sum(lp)] for lp in logprobs], dtype=np.float32), "FP32")
            elif name == "output_log_probs":
                width = max((len(lp) for lp in logprobs), default=0)
                arr = np.zeros((n, 1, width), dtype=np.float32)
                for i, lp in enumerate(logprobs):
                    arr[i, 0, :len(lp)] = lp
                add_output(resp, name, arr, "FP32")
