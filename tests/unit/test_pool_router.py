"""The model pool's request router without Serve: which replicas a version's call may go to
(holders first, a just-routed replica standing in for its report, a hot version's extra
routing IDs away from the replicas that hold a sibling, else two random replicas)."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest

from maas_ray.serving import pool_router
from maas_ray.serving.pool_router import ROUTER_PATH, PoolRouter, rank_candidates

pytestmark = pytest.mark.unit


def _replica(name: str, *ids: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=name, multiplexed_model_ids=set(ids))


def _first(items: list, k: int) -> list:
    """A deterministic stand-in for random.sample: the first k."""
    return list(items[:k])


def _names(ranks: list[list]) -> list[list[str]]:
    return [[r.replica_id for r in group] for group in ranks]


def test_the_router_path_names_the_class():
    module, _, name = ROUTER_PATH.rpartition(".")
    assert module == pool_router.__name__ and getattr(pool_router, name) is PoolRouter


def test_holders_of_the_id_come_first_then_two_others():
    replicas = [_replica("a"), _replica("b", "m:1"), _replica("c", "x:1"), _replica("d"), _replica("e", "m:1")]
    assert _names(rank_candidates("m:1", replicas, sample=_first)) == [["b", "e"], ["a", "c"]]


def test_without_holders_two_random_replicas_are_the_only_group():
    replicas = [_replica(n) for n in "abcde"]
    for _ in range(20):
        ranks = rank_candidates("m:1", replicas)
        assert len(ranks) == 1 and len(ranks[0]) == 2
        assert len({r.replica_id for r in ranks[0]}) == 2 and all(r in replicas for r in ranks[0])


def test_a_recent_target_counts_as_a_holder_before_its_report_arrives():
    replicas = [_replica("a"), _replica("b"), _replica("c")]
    assert _names(rank_candidates("m:1", replicas, recent="b", sample=_first)) == [["b"], ["a", "c"]]
    # a recent target that left the candidates is ignored
    assert _names(rank_candidates("m:1", replicas, recent="gone", sample=_first)) == [["a", "b"]]


def test_a_shard_id_avoids_replicas_that_hold_a_sibling_id():
    replicas = [_replica("a", "m:1"), _replica("b"), _replica("c", "m:1#2"), _replica("d", "x:1")]
    # m:1#1: nobody holds it; a (m:1) and c (m:1#2) hold the same version, so they come last
    assert _names(rank_candidates("m:1#1", replicas, sample=_first)) == [["b", "d"], ["a", "c"]]
    # the base ID: a holds it; c holds only a sibling, so it is tried after the others
    assert _names(rank_candidates("m:1", replicas, sample=_first)) == [["a"], ["b", "d"], ["c"]]


def test_a_shard_id_goes_to_a_sibling_holder_when_every_replica_holds_one():
    replicas = [_replica("a", "m:1"), _replica("b", "m:1#2")]
    assert _names(rank_candidates("m:1#1", replicas, sample=_first)) == [["a", "b"]]


def test_a_shard_id_someone_holds_goes_there():
    replicas = [_replica("a", "m:1"), _replica("b", "m:1#1"), _replica("c")]
    assert _names(rank_candidates("m:1#1", replicas, sample=_first)) == [["b"], ["c"], ["a"]]


def test_a_call_without_a_model_id_goes_to_two_random_replicas():
    replicas = [_replica(n, "m:1") for n in "abcd"]
    ranks = rank_candidates("", replicas)
    assert len(ranks) == 1 and len(ranks[0]) == 2 and all(r in replicas for r in ranks[0])
    assert _names(rank_candidates("", replicas[:1])) == [["a"]]


def test_no_replicas_no_candidates():
    assert rank_candidates("", []) == []
    assert rank_candidates("m:1", []) == []
    assert rank_candidates("m:1#3", [], recent="a") == []


def test_the_two_others_vary_between_calls():
    rng = random.Random(1)
    replicas = [_replica(n) for n in "abcdefgh"]
    seen = {tuple(sorted(r.replica_id for r in rank_candidates("m:9", replicas, sample=rng.sample)[0]))
            for _ in range(50)}
    assert len(seen) > 1  # not always the same pair


# ---- PoolRouter's own state (Serve's RequestRouter not constructed) ------------------------------
def _pending(model_id: str) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=model_id),
                           routing_context=SimpleNamespace(should_backoff=False))


def _router() -> PoolRouter:
    router = PoolRouter.__new__(PoolRouter)  # Serve's __init__ needs a running deployment
    router.initialize_state()
    return router


def test_the_router_follows_its_own_routing_decision_until_the_report_arrives():
    router = _router()
    replicas = [_replica(n) for n in "abcdef"]
    first = _pending("m:1")
    ranks = asyncio.run(router.choose_replicas(replicas, first))
    assert first.routing_context.should_backoff is True
    assert len(ranks) == 1 and len(ranks[0]) == 2
    router.on_request_routed(first, "d", None)
    ranks = asyncio.run(router.choose_replicas(replicas, _pending("m:1")))
    assert _names(ranks)[0] == ["d"]  # the next call for m:1 follows it, not two random replicas
    other = asyncio.run(router.choose_replicas(replicas, _pending("m:2")))
    assert len(other) == 1 and len(other[0]) == 2  # another version is not affected


def test_an_old_routing_decision_stops_counting():
    router = _router()
    replicas = [_replica(n) for n in "abcdef"]
    router.on_request_routed(_pending("m:1"), "d", None)
    target, when = router._recent["m:1"]
    router._recent["m:1"] = (target, when - pool_router.RECENT_S - 1)
    ranks = asyncio.run(router.choose_replicas(replicas, _pending("m:1")))
    assert len(ranks) == 1 and len(ranks[0]) == 2


def test_calls_without_a_model_id_leave_no_routing_memory():
    router = _router()
    router.on_request_routed(_pending(""), "a", None)
    assert router._recent == {}
    ranks = asyncio.run(router.choose_replicas([_replica("a"), _replica("b")], None))
    assert sorted(_names(ranks)[0]) == ["a", "b"]


def test_the_router_keeps_serves_multiplex_bookkeeping():
    """Serve indexes every pending call by its model ID; only MultiplexMixin's matching cleans that
    index (without it the ingress kept every call's request alive: benchmarks/many_models.py)."""
    from ray.serve.request_router import FIFOMixin, MultiplexMixin

    from maas_ray.serving.pool_router import PoolRouter

    assert issubclass(PoolRouter, MultiplexMixin) and issubclass(PoolRouter, FIFOMixin)
    assert hasattr(PoolRouter, "_get_pending_request_matching_multiplexed_model_id")
