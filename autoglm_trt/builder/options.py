"""Options of `autoglm-trt export` and `autoglm-trt build`, validated where they are made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from autoglm_trt.config import (BLOCK_SIZES, DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS,
                                QUANT_MODES, ModelConfig, cuda_graph_sizes)

DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
                 "half": "float16", "fp32": "float32", "float32": "float32", "float": "float32"}
BACKENDS = ("torch", "tensorrt")
PAGE_SIZES = BLOCK_SIZES


def normalize_dtype(name: str, allow_auto: bool = False) -> str:
    if allow_auto and name == "auto":
        return name
    if name not in DTYPE_ALIASES:
        allowed = "auto, " if allow_auto else ""
        raise ValueError(f"dtype must be one of {allowed}bf16, fp16, fp32 (or bfloat16, float16, float32), "
                         f"got {name!r}")
    return DTYPE_ALIASES[name]


def parse_int_list(raw: str | None) -> tuple[int, ...] | None:
    """"1,2,4,8" -> (1, 2, 4, 8); None or "" -> None."""
    if not raw:
        return None
    try:
        return tuple(sorted({int(x) for x in raw.replace(" ", "").split(",") if x}))
    except ValueError:
        raise ValueError(f"expected comma-separated integers like 1,2,4,8, got {raw!r}") from None


@dataclass(frozen=True)
class ShapeLimits:
    """The largest shapes an engine serves (they become the max of every optimization profile, and the
    engine directory's defaults for the runtime: config.py's defaults, as a checkpoint gets them)."""

    max_batch_size: int = DEFAULT_MAX_NUM_SEQS  # sequences in one step
    max_seq_len: int | None = None  # prompt + generated tokens of one sequence; None: the model's maximum
    max_num_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS  # tokens in one step (chunked prefill splits longer prompts)
    max_image_patches: int = 16384  # vision patches in one encoder call (16384 = a 1792x1792 image)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_seq_len", "max_num_tokens", "max_image_patches"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_image_patches < 4 or self.max_image_patches % 4:
            raise ValueError(f"max_image_patches must be a multiple of 4 (2x2 merge) and >= 4, got "
                             f"{self.max_image_patches}")

    def for_model(self, cfg: ModelConfig) -> "ShapeLimits":
        """max_seq_len left open -> the model's max_position_embeddings."""
        return self if self.max_seq_len is not None else replace(self, max_seq_len=cfg.text.max_position_embeddings)


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 17  # ONNX opset (>= 17: LayerNormalization; GridSample needs >= 16)
    dtype: str = "auto"  # auto (float32 for float32 checkpoints, else float16) | float16 | bfloat16 | float32
    verify: bool = True  # compare every graph with PyTorch through onnxruntime
    atol: float = 1e-3  # largest accepted max-abs difference (float32; float16 graphs get 5e-2)
    with_llm: bool = True
    with_vision: bool = True
    limits: ShapeLimits = ShapeLimits()

    def __post_init__(self) -> None:
        if not 17 <= self.opset <= 21:
            raise ValueError(f"opset must be in [17, 21], got {self.opset}")
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype, allow_auto=True))
        if not (self.with_llm or self.with_vision):
            raise ValueError("nothing to export: with_llm and with_vision are both off")


@dataclass(frozen=True)
class BuildConfig:
    dtype: str = "bfloat16"  # weight dtype of the engine
    quant: str = "none"  # none | int8-wo (weight-only INT8) | w8a8 (INT8 weights and activations)
    act_quant: str = "dynamic"  # w8a8 activation scales: dynamic (per token) | static (per tensor, calibrated)
    tp: int = 1  # tensor-parallel ranks: one rank{N}.safetensors each
    page_size: int = DEFAULT_BLOCK_SIZE  # KV-cache block size (tokens)
    cuda_graph_batch_sizes: tuple[int, ...] = ()  # () -> config.cuda_graph_sizes(limits.max_batch_size)
    backend: str = "torch"  # torch (our runtime) | tensorrt (also compile .engine files; needs TensorRT)
    vision_onnx: bool = False  # also export the vision encoder as visual/model.onnx
    opset: int = 17
    calib_dir: str | None = None  # calibration cache directory (SmoothQuant statistics for w8a8)
    source_hash: str = "fast"  # fast | full (see manifest.source_checkpoint_hash)
    limits: ShapeLimits = ShapeLimits()

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        if self.quant not in QUANT_MODES:
            raise ValueError(f"quant must be one of {', '.join(QUANT_MODES)}, got {self.quant!r}")
        if self.act_quant not in ("dynamic", "static"):
            raise ValueError(f"act_quant must be dynamic or static, got {self.act_quant!r}")
        if self.act_quant == "static" and (self.quant != "w8a8" or not self.calib_dir):
            raise ValueError("act_quant static needs --quant w8a8 and --calib CALIB_DIR (calibrated activation ranges)")
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.page_size not in PAGE_SIZES:
            raise ValueError(f"page_size must be one of {', '.join(map(str, PAGE_SIZES))}, got {self.page_size}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.source_hash not in ("fast", "full"):
            raise ValueError(f"source_hash must be fast or full, got {self.source_hash!r}")
        sizes = tuple(sorted(set(self.cuda_graph_batch_sizes or cuda_graph_sizes(self.limits.max_batch_size))))
        bad = [b for b in sizes if not 1 <= b <= self.limits.max_batch_size]
        if bad:
            raise ValueError(f"cuda_graph_batch_sizes must lie in [1, max_batch_size={self.limits.max_batch_size}], "
                             f"got {list(bad)}")
        object.__setattr__(self, "cuda_graph_batch_sizes", sizes)

    def to_dict(self) -> dict:
        return asdict(self)
