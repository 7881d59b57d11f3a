"""Values several commands take (--dtype, --device), checked while the command line is parsed, so
that a typo is one `error:` line before anything loads (not a KeyError minutes later)."""

from __future__ import annotations

from collections.abc import Callable

from autoglm_trt.errors import UserError

DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")
# NOTE: vLLM's spellings (half, float) and the short ones build/export use (bf16, fp16, fp32)
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                 "float": "float32"}


def choice(flag: str, allowed: tuple[str, ...], aliases: dict[str, str] | None = None) -> Callable:
    """A typer callback: the value, with aliases resolved, or a UserError naming the allowed ones."""
    aliases = aliases or {}

    def check(value: str | None) -> str | None:
        if value is None:
            return None
        resolved = aliases.get(value.lower(), value.lower())
        if resolved not in allowed:
            raise UserError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
        return resolved

    return check


dtype_choice = choice("--dtype", DTYPES, DTYPE_ALIASES)
device_choice = choice("--device", DEVICES)
