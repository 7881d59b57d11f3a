"""The engine directory's manifest: versioned, self-describing, checked before anything is loaded.

An engine directory's `config.json` is the source checkpoint's Hugging Face config (dtype set to the
built one, so every tool that reads a model directory reads this one too) plus one key,
`autoglm_trt_engine`, holding the manifest below. This module imports no torch: the CLI, the server
and the loader read it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autoglm_trt.errors import UserError

FORMAT = "autoglm-trt-engine"
FORMAT_VERSION = 2  # 2: INT8 builds also hold an int8 LM head (quantization.lm_head); 1 still loads
SUPPORTED_FORMAT_VERSIONS = (1, 2)
MANIFEST_KEY = "autoglm_trt_engine"
_CHUNK = 16 << 20


@dataclass(frozen=True)
class FileEntry:
    sha256: str  # hex digest of the whole file
    bytes: int  # size on disk


@dataclass(frozen=True)
class SourceInfo:
    path: str  # where the checkpoint was read from (informative only)
    sha256: str  # see source_checkpoint_hash
    hash_method: str  # "fast": config + index + safetensors headers and sizes; "full": every byte


@dataclass
class EngineManifest:
    toolkit_version: str
    source: SourceInfo
    build: dict  # BuildConfig as a dict (dtype, quant, tp, limits, backend, ...)
    quantization: dict  # {"mode": ..., "calibration": {... or None}}
    profiles: dict  # {"runtime": {...}, "llm": {"context": ..., "generation": ...}, "visual": {...}}
    files: dict[str, FileEntry] = field(default_factory=dict)  # relative path -> checksum
    gpu: dict | None = None  # {"name", "compute_capability"} when built for one GPU (TensorRT engines)
    command: str = ""  # the build command line, quoted back in "rebuild with ..." messages
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def tp_size(self) -> int:
        return int(self.build["tp"])

    def to_dict(self) -> dict:
        out = asdict(self)
        out["files"] = {k: asdict(v) for k, v in sorted(self.files.items())}
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> EngineManifest:
        raw = dict(raw)
        raw["source"] = SourceInfo(**raw["source"])
        raw["files"] = {k: FileEntry(**v) for k, v in raw.get("files", {}).items()}
        return cls(**raw)


# ---- hashing ---------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> FileEntry:
    return FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(min(n, 100 << 20))


def source_checkpoint_hash(model_dir: Path, weight_files: list[Path], method: str = "fast") -> str:
    """sha256 identifying a checkpoint.

    "fast" (the default, milliseconds for 20 GB): config.json, the index, and every weight file's name,
    size and safetensors header (tensor names, dtypes, shapes, offsets). It catches a different model,
    layout or dtype, not a re-trained checkpoint of identical layout. "full" hashes every byte.
    """
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        p = model_dir / name
        h.update(name.encode() + b"\0" + (p.read_bytes() if p.is_file() else b""))
    for p in sorted(weight_files):
        h.update(p.name.encode() + b"\0" + str(p.stat().st_size).encode())
        h.update(_safetensors_header(p) if method == "fast" else bytes.fromhex(sha256_file(p)))
    return h.hexdigest()


# ---- reading and checking --------------------------------------------------------------------------
def is_engine_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return MANIFEST_KEY in json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


def require_checkpoint_dir(model_dir: str | Path) -> None:
    """build/export read Hugging Face checkpoints, not engine directories."""
    if is_engine_dir(model_dir):
        source = read_manifest(model_dir).source.path
        raise UserError(f"{model_dir} is an engine directory; build or export from the Hugging Face checkpoint "
                        f"it was built from ({source})")


def rebuild_command(engine_dir: str | Path, m: dict, tp: int | None = None) -> str:
    """The build line that makes this engine again (its manifest's own), with --tp set to `tp` when given."""
    cmd = m.get("command") or f"autoglm-trt build MODEL_DIR -o {engine_dir}"
    if tp is None:
        return cmd
    return re.sub(r"--tp \d+", f"--tp {tp}", cmd) if "--tp " in cmd else f"{cmd} --tp {tp}"


def rebuild_hint(engine_dir: str | Path, m: dict) -> str:
    return f"rebuild it: `{rebuild_command(engine_dir, m)}`"


def read_manifest(engine_dir: str | Path) -> EngineManifest:
    """Parse and version-check an engine directory's manifest (UserError saying what to rebuild)."""
    engine_dir = Path(engine_dir)
    try:
        raw = json.loads((engine_dir / "config.json").read_text())[MANIFEST_KEY]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{engine_dir} is not an autoglm-trt engine directory ({exc})") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or version not in SUPPORTED_FORMAT_VERSIONS:
        from autoglm_trt import __version__

        raise UserError(f"{engine_dir} has engine format version {version!r}; autoglm-trt {__version__} reads "
                        f"version(s) {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}: "
                        f"{rebuild_hint(engine_dir, raw if isinstance(raw, dict) else {})}")
    try:
        return EngineManifest.from_dict(raw)
    except (TypeError, KeyError) as exc:
        raise UserError(f"{engine_dir}/config.json has a damaged manifest ({exc}): "
                        f"{rebuild_hint(engine_dir, raw)}") from None


def checksums_enabled() -> bool:
    """False when AUTOGLM_TRT_SKIP_CHECKSUMS=1: loaders then check file sizes only."""
    return os.environ.get("AUTOGLM_TRT_SKIP_CHECKSUMS", "").lower() not in ("1", "true", "yes")


def verify_files(engine_dir: str | Path, manifest: EngineManifest, names: list[str] | None = None,
                 checksums: bool | None = None) -> None:
    """Check size and sha256 of `names` (default: every file in the manifest) against the manifest.

    checksums=None reads AUTOGLM_TRT_SKIP_CHECKSUMS: "1" checks sizes only (hashing 20 GB takes ~10 s).
    """
    engine_dir = Path(engine_dir)
    checksums = checksums_enabled() if checksums is None else checksums
    for name in names if names is not None else sorted(manifest.files):
        entry, path = manifest.files.get(name), engine_dir / name
        if entry is None:
            raise UserError(f"{engine_dir}: {name} is not listed in the manifest: "
                            f"{rebuild_hint(engine_dir, asdict(manifest))}")
        if not path.is_file():
            raise UserError(f"{path} is missing: {rebuild_hint(engine_dir, asdict(manifest))}")
        if path.stat().st_size != entry.bytes or (checksums and sha256_file(path) != entry.sha256):
            raise UserError(f"{path} does not match its sha256 in the manifest (modified or truncated): "
                            f"{rebuild_hint(engine_dir, asdict(manifest))}")


def check_tp(engine_dir: str | Path, manifest: EngineManifest, tp_size: int) -> None:
    if manifest.tp_size != tp_size:
        raise UserError(f"{engine_dir} was built for tensor parallelism {manifest.tp_size} but is being loaded "
                        f"with {tp_size}: run with --tensor-parallel-size {manifest.tp_size}, or rebuild it with "
                        f"--tp {tp_size}")


def check_gpu(engine_dir: str | Path, manifest: EngineManifest, name: str, compute_capability: str) -> None:
    """TensorRT engines run only on the GPU architecture they were built for."""
    built = manifest.gpu
    if built and built.get("compute_capability") != compute_capability:
        raise UserError(f"{engine_dir} holds TensorRT engines built for {built.get('name')} (sm "
                        f"{built.get('compute_capability')}); this GPU is {name} (sm {compute_capability}): "
                        f"{rebuild_hint(Path(engine_dir), asdict(manifest))} on this machine")


def write_config(engine_dir: Path, hf_config: dict, manifest: EngineManifest) -> None:
    """config.json = the Hugging Face config + the manifest under MANIFEST_KEY (written last)."""
    out = dict(hf_config)
    out[MANIFEST_KEY] = manifest.to_dict()
    tmp = engine_dir / "config.json.tmp"
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(engine_dir / "config.json")


# ---- what the runtime reads of an engine directory ------------------------------------------------
def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def files_to_verify(manifest: EngineManifest) -> list[str]:
    """The small files the runtime reads (not the weights: those are hashed while they load)."""
    skip_suffixes = (".onnx", ".data", ".engine", ".safetensors")
    return [n for n in manifest.files if not n.endswith(skip_suffixes) and not n.startswith("calibration/")]


# Options whose value is baked into the rank files (pre-sharded, pre-quantized): another value needs a rebuild.
FIXED_BY_BUILD = {"tensor_parallel_size": "--tp", "quant": "--quant", "act_quant": "--act-quant"}


def engine_defaults(engine_dir: str | Path) -> dict:
    """Engine options the build fixed (EngineArgs names): limits, page size, CUDA-graph sizes, TP, quant."""
    m = read_manifest(engine_dir)
    lim = m.build["limits"]
    return {"max_model_len": lim["max_seq_len"], "max_num_seqs": lim["max_batch_size"],
            "max_num_batched_tokens": lim["max_num_tokens"], "block_size": m.build["page_size"],
            "cuda_graph_batch_sizes": tuple(m.build["cuda_graph_batch_sizes"]),
            "tensor_parallel_size": m.tp_size, "quant": m.quantization.get("mode", "none"),
            "act_quant": m.quantization.get("act_quant") or "dynamic"}


def check_fixed_options(engine_dir: str | Path, defaults: dict, given: dict) -> None:
    """Refuse an explicit option that contradicts what the build baked into the rank files."""
    for key, flag in FIXED_BY_BUILD.items():
        if key == "act_quant" and defaults["quant"] != "w8a8":
            continue  # NOTE: only w8a8 engines carry an activation-scale mode
        if key in given and given[key] != defaults[key]:
            raise UserError(f"{engine_dir} was built with {flag} {defaults[key]}, but {key}={given[key]!r} was "
                            f"asked for: leave {key} out (the engine's value is the default), or rebuild with "
                            f"{flag} {given[key]}")


def build_defaults(model_dir: str | Path, given: dict) -> dict:
    """An engine directory's build options (EngineArgs names), after refusing an explicit option that
    contradicts its rank files; {} for a checkpoint directory."""
    if not is_engine_dir(model_dir):
        return {}
    defaults = engine_defaults(model_dir)
    check_fixed_options(model_dir, defaults, given)
    return defaults
