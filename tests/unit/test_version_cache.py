"""maas_ray.serving.cache: the policy's bookkeeping, replicas_wanted, and VersionCache's loads,
evictions, waits, timeouts and failures (asyncio.run inside sync tests; loads are tiny sleeps
in the thread asyncio.to_thread gives them)."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time

import pytest

from maas_ray.errors import ConfigError, InvalidInputError, ModelNotReadyError
from maas_ray.serving.cache import CachePolicy, VersionCache, replicas_wanted

pytestmark = pytest.mark.unit
MB = 1_000_000


class Loader:
    """A fake load(key): returns (f"value-{key}", sizes[key]) after `delay` seconds; counts loads
    per key and the most loads running at once; raises for keys in `fail`."""

    def __init__(self, sizes: dict[str, int], delay: float = 0.0, fail: dict[str, Exception] | None = None):
        self.sizes, self.delay, self.fail = sizes, delay, dict(fail or {})
        self.calls: dict[str, int] = {}
        self.unloaded: list[str] = []
        self._lock = threading.Lock()
        self._running = 0
        self.max_running = 0

    def __call__(self, key: str):
        with self._lock:
            self.calls[key] = self.calls.get(key, 0) + 1
            self._running += 1
            self.max_running = max(self.max_running, self._running)
        try:
            time.sleep(self.delay)
            if key in self.fail:
                raise self.fail[key]
            return f"value-{key}", self.sizes[key]
        finally:
            with self._lock:
                self._running -= 1

    def unload(self, value: str) -> None:
        self.unloaded.append(value.removeprefix("value-"))


class Events:
    """A CacheListener that records every callback."""

    def __init__(self):
        self.log: list[tuple] = []

    def __getattr__(self, name):
        if name in {"hit", "miss", "loaded", "load_failed", "evicted", "held"}:
            return lambda *args: self.log.append((name, *args))
        raise AttributeError(name)

    def of(self, name):
        return [e[1:] for e in self.log if e[0] == name]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


async def use_once(cache, key, hold: float = 0.0):
    async with cache.use(key) as value:
        await asyncio.sleep(hold)
        return value


# ---- CachePolicy -------------------------------------------------------------------------------
def test_policy_evicts_least_recently_used_idle_entries_by_bytes():
    p = CachePolicy(100)
    p.add("a", 40, 1.0)
    p.add("b", 30, 2.0)
    p.add("c", 20, 3.0)
    assert p.held_bytes == 90 and len(p) == 3 and p.keys() == ["a", "b", "c"]
    assert p.victims(10) == []
    p.touch("a", 4.0)  # b is now the least recently used
    assert p.keys() == ["b", "c", "a"] and p.last_used("a") == 4.0
    assert p.victims(15) == ["b"]
    assert p.victims(45) == ["b", "c"]
    p.pin("b")
    assert p.victims(15) == ["c"]
    assert p.victims(15, exclude={"c"}) == ["a"]
    assert p.victims(75) is None  # only a (40) and c (20) idle: 90 - 60 + 75 > 100
    assert p.victims(101) is None  # bigger than the whole budget
    p.unpin("b")
    assert p.in_flight("b") == 0
    assert p.remove("b") == 30 and "b" not in p and p.held_bytes == 60


def test_policy_count_bound_and_both_bounds():
    p = CachePolicy(None, max_entries=2)
    p.add("a", 10**12, 1.0)  # no byte bound: any size
    p.add("b", 1, 2.0)
    assert p.victims(10**12) == ["a"]
    p.pin("a")
    assert p.victims(0) == ["b"]
    p.pin("b")
    assert p.victims(0) is None
    both = CachePolicy(100, max_entries=2)
    both.add("a", 10, 1.0)
    both.add("b", 10, 2.0)
    assert both.victims(5) == ["a"]  # the count binds, not the bytes
    assert both.victims(95) == ["a", "b"]  # the bytes bind further
    assert CachePolicy(None).victims(10**15) == []


def test_policy_over_budget_and_misuse():
    p = CachePolicy(100)
    p.add("a", 50, 1.0)
    p.add("b", 30, 2.0)
    p.add("c", 60, 3.0)  # measured bigger than its estimate: 140 held
    p.pin("a")
    assert p.over_budget() == ["b", "c"]  # a is in flight; b alone (30) is not enough
    assert p.over_budget(exclude={"c"}) == ["b"]  # may leave it over budget
    assert CachePolicy(None).over_budget() == []
    with pytest.raises(ValueError, match="already held"):
        p.add("a", 1, 4.0)
    with pytest.raises(ValueError, match="not pinned"):
        p.unpin("b")
    with pytest.raises(ConfigError, match="-5"):
        CachePolicy(-5)
    with pytest.raises(ConfigError, match="0"):
        CachePolicy(100, max_entries=0)


def test_replicas_wanted():
    kw = {"target_utilization": 0.5, "max_replicas": 8}
    assert replicas_wanted(0.0, 0.01, **kw) == 1
    assert replicas_wanted(50, 0.01, **kw) == 1  # 0.5 replica-seconds per second at 0.5 utilization
    assert replicas_wanted(51, 0.01, **kw) == 2
    assert replicas_wanted(1000, 0.01, **kw) == 8  # capped
    assert replicas_wanted(10, 0.07, target_utilization=0.7, max_replicas=5) == 1  # no float noise
    with pytest.raises(ConfigError, match="1.5"):
        replicas_wanted(1, 1, target_utilization=1.5, max_replicas=2)


# ---- VersionCache: loading -----------------------------------------------------------------------
def test_twenty_concurrent_first_uses_cause_one_load():
    loader = Loader({"m:1": 10}, delay=0.05)
    cache = VersionCache(loader, budget_bytes=100)

    async def go():
        return await asyncio.gather(*(use_once(cache, "m:1") for _ in range(20)))

    assert asyncio.run(go()) == ["value-m:1"] * 20
    assert loader.calls == {"m:1": 1}
    stats = cache.stats()
    assert (stats["loads"], stats["misses"], stats["hits"]) == (1, 20, 0)
    assert stats["entries"][0]["in_flight"] == 0 and stats["loading"] == []


def test_loads_of_different_keys_overlap_up_to_the_limit():
    loader = Loader({f"m{i}": 1 for i in range(6)}, delay=0.1)
    cache = VersionCache(loader, budget_bytes=None, max_concurrent_loads=3)

    async def go():
        await asyncio.gather(*(use_once(cache, f"m{i}") for i in range(6)))

    asyncio.run(go())
    assert loader.max_running == 3
    assert sorted(cache.keys()) == [f"m{i}" for i in range(6)]


def test_hits_touch_and_evict_least_recently_used_by_bytes():
    loader = Loader({"a": 40, "b": 30, "c": 20, "d": 35})
    events = Events()
    cache = VersionCache(loader, budget_bytes=100, estimate=loader.sizes.__getitem__,
                         unload=loader.unload, listener=events)

    async def go():
        for key in ["a", "b", "c", "a", "d"]:  # d (35) needs 25 more: b (the LRU) goes, not a
            await use_once(cache, key)

    asyncio.run(go())
    assert cache.keys() == ["c", "a", "d"]
    assert loader.unloaded == ["b"]
    assert events.of("evicted") == [("b", 30, "lru")]
    assert [e[0] for e in events.of("miss")] == ["a", "b", "c", "d"]
    assert events.of("hit") == [("a",)]
    assert [(k, size) for k, _, size in events.of("loaded")] == [("a", 40), ("b", 30), ("c", 20), ("d", 35)]
    assert events.of("held")[-1] == (3, 95)
    s = cache.stats()
    assert (s["hits"], s["misses"], s["loads"], s["evictions"], s["held_bytes"], s["count"]) == (1, 4, 4, 1, 95, 3)
    assert [e["key"] for e in s["entries"]] == ["c", "a", "d"] and s["budget_bytes"] == 100
    assert cache.state("a") == ("READY", "") and cache.state("b") == ("UNAVAILABLE", "not loaded")


def test_count_bound_evicts_without_a_byte_budget():
    loader = Loader({k: 10**9 for k in "abc"})
    cache = VersionCache(loader, budget_bytes=None, max_entries=2, unload=loader.unload)

    async def go():
        for key in "abc":
            await use_once(cache, key)

    asyncio.run(go())
    assert cache.keys() == ["b", "c"] and loader.unloaded == ["a"]
    assert cache.stats()["max_entries"] == 2


def test_in_flight_entry_is_never_evicted_and_its_unpin_makes_room():
    loader = Loader({"a": 60, "b": 60})
    cache = VersionCache(loader, budget_bytes=100, estimate=loader.sizes.__getitem__, unload=loader.unload)

    async def go():
        release = asyncio.Event()
        seen = []

        async def hold_a():
            async with cache.use("a"):
                seen.append("a in use")
                await release.wait()
            seen.append("a released")

        holder = asyncio.create_task(hold_a())
        await asyncio.sleep(0.02)
        waiter = asyncio.create_task(use_once(cache, "b"))
        await asyncio.sleep(0.05)
        assert not waiter.done() and cache.keys() == ["a"] and loader.unloaded == []
        assert cache.state("b") == ("LOADING", "loading")
        release.set()
        assert await waiter == "value-b"
        await holder
        return seen

    assert asyncio.run(go()) == ["a in use", "a released"]
    assert cache.keys() == ["b"] and loader.unloaded == ["a"]


def test_no_room_within_the_timeout_is_a_503_that_is_not_remembered():
    loader = Loader({"a": 60, "b": 60})
    cache = VersionCache(loader, budget_bytes=100, estimate=loader.sizes.__getitem__, load_timeout_s=0.05)

    async def go():
        release = asyncio.Event()

        async def hold_a():
            async with cache.use("a"):
                await release.wait()

        holder = asyncio.create_task(hold_a())
        await asyncio.sleep(0.01)
        with pytest.raises(ModelNotReadyError, match="b (still loading|waits for room)"):
            await use_once(cache, "b")
        await asyncio.sleep(0.1)  # the load itself gave up waiting for room
        assert cache.state("b") == ("UNAVAILABLE", "not loaded") and "b" not in loader.calls
        release.set()
        await holder
        return await use_once(cache, "b")  # retried at once: the wait was transient

    assert asyncio.run(go()) == "value-b"
    assert cache.keys() == ["b"] and loader.calls == {"a": 1, "b": 1}


def test_version_bigger_than_the_budget_is_refused_naming_both_sizes():
    loader = Loader({"big": 150 * MB, "sneaky": 150 * MB})
    cache = VersionCache(loader, budget_bytes=100 * MB, estimate=lambda k: 150 * MB if k == "big" else 0,
                         unload=loader.unload)

    async def go():
        for key in ["big", "sneaky"]:
            with pytest.raises(ModelNotReadyError) as info:
                await use_once(cache, key)
            assert "150.0 MB" in str(info.value) and "100.0 MB" in str(info.value), str(info.value)

    asyncio.run(go())
    assert "big" not in loader.calls  # refused on its estimate: never loaded
    assert loader.calls == {"sneaky": 1} and loader.unloaded == ["sneaky"]  # loaded, measured, dropped
    assert cache.keys() == [] and cache.stats()["held_bytes"] == 0


def test_load_timeout_answers_503_and_the_load_completes_for_the_next_caller():
    loader = Loader({"slow": 10}, delay=0.3)
    cache = VersionCache(loader, budget_bytes=100, load_timeout_s=0.05)

    async def go():
        with pytest.raises(ModelNotReadyError, match="still loading after 0.05s") as info:
            await use_once(cache, "slow")
        assert info.value.retry_after_s is not None and info.value.status_code == 503
        assert cache.state("slow")[0] == "LOADING"
        await asyncio.sleep(0.4)
        return await use_once(cache, "slow")

    assert asyncio.run(go()) == "value-slow"
    assert loader.calls == {"slow": 1}
    assert cache.stats()["hits"] == 1


def test_failure_is_remembered_for_its_ttl_then_retried():
    clock = Clock()
    loader = Loader({"m": 10}, fail={"m": OSError("corrupt artifact")})
    events = Events()
    cache = VersionCache(loader, budget_bytes=100, failure_ttl_s=10.0, clock=clock, listener=events)

    async def go():
        errors = []
        results = await asyncio.gather(*(use_once(cache, "m") for _ in range(5)), return_exceptions=True)
        errors += results
        clock.now += 5.0  # within the ttl: the same error at once, no reload
        with pytest.raises(ModelNotReadyError) as again:
            await use_once(cache, "m")
        errors.append(again.value)
        assert cache.state("m") == ("UNAVAILABLE", "m failed to load: OSError: corrupt artifact")
        clock.now += 5.0
        del loader.fail["m"]
        return errors, await use_once(cache, "m")

    errors, value = asyncio.run(go())
    assert value == "value-m" and loader.calls == {"m": 2}
    assert all(isinstance(e, ModelNotReadyError) for e in errors) and len(errors) == 6
    assert str(errors[0]) == "m failed to load: OSError: corrupt artifact"
    assert isinstance(errors[0].__cause__, OSError) and errors[0].retry_after_s == 5.0
    assert pickle.loads(pickle.dumps(errors[0])).retry_after_s == 5.0
    assert [(k, reason) for k, _, reason in events.of("load_failed")] == [("m", str(errors[0]))]
    assert cache.stats()["load_failures"] == 1


def test_a_maas_error_from_load_reaches_the_caller_as_is():
    loader = Loader({"m": 1}, fail={"m": InvalidInputError("bad manifest")})
    cache = VersionCache(loader, budget_bytes=None)
    with pytest.raises(InvalidInputError, match="^bad manifest$"):
        asyncio.run(use_once(cache, "m"))


def test_unload_waits_for_in_flight_requests_and_a_later_request_loads_again():
    loader = Loader({"a": 10})
    events = Events()
    cache = VersionCache(loader, budget_bytes=100, unload=loader.unload, listener=events)

    async def go():
        order = []

        async def request():
            async with cache.use("a"):
                await asyncio.sleep(0.1)
                order.append("request done")

        await cache.load("a")
        req = asyncio.create_task(request())
        await asyncio.sleep(0.01)
        unloaded = await cache.unload("a")
        order.append("unloaded")
        assert unloaded is True and cache.keys() == []
        assert await cache.unload("a") is False
        await req
        assert await use_once(cache, "a") == "value-a"
        return order

    assert asyncio.run(go()) == ["request done", "unloaded"]
    assert loader.calls == {"a": 2} and loader.unloaded == ["a"]
    assert events.of("evicted") == [("a", 10, "unload")]
    stats = cache.stats()
    assert (stats["hits"], stats["misses"]) == (1, 1)  # cache.load() counts neither hit nor miss


def test_measured_size_over_estimate_evicts_idle_lru_for_budget():
    loader = Loader({"a": 30, "b": 30, "c": 30, "big": 70})
    events = Events()
    cache = VersionCache(loader, budget_bytes=100, estimate=lambda k: 10, unload=loader.unload, listener=events)

    async def go():
        for key in "abc":
            await cache.load(key)
        release = asyncio.Event()

        async def hold(key):
            async with cache.use(key):
                await release.wait()

        holder = asyncio.create_task(hold("a"))  # a is in flight: b and c go, not a
        await asyncio.sleep(0.01)
        await cache.load("big")  # estimated 10 fits (100 - 90 = 10), measured 70: 160 held
        release.set()
        await holder

    asyncio.run(go())
    assert events.of("evicted") == [("b", 30, "budget"), ("c", 30, "budget")]
    assert cache.keys() == ["a", "big"] and cache.stats()["held_bytes"] == 100
    assert sorted(loader.unloaded) == ["b", "c"]


def test_a_broken_listener_does_not_fail_requests():
    class Broken:
        def hit(self, key):
            raise RuntimeError("metrics down")

    cache = VersionCache(Loader({"a": 1}), budget_bytes=None, listener=Broken())

    async def go():
        await use_once(cache, "a")
        return await use_once(cache, "a")

    assert asyncio.run(go()) == "value-a"
    assert cache.stats()["hits"] == 1


def test_constructor_rejects_bad_values():
    with pytest.raises(ConfigError, match="0"):
        VersionCache(Loader({}), budget_bytes=10, max_concurrent_loads=0)
    with pytest.raises(ConfigError, match="-1"):
        VersionCache(Loader({}), budget_bytes=10, load_timeout_s=-1)
