"""Image URL resolution: formats, local-file sandbox, remote opt-in, decompression-bomb guard."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import zlib

import pytest
from PIL import Image

from autoglm_trt.serve.errors import ServeError
from autoglm_trt.serve.media import MediaPolicy, decode_image, load_image


def encode(fmt: str, size=(40, 30), color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header claims width x height (a decompression bomb's shape)."""
    raw = bytearray(encode("PNG", (1, 1)))
    ihdr = 8  # signature, then the IHDR chunk: length(4) type(4) data(13) crc(4)
    raw[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    raw[ihdr + 21:ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr + 4:ihdr + 21])))
    return bytes(raw)


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_data_urls_of_each_format(fmt, mime):
    img = load_image(data_url(encode(fmt), mime), MediaPolicy())
    assert img.size == (40, 30) and img.mode == "RGB"


def test_rgba_keeps_its_alpha_for_the_processor_and_the_source_names_the_image():
    from autoglm_trt.processing.image_processor import SOURCE_DIGEST, ImageProcessor

    buf = io.BytesIO()
    Image.new("RGBA", (224, 224), (200, 100, 0, 0)).save(buf, "PNG")  # fully transparent
    img = load_image(data_url(buf.getvalue()), MediaPolicy())
    assert img.mode == "RGBA" and img.info[SOURCE_DIGEST] == hashlib.sha256(buf.getvalue()).hexdigest()
    out = ImageProcessor().preprocess(img)
    assert (out.rgb == 255).all()  # composited onto white, as transformers does; alpha dropped would be orange
    again = ImageProcessor().preprocess(load_image(data_url(buf.getvalue()), MediaPolicy()))
    other = io.BytesIO()
    Image.new("RGBA", (224, 224), (200, 100, 1, 0)).save(other, "PNG")
    third = ImageProcessor().preprocess(load_image(data_url(other.getvalue()), MediaPolicy()))
    assert again.content_hash == out.content_hash != third.content_hash
    smaller = ImageProcessor().preprocess(img, max_pixels=2 * 112 * 112)
    assert smaller.grid_thw != out.grid_thw and smaller.content_hash != out.content_hash


def test_bad_data_urls():
    policy = MediaPolicy()
    with pytest.raises(ServeError, match="base64"):
        load_image("data:image/png,rawbytes", policy)
    with pytest.raises(ServeError, match="unsupported image type"):
        load_image(data_url(encode("PNG"), "image/gif"), policy)
    with pytest.raises(ServeError, match="could not decode"):
        load_image(data_url(b"this is not an image"), policy)
    with pytest.raises(ServeError, match="no comma"):
        load_image("data:image/png;base64", policy)


def test_gif_bytes_refused_even_with_png_mime():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "GIF")
    with pytest.raises(ServeError, match="unsupported image format GIF"):
        load_image(data_url(buf.getvalue()), MediaPolicy())


def test_decompression_bomb_refused_before_decoding():
    bomb = png_claiming(100_000, 100_000)
    assert len(bomb) < 200
    with pytest.raises(ServeError, match="decompression-bomb|decompression bomb"):
        decode_image(bomb, MediaPolicy())
    with pytest.raises(ServeError, match="more than the server's limit"):
        decode_image(png_claiming(5000, 5000), MediaPolicy(max_image_pixels=1_000_000))


def test_encoded_size_limit():
    with pytest.raises(ServeError, match="larger than"):
        load_image(data_url(encode("PNG", (64, 64))), MediaPolicy(max_image_bytes=50))


def test_local_files_need_the_allowed_directory(tmp_path):
    path = tmp_path / "shot.png"
    path.write_bytes(encode("PNG"))
    with pytest.raises(ServeError, match="allowed-local-media-path"):
        load_image(f"file://{path}", MediaPolicy())
    with pytest.raises(ServeError, match="allowed-local-media-path"):
        load_image(str(path), MediaPolicy())
    policy = MediaPolicy(allowed_local_media_path=str(tmp_path.resolve()))
    assert load_image(f"file://{path}", policy).size == (40, 30)
    assert load_image(str(path), policy).size == (40, 30)


def test_local_files_cannot_escape_the_directory(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(encode("PNG"))
    (allowed / "link.png").symlink_to(secret)
    policy = MediaPolicy(allowed_local_media_path=str(allowed.resolve()))
    for url in (f"file://{allowed}/../secret.png", f"{allowed}/../secret.png", f"file://{allowed}/link.png",
                "file:///etc/passwd"):
        with pytest.raises(ServeError, match="outside|does not exist"):
            load_image(url, policy)
    with pytest.raises(ServeError, match="does not exist"):
        load_image(f"file://{allowed}/missing.png", policy)


def test_remote_urls_are_off_by_default():
    with pytest.raises(ServeError, match="allow-remote-media"):
        load_image("https://example.com/a.png", MediaPolicy())
    with pytest.raises(ServeError, match="unsupported image URL scheme"):
        load_image("ftp://example.com/a.png", MediaPolicy())


def test_remote_fetch_when_allowed(tmp_path):
    import http.server
    import threading

    (tmp_path / "a.png").write_bytes(encode("PNG"))
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert load_image(f"{url}/a.png", MediaPolicy(allow_remote_media=True)).size == (40, 30)
        with pytest.raises(ServeError, match="could not fetch"):
            load_image(f"{url}/missing.png", MediaPolicy(allow_remote_media=True))
    finally:
        httpd.shutdown()


def test_error_names_the_image_index():
    with pytest.raises(ServeError, match="^image 3: "):
        load_image("data:image/png;base64,!!!!", MediaPolicy(), index=2)
