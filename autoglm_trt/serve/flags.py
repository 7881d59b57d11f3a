"""vLLM's and SGLang's spellings of `serve`'s flags, so their deployment command lines run unchanged.

`normalize_serve_argv` rewrites the command line before typer parses it: `--a_b` becomes `--a-b` (vLLM
accepts both), an alias becomes our flag (`--context-length` -> `--max-model-len`), and a flag that means
nothing for this engine is dropped and remembered as a hidden `--accepted-flag NAME=VALUE`, which `serve`
logs once (one line each). (`--model` / `--model-path` are `serve`'s own options.)
Anything else passes through for typer to accept or refuse. The README's flag table mirrors ALIASES.

Nothing heavy is imported here: every command line passes through this module.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from autoglm_trt.errors import UserError

ACCEPTED_FLAG = "--accepted-flag"  # hidden option of `serve` carrying the dropped flags


@dataclass(frozen=True)
class Alias:
    """What one foreign flag becomes: our flag (`ours`), or nothing (`ours` None: `why` is logged)."""

    ours: str | None
    takes_value: bool = True
    why: str = ""
    convert: Callable[[str], list[str]] | None = None  # value -> our arguments (JSON forms)


def _ignored(why: str, takes_value: bool = True) -> Alias:
    return Alias(None, takes_value, why)


def _sglang_mm_config(raw: str) -> list[str]:
    """SGLang's --mm-process-config '{"image": {"max_pixels": N}}' -> vLLM's --mm-processor-kwargs."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"--mm-process-config must be JSON, e.g. '{{\"image\": {{\"max_pixels\": 5000000}}}}' "
                        f"({exc})") from None
    image = value.get("image") if isinstance(value, dict) else None
    if not isinstance(image, dict):
        raise UserError(f"--mm-process-config must hold an \"image\" object, got {raw}")
    return ["--mm-processor-kwargs", json.dumps(image)]


# flag (dash form, no leading --) -> Alias. Our own flags need no entry: their underscore forms are
# normalized like any other flag's.
ALIASES: dict[str, Alias] = {
    # vLLM
    "tensor-parallel-size": Alias("--tp"),
    "enable-prefix-caching": Alias("--prefix-caching", False),
    "no-enable-prefix-caching": Alias("--no-prefix-caching", False),
    "enable-log-requests": Alias("--log-requests", False),
    "disable-log-requests": _ignored("requests are logged only with --log-requests", False),
    "mm-encoder-tp-mode": _ignored("the vision tower is placed by the engine itself"),
    "mm-processor-cache-type": _ignored("images are cached by content inside the engine"),
    "chat-template-content-format": _ignored("message content may be a string or a list of parts, both work"),
    "trust-remote-code": _ignored("GLM-4.1V's code is built in", False),
    "disable-log-stats": _ignored("statistics are on /metrics, not in the log", False),
    "uvicorn-log-level": _ignored("use --log-level"),
    "enable-chunked-prefill": _ignored("chunked prefill is always on", False),
    "swap-space": _ignored("preempted requests are recomputed, not swapped"),
    "max-log-len": _ignored("--log-requests logs sizes, not prompts"),
    "media-io-kwargs": _ignored("video input is not supported (images only)"),
    "disable-fastapi-docs": _ignored("/docs is served", False),
    # NOTE: tool calling belongs to structured outputs (issue 22), which may give these a meaning
    "tool-call-parser": _ignored("tool calls are not parsed by this server"),
    "enable-auto-tool-choice": _ignored("tool calls are not parsed by this server", False),
    # SGLang
    "tp-size": Alias("--tp"),
    "context-length": Alias("--max-model-len"),
    "mem-fraction-static": Alias("--gpu-memory-utilization"),
    "max-running-requests": Alias("--max-num-seqs"),
    "chunked-prefill-size": Alias("--max-num-batched-tokens"),
    "page-size": Alias("--block-size"),
    "random-seed": Alias("--seed"),
    "disable-radix-cache": Alias("--no-prefix-caching", False),
    "mm-process-config": Alias("--mm-processor-kwargs", convert=_sglang_mm_config),
    "mm-enable-dp-encoder": _ignored("the vision tower is placed by the engine itself", False),
    "attention-backend": _ignored("attention kernels are chosen by the engine"),
    "mm-attention-backend": _ignored("attention kernels are chosen by the engine"),
    "enable-torch-compile": _ignored("the engine runs its own kernels and CUDA graphs", False),
    "enable-metrics": _ignored("/metrics is always served", False),
    "skip-server-warmup": _ignored("the engine warms up while /health answers 503", False),
}


def _split(token: str) -> tuple[str, str | None]:
    """'--a_b=1' -> ('a-b', '1'); '--a_b' -> ('a-b', None)."""
    name, eq, value = token[2:].partition("=")
    return name.replace("_", "-"), (value if eq else None)


def normalize_serve_argv(argv: list[str]) -> list[str]:
    """The command line with `serve`'s foreign flags rewritten (other commands: unchanged)."""
    if "serve" not in argv[:1]:
        return list(argv)
    out, i = ["serve"], 1
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            out += argv[i - 1:]
            break
        if not token.startswith("--") or token == "--":
            out.append(token)
            continue
        name, value = _split(token)
        alias = ALIASES.get(name)
        if alias is None:
            out.append(f"--{name}" + (f"={value}" if value is not None else ""))
            continue
        if alias.takes_value and value is None:
            if i >= len(argv):
                raise UserError(f"--{name} needs a value")
            value, i = argv[i], i + 1
        out += _rewrite(name, alias, value)
    return out


def _rewrite(name: str, alias: Alias, value: str | None) -> list[str]:
    if alias.ours is None:
        return [ACCEPTED_FLAG, name if value is None else f"{name}={value}"]
    if alias.convert is not None:
        return alias.convert(value or "")
    return [alias.ours] + ([value] if alias.takes_value else [])


def accepted_flag_note(entry: str) -> str:
    """The log line for one dropped flag (`entry` as carried by --accepted-flag)."""
    name, eq, value = entry.partition("=")
    alias = ALIASES.get(name)
    why = alias.why if alias is not None else "no meaning for this engine"
    return f"accepted --{name}{' ' + value if eq else ''}: no effect here ({why})"
