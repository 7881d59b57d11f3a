"""What the engine regression runs: one tiny random checkpoint, engines in every mode, fixed prompts.

Everything here is fixed on purpose; changing any of it changes the goldens (`make regress-update`).
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw

PRESET = "tiny"
SEED = 3  # `autoglm-trt init-random DIR --preset tiny --seed 3`
MAX_TOKENS = 16  # greedy tokens per prompt (EOS ignored, so every run has this many)
TOP_K = 5  # logprobs asked per step (the top two give the margin of each greedy choice)
TOP_STEPS = 4  # steps whose top-k (token id, logprob) pairs the goldens keep


@dataclass(frozen=True)
class Mode:
    name: str
    quant: str = "none"  # BuildConfig.quant
    tp: int = 1  # tensor-parallel ranks (gloo on the CPU)
    # Largest accepted |logprob - golden|. NOTE: measured with the same checkpoint bytes across CPU kernels
    # (ATEN_CPU_CAPABILITY=default vs avx2): every mode within 2e-6. INT8 modes get 1e-3 anyway: one
    # weight or activation that rounds to the other int8 neighbour moves a logprob by ~1e-4..4e-3.
    atol: float = 1e-4


MODES = (Mode("fp32"), Mode("int8-wo", quant="int8-wo", atol=1e-3), Mode("w8a8", quant="w8a8", atol=1e-3),
         Mode("fp8", quant="fp8", atol=1e-3), Mode("int4", quant="int4-awq", atol=1e-3), Mode("tp2", tp=2))


def screenshot() -> Image.Image:
    """A 140x112 "phone screen" of flat rectangles: no fonts, no antialiasing, no resize (multiples of 28)."""
    im = Image.new("RGB", (140, 112), (240, 240, 240))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, 139, 15], fill=(30, 90, 200))  # status bar
    d.rectangle([10, 30, 60, 70], fill=(220, 40, 40))  # the red button
    d.rectangle([80, 40, 130, 100], outline=(0, 0, 0), width=3, fill=(40, 180, 90))
    return im


@dataclass(frozen=True)
class Prompt:
    name: str
    description: str
    text: str
    image: bool = False  # show screenshot() before the text
    chat: bool = True  # through the chat template; False = raw completion

    def build(self) -> str | list[dict]:
        """What LLM.generate takes: raw text, or one conversation."""
        if not self.chat:
            return self.text
        content = [{"type": "image", "image": screenshot()}, {"type": "text", "text": self.text}] \
            if self.image else self.text
        return [{"role": "user", "content": content}]


PROMPTS = (
    Prompt("chat-text", "chat, text only", "Open the settings app and turn on Wi-Fi"),
    Prompt("raw-text", "raw completion, no template", "The quick brown fox jumps over the lazy dog", chat=False),
    Prompt("chat-image", "chat with a 140x112 screenshot, 20 image tokens", "Tap the red button", image=True),
)
