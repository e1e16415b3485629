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

from maas_ray.errors import ModelNotFoundError, ModelNotReadyError, VersionNotFoundError
from maas_ray.registry import Manifest, Registry
from maas_ray.serving.coalesce import Coalescer
from maas_ray.serving.codecs.common import parse_version_ref
from maas_ray.serving.config import AppArgs, ModelConfig
from maas_ray.serving.generation import GenerativePipeline
from maas_ray.serving.metrics import ServingMetrics
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
    ) -> None:
        """``routes``: per model, version -> the handles of its deployments ({} for ``ingress``
        placement); ``resolved``: per model, each configured version reference -> the number
        the builder resolved it to (reused so the routes and the router never disagree)."""
        self.args, self.limits, self.metrics = args, args.limits, metrics
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
                states = {v: s.state for v, s in slots.items()}
                raise ModelNotReadyError(f"model {model!r} has no ready version with traffic: {states}", 5.0)
            return slots[router.choose(key)]
        number = self.resolve(model, version)
        if number not in slots:
            raise VersionNotFoundError(f"model {model!r} has no served version {version!r}; served: {sorted(slots)}")
        return slots[number]

    def likely_version(self, model: str) -> int:
        """The version an unpinned request most likely reaches (the largest weight)."""
        router = self.routers[model]
        if router is not None:
            return max(router.weights.items(), key=lambda kv: (kv[1], kv[0]))[0]
        return max(self.of(model))

    def index(self) -> list[dict[str, Any]]:
        """Triton's repository index: every configured model version and its state."""
        return [
            {"name": m, "version": str(v), "state": s.state.upper(), "reason": s.reason or ""}
            for m, slots in sorted(self.slots.items()) for v, s in sorted(slots.items())
        ]

    # ---- traffic ----------------------------------------------------------------------
    def check_traffic(self, model: str, weights: Any) -> dict[str, float]:
        """Validate one model's ``user_config.traffic`` entry against the deployed versions."""
        return parse_weights(model, weights, lambda ref: self.resolve(model, ref), set(self.of(model)))

    def set_traffic(self, model: str, refs: dict[str, float]) -> None:
        self.refs[model] = dict(refs)
        self.weights[model] = weights_by_version(self.refs[model], lambda ref: self.resolve(model, ref))
        self._rebuild_router(model)

    def _rebuild_router(self, model: str) -> None:
        """Split traffic over the ready versions only; None while none is ready."""
        ready = {v: w for v, w in self.weights[model].items() if self.slots[model][v].state == "ready"}
        live = {v: w for v, w in ready.items() if w > 0}
        self.routers[model] = TrafficRouter(ready) if live else None
        self.loading[model] = any(s.state == "loading" for s in self.slots[model].values())

    # ---- version states ---------------------------------------------------------------
    def _settle(self, model: str, slot: VersionSlot, info: dict[str, Any]) -> None:
        slot.describe = info
        slot.state, slot.reason = info.get("state", "ready"), info.get("reason")
        slot.schema = info.get("schema")
        self.metrics.version_state(model, slot.number, slot.state)
        if slot.state == "failed":
            logger.error("%s:%d failed to load and gets no traffic: %s", model, slot.number, slot.reason)

    def _fail(self, model: str, slot: VersionSlot, exc: BaseException) -> None:
        self._settle(model, slot, {"state": "failed", "reason": f"{type(exc).__name__}: {exc}"})

    async def _ask_remote(self, model: str, slots: Iterable[VersionSlot], timeout_s: Optional[float] = None) -> bool:
        """Ask these slots' fused/split versions for their state (they load in their own
        replicas), settle the ones that changed and rebuild the router if any did.

        Returns whether every one answered and none is still loading.
        """
        changed, settled = False, True
        for slot in slots:
            if slot.route is None or slot.route.local is not None:
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
            for model, mapping in self.aliases.items():
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
                    mapping[ref] = target
                    self.set_traffic(model, self.refs[model])

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
