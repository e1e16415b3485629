"""The versions one ingress replica serves: their slots, how each is reached, traffic over them,
and following the registry's aliases.

Each configured version is a :class:`VersionSlot`: ``loading`` until its pipeline is up,
``ready``, or ``failed`` with the reason (a checksum mismatch, a load error). Only ready
versions get split traffic; the others answer 503 when pinned and say why in metadata.
A version runs in this process (``ingress`` placement) or behind handle calls to its own
deployments (``fused``, ``split``): :class:`Route` hides which.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable, Mapping, Optional

from maas_ray.errors import (
    InvalidInputError, ModelNotFoundError, ModelNotReadyError, VersionNotFoundError, unwrap_remote,
)
from maas_ray.registry import Manifest, Registry
from maas_ray.serving.coalesce import Coalescer
from maas_ray.serving.codecs.common import parse_version_ref
from maas_ray.serving.cache import replicas_wanted
from maas_ray.serving.config import AppArgs, DynamicModels, ModelConfig
from maas_ray.serving.generation import GenerativePipeline
from maas_ray.serving.metrics import ServingMetrics
from maas_ray.serving.pool import routing_id
from maas_ray.serving.replicas import LocalPipeline
from maas_ray.serving.runner import rows
from maas_ray.serving.traffic import TrafficRouter, parse_weights, weights_by_version
from maas_ray.serving.types import GenerateRequest, GenerationChunk, RequestSchema, Tensors, Timings

logger = logging.getLogger(__name__)

# How often the ingress asks remote (fused/split) versions whether they are up: fast while
# one is still loading, slow once all are settled.
POLL_LOADING_S = 1.0
POLL_SETTLED_S = 10.0


def _replica_gone(exc: BaseException) -> bool:
    """Whether a handle call failed because the replica died or became unreachable.

    Inference is idempotent, so such a call is safe to retry on another replica.
    """
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError))


class Route:
    """How the ingress reaches one version: in process, or over handle calls to one
    deployment (fused) or three (split).

    Remote calls are coalesced: at most ``batching.max_calls_in_flight`` handle calls at a
    time, and the requests that arrive meanwhile travel together in the next one. A handle
    call costs the ingress ~1.3 ms of CPU on 2 cores (routing, gRPC, pickling: py-spy,
    benchmarks/README.md), more than a wide model's batch-1 run; coalesced, that cost is paid
    per batch, and the replica gets whole batches to run.
    """

    def __init__(self, local: Optional[LocalPipeline] = None, handles: Optional[dict[str, Any]] = None,
                 model: Optional[ModelConfig] = None, max_queued: Optional[int] = None, callers: int = 1):
        """Either ``local``, or ``handles`` with the version's ``model`` config. ``max_queued``:
        requests that may wait for a call slot; beyond it, 503 with Retry-After (calls carry
        batches, so the bound on waiting requests is kept here, not in Serve's queue).
        ``callers``: the ingress replicas that share the inference deployment's call budget."""
        self.local, self.handles = local, handles or {}
        self._methods: dict[tuple[str, str], Any] = {}
        self.calls: Optional[Coalescer[tuple[Tensors, bool], tuple[Tensors, Timings]]] = None
        if model is not None:
            batching = model.batching
            self.calls = Coalescer(
                self._remote, max_items=batching.max_batch_size,
                concurrency=batching.max_calls_in_flight
                or model.inference.calls_in_flight(per_replica=2, callers=callers),
                size=lambda item: rows(item[0]),
                max_queued=max_queued,
                overflow=lambda: ModelNotReadyError(f"overloaded: more than {max_queued} requests queued", 1.0),
            )

    async def infer(self, tensors: Tensors, strict: bool) -> tuple[Tensors, Timings]:
        if self.calls is None:
            return await self.local.infer(tensors, strict)
        start = time.perf_counter()
        outputs, stages = await self.calls.submit((tensors, strict))
        if stages:  # fused: the replica timed its own stages; the rest of the wait is the hop's
            stages["hop"] = max(0.0, time.perf_counter() - start - sum(stages.values()))
        return outputs, stages

    async def _remote(self, items: list[tuple[Tensors, bool]]) -> list:
        try:
            return await self._call(items)
        except Exception as exc:
            if not _replica_gone(exc):
                raise
            logger.warning("a replica died mid-request (%s); retrying once on another", type(exc).__name__)
        try:  # the router has dropped the dead replica by now
            return await self._call(items)
        except Exception as exc:
            if _replica_gone(exc):
                raise ModelNotReadyError("the replica serving this request died; retry", 1.0) from exc
            raise

    def _method(self, deployment: str, name: str) -> Any:
        """``handles[deployment].<name>``, made once: each attribute access builds a new handle
        (Serve's ``options(method_name=...)``), ~6-11 % of the caller's CPU per call
        (benchmarks/hop.py). Made on first use, on the event loop the handle routes on."""
        method = self._methods.get((deployment, name))
        if method is None:
            method = self._methods[(deployment, name)] = getattr(self.handles[deployment], name)
        return method

    async def _call(self, items: list[tuple[Tensors, bool]]) -> list:
        if "pre" in self.handles:  # split: chained responses pass through the object store
            feeds = self._method("pre", "many").remote(items)
            outputs = self._method("infer", "run_many").remote(feeds)
            answers = await self._method("post", "many").remote(outputs)
            return [a if isinstance(a, BaseException) else (a, {}) for a in answers]
        return await self._method("infer", "infer_many").remote(items)

    async def describe(self) -> dict[str, Any]:
        if self.local is not None:
            return self.local.describe()
        return await self._method("infer", "describe").remote()


class GenerativeRoute:
    """How the ingress reaches a generative version: its engine in this process (``local``),
    or a streaming handle call to its :class:`~maas_ray.serving.generation.GenerativeServer`.

    Generation is not coalesced: each request is one stream, and the engine batches the
    running sequences itself, step by step.
    """

    def __init__(self, local: Optional[GenerativePipeline] = None, handles: Optional[dict[str, Any]] = None) -> None:
        self.local, self.handles = local, handles or {}
        self._stream: Optional[Any] = None  # handles["infer"].options(stream=True).generate, made once

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        """The version's chunks for ``request``. Closing the iterator (``aclose``) stops the
        sequence: in process at once, remotely by cancelling the handle's stream."""
        if self.local is not None:
            return self.local.generate(request)
        return self._remote(request)

    async def _remote(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        if self._stream is None:
            self._stream = self.handles["infer"].options(stream=True).generate
        response = self._stream.remote(request)
        finished = False
        try:
            async for items in response:  # the chunks made since the last item (GenerativeServer.generate)
                for chunk in items:
                    if isinstance(chunk, BaseException):  # the request's own error, sent last
                        finished = True
                        raise chunk
                    yield chunk
            finished = True
        finally:
            if not finished:  # the consumer went away (or failed): the replica drops the sequence
                response.cancel()

    async def infer(self, tensors: Tensors, strict: bool) -> tuple[Tensors, Timings]:  # pragma: no cover
        raise ModelNotReadyError("a generative version does not run infer requests", 5.0)

    async def describe(self) -> dict[str, Any]:
        if self.local is not None:
            return self.local.describe()
        return await self.handles["infer"].describe.remote()

    async def stats(self) -> dict[str, Any]:
        """The engine's stats (running, waiting, KV use, ...); one replica's for ``fused``."""
        if self.local is not None:
            return self.local.stats()
        return await self.handles["infer"].stats.remote()


class PoolRoute(Route):
    """How the ingress reaches a dynamic version: coalesced handle calls to the model pool
    (:mod:`maas_ray.serving.pool`) carrying the version's multiplexed model ID, so Serve routes
    them to a replica that holds it (or makes one load it).

    A hot version is spread over more replicas: it needs ``replicas_wanted(rate, busy)`` of them
    (its request rate here x the pool time per request, over the target utilization), and its
    calls rotate over that many routing IDs (``model:version``, ``model:version#1``, ...). An ID
    no replica holds goes to the replica with the fewest versions, which loads it; when the
    version cools, the extra IDs get no calls and their copies age out of the replicas' LRU.
    """

    def __init__(self, pool: Any, model: str, version: int, cfg: ModelConfig, dynamic: DynamicModels,
                 max_queued: Optional[int], callers: int, pool_replicas: int) -> None:
        super().__init__(handles={}, model=cfg, max_queued=max_queued, callers=callers)
        self.pool, self.model, self.version = pool, model, version
        self.hot = dynamic.hot
        self.max_shards = max(1, dynamic.hot.max_replicas_per_model or pool_replicas)
        self.shards = 1  # replicas this version is spread over now
        self.used: set[int] = {0}  # shard IDs that got calls (an unload goes to each)
        self._arrivals: list[float] = []  # request times in the rate window (pruned per decision)
        self._busy_s = 0.0  # pool seconds per request (EWMA of a call's time / its requests)
        self._decided = 0.0
        self._next = 0

    def _handle(self, shard: int) -> Any:
        name = f"infer#{shard}"
        if name not in self.handles:
            self.handles[name] = self.pool.options(multiplexed_model_id=routing_id(self.model, self.version, shard))
        return name

    def _shard(self, now: float) -> int:
        if now - self._decided >= 1.0:  # re-decide at most once a second
            window = self.hot.window_s
            self._arrivals = [t for t in self._arrivals if now - t <= window]
            rate = len(self._arrivals) / window
            wanted = replicas_wanted(rate, self._busy_s, target_utilization=self.hot.target_utilization,
                                     max_replicas=self.max_shards)
            if wanted != self.shards:
                logger.info("%s:%d: %.1f requests/s x %.1f ms each -> on %d replica(s)", self.model, self.version,
                            rate, self._busy_s * 1e3, wanted)
            self.shards, self._decided = wanted, now
        self._next = (self._next + 1) % self.shards
        return self._next

    async def _call(self, items: list[tuple[Tensors, bool]]) -> list:
        start = time.perf_counter()
        self._arrivals.extend([start] * len(items))
        shard = self._shard(start)
        self.used.add(shard)
        out = await self._method(self._handle(shard), "infer_many").remote(items)
        per_request = (time.perf_counter() - start) / max(1, len(items))
        self._busy_s = per_request if self._busy_s == 0 else 0.8 * self._busy_s + 0.2 * per_request
        return out

    async def describe(self) -> dict[str, Any]:
        return await self._method(self._handle(0), "describe").remote()

    async def unload(self) -> None:
        """Ask the replicas holding this version's routing IDs to unload it."""
        for shard in sorted(self.used):
            await self._method(self._handle(shard), "unload").remote()
        self.used = {0}


def _max_replicas(dynamic: DynamicModels) -> int:
    """The most replicas the pool may run (its fixed count, or autoscaling's ceiling)."""
    opts = dynamic.pool
    if isinstance(opts.num_replicas, int):
        return max(1, opts.num_replicas)
    if opts.autoscaling_config:
        return max(1, int(opts.autoscaling_config.get("max_replicas", 1)))
    return 1


@dataclass
class VersionSlot:
    """One configured version of a model, as this ingress replica sees it."""

    number: int
    manifest: Optional[Manifest]
    route: Optional[Route] = None
    state: str = "loading"  # loading | ready | failed
    reason: Optional[str] = None
    schema: Optional[RequestSchema] = None
    describe: dict[str, Any] = field(default_factory=dict)
    dynamic: bool = False  # loaded on demand in the model pool (PoolRoute)
    since: float = 0.0  # when the state last changed (a dynamic version's failure is retried after a while)
    warming: Optional[asyncio.Task] = None  # a dynamic version's first describe (its load), shared

    @property
    def generative(self) -> bool:
        return self.manifest is not None and self.manifest.generation is not None

    def require_ready(self, model: str) -> None:
        if self.state != "ready":
            why = f": {self.reason}" if self.reason else ""
            raise ModelNotReadyError(f"model {model!r} version {self.number} is {self.state}{why}", 5.0)


class VersionTable:
    """Every model's version slots in this replica, the traffic over them, and alias following."""

    def __init__(
        self,
        args: AppArgs,
        routes: Mapping[str, Mapping[Any, dict[str, Any]]],
        resolved: Mapping[str, dict[str, int]],
        metrics: ServingMetrics,
        pool: Any = None,
    ) -> None:
        """``routes``: per model, version -> the handles of its deployments ({} for ``ingress``
        placement); ``resolved``: per model, each configured version reference -> the number
        the builder resolved it to (reused so the routes and the router never disagree);
        ``pool``: the model pool's handle when ``args.dynamic`` is set."""
        self.args, self.limits, self.metrics = args, args.limits, metrics
        self.dynamic: Optional[DynamicModels] = args.dynamic
        self.pool = pool
        self.known: dict[str, list[int]] = {}  # dynamic model -> its published versions, as last read
        self.unloaded: set[tuple[str, int]] = set()  # dynamic versions unloaded through the repository API
        self._absent: dict[str, float] = {}  # names not in the registry -> when that was checked
        self._dynamic_read = 0.0  # when the registry's model list was last read
        self.registry_models: dict[str, list[int]] = {}  # every dynamic model of the registry -> versions
        self.registry = Registry(args.registry_root)
        self.aliases: dict[str, dict[str, int]] = {}
        self.slots: dict[str, dict[int, VersionSlot]] = {}
        self.weights: dict[str, dict[int, float]] = {}
        self.routers: dict[str, Optional[TrafficRouter]] = {}
        self.loading: dict[str, bool] = {}  # model -> has a version still loading (checked per request)
        self.refs: dict[str, dict[str, float]] = {}  # model -> configured version reference -> weight
        self.models = {m.name: m for m in args.models}
        for m in args.models:
            self.aliases[m.name] = dict(resolved[m.name])
            self.slots[m.name] = {}
            for v, handles in routes[m.name].items():
                slot = VersionSlot(int(v), manifest=None)
                self.slots[m.name][slot.number] = slot
                try:
                    slot.manifest = self.registry.describe(m.name, slot.number)
                    if slot.generative:
                        slot.route = self._generative_route(m, slot, handles)
                    elif m.placement == "ingress":
                        pipeline = LocalPipeline(args.registry_root, m, slot.number, limits=self.limits,
                                                 metrics=metrics, security=args.security.model_dump())
                        slot.route = Route(local=pipeline)
                        self._settle(m.name, slot, pipeline.describe())
                    else:
                        bound = m.inference.max_queued_requests or self.limits.max_queued_requests
                        slot.route = Route(handles=handles, model=m, max_queued=bound,
                                           callers=args.ingress.min_replicas())
                except Exception as exc:  # one bad version must not take the others down
                    self._fail(m.name, slot, exc)
            self.set_traffic(m.name, args.ingress_user_config()["traffic"][m.name])

    def _generative_route(self, m: ModelConfig, slot: VersionSlot, handles: dict[str, Any]) -> GenerativeRoute:
        if handles:
            return GenerativeRoute(handles=handles)
        pipeline = GenerativePipeline(self.args.registry_root, m, slot.number, metrics=self.metrics,
                                      security=self.args.security.model_dump())
        self._settle(m.name, slot, pipeline.describe())
        return GenerativeRoute(local=pipeline)

    # ---- dynamic models ---------------------------------------------------------------
    def is_dynamic(self, model: str) -> bool:
        """Whether ``model`` is (or would be) served by the pool: not configured, and matched."""
        return model not in self.models and self.dynamic is not None and self.dynamic.matches(model)

    def _read_model(self, model: str) -> tuple[list[int], dict[str, int]]:
        versions = self.registry.list_versions(model, must_exist=False)
        return versions, (self.registry.aliases(model) if versions else {})

    async def ensure(self, model: str, version: Optional[str] = None) -> None:
        """Make a dynamic model known (read its versions and aliases from the registry, off the
        loop); with a pinned ``version`` it does not know yet, re-read them (published since).
        Names not in the registry are remembered for a few seconds, so a stream of requests for
        made-up names costs one registry listing per name and interval."""
        if not self.is_dynamic(model):
            return
        known = model in self.slots
        if known and (version is None or self.resolve(model, version) in self.known[model]):
            return
        now = time.monotonic()
        if self._absent.get(model, -1e9) > now - self.dynamic.refresh_interval_s:
            return  # not in the registry, or (known) re-read for an unknown version this interval
        if known:
            self._absent[model] = now
        try:
            versions, aliases = await asyncio.to_thread(self._read_model, model)
        except Exception as exc:  # a name the registry refuses, or the registry unreachable
            logger.debug("reading %s from the registry: %r", model, exc)
            versions, aliases = [], {}
        if len(self._absent) > 4096:
            self._absent.clear()
        if not versions:
            self._absent[model] = now
            return
        if not known:
            self._absent.pop(model, None)
        self._update_dynamic(model, versions, aliases)

    def ensure_sync(self, model: str) -> None:
        """:meth:`ensure` for the control path (``reconfigure``, which Serve calls synchronously)."""
        if self.is_dynamic(model) and model not in self.slots:
            versions, aliases = self._read_model(model)
            if versions:
                self._update_dynamic(model, versions, aliases)

    def _update_dynamic(self, model: str, versions: list[int], aliases: dict[str, int]) -> None:
        """(Re)state a dynamic model's versions and aliases; its traffic follows them."""
        assert self.dynamic is not None
        new = model not in self.slots
        self.known[model] = list(versions)
        self.aliases[model] = {**aliases, "latest": versions[-1]}
        if new:
            self.slots[model] = {}
            self.metrics.add_model(model)
            default = self.dynamic.version if self.dynamic.version in aliases else "latest"
            self.refs[model] = {default: 1.0}
            logger.info("serving %s from the model pool (versions %s, unpinned requests: %s)", model, versions,
                        default)
        for gone in [v for v in self.slots[model] if v not in versions]:  # deleted from the registry
            del self.slots[model][gone]
        refs = {r: w for r, w in self.refs[model].items() if self.resolve(model, r) in versions}
        self.set_traffic(model, refs or {"latest": 1.0})

    def servable(self, model: str) -> set[int]:
        """The version numbers requests and traffic may name: the deployed ones, or for a dynamic
        model every published version."""
        self.of(model)
        return set(self.known[model]) if model in self.known else set(self.slots[model])

    def slot(self, model: str, number: int) -> VersionSlot:
        """A version's slot; a dynamic version's is made on first use (its load has not started)."""
        slots = self.of(model)
        slot = slots.get(number)
        if slot is None:
            if model not in self.known or number not in self.known[model]:
                raise VersionNotFoundError(
                    f"model {model!r} has no served version {number}; served: {sorted(self.servable(model))}")
            assert self.dynamic is not None
            cfg = self.dynamic.version_config(model, number)
            bound = self.dynamic.pool.max_queued_requests or self.limits.max_queued_requests
            route = PoolRoute(self.pool, model, number, cfg, self.dynamic, bound, self.args.ingress.min_replicas(),
                              pool_replicas=_max_replicas(self.dynamic))
            slot = slots[number] = VersionSlot(number, manifest=None, route=route, dynamic=True,
                                               since=time.monotonic())
        return slot

    async def warm(self, model: str, slot: VersionSlot) -> None:
        """Bring a dynamic version's slot to ready: read its manifest and ask the pool for its
        describe() (which loads it in a replica). Concurrent callers share one attempt; each waits
        at most the load timeout (then 503 with Retry-After, while the load goes on)."""
        assert self.dynamic is not None
        if (model, slot.number) in self.unloaded:
            raise ModelNotReadyError(f"model {model!r} version {slot.number} is unloaded: load it with POST "
                                     f"/v2/repository/models/{model}/load", 5.0)
        if slot.state == "failed" and time.monotonic() - slot.since < self.dynamic.failure_ttl_s:
            if slot.generative:
                raise InvalidInputError(slot.reason or f"{model}:{slot.number} is a generative model")
            return
        if slot.state == "ready":
            return
        if slot.warming is None or slot.warming.done():
            slot.state, slot.since = "loading", time.monotonic()
            slot.warming = asyncio.get_running_loop().create_task(self._warm(model, slot))
        try:
            await asyncio.wait_for(asyncio.shield(slot.warming), self.dynamic.load_timeout_s)
        except asyncio.TimeoutError:
            raise ModelNotReadyError(f"model {model!r} version {slot.number} is still loading after "
                                     f"{self.dynamic.load_timeout_s:g}s; retry", 5.0) from None
        if slot.generative:  # not a retryable failure: the pool never serves it
            raise InvalidInputError(slot.reason or f"{model}:{slot.number} is a generative model")

    async def _warm(self, model: str, slot: VersionSlot) -> None:
        try:
            if slot.manifest is None:
                slot.manifest = await asyncio.to_thread(self.registry.describe, model, slot.number)
            if slot.generative:
                raise InvalidInputError(
                    f"{model}:{slot.number} is a generative model: the model pool serves classifiers and tabular "
                    "models; list it under the app's `models` to serve it")
            info = await slot.route.describe()
        except Exception as exc:
            self._fail(model, slot, exc)
        else:
            self._settle(model, slot, info)
        slot.since = time.monotonic()
        self._rebuild_router(model)

    async def refresh_dynamic(self) -> None:
        """Re-read the registry's models matching the app's patterns (for the repository index)
        and the versions and aliases of the dynamic models in use; traffic follows moved aliases,
        a version nothing points to any more is unloaded from the pool."""
        if self.dynamic is None:
            return
        try:
            listing = await asyncio.to_thread(self._list_dynamic)
        except Exception as exc:  # registry unreachable: keep serving what is known
            logger.warning("reading the registry's models failed: %r", exc)
            return
        self.registry_models = {m: vs for m, (vs, _) in listing.items()}
        for model in [m for m in self.known]:
            if model not in listing:
                logger.info("%s is no longer in the registry", model)
                self._drop_dynamic(model)
                continue
            before = self._targets(model)
            self._update_dynamic(model, *listing[model])
            for number in before - self._targets(model):
                await self._release(model, number)

    def _list_dynamic(self) -> dict[str, tuple[list[int], dict[str, int]]]:
        out = {}
        for model in self.registry.list_models():
            if self.is_dynamic(model):
                versions, aliases = self._read_model(model)
                if versions:
                    out[model] = (versions, aliases if model in self.known else {})
        return out

    def _targets(self, model: str) -> set[int]:
        """The versions a dynamic model's traffic refs (and its shadow) point at now."""
        return {v for v, w in self.weights.get(model, {}).items() if w > 0}

    async def _release(self, model: str, number: int) -> None:
        """An alias moved off a dynamic version that no traffic names any more: unload it from the
        pool after its requests in flight (a pinned request loads it again)."""
        slot = self.slots.get(model, {}).get(number)
        if slot is None or number in self._targets(model):
            return
        logger.info("%s:%d: no alias or traffic points at it any more; unloading it", model, number)
        del self.slots[model][number]
        try:
            await slot.route.unload()
        except Exception as exc:  # the pool will evict it as it ages anyway
            logger.warning("unloading %s:%d: %r", model, number, exc)

    def _drop_dynamic(self, model: str) -> None:
        for table in (self.slots, self.known, self.aliases, self.refs, self.weights, self.routers, self.loading):
            table.pop(model, None)

    async def load(self, model: str) -> int:
        """Repository API: (re)load a model's unpinned version into the pool; returns its number."""
        await self.ensure(model)
        if model not in self.known:
            if model in self.models:
                raise InvalidInputError(f"model {model!r} is configured by the app (its `models` section): "
                                        "it is loaded as long as the app runs")
            raise ModelNotFoundError(f"model {model!r} is not in the registry (or not served by this app)")
        number = self.likely_version(model)
        self.unloaded = {(m, v) for m, v in self.unloaded if m != model}
        slot = self.slot(model, number)
        if slot.state == "failed":
            slot.state, slot.since = "loading", 0.0  # an explicit load retries at once
        await self.warm(model, slot)
        slot.require_ready(model)
        return number

    async def unload(self, model: str) -> list[int]:
        """Repository API: unload every version of a dynamic model from the pool; requests for it get
        503 until it is loaded again. Returns the versions unloaded."""
        await self.ensure(model)
        if model not in self.known:
            if model in self.models:
                raise InvalidInputError(f"model {model!r} is configured by the app (its `models` section): "
                                        "change the app to stop serving it")
            raise ModelNotFoundError(f"model {model!r} is not in the registry (or not served by this app)")
        done = []
        for number, slot in list(self.slots[model].items()):
            self.unloaded.add((model, number))
            await slot.route.unload()
            del self.slots[model][number]
            done.append(number)
        for number in self.known[model]:
            self.unloaded.add((model, number))
        self._rebuild_router(model)
        return done

    def dynamic_state(self, model: str, number: int) -> str:
        """A dynamic version's state for the rollout controller: ``ready`` (served on demand),
        ``failed`` (its last load failed) or ``unloaded``."""
        if (model, number) in self.unloaded:
            return "unloaded"
        slot = self.slots.get(model, {}).get(number)
        return "failed" if slot is not None and slot.state == "failed" else "ready"

    def dynamic_index(self) -> list[dict[str, Any]]:
        """The repository index rows of the registry's dynamic models, each version's state."""
        rows = []
        for model, versions in sorted({**self.registry_models, **self.known}.items()):
            for number in versions:
                slot = self.slots.get(model, {}).get(number)
                if (model, number) in self.unloaded:
                    state, reason = "UNAVAILABLE", "unloaded"
                elif slot is None:
                    state, reason = "UNAVAILABLE", "not loaded (loads on its first request)"
                else:
                    state, reason = slot.state.upper(), slot.reason or ""
                    state = "UNAVAILABLE" if state == "FAILED" else state
                rows.append({"name": model, "version": str(number), "state": state, "reason": reason})
        return rows

    # ---- lookups ----------------------------------------------------------------------
    def of(self, model: str) -> dict[int, VersionSlot]:
        slots = self.slots.get(model)
        if slots is None:
            raise ModelNotFoundError(f"model {model!r} is not served here; models: {sorted(self.slots)}")
        return slots

    def resolve(self, model: str, ref: str) -> Optional[int]:
        """A version number or a build-time alias -> the version number (None if neither)."""
        if ref in self.aliases[model]:
            return self.aliases[model][ref]
        parsed = parse_version_ref(ref)
        return parsed if isinstance(parsed, int) else None

    def pick(self, model: str, version: Optional[str], key: Optional[str]) -> VersionSlot:
        """The version a request reaches: its pin, else the weighted (optionally sticky) split."""
        slots = self.of(model)
        if version is None:
            router = self.routers[model]
            if router is None:
                if model in self.known and any(m == model for m, _ in self.unloaded):
                    raise ModelNotReadyError(f"model {model!r} is unloaded: load it with POST "
                                             f"/v2/repository/models/{model}/load", 5.0)
                states = {v: s.state for v, s in slots.items()}
                raise ModelNotReadyError(f"model {model!r} has no ready version with traffic: {states}", 5.0)
            number = router.choose(key)
            return slots[number] if number in slots else self.slot(model, number)
        number = self.resolve(model, version)
        if number in slots:
            return slots[number]
        if model in self.known and number in self.known[model]:
            return self.slot(model, number)
        raise VersionNotFoundError(
            f"model {model!r} has no served version {version!r}; served: {sorted(self.servable(model))}")

    def likely_version(self, model: str) -> int:
        """The version an unpinned request most likely reaches (the largest weight)."""
        router = self.routers[model]
        if router is not None:
            return max(router.weights.items(), key=lambda kv: (kv[1], kv[0]))[0]
        live = {v: w for v, w in self.weights.get(model, {}).items() if w > 0}
        if model in self.known and live:  # all unloaded: the version its traffic goes to once loaded
            return max(live.items(), key=lambda kv: (kv[1], kv[0]))[0]
        return max(self.servable(model))

    def index(self) -> list[dict[str, Any]]:
        """Triton's repository index: every configured model version and its state."""
        rows = [
            {"name": m, "version": str(v), "state": s.state.upper(), "reason": s.reason or ""}
            for m, slots in sorted(self.slots.items()) if m not in self.known for v, s in sorted(slots.items())
        ]
        return rows + self.dynamic_index()

    # ---- traffic ----------------------------------------------------------------------
    def check_traffic(self, model: str, weights: Any) -> dict[str, float]:
        """Validate one model's ``user_config.traffic`` entry against the deployed versions."""
        return parse_weights(model, weights, lambda ref: self.resolve(model, ref), self.servable(model))

    def set_traffic(self, model: str, refs: dict[str, float]) -> None:
        self.refs[model] = dict(refs)
        self.weights[model] = weights_by_version(self.refs[model], lambda ref: self.resolve(model, ref))
        self._rebuild_router(model)

    def _rebuild_router(self, model: str) -> None:
        """Split traffic over the ready versions only; None while none is ready."""
        if model in self.known:  # dynamic: every version that has not failed (the pool loads it on demand)
            slots = self.slots[model]
            ready = {v: w for v, w in self.weights[model].items()
                     if (model, v) not in self.unloaded and (v not in slots or slots[v].state != "failed")}
            self.loading[model] = False
        else:
            ready = {v: w for v, w in self.weights[model].items() if self.slots[model][v].state == "ready"}
            self.loading[model] = any(s.state == "loading" for s in self.slots[model].values())
        live = {v: w for v, w in ready.items() if w > 0}
        self.routers[model] = TrafficRouter(ready) if live else None

    # ---- version states ---------------------------------------------------------------
    def _settle(self, model: str, slot: VersionSlot, info: dict[str, Any]) -> None:
        slot.describe = info
        slot.state, slot.reason = info.get("state", "ready"), info.get("reason")
        slot.schema = info.get("schema")
        self.metrics.version_state(model, slot.number, slot.state)
        if slot.state == "failed":
            logger.error("%s:%d failed to load and gets no traffic: %s", model, slot.number, slot.reason)

    def _fail(self, model: str, slot: VersionSlot, exc: BaseException) -> None:
        exc = unwrap_remote(exc)  # a replica's error: its own message, not Ray's wrapper and traceback
        self._settle(model, slot, {"state": "failed", "reason": f"{type(exc).__name__}: {exc}"})

    async def _ask_remote(self, model: str, slots: Iterable[VersionSlot], timeout_s: Optional[float] = None) -> bool:
        """Ask these slots' fused/split versions for their state (they load in their own
        replicas), settle the ones that changed and rebuild the router if any did.

        Returns whether every one answered and none is still loading.
        """
        changed, settled = False, True
        for slot in slots:
            if slot.route is None or slot.route.local is not None or slot.dynamic:
                continue
            try:
                info = await asyncio.wait_for(slot.route.describe(), timeout_s)
            except Exception as exc:  # replica starting, restarting or gone: stays as it is, ask again
                logger.debug("describe %s:%d: %r", model, slot.number, exc)
                settled = False
                continue
            # A replica answers ready or failed, never loading: a loading slot always settles.
            if info.get("state") != slot.state or info.get("reason") != slot.reason:
                self._settle(model, slot, info)
                changed = True
            settled = settled and slot.state != "loading"
        if changed:
            self._rebuild_router(model)
        return settled

    async def poll_remote_versions(self) -> None:
        """Ask fused/split versions whether they are up, forever."""
        while True:
            settled = True
            for model, slots in self.slots.items():
                settled = await self._ask_remote(model, slots.values()) and settled
            await asyncio.sleep(POLL_SETTLED_S if settled else POLL_LOADING_S)

    async def refresh_loading(self, model: str) -> None:
        """Ask this model's still-loading remote versions now (the first requests after a
        deploy must not wait for the background poll)."""
        await self._ask_remote(model, (s for s in self.of(model).values() if s.state == "loading"), timeout_s=10)

    # ---- aliases ----------------------------------------------------------------------
    async def follow_aliases(self) -> None:
        """Re-read the registry's aliases; when one this app routes by moves, load the version it
        now names (in process, for ``ingress`` placement) and only then move its traffic."""
        while True:
            await asyncio.sleep(self.args.alias_poll_interval_s)
            for model, mapping in list(self.aliases.items()):
                if model in self.known:  # dynamic models: refresh_dynamic follows theirs
                    continue
                alias_refs = [r for r in self.refs[model] if not r.isdigit()]
                if not alias_refs:
                    continue
                try:
                    current = await asyncio.to_thread(self.registry.aliases, model)
                except Exception as exc:  # registry unreachable: keep routing as before
                    logger.warning("reading %s's aliases failed: %r", model, exc)
                    continue
                for ref in alias_refs:
                    target = current.get(ref)
                    if target is None or target == mapping.get(ref):
                        continue
                    placement = self.models[model].placement
                    if target not in self.slots[model]:
                        if placement != "ingress":
                            logger.warning("%s alias %r moved to %d, which this app does not deploy (placement %s):"
                                           " rebuild the app to follow it", model, ref, target, placement)
                            continue
                        await self._load_local(self.models[model], target)
                    if self.slots[model][target].state != "ready":
                        logger.warning("%s alias %r moved to %d, which is %s: traffic stays on %d", model, ref,
                                       target, self.slots[model][target].state, mapping.get(ref))
                        continue
                    logger.info("%s alias %r moved %s -> %d: traffic follows", model, ref, mapping.get(ref), target)
                    previous = mapping.get(ref)
                    mapping[ref] = target
                    self.set_traffic(model, self.refs[model])
                    if placement == "ingress" and previous is not None and previous not in self.weights[model]:
                        # nothing points at it any more: its pipeline goes once its requests in flight end
                        logger.info("%s:%d: no version reference points at it any more; unloading it", model,
                                    previous)
                        self.slots[model].pop(previous, None)

    async def refresh_dynamic_forever(self) -> None:
        """:meth:`refresh_dynamic` every ``dynamic.refresh_interval_s``."""
        if self.dynamic is None:
            return
        while True:
            await self.refresh_dynamic()
            await asyncio.sleep(self.dynamic.refresh_interval_s)

    async def _load_local(self, m: ModelConfig, number: int) -> None:
        """Load one more version into this replica (off the event loop) as a new slot."""
        slot = VersionSlot(number, manifest=None)
        try:
            slot.manifest = await asyncio.to_thread(self.registry.describe, m.name, number)
            if slot.generative:
                pipeline = await asyncio.to_thread(
                    GenerativePipeline, self.args.registry_root, m, number, metrics=self.metrics,
                    security=self.args.security.model_dump())
                slot.route = GenerativeRoute(local=pipeline)
                self._settle(m.name, slot, pipeline.describe())
                self.slots[m.name][number] = slot
                self.weights[m.name].setdefault(number, 0.0)
                return
            pipeline = await asyncio.to_thread(
                LocalPipeline, self.args.registry_root, m, number, limits=self.limits, metrics=self.metrics,
                security=self.args.security.model_dump())
            slot.route = Route(local=pipeline)
            self._settle(m.name, slot, pipeline.describe())
        except Exception as exc:
            self._fail(m.name, slot, exc)
        self.slots[m.name][number] = slot
        self.weights[m.name].setdefault(number, 0.0)

    def reconfigure_batching(self, model: str, batching: dict[str, Any]) -> None:
        """Apply a ``user_config.batching`` entry to the versions running in this process."""
        for slot in self.of(model).values():
            if slot.route is not None and slot.route.local is not None:
                slot.route.local.reconfigure(batching)
