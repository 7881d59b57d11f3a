"""The `serve` and `bench` commands (registered on the typer app in autoglm_trt/cli.py).

Nothing heavy is imported here: the CLI must start fast; each command imports what it runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from autoglm_trt.errors import UserError
from autoglm_trt.serve.agent_prompts import LANGS  # NOTE: constants only (the CLI must start fast)
from autoglm_trt.utils.choices import choice, device_choice, dtype_choice

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _json_option(raw: Optional[str], name: str) -> dict:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"{name} must be a JSON object, e.g. '{{\"max_pixels\": 5000000}}' ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"{name} must be a JSON object, got {raw}")
    return value


def serve_cmd(
    model_dir: Optional[str] = typer.Argument(None, help="Hugging Face checkpoint or engine directory, or a hub id "
                                              "in the local Hugging Face cache", show_default=False),
    model: Optional[str] = typer.Option(None, "--model", "--model-path", help="the model, vLLM's and SGLang's way"),
    host: str = typer.Option("0.0.0.0", help="address to listen on"),
    port: int = typer.Option(8000, help="OpenAI HTTP API port"),
    grpc_port: int = typer.Option(8001, envvar="AUTOGLM_GRPC_PORT", help="KServe v2 gRPC port (-1: no gRPC server)"),
    served_model_name: str = typer.Option("autoglm-phone-9b", help="the model name clients send"),
    api_key: Optional[str] = typer.Option(None, envvar="AUTOGLM_API_KEY",
                                          help="require `Authorization: Bearer KEY` (HTTP and gRPC)"),
    max_model_len: Optional[int] = typer.Option(None, help="prompt + generated tokens per request"),
    max_num_seqs: Optional[int] = typer.Option(None, help="sequences in the running batch"),
    max_num_batched_tokens: Optional[int] = typer.Option(None, help="token budget of one step"),
    max_queue: int = typer.Option(1024, help="requests waiting beyond the batch; more get 429"),
    gpu_memory_utilization: Optional[float] = typer.Option(None, help="fraction of GPU memory to use"),
    allowed_local_media_path: Optional[Path] = typer.Option(None, help="serve file:// images below this dir"),
    allow_remote_media: bool = typer.Option(False, help="fetch http(s) image URLs"),
    max_pixels: Optional[int] = typer.Option(None, help="image processor max_pixels (vLLM: mm_processor_kwargs)"),
    mm_processor_kwargs: Optional[str] = typer.Option(None, help="vLLM style JSON, e.g. '{\"max_pixels\": 5000000}'"),
    limit_images_per_prompt: int = typer.Option(10, help="images per prompt at most"),
    limit_mm_per_prompt: Optional[str] = typer.Option(None, help="vLLM style JSON, e.g. '{\"image\": 10}'"),
    max_image_pixels: int = typer.Option(64_000_000, help="decoded pixels per image at most (bomb guard)"),
    tp: Optional[int] = typer.Option(None, "--tp", help="tensor-parallel GPUs (default: an engine directory's, "
                                     "else 1; also --tensor-parallel-size, --tp-size)"),
    reasoning_parser: Optional[str] = typer.Option(None, help="glm45: split <think> into reasoning_content"),
    constrain_actions: bool = typer.Option(False, help="every chat reply that asks for no other format is a "
                                           "well-formed phone-agent step: <think>...</think><answer>ACTION</answer>"),
    dtype: str = typer.Option("auto", help="auto | bfloat16 | float16 | float32", callback=dtype_choice),
    device: str = typer.Option("auto", help="auto | cpu | cuda", callback=device_choice),
    num_kv_blocks: Optional[int] = typer.Option(None, help="fixed number of KV blocks"),
    block_size: Optional[int] = typer.Option(None, help="tokens per KV block"),
    enforce_eager: bool = typer.Option(False, help="no CUDA graphs"),
    prefix_caching: bool = typer.Option(True, help="reuse KV blocks of shared prompt prefixes"),
    seed: int = typer.Option(0, help="engine seed"),
    image_preprocess_device: str = typer.Option("auto", help="auto: resize/normalize images on the engine's GPU "
                                                "(~1 ms, within a grey level of transformers) | cpu: transformers' exact numbers"),
    quantization: Optional[str] = typer.Option(None, "--quantization", "--quant",
                                               help="quantize a checkpoint at load: int8-wo | w8a8 | int4-awq | fp8 (e4m3 "
                                               "weights + activations, Ada/Hopper; vLLM's --quantization fp8)"),
    log_requests: bool = typer.Option(False, help="log every HTTP request: route, status, time, prompt size"),
    log_format: str = typer.Option("text", help="text | json (one JSON object per line)",
                                   callback=choice("--log-format", LOG_FORMATS)),
    log_level: str = typer.Option("info", help="debug | info | warning | error",
                                  callback=choice("--log-level", LOG_LEVELS)),
    max_request_bytes: int = typer.Option(32 << 20, help="HTTP request bodies larger than this get 413 (default "
                                          "32 MiB: ten 1080x2400 screenshots as data URLs are ~12 MB)"),
    accepted_flag: Optional[list[str]] = typer.Option(None, hidden=True, help="vLLM/SGLang flags with no meaning "
                                                      "here (serve/flags.py puts them here to be logged)"),
    speculative: Optional[str] = typer.Option(None, help="speculative decoding without a draft model: ngram (n-gram "
                                              "matches in the prompt and output) | suffix (also recent outputs) | off"),
    speculative_config: Optional[str] = typer.Option(None, help="vLLM's JSON spelling, e.g. '{\"method\": \"ngram\", "
                                                     "\"num_speculative_tokens\": 8}'"),
    replicas: Optional[int] = typer.Option(None, help="run N engine replicas on Ray Serve (pip install "
                                           "'autoglm-trt[ray]'), each agent session kept on one replica"),
    max_replicas: Optional[int] = typer.Option(None, help="with --replicas: autoscale up to this many replicas"),
    ray_address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="with --replicas: join this Ray "
                                              "cluster (e.g. auto, or HEAD_IP:6379) instead of starting a local one"),
) -> None:
    """Serve the model: OpenAI API over HTTP and KServe v2 over gRPC (/health is 503 until loaded)."""
    opts = dict(locals())  # NOTE: first statement: exactly the options above
    from autoglm_trt.serve.flags import accepted_flag_note
    from autoglm_trt.utils.hub import resolve_model

    if model_dir and model and model_dir != model:
        raise UserError(f"the model is given twice ({model_dir} and --model {model}): name it once")
    name = model_dir or model
    if not name:
        raise UserError("no model: `autoglm-trt serve MODEL_DIR` (or --model MODEL_DIR)")
    opts["model_dir"] = resolve_model(name)
    notes = [accepted_flag_note(f) for f in accepted_flag or []]
    if opts["model_dir"] != name:
        notes.append(f"{name}: found in the Hugging Face cache at {opts['model_dir']}")
    if replicas is not None or max_replicas is not None:
        _run_replicas(opts, notes)
        return
    from autoglm_trt.serve.server import run_server  # NOTE: after the cheap checks: it imports the whole stack

    run_server(_server_config(opts), _engine_args(opts), notes)


def _run_replicas(o: dict, notes: list[str]) -> None:
    """`serve --replicas N`: the same options, served by N engine replicas on Ray Serve."""
    from autoglm_trt.serve.ray_app import ReplicaOptions, run_ray

    try:
        replicas = o["replicas"] if o["replicas"] is not None else 1
        replica_opts = ReplicaOptions(replicas=replicas, max_replicas=o["max_replicas"])
    except ValueError as exc:
        raise UserError(f"--replicas / --max-replicas: {exc}") from None
    run_ray(_server_config(o), _engine_args(o), replica_opts, o["ray_address"], notes)


def _server_config(o: dict):
    """The HTTP/gRPC side of `serve`'s options (vLLM's JSON forms folded in); a bad value is a UserError."""
    from autoglm_trt.serve.config import ServerConfig

    mm = _json_option(o["mm_processor_kwargs"], "--mm-processor-kwargs")
    limits = _json_option(o["limit_mm_per_prompt"], "--limit-mm-per-prompt")
    media = o["allowed_local_media_path"]
    try:
        return ServerConfig(
            host=o["host"], port=o["port"], grpc_port=o["grpc_port"], served_model_name=o["served_model_name"],
            api_key=o["api_key"], max_queue=o["max_queue"], allowed_local_media_path=str(media) if media else None,
            allow_remote_media=o["allow_remote_media"], max_pixels=o["max_pixels"] or mm.get("max_pixels"),
            max_image_pixels=o["max_image_pixels"],
            limit_images_per_prompt=int(limits.get("image", o["limit_images_per_prompt"])),
            reasoning_parser=o["reasoning_parser"], log_requests=o["log_requests"], log_format=o["log_format"],
            log_level=o["log_level"], max_request_bytes=o["max_request_bytes"], constrain_actions=o["constrain_actions"])
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None


def _engine_args(o: dict):
    """The engine side of `serve`'s options, checked before anything loads."""
    from dataclasses import asdict

    from autoglm_trt.config import QUANT_MODES, EngineArgs, SpeculativeConfig

    if o["image_preprocess_device"] not in ("auto", "cpu"):
        raise UserError(f"--image-preprocess-device must be auto or cpu, got {o['image_preprocess_device']!r}")
    if o["quantization"] not in (None, *QUANT_MODES):
        raise UserError(f"--quantization must be one of {', '.join(QUANT_MODES)}, got {o['quantization']!r}")
    try:
        spec = SpeculativeConfig.parse(o["speculative_config"] or o["speculative"])
    except (ValueError, TypeError) as exc:  # NOTE: json.JSONDecodeError is a ValueError
        raise UserError(f"--speculative / --speculative-config: {exc}") from None
    return EngineArgs(str(o["model_dir"]), max_model_len=o["max_model_len"], max_num_seqs=o["max_num_seqs"],
                      max_num_batched_tokens=o["max_num_batched_tokens"],
                      gpu_memory_utilization=o["gpu_memory_utilization"], tensor_parallel_size=o["tp"],
                      num_blocks=o["num_kv_blocks"], block_size=o["block_size"], dtype=o["dtype"],
                      device=o["device"], enforce_eager=o["enforce_eager"], enable_prefix_caching=o["prefix_caching"],
                      seed=o["seed"], image_preprocess_device=o["image_preprocess_device"], quant=o["quantization"],
                      speculative=asdict(spec) if spec.enabled else None)


