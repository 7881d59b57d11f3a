"""Image inputs of the APIs: data: URLs, local files under an allowed directory, opt-in http(s).

Every failure is a 400 that says what was wrong with which image; nothing here lets a request read
arbitrary files, reach the network without the operator's consent, or decode a decompression bomb.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from autoglm_trt.processing.image_processor import SOURCE_DIGEST
from autoglm_trt.serve.errors import ServeError

# NOTE: our own pixel limit (MediaPolicy.max_image_pixels, checked before decoding) is the guard; PIL's warning
# at 89 M pixels would only repeat it. Set once here: warnings.catch_warnings() per call is not thread-safe, and
# images are decoded in worker threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

ALLOWED_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
_DATA_MIME = {"image/png", "image/jpeg", "image/jpg", "image/webp"}


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_media_path: str | None = None  # resolved directory, or None = no local files
    allow_remote_media: bool = False
    max_image_pixels: int = 64_000_000  # decoded width * height
    max_image_bytes: int = 32 << 20  # encoded bytes
    remote_timeout_s: float = 10.0


def _bad(message: str, index: int | None = None) -> ServeError:
    where = f"image {index + 1}: " if index is not None else ""
    return ServeError(where + message, status=400, param="messages")


def load_image(url: str, policy: MediaPolicy, index: int | None = None) -> Image.Image:
    """Resolve one image URL to a decoded PIL image (raises a 400 ServeError)."""
    if not isinstance(url, str) or not url:
        raise _bad("image_url.url must be a non-empty string", index)
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme == "data":
        data = _read_data_url(url, policy, index)
    elif scheme in ("http", "https"):
        data = _read_remote(url, policy, index)
    elif scheme == "file" or url.startswith("/") or scheme == "":
        data = _read_local(url, policy, index)
    else:
        raise _bad(f"unsupported image URL scheme {scheme!r} (use a data: URL"
                   f"{', http(s)' if policy.allow_remote_media else ''} or an allowed local file)", index)
    return decode_image(data, policy, index)


def _read_data_url(url: str, policy: MediaPolicy, index: int | None) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise _bad("malformed data: URL (no comma before the payload)", index)
    parts = header[5:].split(";")
    mime = parts[0].strip().lower()
    if mime and mime not in _DATA_MIME:
        raise _bad(f"unsupported image type {mime!r} in data: URL (png, jpeg or webp)", index)
    if "base64" not in (p.strip().lower() for p in parts[1:]):
        raise _bad("data: URLs must be base64 encoded (data:image/png;base64,...)", index)
    if len(payload) > policy.max_image_bytes * 4 // 3 + 4:
        raise _bad(f"image is larger than {policy.max_image_bytes} bytes", index)
    try:
        return base64.b64decode(payload.strip(), validate=False)
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"invalid base64 in data: URL ({exc})", index) from None


def _read_local(url: str, policy: MediaPolicy, index: int | None) -> bytes:
    if policy.allowed_local_media_path is None:
        raise _bad("local image files are not allowed; start the server with "
                   "--allowed-local-media-path DIR to serve files below DIR, or send a data: URL", index)
    raw = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.lower().startswith("file:") else url
    root = Path(policy.allowed_local_media_path)
    path = Path(raw) if Path(raw).is_absolute() else root / raw
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise _bad(f"local image {raw} does not exist", index) from None
    if not resolved.is_relative_to(root):
        raise _bad(f"local image {raw} is outside --allowed-local-media-path", index)
    if not resolved.is_file():
        raise _bad(f"local image {raw} is not a file", index)
    if resolved.stat().st_size > policy.max_image_bytes:
        raise _bad(f"image is larger than {policy.max_image_bytes} bytes", index)
    return resolved.read_bytes()


def _read_remote(url: str, policy: MediaPolicy, index: int | None) -> bytes:
    if not policy.allow_remote_media:
        raise _bad("fetching http(s) image URLs is off on this server (start it with "
                   "--allow-remote-media); send the image as a data: URL", index)
    req = urllib.request.Request(url, headers={"User-Agent": "autoglm-trt"})
    try:
        with urllib.request.urlopen(req, timeout=policy.remote_timeout_s) as resp:  # noqa: S310
            data = resp.read(policy.max_image_bytes + 1)
    except Exception as exc:  # urllib raises many kinds: URLError, HTTPError, timeouts, ValueError
        raise _bad(f"could not fetch {url}: {exc}", index) from None
    if len(data) > policy.max_image_bytes:
        raise _bad(f"image at {url} is larger than {policy.max_image_bytes} bytes", index)
    return data


def decode_image(data: bytes, policy: MediaPolicy, index: int | None = None) -> Image.Image:
    """Decode PNG/JPEG/WEBP bytes (any mode), refusing what is not an image or decodes too large."""
    if len(data) > policy.max_image_bytes:
        raise _bad(f"image is larger than {policy.max_image_bytes} bytes", index)
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        if img.format not in ALLOWED_FORMATS:
            raise _bad(f"unsupported image format {img.format} (png, jpeg or webp)", index)
        w, h = img.size
        # NOTE: checked before load(): the header's size is what decoding would allocate.
        if w * h > policy.max_image_pixels:
            raise _bad(f"image is {w}x{h} = {w * h} pixels, more than the server's limit of "
                       f"{policy.max_image_pixels} (decompression-bomb guard)", index)
        if w < 1 or h < 1:
            raise _bad(f"image has an empty size {w}x{h}", index)
        img.load()
        # NOTE: the mode stays: the processor composites transparency onto white as transformers does (a
        # convert("RGB") here dropped alpha, and copied an RGB screenshot for nothing)
        img.info[SOURCE_DIGEST] = hashlib.sha256(data).hexdigest()  # the image's identity, 5x less to hash
        return img
    except ServeError:
        raise
    except Image.DecompressionBombError as exc:
        raise _bad(f"image refused as a decompression bomb: {exc}", index) from None
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise _bad(f"could not decode the image ({type(exc).__name__}: {exc})", index) from None
