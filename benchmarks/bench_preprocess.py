"""What a screenshot costs on the CPU before the vision tower: decode, preprocess (sizes + hash), and the
exact pixel work (resize, normalize, patches) that the engine now does on its GPU instead.

    python benchmarks/bench_preprocess.py [--size 1080x2400] [--max-pixels 5000000] [--device cuda]

Medians of --repeats runs after one warm-up, in ms. With --device cuda it also times the GPU pixel path
(processing/pixels.device_pixels, synchronized) on the same image.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import time

import torch


def _ms(fn, repeats: int, sync: bool = False) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1080x2400")
    ap.add_argument("--max-pixels", type=int, default=5_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from autoglm_trt.calibration.screens import draw_screen
    from autoglm_trt.processing.image_processor import SOURCE_DIGEST, ImageProcessor
    from autoglm_trt.processing.pixels import cpu_pixels, device_pixels

    w, h = (int(v) for v in args.size.split("x"))
    buf = io.BytesIO()
    draw_screen("chat", 1, (w, h)).save(buf, "PNG")
    url = base64.b64encode(buf.getvalue()).decode()
    proc = ImageProcessor()

    from autoglm_trt.serve.media import MediaPolicy, decode_image

    def decode():  # what the server does with a data: URL (it also names the image by the sha256 of its bytes)
        return decode_image(base64.b64decode(url), MediaPolicy())

    img = decode()
    plain = img.copy()
    plain.info.pop(SOURCE_DIGEST, None)
    image = proc.preprocess(img, max_pixels=args.max_pixels)
    res = {"size": args.size, "png_bytes": len(buf.getvalue()), "threads": torch.get_num_threads(),
           "decode_ms": _ms(decode, args.repeats),
           "preprocess_ms": _ms(lambda: proc.preprocess(img, max_pixels=args.max_pixels), args.repeats),
           "preprocess_pil_image_ms": _ms(lambda: proc.preprocess(plain, max_pixels=args.max_pixels),
                                          args.repeats),  # an in-process PIL image: its pixels are hashed
           "cpu_pixels_ms": _ms(lambda: cpu_pixels(image.rgb, image.resized, image.spec), args.repeats)}
    if args.device == "cuda":
        dev = torch.device("cuda")
        res["gpu_pixels_ms"] = _ms(lambda: device_pixels(image.rgb, image.resized, image.spec, dev, torch.bfloat16),
                                   args.repeats, sync=True)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
