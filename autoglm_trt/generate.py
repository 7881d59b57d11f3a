"""`autoglm-trt generate`: the simplest offline path, streaming tokens to the terminal."""

from __future__ import annotations

import sys
from pathlib import Path

from autoglm_trt.errors import UserError


def build_messages(prompt: str, images: list, system: str | None) -> list[dict]:
    parts = [{"type": "image", "image": img} for img in images] + [{"type": "text", "text": prompt}]
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": parts if images else prompt}]


def run_generate(model_dir: Path, prompt: str, *, images: list[Path], max_tokens: int, temperature: float,
                 top_p: float, seed: int | None, system: str | None, raw: bool, device: str, dtype: str) -> None:
    from autoglm_trt.engine.llm import LLM
    from autoglm_trt.engine.sampling_params import SamplingParams
    from autoglm_trt.processing.image_processor import load_image

    if raw and images:
        raise UserError("--raw sends plain text; images need the chat template (drop --raw)")
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    pil_images = [load_image(p) for p in images]
    llm = LLM(str(model_dir), device=device, dtype=dtype, max_num_seqs=1)
    request = prompt if raw else build_messages(prompt, pil_images, system)
    reason = None
    for out in llm.stream(request, params):
        sys.stdout.write(out.new_text)
        sys.stdout.flush()
        reason = out.finish_reason
    sys.stdout.write(f"\n[finish_reason: {reason}]\n")
