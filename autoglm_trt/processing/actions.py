"""Open-AutoGLM's action language: parse a phone-agent reply into a typed action (our own parser).

A reply is `<think>THOUGHT</think><answer>ACTION</answer>`; ACTION is one call:

    do(action="Launch", app="Settings")          do(action="Tap", element=[500,300])
    do(action="Tap", element=[x,y], message="...")   (a sensitive tap: the client asks the user first)
    do(action="Type", text="...")                do(action="Type_Name", text="...")
    do(action="Swipe", start=[x1,y1], end=[x2,y2])
    do(action="Long Press", element=[x,y])       do(action="Double Tap", element=[x,y])
    do(action="Back")  do(action="Home")  do(action="Interact")
    do(action="Wait", duration="2 seconds")      do(action="Take_over", message="...")
    do(action="Note", message="...")             do(action="Call_API", instruction="...")
    finish(message="...")

Points are on a 0-999 grid (origin top-left). Strings are one line without quotes or backslashes (what
both ways Open-AutoGLM reads them, a raw slice and a Python literal, agree on). The thought must not hold
"do(action=", "finish(message=" or the tags as text (their client and the reasoning parser split there).
Whitespace around `=`, `,` and inside points is tolerated, as their ast-based parser tolerates it; everything
else is strict: an unknown action, a missing, extra or misplaced argument, a coordinate off the grid is an
ActionSyntaxError. structured/actions.lark is the same language as a grammar, a little stricter (no "=" or
"<" at all in the thought, canonical spacing); tests hold the two to the same examples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

STRING, POINT, DURATION = "string", "point", "duration"

# action -> ((argument, kind), ...) in the documented order; arguments after `|` are optional
_SIGNATURES: dict[str, tuple[tuple[str, str], ...]] = {
    "Launch": (("app", STRING),),
    "Tap": (("element", POINT), ("|message", STRING)),
    "Type": (("text", STRING),),
    "Type_Name": (("text", STRING),),
    "Swipe": (("start", POINT), ("end", POINT)),
    "Long Press": (("element", POINT),),
    "Double Tap": (("element", POINT),),
    "Back": (),
    "Home": (),
    "Wait": (("duration", DURATION),),
    "Take_over": (("message", STRING),),
    "Note": (("message", STRING),),
    "Call_API": (("instruction", STRING),),
    "Interact": (),
}
ACTION_NAMES = tuple(_SIGNATURES)
GRID = 1000  # coordinates are in [0, GRID)

_MARKERS = ("do(action=", "finish(message=", "<think>", "</think>", "<answer>", "</answer>")
_CALL = re.compile(r"\s*(do|finish)\s*\((.*)\)\s*", re.S)
_ARG = re.compile(r'\s*([A-Za-z_]+)\s*=\s*("[^"\\\x00-\x1f\x7f]*"|\[[^\]]*\])\s*(,|$)')
_NUMBER = re.compile(r"0|[1-9][0-9]{0,2}")
_DURATION = re.compile(r"(0|[1-9][0-9]{0,2})(\.[0-9]{1,2})? seconds")
_REPLY = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)(?:</answer>\s*)?", re.S)


class ActionSyntaxError(ValueError):
    """Text that is not one well-formed action of the language; the message says what is wrong."""


@dataclass(frozen=True)
class Action:
    name: str  # "finish" or one of ACTION_NAMES
    args: dict[str, str | tuple[int, int]] = field(default_factory=dict)  # points as (x, y)

    @property
    def is_finish(self) -> bool:
        return self.name == "finish"

    def to_text(self) -> str:
        """The canonical spelling (the one the prompts show)."""
        parts = [] if self.is_finish else [f'action="{self.name}"']
        for key, value in self.args.items():
            parts.append(f"{key}=[{value[0]},{value[1]}]" if isinstance(value, tuple) else f'{key}="{value}"')
        return f"{'finish' if self.is_finish else 'do'}({', '.join(parts)})"


@dataclass(frozen=True)
class Reply:
    thought: str
    action: Action


def parse_action(text: str) -> Action:
    """The action of `text` (one call, surrounding whitespace allowed)."""
    call = _CALL.fullmatch(text)
    if call is None:
        raise ActionSyntaxError(f"not a do(...) or finish(...) call: {text[:80]!r}")
    pairs = _arguments(call.group(2))
    if call.group(1) == "finish":
        if [k for k, _ in pairs] != ["message"]:
            raise ActionSyntaxError(f"finish takes exactly message=, got {[k for k, _ in pairs]}")
        return Action("finish", {"message": _string("message", pairs[0][1])})
    if not pairs or pairs[0][0] != "action":
        raise ActionSyntaxError("do(...) must start with action=")
    name = _string("action", pairs[0][1])
    if name not in _SIGNATURES:
        raise ActionSyntaxError(f"unknown action {name!r}; known: {', '.join(ACTION_NAMES)}")
    return Action(name, _bind(name, pairs[1:]))


def parse_reply(text: str) -> Reply:
    """`<think>THOUGHT</think><answer>ACTION</answer>` (the closing </answer> may be missing: it is an eos
    token, which servers leave out of the text)."""
    reply = _REPLY.fullmatch(text)
    if reply is None:
        raise ActionSyntaxError(f"not <think>...</think><answer>...</answer>: {text[:80]!r}")
    marker = next((m for m in _MARKERS if m in reply.group(1)), None)
    if marker is not None:  # NOTE: Open-AutoGLM's client would cut the reply at it
        raise ActionSyntaxError(f"the thought must not contain {marker!r}")
    return Reply(reply.group(1), parse_action(reply.group(2)))


def _arguments(body: str) -> list[tuple[str, str]]:
    pairs, pos = [], 0
    while pos < len(body) or not pairs:
        arg = _ARG.match(body, pos)
        if arg is None:
            raise ActionSyntaxError(f"cannot read the arguments at {body[pos:pos + 40]!r}")
        pairs.append((arg.group(1), arg.group(2)))
        pos = arg.end()
        if arg.group(3) == "" and pos < len(body):
            raise ActionSyntaxError(f"unexpected text after the arguments: {body[pos:pos + 40]!r}")
        if arg.group(3) == "," and pos >= len(body):
            raise ActionSyntaxError("a trailing comma after the last argument")
    return pairs


def _bind(name: str, pairs: list[tuple[str, str]]) -> dict[str, str | tuple[int, int]]:
    """Match the arguments to the action's signature, in order, optional ones possibly absent."""
    args: dict[str, str | tuple[int, int]] = {}
    signature = list(_SIGNATURES[name])
    for key, raw in pairs:
        while signature and signature[0][0].lstrip("|") != key and signature[0][0].startswith("|"):
            signature.pop(0)  # an optional argument left out
        if not signature or signature[0][0].lstrip("|") != key:
            raise ActionSyntaxError(f"{name}: unexpected argument {key}= (takes {_describe(name)})")
        kind = signature.pop(0)[1]
        args[key] = _point(key, raw) if kind == POINT else _string(key, raw)
        if kind == DURATION and not _DURATION.fullmatch(args[key]):
            raise ActionSyntaxError(f'{name}: duration must read "N seconds", got {args[key]!r}')
    missing = [k for k, _ in signature if not k.startswith("|")]
    if missing:
        raise ActionSyntaxError(f"{name}: missing {', '.join(m + '=' for m in missing)}")
    return args


def _describe(name: str) -> str:
    return ", ".join(k.lstrip("|") + ("= (optional)" if k.startswith("|") else "=")
                     for k, _ in _SIGNATURES[name]) or "no arguments"


def _string(key: str, raw: str) -> str:
    if not raw.startswith('"'):
        raise ActionSyntaxError(f"{key}= must be a quoted string, got {raw!r}")
    value = raw[1:-1]
    if key in ("action", "app") and not value:
        raise ActionSyntaxError(f"{key}= must not be empty")
    return value


def _point(key: str, raw: str) -> tuple[int, int]:
    parts = [p.strip() for p in raw[1:-1].split(",")] if raw.startswith("[") else []
    if len(parts) != 2 or not all(_NUMBER.fullmatch(p) for p in parts):
        raise ActionSyntaxError(f"{key}= must be [x,y] with integers 0-{GRID - 1}, got {raw!r}")
    return int(parts[0]), int(parts[1])
