"""The model pool's request router: a version's calls go to a replica that holds it, and a
version no free replica holds goes to the less busy of two random replicas.

Ray Serve's default router, for a multiplexed model ID that no replica reports, falls back to
the replicas holding the *fewest* model IDs (``MultiplexMixin.apply_multiplex_routing``). Under
a byte budget that herds every miss onto whichever replica holds a few large versions:
``benchmarks/cache_sim.py`` (10,000 models, 100 replicas, Zipf 1.2, 4 GB per replica) measured
a p99 of 6.9 s with that fallback against 104 ms with power of two choices, the longest load
queue 4,442 against 3 (benchmarks/results/issue25/cache_sim.md). This router keeps the rest of
Serve's machinery (queue-length probes, max_ongoing_requests, backoff) and changes only the
candidates: the holders first, then two random others.

Named in the pool deployment's ``request_router_config`` (:mod:`maas_ray.serving.app`); it runs
in every process that holds a handle to the pool (the ingress replicas).
"""

from __future__ import annotations

import random
import time
from typing import Optional

from ray.serve.request_router import (
    FIFOMixin, MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica,
)

ROUTER_PATH = "maas_ray.serving.pool_router.PoolRouter"


# How long a routing decision for an ID no replica reported stands in for the replica's own
# report (which reaches this process through the controller a moment later).
RECENT_S = 10.0


def rank_candidates(model_id: str, replicas: list, recent: Optional[object] = None, sample=random.sample) -> list[list]:
    """[replicas reporting ``model_id`` (or the one it was just sent to), up to two random others]:
    Serve's router takes the least loaded replica with room from the first group that has one."""
    if not model_id:
        return [sample(replicas, min(2, len(replicas)))] if replicas else []
    holders = [r for r in replicas if model_id in r.multiplexed_model_ids or r.replica_id == recent]
    # A hot version's extra routing ID (``model:version#k``) should land where the version is not yet.
    base = model_id.partition("#")[0]
    siblings = [r for r in replicas if r not in holders
                and any(i.partition("#")[0] == base for i in r.multiplexed_model_ids)]
    others = [r for r in replicas if r not in holders and r not in siblings]
    ranks = [holders] if holders else []
    if others:
        ranks.append(sample(others, min(2, len(others))))
    if siblings:
        ranks.append(siblings)
    return ranks


class PoolRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Holders of the call's multiplexed model ID first, else power of two choices.

    The mixins are Serve's default router's: ``MultiplexMixin`` hands a replica chosen for a
    model ID to a pending request for that ID (FIFO alone would give it to the oldest request,
    of any model), and cleans the router's per-ID index of pending requests, which Serve fills
    for every call with a model ID (without it, that index grew by every call: ~1,250 requests
    kept alive after ~1,150 calls, the ingress at 800 MB, benchmarks/many_models.py).

    A version's first call goes to one replica, and until that replica's report of the ID
    arrives, the version's next calls follow it there (``on_request_routed``): concurrent first
    requests cause one load, not one per replica they happen to reach.
    """

    def initialize_state(self, **kwargs) -> None:
        self._recent: dict[str, tuple[object, float]] = {}

    def _recent_target(self, model_id: str) -> Optional[object]:
        entry = getattr(self, "_recent", {}).get(model_id)
        if entry is None or time.monotonic() - entry[1] > RECENT_S:
            return None
        return entry[0]

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: Optional[PendingRequest] = None,
    ) -> list[list[RunningReplica]]:
        model_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # every group tried: back off, then retry
        return rank_candidates(model_id, candidate_replicas, self._recent_target(model_id) if model_id else None)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: object) -> None:
        model_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not model_id:
            return
        recent = getattr(self, "_recent", None)
        if recent is None:
            recent = self._recent = {}
        if len(recent) > 10_000:
            recent.clear()
        recent[model_id] = (replica_id, time.monotonic())
