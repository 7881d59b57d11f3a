"""Session keys and replica ranking (serve/ray/affinity.py), without Ray."""

from __future__ import annotations

import json

from autoglm_trt.serve.ray.affinity import SessionTable, rank_replicas, rendezvous, session_key

SYSTEM = {"role": "system", "content": "You operate a phone. Today is 2026-12-08."}


def _body(messages, **extra) -> bytes:
    return json.dumps({"model": "m", "messages": messages, **extra}).encode()


def _shot(url="data:image/png;base64,AAAA"):
    return {"type": "image_url", "image_url": {"url": url}}


def test_an_agent_sessions_steps_share_one_key():
    task = {"type": "text", "text": "Open the weather app"}
    step1 = [SYSTEM, {"role": "user", "content": [task, _shot()]}]
    step2 = [SYSTEM, {"role": "user", "content": [task]}, {"role": "assistant", "content": "<answer>do(...)</answer>"},
             {"role": "user", "content": [{"type": "text", "text": "** Screen Info **"}, _shot("data:x")]}]
    key = session_key(None, _body(step1, max_tokens=3000, stream=True))
    assert key is not None and key == session_key(None, _body(step2, temperature=0.0))
    other_task = [SYSTEM, {"role": "user", "content": "Open the camera"}]
    assert session_key(None, _body(other_task)) != key
    assert session_key(None, _body([{"role": "user", "content": "Open the weather app"}])) != key  # no system


def test_the_header_wins_and_bad_bodies_have_no_key():
    assert session_key("phone-7", _body([SYSTEM, {"role": "user", "content": "x"}])) == "id:phone-7"
    for body in (None, b"", b"not json", b"[1, 2]", _body("messages"), _body([SYSTEM]), b'{"prompt": "hi"}'):
        assert session_key(None, body) is None


def test_rendezvous_is_stable_and_moves_only_the_lost_replicas_sessions():
    replicas = ["a", "b", "c"]
    homes = {f"s{i}": rendezvous(f"s{i}", replicas) for i in range(300)}
    assert set(homes.values()) == set(replicas)  # spread over all of them
    after = {k: rendezvous(k, ["a", "c"]) for k in homes}
    assert all(after[k] == h for k, h in homes.items() if h != "b")


def test_ranking_prefers_home_until_it_is_saturated():
    loads = {"a": 3, "b": 0, "c": 1}
    assert rank_replicas("s", ["a", "b", "c"], loads, home="a", saturation=4) == [["a"], ["b", "c"]]
    assert rank_replicas("s", ["a", "b", "c"], {**loads, "a": 4}, home="a", saturation=4) == [["b", "c", "a"]]
    # a home that is gone: the rendezvous choice
    assert rank_replicas("s", ["b", "c"], loads, home="a", saturation=4)[0] == [rendezvous("s", ["b", "c"])]
    # no key: the least loaded (Ray Serve picks the lighter of the first rank)
    assert rank_replicas(None, ["a", "b", "c"], loads, home=None, saturation=4) == [["b", "c"], ["a"]]
    assert rank_replicas("s", [], loads, home=None, saturation=4) == []


def test_session_table_is_bounded_and_forgets_dead_replicas():
    table = SessionTable(capacity=2)
    table.remember("s1", "a")
    table.remember("s2", "b")
    table.remember("s1", "a")  # s1 used again: s2 is now the oldest
    table.remember("s3", "a")
    assert table.get("s2") is None and table.get("s1") == "a" and table.get("s3") == "a"
    table.forget_replica("a")
    assert table.get("s1") is None and table.get(None) is None
