"""Ray Serve's request router for the engine replicas: session affinity (affinity.py), least-loaded fallback.

Ray Serve runs one router per deployment handle (in each ingress replica) and asks it, for each request, for
ranks of candidate replicas; it then sends the request to the least-loaded replica of the first rank that has
room (below max_ongoing_requests), probing queue lengths it has not cached. The request carries its session key
as the `session` keyword of `EngineReplica.generate`.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from autoglm_trt.serve.ray.affinity import SessionTable, rank_replicas


def _session_of(pending: PendingRequest | None) -> str | None:
    return pending.kwargs.get("session") if pending is not None and pending.kwargs else None


class SessionAffinityRouter(RequestRouter):
    """Steps of one agent session go to the replica that served the previous one; a saturated home (ongoing
    requests >= `saturation`, by default the engine's max-num-seqs: a full running batch) sends the step to the
    least-loaded replica instead."""

    def initialize_state(self, saturation: int = 64, max_sessions: int = 100_000, **_: Any) -> None:
        self.saturation = saturation
        self.sessions = SessionTable(max_sessions)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        loads = {rid: cache.get(r.replica_id) for rid, r in by_id.items()}
        key = _session_of(pending_request)
        ranks = rank_replicas(key, list(by_id), loads, self.sessions.get(key), self.saturation)
        return [[by_id[rid] for rid in rank] for rank in ranks if rank]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self.sessions.remember(_session_of(pending_request), replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.sessions.forget_replica(replica_id.unique_id)
