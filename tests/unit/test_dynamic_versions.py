"""The ingress's side of dynamic models without Ray: VersionTable over a real registry, with the
model pool's handle faked (``pool.options(multiplexed_model_id=...)`` -> ``.infer_many`` /
``.describe`` / ``.unload``), and PoolRoute's spreading of a hot version over more replicas."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, Callable, Optional

import numpy as np
import pytest

from maas_ray.errors import InvalidInputError, ModelNotFoundError, ModelNotReadyError, VersionNotFoundError
from maas_ray.registry import Registry
from maas_ray.serving.config import AppArgs, DynamicModels
from maas_ray.serving.metrics import ServingMetrics
from maas_ray.serving.versions import PoolRoute, VersionTable
from tests.helpers import linear_onnx

pytestmark = pytest.mark.unit


# ---- fakes: the pool's handle and Ray's metrics module -------------------------------------------
class _Remote:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)


class FakePool:
    """The model pool's handle. ``describe_with(routing_id)`` answers describe() (a dict, or
    raises); every call is recorded as (routing_id, method)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.options_made: list[str] = []
        self.describe_with: Callable[[str], Any] = lambda routing: {"state": "ready", "schema": None,
                                                                     "replica": "r1", "bytes": 100}

    def options(self, *, multiplexed_model_id: str) -> SimpleNamespace:
        self.options_made.append(multiplexed_model_id)
        routing = multiplexed_model_id

        async def infer_many(items):
            self.calls.append((routing, "infer_many"))
            return [({"y": tensors["x"] * 2}, {}) for tensors, _ in items]

        async def describe():
            self.calls.append((routing, "describe"))
            answer = self.describe_with(routing)
            if asyncio.iscoroutine(answer):
                answer = await answer
            return answer

        async def unload():
            self.calls.append((routing, "unload"))
            return True

        return SimpleNamespace(infer_many=_Remote(infer_many), describe=_Remote(describe), unload=_Remote(unload))

    def called(self, method: str) -> list[str]:
        return [r for r, m in self.calls if m == method]


class _Metric:
    def __init__(self, *a, **kw) -> None:
        pass

    def inc(self, *a, **kw) -> None:
        pass

    set = observe = inc


FAKE_METRICS = SimpleNamespace(Counter=_Metric, Gauge=_Metric, Histogram=_Metric)


