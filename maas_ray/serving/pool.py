"""The model pool: one Serve deployment whose replicas load registry versions on demand.

Each replica holds a :class:`~maas_ray.serving.cache.VersionCache` of
:class:`~maas_ray.serving.replicas.LocalPipeline` s (pre -> batched onnxruntime -> post), keyed
``model:version``, under a byte budget. The ingress reaches a version with a handle call made
with ``.options(multiplexed_model_id="model:version")`` (``"model:version#k"`` for the k-th
extra replica of a hot version); Serve's router sends it to a replica that reports that ID, else
to the one with the fewest IDs, which then loads the version. Replicas report the IDs they hold
through the same channel ``@serve.multiplexed`` uses (:func:`compat.report_multiplexed_ids`).

Why not ``@serve.multiplexed`` itself (ray 2.60, ``ray/serve/multiplex.py``): it bounds a
replica by a model *count* (200 models of 5 MB and 20 of 400 MB need different counts), loads
one model at a time for the whole replica (one lock around every load, so a 400 MB load stalls
every other cold model), and evicts the least recently used model even while it has requests in
flight. The cache here has a byte budget, loads different versions concurrently with one load
per version, and evicts only idle versions; the routing is Serve's.

A version's bytes are measured when it loads: the growth of the replica's allocated memory
(glibc's ``mallinfo2``) across the load (session, arena after a warm-up run, processors' files),
taken when that load ran alone, and never less than its artifact's bytes; loads that overlapped
another are charged their artifact's bytes times the ratio measured so far (``stats()`` says
which).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from typing import Any, Optional

from maas_ray.errors import InvalidInputError, MaasError
from maas_ray.serving import compat
from maas_ray.serving.cache import VersionCache
from maas_ray.serving.config import DynamicModels, Limits
from maas_ray.serving.metric_names import (
    CACHE_BUDGET, CACHE_BYTES, CACHE_EVICTIONS, CACHE_LOAD_LATENCY, CACHE_LOADS, CACHE_LOOKUPS,
    CACHE_REQUEST_LATENCY, CACHE_VERSIONS, LABEL_APP, LABEL_CACHE, LABEL_MODEL, LABEL_OUTCOME, LABEL_REASON,
    LABEL_REPLICA, LABEL_RESULT, LABEL_VERSION,
)
from maas_ray.serving.metrics import LATENCY_BUCKETS, ServingMetrics
from maas_ray.serving.replicas import (
    SKIP_ROLES, LocalPipeline, _per_item, app_name, artifact_registry, freeze_startup_objects, release_free_memory,
    use_serve_logging,
)

logger = logging.getLogger(__name__)

SHARD_SEP = "#"
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DEFAULT_BYTES_PER_ARTIFACT_BYTE = 2.0  # until a solo load measured this replica's own ratio
SIZE_FOR_RATIO = 1 << 20  # artifacts at least this big teach the ratio; smaller ones the fixed cost
MAX_RATIO = 8.0
MAX_OVERHEAD = 64 << 20
TRIM_EVERY_S = 30


def version_key(model: str, version: int) -> str:
    return f"{model}:{version}"


def parse_key(key: str) -> tuple[str, int]:
    """``model:version`` (a shard suffix ``#k`` dropped) -> (model, version); 400 if malformed."""
    base = key.partition(SHARD_SEP)[0]
    model, _, version = base.rpartition(":")
    if not model or not version.isdigit():
        raise InvalidInputError(f"not a model version key: {key!r} (expected model:version)")
    return model, int(version)


def routing_id(model: str, version: int, shard: int = 0) -> str:
    """The multiplexed model ID the ingress sends a version's calls with (shard > 0: a hot
    version's extra replicas)."""
    key = version_key(model, version)
    return key if shard == 0 else f"{key}{SHARD_SEP}{shard}"


def _heap_bytes() -> Optional[int]:
    """Bytes this process has allocated and not freed (glibc ``mallinfo2``: the malloc heap plus
    its mmap'ed blocks), or None where that is not available. Unlike resident memory, it drops
    when a version is freed and grows by what a load keeps, even when the allocator reuses pages
    an earlier version gave back (a 2.1 MB linear model's session measured 4.7 MB this way)."""
    info = _mallinfo2()
    return None if info is None else info.uordblks + info.hblkhd


def _mallinfo2() -> Any:
    global _MALLINFO2
    if _MALLINFO2 is None:
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]

        try:
            fn = ctypes.CDLL(None).mallinfo2
            fn.restype = MallInfo2
            _MALLINFO2 = fn
        except (OSError, AttributeError):  # not glibc >= 2.33
            _MALLINFO2 = False
    return _MALLINFO2() if _MALLINFO2 else None


