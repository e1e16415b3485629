"""A model pool replica without Serve: its keys and routing IDs, its cache metrics (Ray's metrics
module faked), and ModelPool itself over a real registry and onnxruntime, with only Serve's side
faked (the call's multiplexed model ID, the routing report, the replica's CPUs)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from maas_ray.errors import InvalidInputError, MaasError, ModelNotReadyError
from maas_ray.registry import Registry
from maas_ray.serving import compat, replicas
from maas_ray.serving import metric_names as names
from maas_ray.serving import pool as pool_mod
from maas_ray.serving.metrics import ServingMetrics
from maas_ray.serving.pool import ModelPool, PoolMetrics, parse_key, routing_id, version_key
from tests.helpers import linear_onnx

pytestmark = pytest.mark.unit
IN, OUT = 4, 3


# ---- keys and routing IDs -------------------------------------------------------------------------
def test_keys_and_routing_ids():
    assert version_key("fraud-eu", 3) == "fraud-eu:3"
    assert routing_id("fraud-eu", 3) == "fraud-eu:3"
    assert routing_id("fraud-eu", 3, 0) == "fraud-eu:3"
    assert routing_id("fraud-eu", 3, 2) == "fraud-eu:3#2"
    assert parse_key("fraud-eu:3") == ("fraud-eu", 3)
    assert parse_key("fraud-eu:3#2") == ("fraud-eu", 3)  # a shard's suffix dropped
    assert parse_key(routing_id("m.v2_x", 12, 5)) == ("m.v2_x", 12)


@pytest.mark.parametrize("bad", ["", "m", "m:", ":1", "m:x", "m:-1", "m:1.5", "#1", "m#1", "m:#1"])
def test_a_malformed_key_is_a_400_quoting_it(bad):
    with pytest.raises(InvalidInputError) as err:
        parse_key(bad)
    assert err.value.status_code == 400 and repr(bad) in str(err.value)


# ---- PoolMetrics ----------------------------------------------------------------------------------
class FakeMetric:
    def __init__(self, name, description="", tag_keys=(), boundaries=None):
        self.name, self.tag_keys, self.boundaries = name, tuple(tag_keys), boundaries
        self.values: dict = {}
        self.observed: dict = {}

    def _key(self, tags):
        assert set(tags) == set(self.tag_keys), (self.name, tags)  # every label given, no other
        return tuple(sorted(tags.items()))

    def inc(self, value=1, tags=None):
        self.values[self._key(tags)] = self.values.get(self._key(tags), 0) + value

    def set(self, value, tags=None):
        self.values[self._key(tags)] = value

    def observe(self, value, tags=None):
        self.observed.setdefault(self._key(tags), []).append(value)


class FakeModule:
    def __init__(self) -> None:
        self.made: dict[str, FakeMetric] = {}
        self.Counter = self.Gauge = self.Histogram = self._make

    def _make(self, name, **kw):
        assert name not in self.made, f"{name} made twice"
        metric = self.made[name] = FakeMetric(name, **kw)
        return metric


def _tags(**kw) -> tuple:
    return tuple(sorted(kw.items()))


def test_pool_metrics_export_counters_as_deltas_and_gauges_as_values():
    fake = FakeModule()
    m = PoolMetrics("app", "r1", 1000, module=fake)
    m.miss("a:1")
    m.loaded("a:1", 0.3, 400)
    m.hit("a:1")
    m.hit("a:1#2")  # a shard counts for its version
    m.miss("b:2")
    m.load_failed("b:2", 0.1, "checksum")
    m.evicted("a:1", 400, "lru")
    m.held(1, 250)
    m.request("a", cold=True, seconds=0.35)
    m.request("a", cold=False, seconds=0.002)
    m.flush()
    made = fake.made
    assert made[names.CACHE_VERSIONS].values == {_tags(app="app", replica="r1"): 1}
    assert made[names.CACHE_BYTES].values == {_tags(app="app", replica="r1"): 250}
    assert made[names.CACHE_BUDGET].values == {_tags(app="app", replica="r1"): 1000}
    assert made[names.CACHE_LOOKUPS].values == {
        _tags(app="app", model="a", version="1", result="hit"): 2,
        _tags(app="app", model="a", version="1", result="miss"): 1,
        _tags(app="app", model="b", version="2", result="miss"): 1,
    }
    assert made[names.CACHE_LOADS].values == {
        _tags(app="app", model="a", version="1", outcome="ok"): 1,
        _tags(app="app", model="b", version="2", outcome="failed"): 1,
    }
    assert made[names.CACHE_EVICTIONS].values == {_tags(app="app", reason="lru"): 1}
    assert made[names.CACHE_LOAD_LATENCY].observed == {_tags(app="app", model="a"): [0.3]}
    assert made[names.CACHE_LOAD_LATENCY].boundaries == list(pool_mod.LOAD_BUCKETS)
    assert made[names.CACHE_REQUEST_LATENCY].observed == {
        _tags(app="app", model="a", cache="cold"): [0.35], _tags(app="app", model="a", cache="warm"): [0.002]}

    m.flush()  # nothing new: counters unchanged, histograms not observed again
    assert made[names.CACHE_LOOKUPS].values[_tags(app="app", model="a", version="1", result="hit")] == 2
    assert made[names.CACHE_LOAD_LATENCY].observed == {_tags(app="app", model="a"): [0.3]}

    m.hit("a:1")
    m.evicted("x:1", 10, "unload")
    m.held(0, 0)
    m.flush()  # only the deltas reach Ray's counters
    assert made[names.CACHE_LOOKUPS].values[_tags(app="app", model="a", version="1", result="hit")] == 3
    assert made[names.CACHE_EVICTIONS].values == {_tags(app="app", reason="lru"): 1,
                                                  _tags(app="app", reason="unload"): 1}
    assert made[names.CACHE_VERSIONS].values == {_tags(app="app", replica="r1"): 0}


def test_pool_metrics_bound_the_requests_kept_between_flushes():
    m = PoolMetrics("app", "r1", 1000, module=FakeModule())
    for _ in range(100_010):
        m.request("a", cold=False, seconds=0.001)
    assert len(m._request_s) == 100_000


# ---- ModelPool outside Serve ----------------------------------------------------------------------
def _expected(seed: int, x: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(IN, OUT)).astype(np.float32)
    b = rng.normal(size=(OUT,)).astype(np.float32)
    return x @ w + b


class _Serve:
    """Serve's side of a pool replica: the call's multiplexed model ID and the IDs it reports."""

    def __init__(self) -> None:
        self.model_id = ""
        self.reports: list[list[str]] = []

    def report(self, ids: list[str]) -> bool:
        self.reports.append(list(ids))
        return False  # as outside a replica


@pytest.fixture
def serve_side(monkeypatch):
    side = _Serve()
    monkeypatch.setattr(compat, "multiplexed_model_id", lambda: side.model_id)
    monkeypatch.setattr(compat, "report_multiplexed_ids", side.report)
    monkeypatch.setattr(replicas, "replica_cpus", lambda default=1: 1)  # Ray's runtime context auto-starts Ray
    monkeypatch.setattr(pool_mod, "freeze_startup_objects", lambda: None)  # no gc.freeze in the test process
    monkeypatch.setattr(pool_mod, "ServingMetrics",
                        lambda app, models=None, max_models=None: ServingMetrics(
                            app, models=models, max_models=max_models, metrics_module=FakeModule()))
    side.fake = FakeModule()  # the pool's cache metrics (PoolMetrics) flush here
    return side


@pytest.fixture
def registry(tmp_path):
    root = str(tmp_path / "registry")
    reg = Registry(root)
    reg.publish("a", linear_onnx(IN, OUT, seed=1))
    reg.publish("a", linear_onnx(IN, OUT, seed=2))
    reg.publish("b", linear_onnx(IN, OUT, seed=3))
    broken = reg.publish("broken", linear_onnx(IN, OUT, seed=4)).version
    onnx_file = Path(root) / "broken" / str(broken) / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-10] ^= 0xFF  # same size, wrong checksum
    onnx_file.write_bytes(bytes(data))
    return root


def _pool(serve_side, root: str, **dynamic) -> ModelPool:
    pool = ModelPool(root, {"memory_budget_bytes": 256 << 20, **dynamic})
    pool.cache_metrics._module = serve_side.fake  # the 1 s flusher never reaches Ray's metrics
    return pool


def _run(pool: ModelPool, coro_fn):
    try:
        return asyncio.run(coro_fn())
    finally:
        pool.metrics.stop()


async def _infer(pool: ModelPool, serve_side: _Serve, routing: str, x: np.ndarray):
    serve_side.model_id = routing
    return await pool.infer_many([({"input": x}, False)])


def test_a_version_loads_on_its_first_call_and_answers(serve_side, registry):
    pool = _pool(serve_side, registry)
    x = np.arange(2 * IN, dtype=np.float32).reshape(2, IN)

    async def go():
        [(outputs, timings)] = await _infer(pool, serve_side, "a:2", x)
        first = await pool.stats()
        [(again, _)] = await _infer(pool, serve_side, "a:2", x)
        return outputs, timings, again, first, await pool.stats()

    outputs, timings, again, first, stats = _run(pool, go)
    np.testing.assert_allclose(outputs["logits"], _expected(2, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(again["logits"], _expected(2, x), rtol=1e-5, atol=1e-5)
    assert "inference" in timings
    assert first["misses"] == 1 and first["loads"] == 1 and first["hits"] == 0
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["loads"] == 1  # no second load
    assert stats["count"] == 1 and [e["key"] for e in stats["entries"]] == ["a:2"]
    entry = stats["entries"][0]
    assert entry["in_flight"] == 0 and entry["idle_s"] >= 0
    assert entry["bytes"] >= pool._artifact_bytes("a:2") > 0  # never less than the artifact
    assert stats["held_bytes"] == entry["bytes"] <= stats["budget_bytes"] == 256 << 20
    assert set(stats["measured"]) == {"a:2"}
    assert stats["replica"] == pool.replica and stats["pid"] > 0
    assert stats["bytes_per_artifact_byte"] >= 1.0
    assert stats["load_failures"] == 0 and stats["evictions"] == 0
    assert serve_side.reports[-1] == ["a:2"]  # the replica told Serve's routers it holds a:2


def test_a_call_without_a_routing_id_or_with_a_bad_one_is_a_400(serve_side, registry):
    pool = _pool(serve_side, registry)

    async def go():
        for routing in ("", "a", "a:x"):
            with pytest.raises(InvalidInputError) as err:
                await _infer(pool, serve_side, routing, np.ones((1, IN), np.float32))
            assert err.value.status_code == 400
        return await pool.stats()

    assert _run(pool, go)["loads"] == 0


def test_versions_of_two_models_and_a_shard_id_are_held_and_reported(serve_side, registry):
    pool = _pool(serve_side, registry)
    x = np.ones((1, IN), np.float32)

    async def go():
        [(a1, _)] = await _infer(pool, serve_side, "a:1", x)
        [(b1, _)] = await _infer(pool, serve_side, "b:1", x)
        [(shard, _)] = await _infer(pool, serve_side, "a:1#1", x)  # a hot version's extra ID: same entry
        return a1, b1, shard, await pool.stats()

    a1, b1, shard, stats = _run(pool, go)
    np.testing.assert_allclose(a1["logits"], _expected(1, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b1["logits"], _expected(3, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(shard["logits"], a1["logits"])
    assert stats["loads"] == 2 and sorted(e["key"] for e in stats["entries"]) == ["a:1", "b:1"]
    assert serve_side.reports[-1] == ["a:1", "a:1#1", "b:1"]


def test_describe_gives_the_schema_replica_and_bytes(serve_side, registry):
    pool = _pool(serve_side, registry)

    async def go():
        serve_side.model_id = "b:1"
        return await pool.describe(), await pool.stats()

    info, stats = _run(pool, go)
    assert info["state"] == "ready" and info["replica"] == pool.replica
    assert info["bytes"] == stats["entries"][0]["bytes"]
    assert info["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, IN]}]
    assert [o["name"] for o in info["outputs"]] == ["logits"]


def test_unload_drops_the_version_and_its_routing_ids(serve_side, registry):
    pool = _pool(serve_side, registry)
    x = np.ones((1, IN), np.float32)

    async def go():
        await _infer(pool, serve_side, "a:1", x)
        await _infer(pool, serve_side, "b:1", x)
        serve_side.model_id = "a:1"
        done = await pool.unload()
        again = await pool.unload()  # nothing held any more
        return done, again, await pool.stats()

    done, again, stats = _run(pool, go)
    assert done is True and again is False
    assert [e["key"] for e in stats["entries"]] == ["b:1"] and stats["evictions"] == 1
    assert serve_side.reports[-1] == ["b:1"]
    assert pool.cache_metrics.evictions == {"unload": 1}


def test_a_corrupt_artifact_fails_its_load_with_the_reason_and_the_rest_keep_serving(serve_side, registry):
    pool = _pool(serve_side, registry)
    x = np.ones((1, IN), np.float32)

    async def go():
        with pytest.raises(MaasError) as err:
            await _infer(pool, serve_side, "broken:1", x)
        [(ok, _)] = await _infer(pool, serve_side, "a:1", x)
        with pytest.raises(MaasError) as again:  # remembered for failure_ttl_s: not loaded again
            await _infer(pool, serve_side, "broken:1", x)
        return err.value, again.value, ok, await pool.stats()

    error, again, ok, stats = _run(pool, go)
    assert "sha256" in str(error) and "integrity" in str(error)
    assert str(again) == str(error)
    np.testing.assert_allclose(ok["logits"], _expected(1, x), rtol=1e-5, atol=1e-5)
    assert stats["load_failures"] == 1  # the failure is remembered: the request did not load it again
    assert [e["key"] for e in stats["entries"]] == ["a:1"]
    assert pool.cache.state("broken:1")[0] == "UNAVAILABLE"
    assert pool.cache_metrics.loads == {("a", "1", "ok"): 1, ("broken", "1", "failed"): 1}
    assert "broken:1" not in serve_side.reports[-1]


def test_describe_of_a_corrupt_artifact_answers_failed_with_the_reason(serve_side, registry):
    pool = _pool(serve_side, registry)

    async def go():
        serve_side.model_id = "broken:1"
        return await pool.describe()

    info = _run(pool, go)
    assert info["state"] == "failed" and "sha256" in info["reason"], info


def test_a_version_that_does_not_exist_fails_its_load(serve_side, registry):
    pool = _pool(serve_side, registry)

    async def go():
        with pytest.raises(MaasError) as err:
            await _infer(pool, serve_side, "a:9", np.ones((1, IN), np.float32))
        return err.value

    error = _run(pool, go)
    assert error.status_code in (404, 503)
    assert pool._estimate("a:9") == 0  # an unreadable manifest estimates nothing; the load says why


def test_the_estimate_is_the_artifact_times_the_measured_ratio(serve_side, registry):
    pool = _pool(serve_side, registry)
    artifact = pool._artifact_bytes("a:1")
    manifest = Registry(registry).describe("a", 1)
    assert artifact >= manifest.size_bytes > 0
    assert pool._estimate("a:1") == int(artifact * pool_mod.DEFAULT_BYTES_PER_ARTIFACT_BYTE)
    pool._ratio = 3.5
    assert pool._estimate("a:1") == int(artifact * 3.5)
    pool.metrics.stop()


class _FakeHeap:
    """glibc's allocated bytes as a load sees them: each load's session keeps ``per_load`` bytes."""

    def __init__(self, per_load: int) -> None:
        self.per_load, self.calls, self.total = per_load, 0, 1 << 30

    def __call__(self) -> int:
        self.calls += 1
        if self.calls % 2 == 0:  # the reading after a load
            self.total += self.per_load
        return self.total


def test_a_solo_load_is_charged_its_measured_growth(serve_side, registry, monkeypatch):
    monkeypatch.setattr(pool_mod, "_heap_bytes", _FakeHeap(per_load=3_000_000))
    pool = _pool(serve_side, registry)

    async def go():
        await _infer(pool, serve_side, "a:1", np.ones((1, IN), np.float32))
        return await pool.stats()

    stats = _run(pool, go)
    assert stats["entries"][0]["bytes"] == 3_000_000
    assert stats["measured"] == {"a:1": True}
    artifact = pool._artifact_bytes("a:1")  # under 1 MiB: it teaches the per-session cost, not the ratio
    assert pool._overhead == 3_000_000 - artifact and pool._ratio == 2.0


def test_after_tiny_models_a_larger_version_still_loads_within_the_budget(serve_side, tmp_path, monkeypatch):
    root = str(tmp_path / "mixed")
    reg = Registry(root)
    reg.publish("tiny", linear_onnx(IN, OUT, seed=1))  # ~200 bytes
    reg.publish("wide", linear_onnx(512, 512, seed=2))  # ~1 MB of weights
    # each session holds 1 MB beyond its weights (what a tiny linear model measured in this process)
    heap = _FakeHeap(per_load=1_000_000)
    monkeypatch.setattr(pool_mod, "_heap_bytes", heap)
    pool = _pool(serve_side, root, memory_budget_bytes=64 << 20)

    async def go():
        await _infer(pool, serve_side, "tiny:1", np.ones((1, IN), np.float32))
        heap.per_load = 3_000_000  # the wide version's session: 1 MB + its weights twice
        return await _infer(pool, serve_side, "wide:1", np.ones((1, 512), np.float32))

    try:
        [(outputs, _)] = _run(pool, go)
    except ModelNotReadyError as exc:
        pytest.fail(f"the wide version was refused: {exc}")
    assert outputs["logits"].shape == (1, 512)
