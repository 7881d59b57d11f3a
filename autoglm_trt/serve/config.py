"""The server's own knobs (the engine's are in autoglm_trt.config), validated in __post_init__."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REASONING_PARSERS = ("glm45",)
# NOTE: 1080x2400 phone screenshots are 2.6 M pixels; 64 M leaves room for 8K captures while a
# 100x100 PNG that claims 100k x 100k pixels (a decompression bomb) is refused before decoding.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
# NOTE: a 1080x2400 PNG screenshot is ~1.2 M base64 characters; 32 MiB holds ten of them with room for 1440p
DEFAULT_MAX_REQUEST_BYTES = 32 << 20


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8000  # OpenAI HTTP API
    grpc_port: int = 8001  # KServe v2 gRPC API; 0 = a free port, -1 = no gRPC server
    served_model_name: str = "autoglm-phone-9b"
    api_key: str | None = None  # required as `Authorization: Bearer KEY` when set
    max_queue: int = 1024  # requests waiting beyond the running batch; more -> 429
    allowed_local_media_path: str | None = None  # file:// and paths only below this directory
    allow_remote_media: bool = False  # fetch http(s) image URLs
    max_pixels: int | None = None  # image processor's max_pixels (like vLLM's mm_processor_kwargs)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # decoded size limit of one image
    max_image_bytes: int = 32 << 20  # encoded size limit of one image
    limit_images_per_prompt: int = 10
    reasoning_parser: str | None = None  # "glm45": always split <think> into reasoning_content
    constrain_actions: bool = False  # chat replies without a constraint of their own follow actions.lark
    remote_media_timeout_s: float = 10.0
    log_requests: bool = False
    log_format: str = "text"  # text | json
    log_level: str = "info"
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger HTTP bodies -> 413

    def __post_init__(self) -> None:
        for name in ("port",):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        if not -1 <= self.grpc_port <= 65535:
            raise ValueError(f"grpc_port must be in [-1, 65535] (-1 = off), got {self.grpc_port}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.limit_images_per_prompt < 0:
            raise ValueError(f"limit_images_per_prompt must be >= 0, got {self.limit_images_per_prompt}")
        for name in ("max_image_pixels", "max_image_bytes", "max_request_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_pixels is not None and self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be > 0, got {self.max_pixels}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, "
                             f"got {self.reasoning_parser!r}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, got {self.log_format!r}")
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if self.allowed_local_media_path is not None:
            path = Path(self.allowed_local_media_path)
            if not path.is_dir():
                raise ValueError(f"allowed_local_media_path must be an existing directory, got {path}")
            self.allowed_local_media_path = str(path.resolve())