_MALLINFO2: Any = None


def _rss_bytes() -> Optional[int]:
    """This process's resident memory (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PoolMetrics:
    """The pool replica's cache metrics (a :class:`~maas_ray.serving.cache.CacheListener`).

    Callbacks only update dicts; :meth:`flush` (every second, on the replica's loop) hands them
    to ``ray.util.metrics``, so the request path never calls into Ray's metrics."""

    def __init__(self, app: str, replica: str, budget: int, module: Any = None) -> None:
        self.app, self.replica, self.budget = app, replica, budget
        self._module = module
        self._made = False
        self.lookups: dict[tuple[str, str, str], int] = {}  # (model, version, hit|miss)
        self.loads: dict[tuple[str, str, str], int] = {}  # (model, version, ok|failed)
        self.evictions: dict[str, int] = {}  # reason
        self._load_s: list[tuple[str, float]] = []
        self._request_s: list[tuple[str, str, float]] = []  # (model, warm|cold, seconds)
        self.count, self.bytes = 0, 0
        self._sent: dict[tuple, int] = {}

    # ---- CacheListener ----------------------------------------------------------------
    def hit(self, key: str) -> None:
        self._bump(self.lookups, (*self._mv(key), "hit"))

    def miss(self, key: str) -> None:
        self._bump(self.lookups, (*self._mv(key), "miss"))

    def loaded(self, key: str, seconds: float, size: int) -> None:
        self._bump(self.loads, (*self._mv(key), "ok"))
        self._load_s.append((self._mv(key)[0], seconds))
        logger.info("loaded %s in %.2fs (%.1f MB)", key, seconds, size / 1e6)

    def load_failed(self, key: str, seconds: float, reason: str) -> None:
        self._bump(self.loads, (*self._mv(key), "failed"))
        logger.error("loading %s failed after %.2fs: %s", key, seconds, reason)

    def evicted(self, key: str, size: int, reason: str) -> None:
        self._bump(self.evictions, reason)
        logger.info("unloaded %s (%s, %.1f MB)", key, reason, size / 1e6)

    def held(self, count: int, size: int) -> None:
        self.count, self.bytes = count, size

    def request(self, model: str, cold: bool, seconds: float) -> None:
        if len(self._request_s) < 100_000:  # bounded between flushes
            self._request_s.append((model, "cold" if cold else "warm", seconds))

    @staticmethod
    def _mv(key: str) -> tuple[str, str]:
        model, _, version = key.partition(SHARD_SEP)[0].rpartition(":")
        return model, version

    @staticmethod
    def _bump(d: dict, k: Any) -> None:
        d[k] = d.get(k, 0) + 1

    # ---- export -----------------------------------------------------------------------
    def _make(self) -> None:
        if self._module is None:
            from ray.util import metrics as module
            self._module = module
        m, base = self._module, (LABEL_APP, LABEL_REPLICA)
        self.g_versions = m.Gauge(CACHE_VERSIONS, description="Versions a pool replica holds.", tag_keys=base)
        self.g_bytes = m.Gauge(CACHE_BYTES, description="Bytes a pool replica's loaded versions hold (measured "
                               "at load).", tag_keys=base)
        self.g_budget = m.Gauge(CACHE_BUDGET, description="A pool replica's memory budget, bytes.", tag_keys=base)
        self.c_lookups = m.Counter(CACHE_LOOKUPS, description="Pool requests by whether their version was "
                                   "loaded (hit) or not (miss).",
                                   tag_keys=(LABEL_APP, LABEL_MODEL, LABEL_VERSION, LABEL_RESULT))
        self.c_loads = m.Counter(CACHE_LOADS, description="Version loads in pool replicas by outcome.",
                                 tag_keys=(LABEL_APP, LABEL_MODEL, LABEL_VERSION, LABEL_OUTCOME))
        self.c_evictions = m.Counter(CACHE_EVICTIONS, description="Versions unloaded from pool replicas by "
                                     "reason (lru: room for another; budget: measured over budget; unload: asked).",
                                     tag_keys=(LABEL_APP, LABEL_REASON))
        self.h_load = m.Histogram(CACHE_LOAD_LATENCY, description="Time to load a version into a pool replica, "
                                  "seconds.", boundaries=list(LOAD_BUCKETS), tag_keys=(LABEL_APP, LABEL_MODEL))
        self.h_request = m.Histogram(CACHE_REQUEST_LATENCY, description="A request's time in the pool replica, "
                                     "seconds: cold ones waited for their version's load.",
                                     boundaries=list(LATENCY_BUCKETS), tag_keys=(LABEL_APP, LABEL_MODEL, LABEL_CACHE))
        self._made = True

    def flush(self) -> None:
        if not self._made:
            self._make()
        base = {LABEL_APP: self.app, LABEL_REPLICA: self.replica}
        self.g_versions.set(self.count, base)
        self.g_bytes.set(self.bytes, base)
        self.g_budget.set(self.budget, base)
        for (model, version, result), n in list(self.lookups.items()):
            self._inc(self.c_lookups, ("l", model, version, result), n,
                      {LABEL_APP: self.app, LABEL_MODEL: model, LABEL_VERSION: version, LABEL_RESULT: result})
        for (model, version, outcome), n in list(self.loads.items()):
            self._inc(self.c_loads, ("o", model, version, outcome), n,
                      {LABEL_APP: self.app, LABEL_MODEL: model, LABEL_VERSION: version, LABEL_OUTCOME: outcome})
        for reason, n in list(self.evictions.items()):
            self._inc(self.c_evictions, ("e", reason), n, {LABEL_APP: self.app, LABEL_REASON: reason})
        loads, self._load_s = self._load_s, []
        for model, seconds in loads:
            self.h_load.observe(seconds, {LABEL_APP: self.app, LABEL_MODEL: model})
        requests, self._request_s = self._request_s, []
        for model, cache, seconds in requests:
            self.h_request.observe(seconds, {LABEL_APP: self.app, LABEL_MODEL: model, LABEL_CACHE: cache})

    def _inc(self, counter: Any, key: tuple, total: int, tags: dict[str, str]) -> None:
        delta = total - self._sent.get(key, 0)
        if delta > 0:
            counter.inc(delta, tags)
            self._sent[key] = total


class ModelPool:
    """A pool replica: the registry's versions, loaded on demand under a byte budget."""

    def __init__(self, registry_root: Optional[str], dynamic: dict[str, Any], limits: Optional[dict] = None,
                 security: Optional[dict[str, Any]] = None) -> None:
        use_serve_logging()
        self.registry_root, self.security = registry_root, security
        self.dynamic = DynamicModels.model_validate(dynamic)
        self.limits = None if limits is None else Limits.model_validate(limits)
        self.registry = artifact_registry(registry_root, security)
        self.replica = self._replica_id()
        self.metrics = ServingMetrics(app=app_name(), models=None,  # batch sizes and states by version
                                      max_models=self.dynamic.metrics_max_models)
        self.metrics.start()
        self.cache_metrics = PoolMetrics(app_name(), self.replica, self.dynamic.memory_budget_bytes)
        self.cache: VersionCache[LocalPipeline] = VersionCache(
            self._load, budget_bytes=self.dynamic.memory_budget_bytes,
            max_entries=self.dynamic.max_models_per_replica, estimate=self._estimate, unload=self._unload,
            load_timeout_s=self.dynamic.load_timeout_s, max_concurrent_loads=self.dynamic.max_concurrent_loads,
            failure_ttl_s=self.dynamic.failure_ttl_s, listener=_Listener(self))
        self._loads_running = 0
        self._lock = threading.Lock()  # guards _loads_running and _ratio (loads run in threads)
        self._ratio = DEFAULT_BYTES_PER_ARTIFACT_BYTE  # learnt from solo loads of artifacts >= 1 MiB
        self._overhead = 0  # per-version bytes beyond ratio x artifact, learnt from solo loads of small ones
        self._measured: dict[str, bool] = {}  # key -> its bytes were measured (else estimated)
        self._artifact: dict[str, int] = {}  # key -> artifact bytes (from the manifest)
        self._ids: dict[str, set[str]] = {}  # key -> the routing IDs this replica answered for it
        self._reported: frozenset[str] = frozenset()
        self._flusher: Optional[asyncio.Task] = None
        freeze_startup_objects()

    @staticmethod
    def _replica_id() -> str:
        try:
            from ray import serve

            return serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica
            return str(os.getpid())

    # ---- loading ----------------------------------------------------------------------
    def _artifact_bytes(self, key: str) -> int:
        size = self._artifact.get(key)
        if size is None:
            model, version = parse_key(key)
            manifest = self.registry.describe(model, version)
            size = manifest.size_bytes + sum(e.size_bytes for e in manifest.files.values() if e.role not in SKIP_ROLES)
            self._artifact[key] = size
        return size

    def _estimate(self, key: str) -> int:
        """Bytes to make room for before loading ``key`` (its artifact x the measured ratio)."""
        try:
            return self._predict(self._artifact_bytes(key))
        except Exception:  # an unreadable manifest: the load itself will say why
            return 0

    def _predict(self, artifact: int) -> int:
        return int(artifact * self._ratio) + self._overhead

    def _learn(self, artifact: int, size: int) -> None:
        """Fold a solo load's measured size into the estimate: large artifacts teach the bytes
        held per artifact byte, small ones the fixed cost of a session (a 210-byte model's
        session holds ~1 MB: folding that into a ratio would price a 1 MB model at gigabytes)."""
        with self._lock:
            if artifact >= SIZE_FOR_RATIO:
                ratio = min(MAX_RATIO, max(1.0, size / artifact))
                self._ratio = 0.8 * self._ratio + 0.2 * ratio
            else:
                extra = min(MAX_OVERHEAD, max(0, size - artifact))
                self._overhead = int(0.8 * self._overhead + 0.2 * extra) if self._overhead else extra

    def _load(self, key: str) -> tuple[LocalPipeline, int]:
        """Runs in a thread (VersionCache): the version's pipeline and the bytes it holds."""
        model, version = parse_key(key)
        with self._lock:
            self._loads_running += 1
            alone = self._loads_running == 1
        try:
            before = _heap_bytes()
            pipeline = LocalPipeline(self.registry_root, self.dynamic.version_config(model, version),
                                     version, limits=self.limits, metrics=self.metrics, security=self.security)
            after = _heap_bytes()
            with self._lock:
                alone = alone and self._loads_running == 1
        finally:
            with self._lock:
                self._loads_running -= 1
        artifact = self._artifact_bytes(key)
        if alone and before is not None and after is not None:
            size = max(after - before, artifact)
            self._learn(artifact, size)
            self._measured[key] = True
        else:
            size = self._predict(artifact)
            self._measured[key] = False
        self.metrics.version_state(model, version, "ready")
        return pipeline, size

    def _unload(self, pipeline: LocalPipeline) -> None:
        del pipeline
        gc.collect()  # the session's buffers go now, not at the next collection
        release_free_memory()

    # ---- routing IDs ------------------------------------------------------------------
    def _note(self, routing: str, key: str) -> None:
        ids = self._ids.setdefault(key, set())
        if routing not in ids:
            ids.add(routing)
            self._report()

    def _forget(self, key: str) -> None:
        if self._ids.pop(key, None):
            self._report()

    def _report(self) -> None:
        ids = frozenset(i for k, s in self._ids.items() if self.cache.state(k)[0] in ("READY", "LOADING") for i in s)
        if ids != self._reported:
            self._reported = ids
            compat.report_multiplexed_ids(sorted(ids))

    def _routing(self) -> tuple[str, str]:
        routing = compat.multiplexed_model_id()
        if not routing:
            raise InvalidInputError("a pool call needs a multiplexed model ID (handle.options(multiplexed_model_id="
                                    "'model:version'))")
        parse_key(routing)
        return routing, routing.partition(SHARD_SEP)[0]

    def _ensure_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            try:
                self.cache_metrics.flush()
            except Exception:  # a metrics backend problem must never reach a request
                logger.debug("flushing pool metrics failed", exc_info=True)
            if ticks % TRIM_EVERY_S == 0:  # what requests freed, beside what evictions free
                await asyncio.to_thread(release_free_memory)

    # ---- handle API (what the ingress calls) -------------------------------------------
    async def infer_many(self, items: list) -> list:
        """Coalesced requests for the version named by the call's multiplexed model ID."""
        self._ensure_flusher()
        start = time.perf_counter()
        routing, key = self._routing()
        self._note(routing, key)
        cold = self.cache.state(key)[0] != "READY"
        try:
            async with self.cache.use(key) as pipeline:
                out = _per_item(await pipeline.infer_many(items))
        finally:
            self.cache_metrics.request(parse_key(key)[0], cold, time.perf_counter() - start)
        return out

    async def describe(self) -> dict[str, Any]:
        """The version's describe() (its schema, inputs and outputs), loading it if needed."""
        self._ensure_flusher()
        routing, key = self._routing()
        self._note(routing, key)
        try:
            async with self.cache.use(key) as pipeline:
                info = pipeline.describe()
        except MaasError as exc:
            if self.cache.state(key)[0] == "LOADING":  # the caller's wait ran out; the load goes on
                raise
            return {"pid": os.getpid(), "state": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        held = {e["key"]: e["bytes"] for e in self.cache.stats()["entries"]}
        return {**info, "replica": self.replica, "bytes": held.get(key)}

    async def unload(self) -> bool:
        """Unload the call's version from this replica (after its requests in flight)."""
        routing, key = self._routing()
        done = await self.cache.unload(key)
        self._forget(key)
        return done

    async def stats(self) -> dict[str, Any]:
        """This replica's cache: budget, bytes and versions held (LRU first), loads, evictions."""
        out = dict(self.cache.stats())
        out.update(replica=self.replica, pid=os.getpid(), rss_bytes=_rss_bytes(),
                   bytes_per_artifact_byte=round(self._ratio, 3), session_overhead_bytes=self._overhead,
                   measured={k: self._measured.get(k, False) for k in self.cache.keys()})
        return out


class _Listener:
    """Cache events -> the pool's metrics and routing report."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    def hit(self, key: str) -> None:
        self.pool.cache_metrics.hit(key)

    def miss(self, key: str) -> None:
        self.pool.cache_metrics.miss(key)

    def loaded(self, key: str, seconds: float, size: int) -> None:
        self.pool.cache_metrics.loaded(key, seconds, size)
        self.pool._report()

    def load_failed(self, key: str, seconds: float, reason: str) -> None:
        self.pool.cache_metrics.load_failed(key, seconds, reason)
        self.pool._forget(key)

    def evicted(self, key: str, size: int, reason: str) -> None:
        self.pool.cache_metrics.evicted(key, size, reason)
        self.pool._forget(key)

    def held(self, count: int, size: int) -> None:
        self.pool.cache_metrics.held(count, size)
