"""Configuration dataclasses, one per concern, validated in __post_init__.

`ModelConfig` is read from a Hugging Face `config.json` (model_type `glm4v`); the others are the
knobs of the engine (cache, scheduler, parallel) and are filled from the CLI or `LLM(...)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from autoglm_trt.errors import UserError

QUANT_MODES = ("none", "int8-wo", "w8a8", "fp8", "int4-awq")  # how the decoder's linears run (layers/quantize.py)

SUPPORTED_MODEL_TYPES = ("glm4v",)


def _check_positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    mrope_section: tuple[int, ...] = (8, 12, 12)
    max_position_embeddings: int = 65536
    attention_bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size"):
            _check_positive(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads, got "
                             f"{self.num_attention_heads} and {self.num_key_value_heads}")
        if 2 * sum(self.mrope_section) != self.rotary_dim:
            raise ValueError(f"mrope_section {list(self.mrope_section)} must sum to rotary_dim/2 = "
                             f"{self.rotary_dim // 2}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 12
    intermediate_size: int = 13696
    out_hidden_size: int = 4096
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    image_size: int = 336
    in_channels: int = 3
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attention_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "spatial_merge_size"):
            _check_positive(name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151343
    video_token_id: int = 151344
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340
    video_start_token_id: int = 151341
    video_end_token_id: int = 151342
    eos_token_ids: tuple[int, ...] = (151329, 151336, 151338, 151348)
    pad_token_id: int = 151329
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(f"config.json has model_type {model_type!r}; autoglm-trt serves "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)} (GLM-4.1V / AutoGLM-Phone-9B) only")
        # NOTE: older configs keep the text fields at the top level; text_config wins where both exist.
        text_raw = {k: v for k, v in raw.items() if k not in ("text_config", "vision_config")}
        text_raw.update(raw.get("text_config") or {})
        vision_raw = raw.get("vision_config") or {}
        eos = text_raw.get("eos_token_id") or list(cls.eos_token_ids)
        return cls(
            text=_text_from_dict(text_raw),
            vision=_vision_from_dict(vision_raw),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
            pad_token_id=text_raw.get("pad_token_id") or cls.pad_token_id,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            torch_dtype=str(text_raw.get("dtype") or raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            **{k: raw[k] for k in ("image_token_id", "video_token_id", "image_start_token_id",
                                   "image_end_token_id", "video_start_token_id", "video_end_token_id")
               if k in raw},
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir)
        if not path.is_dir():
            raise UserError(f"model directory {path} does not exist (create one with "
                            "`autoglm-trt init-random DIR` or download the checkpoint)")
        cfg = path / "config.json"
        if not cfg.is_file():
            raise UserError(f"{path} has no config.json: is it a Hugging Face model directory?")
        try:
            raw = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{cfg} is not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{cfg} must hold a JSON object")
        try:
            return cls.from_dict(raw)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{cfg} is not a valid GLM-4.1V config: {exc}") from None


def _rope_params(raw: dict) -> dict:
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    params.setdefault("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5))
    return params


def _text_from_dict(raw: dict) -> TextConfig:
    rope = _rope_params(raw)
    heads = raw.get("num_attention_heads", 32)
    hidden = raw.get("hidden_size", 4096)
    return TextConfig(
        vocab_size=raw.get("vocab_size", 151552),
        hidden_size=hidden,
        intermediate_size=raw.get("intermediate_size", 13696),
        num_hidden_layers=raw.get("num_hidden_layers", 40),
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        # NOTE: transformers' Glm4vTextAttention derives head_dim from hidden/heads and ignores the key.
        head_dim=hidden // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope["rope_theta"]),
        partial_rotary_factor=float(rope["partial_rotary_factor"]),
        mrope_section=tuple(rope.get("mrope_section", (8, 12, 12))),
        max_position_embeddings=raw.get("max_position_embeddings", 65536),
        attention_bias=raw.get("attention_bias", True),
    )


def _vision_from_dict(raw: dict) -> VisionConfig:
    rope = raw.get("rope_parameters") or {}
    fields = VisionConfig.__dataclass_fields__
    kwargs = {k: v for k, v in raw.items() if k in fields and k != "rope_theta"}
    if "num_attention_heads" in raw and "num_heads" not in raw:
        kwargs["num_heads"] = raw["num_attention_heads"]
    if "num_hidden_layers" in raw and "depth" not in raw:
        kwargs["depth"] = raw["num_hidden_layers"]
    kwargs["rope_theta"] = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    return VisionConfig(**kwargs)


# ---- the engine's options: one set of defaults, read by EngineArgs (LLM, serve, generate) and the build ----
DEFAULT_MAX_NUM_SEQS = 64  # sequences running at once
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192  # token budget of one step, as vLLM's API server on large GPUs
DEFAULT_BLOCK_SIZE = 16  # tokens per KV block
DEFAULT_GPU_MEMORY_UTILIZATION = 0.90
BLOCK_SIZES = (8, 16, 32, 64, 128)
CUDA_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def cuda_graph_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """The decode batch buckets captured as CUDA graphs: the standard ones below max_num_seqs, and
    max_num_seqs itself (so every decode batch replays a graph)."""
    return tuple(b for b in CUDA_GRAPH_BATCH_SIZES if b < max_num_seqs) + (max_num_seqs,)


@dataclass
class CacheConfig:
    block_size: int = DEFAULT_BLOCK_SIZE  # tokens per KV block
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION  # fraction of the GPU the engine may use in all
    num_blocks: int | None = None  # fixed number of KV blocks (CPU default: from max_model_len)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")
        if not 0.05 <= self.gpu_memory_utilization <= 0.99:
            raise ValueError(f"gpu_memory_utilization must be in [0.05, 0.99], got {self.gpu_memory_utilization}")
        if self.num_blocks is not None:
            _check_positive("num_blocks", self.num_blocks)


@dataclass
class SchedulerConfig:
    max_model_len: int  # prompt + generated tokens of one sequence
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS  # sequences running at once
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS  # token budget of one step (chunked prefill past it)
    num_decode_steps: int | None = None  # greedy tokens per multi-step window (None: 8 with CUDA graphs, else 1)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            _check_positive(name, getattr(self, name))
        if self.num_decode_steps is not None and not 1 <= self.num_decode_steps <= 64:
            raise ValueError(f"num_decode_steps must be in [1, 64], got {self.num_decode_steps}")


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    backend: str = "auto"  # "nccl" on GPUs, "gloo" on CPUs

    def __post_init__(self) -> None:
        _check_positive("tensor_parallel_size", self.tensor_parallel_size)
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"backend must be auto, nccl or gloo, got {self.backend}")


SPECULATIVE_METHODS = ("off", "ngram", "suffix")
_VLLM_SPEC_KEYS = {"disable_by_batch_size": "max_batch_size"}  # vLLM's --speculative-config names -> ours


@dataclass
class SpeculativeConfig:
    """Speculative decoding without a draft model: drafts come from n-gram matches in the request's own prompt
    and output ("ngram", vLLM's prompt lookup) and also in recent requests' outputs ("suffix"); they are checked
    in one forward pass and only what greedy decoding itself gives is kept (exact)."""

    method: str = "off"  # off | ngram | suffix
    num_speculative_tokens: int = 8  # draft tokens per row at most (k adapts to the acceptance seen, up to this)
    prompt_lookup_min: int = 1  # shortest n-gram matched
    prompt_lookup_max: int = 4  # longest n-gram matched (the longest match wins)
    max_batch_size: int = 8  # decode batches of more rows do not speculate (verification no longer pays)
    suffix_cache_requests: int = 256  # "suffix": recent outputs kept for matching across requests

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, got "
                             f"{self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 32:
            raise ValueError(f"num_speculative_tokens must be in [1, 32], got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max <= 16:
            raise ValueError("prompt_lookup_min and prompt_lookup_max must satisfy 1 <= min <= max <= 16, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        for name in ("max_batch_size", "suffix_cache_requests"):
            _check_positive(name, getattr(self, name))

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    @classmethod
    def parse(cls, value) -> "SpeculativeConfig":
        """"ngram" | "suffix" | "off" | None, a dict, or vLLM's --speculative-config JSON ({"method": "ngram",
        "num_speculative_tokens": 5, "prompt_lookup_max": 4, ...}); unknown keys are refused."""
        if value is None or isinstance(value, cls):
            return value or cls()
        if isinstance(value, str) and value.strip().startswith("{"):
            value = json.loads(value)
        if isinstance(value, str):
            return cls(method=value)
        if not isinstance(value, dict):
            raise ValueError(f"speculative must be a method name or a JSON object, got {value!r}")
        value = {_VLLM_SPEC_KEYS.get(k, k): v for k, v in value.items()}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative config: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**value)


@dataclass
class EngineConfig:
    model_dir: str
    scheduler: SchedulerConfig
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    device: str = "auto"  # auto | cpu | cuda
    cache: CacheConfig = field(default_factory=CacheConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    enforce_eager: bool = False  # no CUDA graphs
    cuda_graph_batch_sizes: tuple[int, ...] = CUDA_GRAPH_BATCH_SIZES  # decode buckets (<= max_num_seqs) captured
    seed: int = 0
    quant: str = "none"  # none | int8-wo | w8a8 | fp8: quantize the decoder's linears after loading
    calib_dir: str | None = None  # calibration directory (SmoothQuant scales) for w8a8
    act_quant: str = "dynamic"  # w8a8 activation scales: dynamic per token | static from calibration
    # image resize/normalize/patches: "auto" = on the engine's device (a GPU does it in ~1 ms, within a grey
    # level or two of transformers), "cpu" = transformers' numbers exactly (~100 ms per screenshot)
    image_preprocess_device: str = "auto"
    # where max_model_len came from: "the model's maximum" (then lowered to the KV capacity at start-up),
    # "the engine's build" or "--max-model-len"
    max_model_len_origin: str = "--max-model-len"
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device}")
        if self.quant not in QUANT_MODES:
            raise ValueError(f"quant must be one of {', '.join(QUANT_MODES)}, got {self.quant}")
        if self.act_quant not in ("dynamic", "static"):
            raise ValueError(f"act_quant must be dynamic or static, got {self.act_quant}")
        if self.image_preprocess_device not in ("auto", "cpu"):
            raise ValueError(f"image_preprocess_device must be auto or cpu, got {self.image_preprocess_device}")


MODEL_MAXIMUM = "the model's maximum"


@dataclass
class EngineArgs:
    """Every engine option, as `LLM(model_dir, **kwargs)`, `serve` and `generate` take them (vLLM's names).
    None takes the default, in one place (`create_engine_config`): an engine directory's build value,
    else the model's own maximum (max_model_len), else the DEFAULT_* values above."""

    model_dir: str
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int | None = None
    gpu_memory_utilization: float | None = None
    num_blocks: int | None = None  # a fixed KV cache size (blocks); None: sized from memory
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    tensor_parallel_size: int | None = None
    seed: int = 0
    cuda_graph_batch_sizes: tuple[int, ...] | None = None
    num_decode_steps: int | None = None
    quant: str | None = None  # none | int8-wo | w8a8 | fp8 (a checkpoint: at load; an engine: its build's)
    calib_dir: str | None = None
    act_quant: str | None = None
    image_preprocess_device: str = "auto"
    speculative: str | dict | None = None  # off | ngram | suffix, or vLLM's speculative-config object

    def create_engine_config(self) -> EngineConfig:
        """The EngineConfig, defaults applied; UserError for a model directory that cannot serve, or an
        option that contradicts an engine directory's rank files; ValueError naming a bad value."""
        from autoglm_trt.formats.manifest import build_defaults

        fixed = {"max_model_len": self.max_model_len, "max_num_seqs": self.max_num_seqs,
                 "max_num_batched_tokens": self.max_num_batched_tokens, "block_size": self.block_size,
                 "cuda_graph_batch_sizes": self.cuda_graph_batch_sizes,
                 "tensor_parallel_size": self.tensor_parallel_size, "quant": self.quant, "act_quant": self.act_quant}
        given = {k: v for k, v in fixed.items() if v is not None}
        built = build_defaults(self.model_dir, given)  # {} for a checkpoint
        o = {**built, **given}
        max_len, origin = self._max_model_len(o, built)
        seqs = o.get("max_num_seqs", DEFAULT_MAX_NUM_SEQS)
        return EngineConfig(
            model_dir=str(self.model_dir), dtype=self.dtype, device=self.device, enforce_eager=self.enforce_eager,
            seed=self.seed, quant=o.get("quant", "none"), calib_dir=self.calib_dir,
            act_quant=o.get("act_quant", "dynamic"), image_preprocess_device=self.image_preprocess_device,
            cuda_graph_batch_sizes=tuple(o.get("cuda_graph_batch_sizes") or cuda_graph_sizes(seqs)),
            cache=CacheConfig(o.get("block_size", DEFAULT_BLOCK_SIZE),
                              self.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION, self.num_blocks,
                              self.enable_prefix_caching),
            scheduler=SchedulerConfig(max_len, seqs, o.get("max_num_batched_tokens", DEFAULT_MAX_NUM_BATCHED_TOKENS),
                                      self.num_decode_steps),
            parallel=ParallelConfig(o.get("tensor_parallel_size", 1)), max_model_len_origin=origin,
            speculative=SpeculativeConfig.parse(self.speculative))

    def _max_model_len(self, o: dict, built: dict) -> tuple[int, str]:
        """(max_model_len, where it came from); more than the model's positions is refused."""
        most = ModelConfig.from_dir(self.model_dir).text.max_position_embeddings
        if "max_model_len" not in o:
            return most, MODEL_MAXIMUM
        if o["max_model_len"] > most:
            raise ValueError(f"max_model_len {o['max_model_len']} is more than the model's max_position_embeddings "
                             f"{most}")
        return o["max_model_len"], "--max-model-len" if self.max_model_len is not None else "the engine's build"
