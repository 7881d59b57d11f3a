"""One phone-agent session's messages, shaped as Open-AutoGLM's client sends them (the agent workload of
`autoglm-trt bench`).

A session is: the system prompt; the task's first user turn (the task, a blank line, a `{"current_app": ...}`
JSON line); then per step an assistant reply and a user turn `** Screen Info **` + the JSON line. Only the
newest user turn carries a screenshot (a PNG data URL, before its text); after the call the client strips it,
so step n+1 shares a token prefix with step n only up to the start of step n's user turn.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from autoglm_trt.serve.agent_prompts import APPS, TASKS, THOUGHT_CHARS, THOUGHTS, system_prompt

SCREEN_SIZE = (1080, 2400)  # width, height of a full-resolution phone screenshot
ACTION_MARKERS = ("do(action=", "finish(")  # the client's "an action has appeared" test on the streamed text
SCREEN_INFO = "** Screen Info **"


def screen_info(app: str) -> str:
    return json.dumps({"current_app": app}, ensure_ascii=False)


@dataclass
class AgentSession:
    """The messages of one session; `messages` is what the next request sends."""

    task: str
    lang: str
    rng: random.Random  # app names and synthetic replies of this session
    messages: list[dict] = field(default_factory=list)
    steps: int = 0  # user turns added so far

    def add_user_turn(self, image_url: str) -> None:
        """The next step's user turn, its screenshot first (as the client builds it)."""
        app = self.rng.choice(APPS[self.lang])
        head = self.task if self.steps == 0 else SCREEN_INFO
        text = f"{head}\n\n{screen_info(app)}"
        self.messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                          {"type": "text", "text": text}]})
        self.steps += 1

    def strip_images(self) -> None:
        """Drop the image parts of the newest user turn: the history keeps its text only."""
        turn = self.messages[-1]
        turn["content"] = [part for part in turn["content"] if part.get("type") == "text"]

    def add_reply(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


def new_session(index: int, lang: str, seed: int, day: datetime.date | None = None) -> AgentSession:
    """Session `index` of a level: its own task; the system prompt (dated `day`, default today) first."""
    rng = random.Random(f"agent:{seed}:{index}")
    tasks = TASKS[lang]
    session = AgentSession(task=tasks[(seed + index) % len(tasks)], lang=lang, rng=rng)
    session.messages.append({"role": "system", "content": system_prompt(lang, day)})
    return session


def synthetic_reply(rng: random.Random, lang: str) -> str:
    """A reply of a real agent's length and shape, `<think>...</think><answer>ACTION</answer>`: the history's text
    when the model printed no action (random weights print little text)."""
    lo, hi = THOUGHT_CHARS[lang]
    target = rng.randint(lo, hi)
    sentences, size = [], 0
    while size < target:
        s = rng.choice(THOUGHTS[lang]).format(app=rng.choice(APPS[lang][1:]))
        sentences.append(s)
        size += len(s) + (lang == "en")
    thought = (" " if lang == "en" else "").join(sentences)
    return f"<think>{thought}</think><answer>{_action(rng, lang)}</answer>"


def _action(rng: random.Random, lang: str) -> str:
    x, y = rng.randint(40, 960), rng.randint(60, 940)
    kind = rng.randrange(5)
    if kind == 0:
        return f'do(action="Swipe", start=[{x},{y}], end=[{x},{max(0, y - 400)}])'
    if kind == 1:
        return f'do(action="Type", text="{rng.choice(APPS[lang][1:])}")'
    if kind == 2:
        return f'do(action="Launch", app="{rng.choice(APPS[lang][1:])}")'
    return f'do(action="Tap", element=[{x},{y}])'


# ---- screenshots -------------------------------------------------------------------------------------------
def parse_screen_size(text: str) -> tuple[int, int]:
    """'1080x2400' -> (1080, 2400); ValueError names the expected form."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--screen-size must be WIDTHxHEIGHT, e.g. 1080x2400, got {text!r}") from None
    if not (28 <= w <= 8192 and 28 <= h <= 8192):
        raise ValueError(f"--screen-size sides must be within 28..8192 pixels, got {text!r}")
    return w, h


def screenshot_url(seed: int, size: tuple[int, int] = SCREEN_SIZE) -> str:
    """A drawn phone screen (calibration/screens.py) as a PNG data URL; every seed gives other pixels, so no
    request hits the server's image or prefix caches with its screenshot."""
    from PIL import ImageDraw

    from autoglm_trt.calibration.screens import KINDS, draw_screen

    image = draw_screen(KINDS[seed % len(KINDS)], seed, size)
    ImageDraw.Draw(image).text((4, size[1] // 2), f"#{seed}", fill=(seed * 37 % 256, 0, 255 - seed % 256))
    for x in range(4):  # NOTE: the label may fall on a flat area that hides a digit: these pixels always differ
        image.putpixel((x, 0), ((seed >> (8 * x)) & 255, (seed * 7 + x) & 255, 128))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"


def render_screenshots(seeds: list[int], size: tuple[int, int], threads: int = 4) -> list[str]:
    """Data URLs for `seeds`, drawn before a level starts so that no drawing lands inside a timed step."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(lambda s: screenshot_url(s, size), seeds))
