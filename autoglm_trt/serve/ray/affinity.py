"""Session affinity, without Ray: which replica an agent session's next step should go to.

A session is keyed by the `x-session-id` header, else by a hash of the conversation's first messages (the system
prompt and the first user turn: Open-AutoGLM keeps both fixed across a task's steps, and strips only the images).
Its home is the replica that served its previous step; a session seen for the first time gets a home by
rendezvous hashing over the replica ids, so every router (one per ingress replica) agrees without sharing state and
a replica that comes or goes moves only its own sessions. When the home is saturated the least-loaded replica
serves the step, and becomes the session's home (it now holds the newest prefix).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any

SESSION_HEADER = "x-session-id"
REPLICA_HEADER = "x-autoglm-replica"


def session_key(header: str | None, body: bytes | None) -> str | None:
    """The routing key of one request: its x-session-id, else a digest of its first messages, else None."""
    if header:
        return "id:" + header
    if not body:
        return None
    try:
        request = json.loads(body)
    except ValueError:
        return None
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list):
        return None
    head = _opening(messages)
    if not head:
        return None
    digest = hashlib.blake2b(json.dumps(head, ensure_ascii=False).encode(), digest_size=16).hexdigest()
    return "msg:" + digest


def _opening(messages: list) -> list[tuple[str, str]]:
    """(role, text) of the messages up to and including the first user turn; images left out (a client strips
    them after the step that sent them)."""
    head = []
    for m in messages:
        if not isinstance(m, dict):
            return []
        role = str(m.get("role", ""))
        head.append((role, _text(m.get("content"))))
        if role == "user":
            return head
    return []


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def rendezvous(key: str, replicas: list[str]) -> str:
    """The replica with the highest hash of (key, replica): stable while that replica lives."""
    return max(replicas, key=lambda r: hashlib.blake2b(f"{key}\0{r}".encode(), digest_size=8).digest())


def rank_replicas(key: str | None, replicas: list[str], loads: dict[str, int | None], home: str | None,
                  saturation: int) -> list[list[str]]:
    """Replica ids in ranks, most preferred first (Ray Serve tries a rank's least-loaded replica that has room,
    then the next rank). loads: ongoing requests per replica (None: unknown, counted as 0)."""
    if not replicas:
        return []
    by_load = sorted(replicas, key=lambda r: loads.get(r) or 0)
    if key is None:
        return [by_load[:2], by_load[2:]] if len(by_load) > 2 else [by_load]
    if home not in replicas:
        home = rendezvous(key, replicas)
    if (loads.get(home) or 0) >= saturation:
        return [by_load]  # NOTE: saturated: the least-loaded first (the home too, if it is the least loaded)
    return [[home], [r for r in by_load if r != home]]


class SessionTable:
    """session key -> replica id of its last step, least recently used dropped past `capacity`."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._homes: OrderedDict[str, str] = OrderedDict()

    def get(self, key: str | None) -> str | None:
        return self._homes.get(key) if key is not None else None

    def remember(self, key: str | None, replica: str) -> None:
        if key is None:
            return
        self._homes[key] = replica
        self._homes.move_to_end(key)
        while len(self._homes) > self.capacity:
            self._homes.popitem(last=False)

    def forget_replica(self, replica: str) -> None:
        for key in [k for k, r in self._homes.items() if r == replica]:
            del self._homes[key]
