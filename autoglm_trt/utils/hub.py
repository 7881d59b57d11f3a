"""A model named by its Hugging Face hub id (`zai-org/AutoGLM-Phone-9B`), as vLLM's and SGLang's command
lines name it: found in the local Hugging Face cache, never downloaded (this toolkit does not fetch weights)."""

from __future__ import annotations

import re
from pathlib import Path

from autoglm_trt.errors import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(name: str) -> str:
    """`name` itself when it is a local path (or not a hub id); else the cached snapshot directory of the hub
    id (HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub, as huggingface_hub resolves it)."""
    if Path(name).expanduser().exists() or not _HUB_ID.match(name):
        return name
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:  # pragma: no cover - a dependency; a broken install says so
        raise UserError(f"{name} is not a local directory (and huggingface_hub, which finds hub ids in the "
                        f"Hugging Face cache, is not installed)") from None
    try:
        return snapshot_download(name, local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError; a malformed id a ValueError
        raise UserError(f"{name} is neither a local directory nor in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
                        f"download it first (`hf download {name}`) or pass the model's local directory") from None