WORKLOADS = ("text", "agent")


def bench_cmd(
    url: str = typer.Argument(..., help="server base URL, e.g. http://localhost:8000"),
    workload: str = typer.Option("text", help="text: independent prompts at fixed concurrency | agent: Open-AutoGLM-"
                                 "shaped phone-agent sessions (system prompt, text history, a new screenshot a step)",
                                 callback=choice("--workload", WORKLOADS)),
    concurrency: Optional[str] = typer.Option(None, help="text: comma-separated numbers of concurrent clients "
                                              "(default 1,8,32,128)"),
    prompt_len: Optional[int] = typer.Option(None, help="text: prompt tokens per request (calibrated on the server) "
                                             "(default 467)"),
    gen_len: Optional[int] = typer.Option(None, "--gen-len", "--gen", help="tokens generated per request at most "
                                          "(default: text 256, always with ignore_eos; agent 3000, as the phone "
                                          "agent asks)"),
    image: Optional[Path] = typer.Option(None, help="text: PNG/JPEG sent with every request"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON here"),
    num_requests: Optional[int] = typer.Option(None, help="text: requests per level (default 4 x concurrency, >= 16)"),
    max_seconds: Optional[float] = typer.Option(None, help="text: time limit per level (default 120)"),
    model: Optional[str] = typer.Option(None, help="model name (default: the server's)"),
    api_key: Optional[str] = typer.Option(None, envvar="AUTOGLM_API_KEY"),
    logprobs: bool = typer.Option(False, help="time every token via logprobs: use it with random-weight checkpoints, whose "
                                  "tokens mostly decode to no text (it turns off the engine's multi-step windows and "
                                  "speculation for those requests)"),
    unique_images: bool = typer.Option(False, help="text: send every request its own copy of --image (a few pixels "
                                       "differ), so no request hits the image or prefix caches"),
    sessions: Optional[str] = typer.Option(None, help="agent: comma-separated numbers of concurrent sessions, one "
                                           "level each (default 1,8)"),
    steps: Optional[int] = typer.Option(None, help="agent: steps per session (default 6)"),
    ignore_eos: bool = typer.Option(False, help="agent: generate --gen tokens even past the end (random weights); "
                                    "text requests always do"),
    screen_size: Optional[str] = typer.Option(None, help="agent: screenshot WIDTHxHEIGHT (default 1080x2400)"),
    lang: Optional[str] = typer.Option(None, help="agent: the system prompt's language, en (~2.4k characters) | zh "
                                       "(~3.4k) (default en)", callback=choice("--lang", LANGS)),
) -> None:
    """Load-test a running server over the OpenAI streaming API: TTFT, ITL, requests/s, tokens/s (text); or
    phone-agent sessions: per step depth prompt and cached tokens, TTFT, step time, time to the action (agent)."""
    if workload == "agent":
        text_only = {"--concurrency": concurrency, "--prompt-len": prompt_len, "--image": image,
                     "--num-requests": num_requests, "--max-seconds": max_seconds, "--unique-images": unique_images}
        return _bench_agent(url, json_out, gen_len, model, api_key, logprobs, sessions, steps, ignore_eos,
                            screen_size, lang, text_only)
    _refuse_options({"--sessions": sessions, "--steps": steps, "--ignore-eos": ignore_eos,
                     "--screen-size": screen_size, "--lang": lang}, "--workload agent")
    from autoglm_trt.serve.bench import run_bench

    try:
        levels = [int(c) for c in (concurrency or "1,8,32,128").split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--concurrency must be comma-separated integers, got {concurrency!r}") from None
    run_bench(url, levels, prompt_len or 467, gen_len or 256, image, json_out, num_requests=num_requests,
              max_seconds=max_seconds or 120.0, model=model, api_key=api_key, logprobs=logprobs,
              unique_images=unique_images)


def _refuse_options(given: dict, workload: str) -> None:
    """An option of the other workload is a mistake worth one clear line, not a silent no-op."""
    for flag, value in given.items():
        if value not in (None, False):
            raise UserError(f"{flag} is an option of {workload}")


def _bench_agent(url: str, json_out: Optional[Path], gen: Optional[int], model: Optional[str],
                 api_key: Optional[str], logprobs: bool, sessions: Optional[str], steps: Optional[int],
                 ignore_eos: bool, screen_size: Optional[str], lang: Optional[str], text_only: dict) -> None:
    _refuse_options(text_only, "--workload text")
    from autoglm_trt.serve.agent_session import parse_screen_size
    from autoglm_trt.serve.bench_agent import AGENT_MAX_TOKENS, AgentOptions
    from autoglm_trt.serve.bench_agent_report import run_agent_bench

    try:
        levels = [int(n) for n in (sessions or "1,8").split(",") if n.strip()]
    except ValueError:
        raise UserError(f"--sessions must be comma-separated integers, got {sessions!r}") from None
    try:
        size = parse_screen_size(screen_size or "1080x2400")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    opts = AgentOptions(levels, steps if steps is not None else 6, max_tokens=gen or AGENT_MAX_TOKENS,
                        ignore_eos=ignore_eos, screen_size=size, lang=lang or "en", logprobs=logprobs, model=model,
                        api_key=api_key)
    run_agent_bench(url, opts, json_out)