class CountingRegistry:
    """The real registry, counting the listings a table makes per model."""

    def __init__(self, real: Registry) -> None:
        self.real, self.listings = real, {}

    def list_versions(self, model: str, **kw: Any) -> list[int]:
        self.listings[model] = self.listings.get(model, 0) + 1
        return self.real.list_versions(model, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


# ---- fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def root(tmp_path) -> str:
    reg = Registry(str(tmp_path))
    reg.publish("a", linear_onnx(seed=1))
    reg.publish("a", linear_onnx(seed=2))
    reg.set_alias("a", "production", 1)
    reg.publish("b", linear_onnx(seed=3))  # no production alias: its latest
    reg.publish("private-x", linear_onnx(seed=4))  # excluded by the app
    return str(tmp_path)


def _table(root: str, pool: Optional[FakePool] = None, models: Optional[list] = None, **dynamic: Any) -> VersionTable:
    args = AppArgs.model_validate({
        "registry_root": root, "models": models or [],
        "dynamic": {"exclude": ["private-*"], "failure_ttl_s": 10, "refresh_interval_s": 5, **dynamic},
    })
    routes = {m["name"]: {1: {"infer": object()}} for m in models or []}
    resolved = {m["name"]: {"1": 1} for m in models or []}
    table = VersionTable(args, routes, resolved, ServingMetrics("app", metrics_module=FAKE_METRICS),
                         pool=pool or FakePool())
    table.registry = CountingRegistry(table.registry)
    return table


def _run(coro_fn):
    return asyncio.run(coro_fn())


async def _picked(table: VersionTable, model: str, version: Optional[str] = None):
    """What IngressCore.pick does for a dynamic model: ensure, pick, warm, require ready."""
    await table.ensure(model, version)
    slot = table.pick(model, version, None)
    if slot.dynamic and slot.state != "ready":
        await table.warm(model, slot)
    slot.require_ready(model)
    return slot


# ---- ensure: which names become known -------------------------------------------------------------
def test_a_registry_model_becomes_known_unpinned_by_production_else_latest(root):
    table = _table(root)

    async def go():
        await table.ensure("a")
        await table.ensure("b")

    _run(go)
    assert table.known == {"a": [1, 2], "b": [1]}
    assert table.refs["a"] == {"production": 1.0} and table.weights["a"] == {1: 1.0}
    assert table.refs["b"] == {"latest": 1.0} and table.weights["b"] == {1: 1.0}
    assert table.aliases["a"] == {"production": 1, "latest": 2}
    assert table.slots == {"a": {}, "b": {}}  # nothing loaded yet
    assert table.servable("a") == {1, 2}


def test_the_configured_alias_name_is_the_unpinned_one(root):
    Registry(root).set_alias("b", "canary", 1)
    table = _table(root, version="canary")
    _run(lambda: table.ensure("b"))
    _run(lambda: table.ensure("a"))
    assert table.refs["b"] == {"canary": 1.0}
    assert table.refs["a"] == {"latest": 1.0} and table.weights["a"] == {2: 1.0}  # no canary alias: latest


def test_excluded_and_configured_names_are_not_dynamic(root):
    table = _table(root, models=[{"name": "a", "placement": "fused", "versions": [{"version": 1}]}])
    assert not table.is_dynamic("a")  # the app's own `models` entry serves it
    assert not table.is_dynamic("private-x") and table.is_dynamic("b")
    _run(lambda: table.ensure("private-x"))
    assert "private-x" not in table.slots and table.registry.listings == {}  # not even read
    with pytest.raises(ModelNotFoundError):
        table.pick("private-x", None, None)


def test_unknown_names_are_404_and_read_once_per_interval(root):
    table = _table(root)

    async def go():
        for _ in range(5):
            await table.ensure("nope")
            with pytest.raises(ModelNotFoundError) as err:
                table.pick("nope", None, None)
            assert err.value.status_code == 404

    _run(go)
    assert table.registry.listings == {"nope": 1}
    Registry(root).publish("nope", linear_onnx(seed=9))
    _run(lambda: table.ensure("nope"))
    assert "nope" not in table.known and table.registry.listings == {"nope": 1}  # still remembered as absent
    table._absent["nope"] -= table.dynamic.refresh_interval_s + 1  # the interval has passed
    _run(lambda: table.ensure("nope"))
    assert table.known["nope"] == [1] and table.registry.listings == {"nope": 2}


def test_a_name_the_registry_refuses_is_remembered_as_absent(root):
    table = _table(root)
    _run(lambda: table.ensure("../etc"))  # an invalid name: the registry raises, no 500
    assert "../etc" in table._absent and "../etc" not in table.slots


def test_a_known_model_is_not_read_again_unless_a_pin_names_an_unknown_version(root):
    table = _table(root)

    async def go():
        await table.ensure("a")
        await table.ensure("a")
        await table.ensure("a", "2")
        await table.ensure("a", "production")
        assert table.registry.listings == {"a": 1}
        Registry(root).publish("a", linear_onnx(seed=5))  # a:3, published after the app started
        await table.ensure("a", "3")
        return await _picked(table, "a", "3")

    slot = _run(go)
    assert table.registry.listings == {"a": 2} and table.known["a"] == [1, 2, 3]
    assert slot.number == 3 and slot.state == "ready" and slot.dynamic


def test_unknown_versions_of_a_known_model_are_read_once_per_interval(root):
    table = _table(root)

    async def go():
        await table.ensure("a")
        for version in ["99"] * 10 + ["bogus"] * 10:
            await table.ensure("a", version)
            with pytest.raises(VersionNotFoundError):
                table.pick("a", version, None)

    _run(go)
    assert table.registry.listings["a"] <= 3, table.registry.listings


# ---- pick and warm ---------------------------------------------------------------------------------
def test_pick_makes_a_dynamic_slot_pinned_or_unpinned(root):
    pool = FakePool()
    table = _table(root, pool)
    _run(lambda: table.ensure("a"))
    unpinned = table.pick("a", None, None)
    assert unpinned.number == 1 and unpinned.dynamic and unpinned.state == "loading"
    assert isinstance(unpinned.route, PoolRoute) and (unpinned.route.model, unpinned.route.version) == ("a", 1)
    assert table.pick("a", "production", None) is unpinned
    assert table.pick("a", "1", None) is unpinned
    pinned = table.pick("a", "2", None)
    assert pinned.number == 2 and pinned.dynamic and table.pick("a", "latest", None) is pinned
    with pytest.raises(VersionNotFoundError) as err:
        table.pick("a", "7", None)
    assert err.value.status_code == 404 and "[1, 2]" in str(err.value)
    assert pool.calls == []  # making a slot loads nothing; warm() does


def test_warm_settles_ready_from_the_pools_describe_and_calls_share_it(root):
    pool = FakePool()

    async def describe(routing):
        await asyncio.sleep(0.01)
        return {"state": "ready", "schema": "the schema", "inputs": [{"name": "input"}], "replica": "r1"}

    pool.describe_with = describe
    table = _table(root, pool)

    async def go():
        await table.ensure("a")
        slot = table.pick("a", None, None)
        await asyncio.gather(*(table.warm("a", slot) for _ in range(5)))
        return slot

    slot = _run(go)
    assert slot.state == "ready" and slot.reason is None and slot.schema == "the schema"
    assert slot.manifest is not None and slot.manifest.version == 1
    assert pool.called("describe") == ["a:1"]  # five concurrent first requests, one load
    assert table.dynamic_index()[0] == {"name": "a", "version": "1", "state": "READY", "reason": ""}


def test_a_failed_load_answers_503_with_the_reason_and_is_retried_after_failure_ttl(root):
    pool = FakePool()
    answers = [{"state": "failed", "reason": "a:1 failed to load: sha256 mismatch"}, {"state": "ready"}]
    pool.describe_with = lambda routing: answers.pop(0)
    table = _table(root, pool)

    async def go():
        with pytest.raises(ModelNotReadyError) as err:
            await _picked(table, "a")
        assert err.value.status_code == 503 and "sha256 mismatch" in str(err.value)
        slot = table.slots["a"][1]
        assert slot.state == "failed" and slot.reason == "a:1 failed to load: sha256 mismatch"
        # the failed version gets no unpinned traffic
        with pytest.raises(ModelNotReadyError, match="no ready version"):
            table.pick("a", None, None)
        with pytest.raises(ModelNotReadyError, match="sha256"):  # pinned: within failure_ttl_s, not retried
            await _picked(table, "a", "1")
        assert pool.called("describe") == ["a:1"]
        rows = [r for r in table.dynamic_index() if r["name"] == "a" and r["version"] == "1"]
        assert rows == [{"name": "a", "version": "1", "state": "UNAVAILABLE",
                         "reason": "a:1 failed to load: sha256 mismatch"}]
        slot.since -= table.dynamic.failure_ttl_s + 1  # failure_ttl_s has passed
        again = await _picked(table, "a", "1")
        assert again is slot and slot.state == "ready" and pool.called("describe") == ["a:1", "a:1"]
        return table.pick("a", None, None)  # back in the split

    assert _run(go).number == 1


def test_a_describe_that_raises_fails_the_version_with_the_error(root):
    pool = FakePool()

    def refuse(routing):
        raise ModelNotReadyError(f"{routing} does not fit this replica", 5.0)

    pool.describe_with = refuse
    table = _table(root, pool)

    async def go():
        with pytest.raises(ModelNotReadyError):
            await _picked(table, "a", "2")
        return table.slots["a"][2]

    slot = _run(go)
    assert slot.state == "failed" and slot.reason == "ModelNotReadyError: a:2 does not fit this replica"


def _remote_error(exc: Exception) -> Exception:
    """``exc`` as awaiting a Serve handle raises it when the replica raised it (Ray's wrapper,
    built here without Ray running)."""
    import traceback

    from ray.exceptions import RayTaskError

    try:
        raise exc
    except type(exc) as raised:
        return RayTaskError("ServeReplica:app:ModelPool", traceback.format_exc(), raised).as_instanceof_cause()


def test_a_remote_errors_reason_is_the_errors_own_message(root):
    from maas_ray.errors import IntegrityError

    pool = FakePool()

    def corrupt(routing):
        raise _remote_error(IntegrityError(f"{routing} failed its integrity check: sha256 mismatch"))

    pool.describe_with = corrupt
    table = _table(root, pool)

    async def go():
        with pytest.raises(ModelNotReadyError):
            await _picked(table, "a", "2")
        return table.slots["a"][2]

    slot = _run(go)
    assert slot.state == "failed"
    assert slot.reason == "IntegrityError: a:2 failed its integrity check: sha256 mismatch", slot.reason


def test_a_cold_request_waits_at_most_the_load_timeout_while_the_load_goes_on(root):
    pool = FakePool()
    table = _table(root, pool, load_timeout_s=0.05)

    async def go():
        loaded = asyncio.Event()

        async def slow(routing):
            await loaded.wait()
            return {"state": "ready"}

        pool.describe_with = slow
        with pytest.raises(ModelNotReadyError, match="still loading") as err:
            await _picked(table, "a")
        assert err.value.status_code == 503 and err.value.retry_after_s
        slot = table.slots["a"][1]
        assert slot.state == "loading"
        assert table.dynamic_index()[0]["state"] == "LOADING"
        loaded.set()
        assert (await _picked(table, "a")) is slot
        return slot

    assert _run(go).state == "ready"
    assert pool.called("describe") == ["a:1"]  # the second request joined the same load


def test_a_generative_version_is_refused_by_the_pool_with_the_reason(root):
    pool = FakePool()
    table = _table(root, pool)

    async def go():
        await table.ensure("a")
        slot = table.pick("a", "2", None)
        slot.manifest = SimpleNamespace(generation=object(), version=2)  # a decoder LM's manifest
        with pytest.raises(InvalidInputError, match="generative model"):  # 400: retrying cannot help
            await table.warm("a", slot)
        return slot

    slot = _run(go)
    assert slot.state == "failed" and slot.reason.startswith("InvalidInputError: ")
    assert "generative model" in slot.reason and "`models`" in slot.reason
    assert InvalidInputError.status_code == 400
    assert pool.calls == []  # never sent to the pool


# ---- the repository API: load, unload, index -------------------------------------------------------
def test_unload_makes_the_model_unavailable_until_a_load(root):
    pool = FakePool()
    table = _table(root, pool)

    async def go():
        await _picked(table, "a")
        await _picked(table, "a", "2")
        done = await table.unload("a")
        assert sorted(done) == [1, 2]
        assert sorted(pool.called("unload")) == ["a:1", "a:2"]
        rows = [r for r in table.dynamic_index() if r["name"] == "a"]
        assert rows == [{"name": "a", "version": v, "state": "UNAVAILABLE", "reason": "unloaded"} for v in "12"]
        with pytest.raises(ModelNotReadyError, match="unloaded: load it with POST") as err:
            await _picked(table, "a")
        assert err.value.status_code == 503
        with pytest.raises(ModelNotReadyError, match="unloaded"):  # pinned too
            await _picked(table, "a", "2")
        describes = len(pool.called("describe"))
        await table.load("a")
        assert len(pool.called("describe")) == describes + 1
        assert (await _picked(table, "a")).state == "ready"
        assert (await _picked(table, "a", "2")).state == "ready"  # every version is back
        return [r for r in table.dynamic_index() if r["name"] == "a"]

    rows = _run(go)
    assert [r["state"] for r in rows] == ["READY", "READY"]


def test_load_after_unload_loads_the_version_unpinned_requests_reach(root):
    pool = FakePool()
    table = _table(root, pool)

    async def go():
        await _picked(table, "a")  # production -> 1
        await table.unload("a")
        number = await table.load("a")
        return number, pool.called("describe")

    number, describes = _run(go)
    assert number == 1, f"load() loaded a:{number}"
    assert describes == ["a:1", "a:1"]


def test_load_retries_a_failed_version_at_once(root):
    pool = FakePool()
    answers = [{"state": "failed", "reason": "out of memory"}, {"state": "ready"}]
    pool.describe_with = lambda routing: answers.pop(0)
    table = _table(root, pool)

    async def go():
        with pytest.raises(ModelNotReadyError, match="out of memory"):
            await _picked(table, "b")
        assert await table.load("b") == 1  # within failure_ttl_s: an explicit load does not wait it out
        return table.slots["b"][1]

    assert _run(go).state == "ready"


def test_load_and_unload_refuse_unknown_and_configured_models(root):
    table = _table(root, models=[{"name": "s", "placement": "fused", "versions": [{"version": 1}]}])

    async def go():
        for action in (table.load, table.unload):
            with pytest.raises(ModelNotFoundError):
                await action("nope")
            with pytest.raises(ModelNotFoundError):
                await action("private-x")
            with pytest.raises(InvalidInputError, match="configured by the app") as err:
                await action("s")
            assert err.value.status_code == 400

    _run(go)


def test_the_index_lists_registry_models_not_yet_requested(root):
    table = _table(root)

    async def go():
        await table.refresh_dynamic()
        await _picked(table, "b")

    _run(go)
    rows = {(r["name"], r["version"]): r for r in table.dynamic_index()}
    assert set(rows) == {("a", "1"), ("a", "2"), ("b", "1")}  # private-x excluded
    assert rows[("a", "1")]["state"] == "UNAVAILABLE"
    assert rows[("a", "1")]["reason"] == "not loaded (loads on its first request)"
    assert rows[("b", "1")]["state"] == "READY"
    assert table.index() == table.dynamic_index()  # no configured models


# ---- refresh: moved aliases and new versions -------------------------------------------------------
def test_refresh_follows_a_moved_alias_and_unloads_the_version_nothing_points_at(root):
    pool = FakePool()
    table = _table(root, pool)

    async def go():
        assert (await _picked(table, "a")).number == 1
        Registry(root).set_alias("a", "production", 2)
        await table.refresh_dynamic()
        assert table.weights["a"] == {2: 1.0}
        assert pool.called("unload") == ["a:1"]
        assert 1 not in table.slots["a"]
        assert (await _picked(table, "a")).number == 2
        return await _picked(table, "a", "1")  # a pin may still load the old version

    old = _run(go)
    assert old.number == 1 and old.state == "ready"


def test_refresh_keeps_a_version_that_traffic_still_names(root):
    pool = FakePool()
    table = _table(root, pool)

    async def go():
        await _picked(table, "a")
        table.set_traffic("a", {"production": 1.0, "1": 1.0})  # user_config.traffic names 1 itself
        Registry(root).set_alias("a", "production", 2)
        await table.refresh_dynamic()

    _run(go)
    assert table.weights["a"] == {2: 1.0, 1: 1.0} and pool.called("unload") == []
    assert 1 in table.slots["a"]


def test_a_version_published_later_is_servable_after_a_refresh(root):
    pool = FakePool()
    table = _table(root, pool)

    async def go():
        assert (await _picked(table, "b")).number == 1  # unpinned: latest (no production alias)
        Registry(root).publish("b", linear_onnx(seed=6))
        await table.refresh_dynamic()
        assert table.servable("b") == {1, 2}
        slot = await _picked(table, "b")  # latest moved: unpinned requests follow
        assert slot.number == 2
        assert pool.called("unload") == ["b:1"]  # nothing points at b:1 any more
        return await _picked(table, "b", "2")

    assert _run(go).state == "ready"


def test_a_model_deleted_from_the_registry_is_dropped(root):
    table = _table(root)

    async def go():
        await _picked(table, "b")
        table.registry.real.list_models = lambda: ["a", "private-x"]  # b is gone
        await table.refresh_dynamic()

    _run(go)
    assert "b" not in table.slots and "b" not in table.known and "b" not in table.routers


def test_refresh_keeps_serving_when_the_registry_is_unreachable(root):
    table = _table(root)

    async def go():
        await _picked(table, "a")

        def broken():
            raise OSError("registry down")

        table.registry.real.list_models = broken
        await table.refresh_dynamic()
        return await _picked(table, "a")

    assert _run(go).state == "ready"


# ---- PoolRoute: a hot version on more replicas -----------------------------------------------------
def _route(pool: FakePool, pool_replicas: int = 4, **hot: Any) -> PoolRoute:
    dynamic = DynamicModels(hot={"window_s": 10, "target_utilization": 0.5, **hot})
    return PoolRoute(pool, "m", 1, dynamic.version_config("m", 1), dynamic, max_queued=None, callers=1,
                     pool_replicas=pool_replicas)


def test_the_shard_count_grows_with_rate_times_busy_time_and_falls_back():
    route = _route(FakePool())
    now = 1000.0
    assert route._shard(now) == 0 and route.shards == 1  # no traffic yet
    route._busy_s = 0.05  # 50 ms of pool time per request
    route._arrivals = [now - 5.0] * 100  # 10 requests/s over the 10 s window: 0.5 s/s = 1 replica at 50 %
    route._shard(now + 0.5)
    assert route.shards == 1  # decided at most once a second
    route._shard(now + 1.0)
    assert route.shards == 1
    route._arrivals = [now] * 300  # 30 requests/s: 1.5 s/s -> 3 replicas at 50 %
    route._shard(now + 2.0)
    assert route.shards == 3
    picks = [route._shard(now + 2.1 + i * 0.01) for i in range(6)]
    assert sorted(set(picks)) == [0, 1, 2]  # calls rotate over the three routing IDs
    route._arrivals = [now] * 10_000  # far hotter: capped at the pool's replicas
    route._shard(now + 3.0)
    assert route.shards == 4
    route._shard(now + 20.0)  # cooled: every arrival left the window
    assert route.shards == 1 and route._arrivals == []


def test_max_replicas_per_model_caps_the_spread():
    route = _route(FakePool(), pool_replicas=8, max_replicas_per_model=2)
    assert route.max_shards == 2
    route._busy_s, route._arrivals = 1.0, [0.0] * 1000
    route._shard(1.0)
    assert route.shards == 2


def test_calls_carry_the_versions_routing_ids_and_an_unload_reaches_each_used_one():
    pool = FakePool()
    route = _route(pool)
    route.shards, route._decided = 3, float("inf")  # a hot version, decided for now

    async def go():
        results = []
        for i in range(4):
            results.append(await route.infer({"x": np.array([[float(i)]], np.float32)}, False))
        await route.unload()
        return results

    results = _run(go)
    assert [out["y"].tolist() for out, _ in results] == [[[0.0]], [[2.0]], [[4.0]], [[6.0]]]
    assert pool.called("infer_many") == ["m:1#1", "m:1#2", "m:1", "m:1#1"]
    assert sorted(pool.called("unload")) == ["m:1", "m:1#1", "m:1#2"]
    assert route.used == {0}
    assert route._busy_s > 0  # measured from the calls
    assert sorted(set(pool.options_made)) == ["m:1", "m:1#1", "m:1#2"]  # one handle per routing ID, made once
    assert len(pool.options_made) == 3


def test_describe_goes_to_the_base_routing_id():
    pool = FakePool()
    route = _route(pool)
    info = _run(route.describe)
    assert info["state"] == "ready" and pool.calls == [("m:1", "describe")]
