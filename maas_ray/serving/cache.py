"""Which model versions one replica holds: load on first use, evict by bytes, never one in use.

Two parts, split so that what a simulation measures is what replicas do:

- :class:`CachePolicy` is pure bookkeeping (sizes, recency, requests in flight) with no I/O,
  no asyncio and no clock of its own. ``benchmarks/cache_sim.py`` drives this same class in a
  discrete-event simulation of 100 replicas.
- :class:`VersionCache` is the asyncio side a replica uses: single-flight loads in a thread,
  eviction before a load makes room, waiting for room while only in-flight versions remain,
  load timeouts that leave the load running, and failures remembered for a while.

:func:`replicas_wanted` is the per-version replica count a router aims for (hot versions on
more replicas). The module imports only the standard library and ``maas_ray.errors``.

Why bytes and not a count: Ray Serve's ``@serve.multiplexed`` bounds the number of models, so
a replica that happens to hold several large versions runs out of memory, while one holding
small ones wastes its budget. Serve's count bound stays available as ``max_entries``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Collection,
    Generic,
    Optional,
    Protocol,
    TypeVar,
)

from maas_ray.errors import ConfigError, MaasError, ModelNotReadyError

logger = logging.getLogger(__name__)
V = TypeVar("V")

__all__ = ["CacheListener", "CachePolicy", "VersionCache", "replicas_wanted"]

# Retry-After of a request that gave up waiting (the load or the room goes on without it).
_RETRY_WAITING_S = 1.0
# Retry-After of a failed load (the contract's value; the failure is remembered failure_ttl_s).
_RETRY_FAILED_S = 5.0


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB ({size} bytes)"


class CachePolicy:
    """Pure bookkeeping of one replica's held versions: no I/O, no asyncio, no clock of its own
    (callers pass ``now``). The discrete-event simulation (benchmarks/cache_sim.py) drives this
    same class, so what it reports is what replicas do.

    Two optional bounds: ``budget_bytes`` (the sum of sizes) and ``max_entries`` (the count;
    count alone is Serve's ``@serve.multiplexed`` policy). Entries with requests in flight
    (``pin``) are never chosen for eviction: unloading a session under a running request would
    fail it.
    """

    def __init__(self, budget_bytes: Optional[int], max_entries: Optional[int] = None) -> None:
        if budget_bytes is not None and (isinstance(budget_bytes, bool) or budget_bytes < 1):
            raise ConfigError(f"budget_bytes must be a positive number of bytes or None, got {budget_bytes!r}")
        if max_entries is not None and (isinstance(max_entries, bool) or max_entries < 1):
            raise ConfigError(f"max_entries must be at least 1 or None, got {max_entries!r}")
        self.budget_bytes = budget_bytes
        self.max_entries = max_entries
        self._sizes: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._last_used: dict[str, float] = {}
        self._pins: dict[str, int] = {}
        self._held = 0

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    @property
    def held_bytes(self) -> int:
        """The sum of the held entries' sizes."""
        return self._held

    def size_of(self, key: str) -> int:
        return self._sizes[key]

    def keys(self) -> list[str]:
        """Held keys, least recently used first."""
        return list(self._sizes)

    def add(self, key: str, size: int, now: float) -> None:
        """A newly loaded entry, most recently used. Bounds are not checked here: callers make
        room first with :meth:`victims` (a measured size may still exceed an estimate)."""
        if key in self._sizes:
            raise ValueError(f"{key!r} is already held")
        if size < 0:
            raise ValueError(f"size of {key!r} must be >= 0, got {size!r}")
        self._sizes[key] = size
        self._last_used[key] = now
        self._pins[key] = 0
        self._held += size

    def touch(self, key: str, now: float) -> None:
        """A hit: the entry becomes the most recently used."""
        self._sizes.move_to_end(key)
        self._last_used[key] = now

    def pin(self, key: str) -> None:
        """One more request in flight on ``key`` (counted; never evicted while > 0)."""
        self._pins[key] += 1

    def unpin(self, key: str) -> None:
        if self._pins[key] <= 0:
            raise ValueError(f"{key!r} is not pinned")
        self._pins[key] -= 1

    def in_flight(self, key: str) -> int:
        return self._pins.get(key, 0)

    def last_used(self, key: str) -> float:
        return self._last_used[key]

    def remove(self, key: str) -> int:
        """Forget ``key``; returns its size."""
        size = self._sizes.pop(key)
        del self._last_used[key], self._pins[key]
        self._held -= size
        return size

    def victims(self, incoming: int, *, exclude: Collection[str] = ()) -> Optional[list[str]]:
        """The least recently used idle entries (no request in flight, not in ``exclude``) whose
        removal lets ``incoming`` more bytes and one more entry fit under both bounds.

        ``[]`` if it fits already; ``None`` if it cannot fit even after evicting every idle entry
        (the caller waits for an unpin or refuses), and always ``None`` for ``incoming`` larger
        than the whole budget.
        """
        budget, cap = self.budget_bytes, self.max_entries
        if budget is not None and incoming > budget:
            return None
        need_bytes = self._held + incoming - budget if budget is not None else 0
        need_count = len(self._sizes) + 1 - cap if cap is not None else 0
        out: list[str] = []
        for key, size in self._sizes.items():
            if need_bytes <= 0 and need_count <= 0:
                break
            if self._pins[key] or key in exclude:
                continue
            out.append(key)
            need_bytes -= size
            need_count -= 1
        if need_bytes > 0 or need_count > 0:
            return None
        return out

    def over_budget(self, *, exclude: Collection[str] = ()) -> list[str]:
        """The idle LRU entries to evict so that ``held_bytes <= budget`` again (after a load
        measured bigger than its estimate). May leave it over budget when only pinned or
        excluded entries remain: those go once their requests finish and a later load evicts."""
        if self.budget_bytes is None:
            return []
        need = self._held - self.budget_bytes
        out: list[str] = []
        for key, size in self._sizes.items():
            if need <= 0:
                break
            if self._pins[key] or key in exclude:
                continue
            out.append(key)
            need -= size
        return out


def replicas_wanted(rate_rps: float, busy_s: float, *, target_utilization: float, max_replicas: int) -> int:
    """How many replicas should hold a version: ``ceil(rate * busy_s / target_utilization)``, at
    least 1, at most ``max_replicas``. ``busy_s`` = the replica time one request of this version
    costs (measured). A version whose traffic keeps one replica busier than the target gets one
    more, so one hot version does not saturate the replica that happens to hold it (Serve's
    multiplexing pins a model to as few replicas as possible)."""
    if not 0 < target_utilization <= 1:
        raise ConfigError(f"target_utilization must be in (0, 1], got {target_utilization!r}")
    if max_replicas < 1:
        raise ConfigError(f"max_replicas must be at least 1, got {max_replicas!r}")
    if rate_rps < 0 or busy_s < 0:
        raise ConfigError(f"rate_rps and busy_s must be >= 0, got {rate_rps!r} and {busy_s!r}")
    # the 1e-9 keeps float noise (e.g. 0.7 * 10 / 0.7 = 10.000000000000002) from adding a replica
    wanted = math.ceil(rate_rps * busy_s / target_utilization - 1e-9)
    return max(1, min(max_replicas, wanted))


class CacheListener(Protocol):
    """Observer of a :class:`VersionCache` (metrics, logs). Called on the event loop; every method
    is optional (a listener may define only some), and one that raises is logged, not fatal."""

    def hit(self, key: str) -> None: ...

    def miss(self, key: str) -> None: ...

    def loaded(self, key: str, seconds: float, size: int) -> None: ...

    def load_failed(self, key: str, seconds: float, reason: str) -> None: ...

    def evicted(self, key: str, size: int, reason: str) -> None:
        """``reason``: ``"lru"`` (room for a load), ``"budget"`` (a load measured bigger than
        its estimate) or ``"unload"`` (asked for)."""

    def held(self, count: int, size: int) -> None:
        """After any change: loaded versions and their bytes (loads in progress not counted)."""


class VersionCache(Generic[V]):
    """The versions one replica holds, loaded on first use and evicted least recently used.

    ``load(key)`` is synchronous (an onnxruntime session builds in C++, outside the GIL), runs in
    a thread via ``asyncio.to_thread``, and returns ``(value, measured bytes)``. ``estimate(key)``
    is the size room is made for before the load (e.g. the artifact's bytes); the measured size
    replaces it afterwards. ``unload(value)``, if given, runs in a thread after an entry left the
    policy, so no new request can get it.

    While a version loads, its estimate is held in the policy as a pinned placeholder: two
    concurrent loads cannot both count on the same free bytes. ``stats()["held_bytes"]`` and
    ``held()`` report loaded versions only.

    ``clock`` stamps recency, idle time and failure expiry (injectable for tests); waiting (load
    timeout, room) uses the event loop's time.
    """

    def __init__(
        self,
        load: Callable[[str], tuple[V, int]],
        *,
        budget_bytes: Optional[int],
        max_entries: Optional[int] = None,
        estimate: Callable[[str], int] = lambda key: 0,
        unload: Optional[Callable[[V], None]] = None,
        load_timeout_s: float = 30.0,
        max_concurrent_loads: int = 2,
        failure_ttl_s: float = 10.0,
        listener: Optional[CacheListener] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if load_timeout_s <= 0:
            raise ConfigError(f"load_timeout_s must be > 0, got {load_timeout_s!r}")
        if max_concurrent_loads < 1:
            raise ConfigError(f"max_concurrent_loads must be at least 1, got {max_concurrent_loads!r}")
        if failure_ttl_s < 0:
            raise ConfigError(f"failure_ttl_s must be >= 0, got {failure_ttl_s!r}")
        self._policy = CachePolicy(budget_bytes, max_entries)
        self._load_fn = load
        self._estimate = estimate
        self._unload_fn = unload
        self._load_timeout_s = load_timeout_s
        self._max_concurrent_loads = max_concurrent_loads
        self._failure_ttl_s = failure_ttl_s
        self._listener = listener
        self._clock = clock
        self._values: dict[str, V] = {}
        self._loading: dict[str, asyncio.Task] = {}
        self._unloading: dict[str, asyncio.Event] = {}
        self._failures: dict[str, tuple[BaseException, Any, float]] = {}  # error, its traceback, until
        self._slots: Optional[asyncio.Semaphore] = None  # made on first use, on the running loop
        self._changed: Optional[asyncio.Event] = None
        self._counts = {"hits": 0, "misses": 0, "loads": 0, "load_failures": 0, "evictions": 0}

    # ---- public -------------------------------------------------------------------------------
    @asynccontextmanager
    async def use(self, key: str) -> AsyncIterator[V]:
        """The loaded value of ``key``, pinned (never evicted) until the block exits.

        A miss loads it (one load however many callers wait) and waits at most
        ``load_timeout_s``; then :class:`ModelNotReadyError` while the load goes on for the next
        caller. A failed load raises its error for ``failure_ttl_s`` without loading again.
        """
        value = await self._acquire(key, count=True)
        try:
            yield value
        finally:
            self._release(key)

    async def load(self, key: str) -> None:
        """Load ``key`` if it is not held (the repository API's load); same path as :meth:`use`."""
        await self._acquire(key, count=False)
        self._release(key)

    async def unload(self, key: str) -> bool:
        """Drop ``key`` once its in-flight requests finished (reason ``"unload"``); True if it was
        held (a second unload of the same key waits for the first and returns False). A load in
        progress finishes first. Requests that arrive meanwhile wait, then load it again."""
        if key in self._unloading:
            await self._unloading[key].wait()
            return False
        done = self._unloading[key] = asyncio.Event()
        try:
            task = self._loading.get(key)
            if task is not None:
                await asyncio.wait([task])
            if key not in self._values:
                return False
            while key in self._values and self._policy.in_flight(key):
                await self._wait_change(None)
            if key in self._values:  # (an over-budget eviction may have taken it meanwhile)
                await self._evict([key], "unload")
            return True
        finally:
            del self._unloading[key]
            done.set()
            self._notify()

    def state(self, key: str) -> tuple[str, str]:
        """``("READY" | "LOADING" | "UNAVAILABLE", reason)`` for Triton's repository index."""
        if key in self._unloading:
            return "UNAVAILABLE", "unloading"
        if key in self._loading:
            return "LOADING", "loading"
        if key in self._values:
            return "READY", ""
        failure = self._failure(key)
        if failure is not None:
            return "UNAVAILABLE", str(failure[0])
        return "UNAVAILABLE", "not loaded"

    def keys(self) -> list[str]:
        """Loaded keys, least recently used first."""
        return [k for k in self._policy.keys() if k in self._values]

    def stats(self) -> dict:
        now = self._clock()
        entries = [
            {"key": k, "bytes": self._policy.size_of(k), "in_flight": self._policy.in_flight(k),
             "idle_s": max(0.0, now - self._policy.last_used(k))}
            for k in self.keys()
        ]
        return {
            "budget_bytes": self._policy.budget_bytes,
            "max_entries": self._policy.max_entries,
            "held_bytes": sum(e["bytes"] for e in entries),
            "count": len(entries),
            "loading": sorted(self._loading),
            "entries": entries,
            **self._counts,
        }

    # ---- acquiring ------------------------------------------------------------------------------
    async def _acquire(self, key: str, *, count: bool) -> V:
        """Pin and return ``key``'s value, loading it if needed. The check and the pin happen with
        no await between them, so an entry is never evicted between being found and being used;
        if it was evicted after its load finished but before this caller resumed, it loads again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._load_timeout_s
        first = True
        while True:
            if key in self._unloading:
                try:
                    await asyncio.wait_for(self._unloading[key].wait(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise ModelNotReadyError(
                        f"{key} is being unloaded; still waiting after {self._load_timeout_s:g}s",
                        _RETRY_WAITING_S) from None
                continue
            if key in self._values and key not in self._loading:
                self._policy.touch(key, self._clock())
                self._policy.pin(key)
                if count and first:
                    self._counts["hits"] += 1
                    self._emit("hit", key)
                return self._values[key]
            if count and first:
                self._counts["misses"] += 1
                self._emit("miss", key)
            first = False
            failure = self._failure(key)
            if failure is not None:
                error, tb, _ = failure
                raise error.with_traceback(tb)  # the original traceback, not one grown per raise
            task = self._loading.get(key)
            if task is None:
                task = self._loading[key] = loop.create_task(self._load(key), name=f"load {key}")
                # every caller may have timed out: retrieve the outcome so asyncio does not log
                # "exception was never retrieved" (the failure is already logged and remembered)
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(asyncio.shield(task), remaining)
            except asyncio.TimeoutError:
                raise ModelNotReadyError(
                    f"{key} still loading after {self._load_timeout_s:g}s", _RETRY_WAITING_S) from None

    def _release(self, key: str) -> None:
        self._policy.unpin(key)
        if not self._policy.in_flight(key):
            self._notify()

    # ---- loading --------------------------------------------------------------------------------
    async def _load(self, key: str) -> None:
        """The one load of ``key``: make room, load in a thread, settle the measured size. Runs as
        its own task (callers wait on it shielded), so a caller's timeout never cancels it."""
        start = time.perf_counter()
        placeholder = False
        try:
            if self._slots is None:
                self._slots = asyncio.Semaphore(self._max_concurrent_loads)
            async with self._slots:
                estimate = max(0, int(self._estimate(key)))
                self._check_fits(key, estimate, "estimated")
                await self._make_room(key, estimate)
                self._policy.add(key, estimate, self._clock())
                self._policy.pin(key)
                placeholder = True
                try:
                    value, size = await asyncio.to_thread(self._load_fn, key)
                except MaasError:
                    raise
                except Exception as exc:
                    raise ModelNotReadyError(
                        f"{key} failed to load: {type(exc).__name__}: {exc}", _RETRY_FAILED_S) from exc
                self._policy.unpin(key)
                self._policy.remove(key)
                placeholder = False
                try:
                    self._check_fits(key, size, "measured")
                except ModelNotReadyError:
                    if self._unload_fn is not None:
                        await asyncio.to_thread(self._unload_fn, value)
                    raise
                self._policy.add(key, size, self._clock())
                self._values[key] = value
                self._failures.pop(key, None)
            seconds = time.perf_counter() - start
            self._counts["loads"] += 1
            self._emit("loaded", key, seconds, size)
            logger.info("loaded %s in %.2fs: %s", key, seconds, _mb(size))
            over = self._policy.over_budget(exclude={key, *self._unloading})
            await self._evict(over, "budget")
            self._emit_held()
        except ModelNotReadyError as exc:
            self._fail(key, exc, start, remember=not getattr(exc, "_transient", False))
            raise
        except MaasError as exc:
            self._fail(key, exc, start, remember=True)
            raise
        except Exception as exc:  # estimate() or unload() raised: the load failed all the same
            error = ModelNotReadyError(f"{key} failed to load: {type(exc).__name__}: {exc}", _RETRY_FAILED_S)
            error.__cause__ = exc
            self._fail(key, error, start, remember=True)
            raise error from exc
        finally:
            if placeholder:
                self._policy.unpin(key)
                self._policy.remove(key)
            self._loading.pop(key, None)
            self._notify()

    def _check_fits(self, key: str, size: int, what: str) -> None:
        budget = self._policy.budget_bytes
        if budget is not None and size > budget:
            raise ModelNotReadyError(
                f"{key} does not fit this replica: its {what} size {_mb(size)} is over the whole "
                f"budget of {_mb(budget)}", _RETRY_FAILED_S)

    async def _make_room(self, key: str, incoming: int) -> None:
        """Evict LRU idle entries so ``incoming`` bytes and one more entry fit; while only entries
        with requests in flight stand in the way, wait for an unpin (at most load_timeout_s: then
        a transient ModelNotReadyError, not remembered as a failure)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._load_timeout_s
        while True:
            victims = self._policy.victims(incoming, exclude=self._unloading.keys())
            if victims is not None:
                await self._evict(victims, "lru")
                # evicting awaited unload(); someone may have taken the room meanwhile: check again
                if self._policy.victims(incoming, exclude=self._unloading.keys()) == []:
                    return
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                error = ModelNotReadyError(
                    f"{key} waits for room: {_mb(self._policy.held_bytes)} held by versions with "
                    f"requests in flight", _RETRY_WAITING_S)
                error._transient = True  # type: ignore[attr-defined]
                raise error
            try:
                await self._wait_change(remaining)
            except asyncio.TimeoutError:
                pass

    async def _evict(self, keys: list[str], reason: str) -> None:
        """Remove ``keys`` from the policy first (no new request gets them), then unload them."""
        values = []
        for key in keys:
            size = self._policy.remove(key)
            values.append(self._values.pop(key))
            self._counts["evictions"] += 1
            self._emit("evicted", key, size, reason)
            logger.info("evicted %s (%s): %s", key, reason, _mb(size))
        if keys:
            self._emit_held()
            self._notify()
        if self._unload_fn is not None:
            for value in values:
                try:
                    await asyncio.to_thread(self._unload_fn, value)
                except Exception:  # the entry is gone either way; a failed unload must not fail a load
                    logger.exception("unloading an evicted version failed")

    def _fail(self, key: str, exc: BaseException, start: float, *, remember: bool) -> None:
        seconds = time.perf_counter() - start
        self._counts["load_failures"] += 1
        if remember and self._failure_ttl_s > 0:
            self._failures[key] = (exc, exc.__traceback__, self._clock() + self._failure_ttl_s)
        self._emit("load_failed", key, seconds, str(exc))
        logger.warning("loading %s failed after %.2fs: %s", key, seconds, exc)

    def _failure(self, key: str) -> Optional[tuple[BaseException, Any, float]]:
        failure = self._failures.get(key)
        if failure is not None and self._clock() >= failure[2]:
            del self._failures[key]
            return None
        return failure

    # ---- waking and telling ---------------------------------------------------------------------
    def _notify(self) -> None:
        """Wake everyone waiting for a change (an unpin, an eviction, a finished load)."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait_change(self, timeout: Optional[float]) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        await asyncio.wait_for(self._changed.wait(), timeout)

    def _emit_held(self) -> None:
        count = len(self._values)
        size = sum(self._policy.size_of(k) for k in self._values)
        self._emit("held", count, size)

    def _emit(self, name: str, *args: Any) -> None:
        method = getattr(self._listener, name, None) if self._listener is not None else None
        if method is None:
            return
        try:
            method(*args)
        except Exception:  # metrics must never fail a request
            logger.exception("cache listener %s failed", name)
