"""The ingress deployment: admission (keys, rate limits), version routing, readiness, metrics.

It speaks tensors, not wire formats: :mod:`maas_ray.serving.http` (OIP v2 / v1 REST) and the
Python handle (:meth:`Ingress.predict`) decode their requests with :mod:`maas_ray.serving.protocol`
and all go through :meth:`Ingress.infer`, so validation, limits, keys, metrics and routing
behave the same behind every protocol.

Each configured version is a :class:`VersionSlot`: ``loading`` until its pipeline is up,
``ready``, or ``failed`` with the reason (a checksum mismatch, a load error). Only ready
versions get split traffic; the others answer 503 when pinned and say why in metadata.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
from ray import serve

from maas_ray.errors import (
    ConfigError,
    InvalidInputError,
    MaasError,
    ModelNotFoundError,
    ModelNotReadyError,
    VersionNotFoundError,
)
from maas_ray.registry import Manifest, Registry
from maas_ray.serving import protocol
from maas_ray.serving.coalesce import Coalescer
from maas_ray.serving.config import AppArgs, ModelConfig
from maas_ray.serving.deployments import (
    LocalPipeline,
    Timings,
    app_name,
    freeze_startup_objects,
    use_serve_logging,
)
from maas_ray.serving.grpc import GrpcInferenceMixin
from maas_ray.serving.http import HttpApp, build_api
from maas_ray.serving.keys import ANONYMOUS, KeyStore, Principal, resolve_auth
from maas_ray.serving.limits import RateLimiter, RequestDeadlines
from maas_ray.serving.metrics import ServingMetrics
from maas_ray.serving.router import TrafficRouter
from maas_ray.serving.runner import rows
from maas_ray.serving.shadow import ShadowMirror, parse_shadow

logger = logging.getLogger(__name__)
Tensors = dict[str, np.ndarray]

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


def _decode_handle(inputs: dict[str, Any], schema: protocol.RequestSchema, limits: Any) -> Tensors:
    """Handle inputs (name -> array-like) against the version's schema and the element limit."""
    from maas_ray.errors import PayloadTooLargeError

    unknown = sorted(set(inputs) - set(schema.inputs))
    if unknown:
        raise InvalidInputError(f"unknown input(s) {unknown}; model expects {sorted(schema.inputs)}")
    tensors: Tensors = {}
    for name, value in inputs.items():
        try:
            tensors[name] = np.asarray(value)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"input {name!r}: not an array: {exc}") from exc
    elements = sum(a.size for a in tensors.values())
    if elements > limits.max_tensor_elements:
        raise PayloadTooLargeError(
            f"request has {elements} tensor elements; limits.max_tensor_elements is {limits.max_tensor_elements}"
        )
    return tensors


class _Route:
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


@dataclass
class VersionSlot:
    """One configured version of a model, as this ingress replica sees it."""

    number: int
    manifest: Optional[Manifest]
    route: Optional[_Route] = None
    state: str = "loading"  # loading | ready | failed
    reason: Optional[str] = None
    schema: Optional[protocol.RequestSchema] = None
    describe: dict[str, Any] = field(default_factory=dict)

    def require_ready(self, model: str) -> None:
        if self.state != "ready":
            why = f": {self.reason}" if self.reason else ""
            raise ModelNotReadyError(f"model {model!r} version {self.number} is {self.state}{why}", 5.0)


@dataclass(slots=True)
class InferResult:
    """What :meth:`Ingress.infer` hands back to the protocol that called it.

    ``after_response``: call it once the response is written (starts the shadow call, if
    this request is mirrored; None otherwise).
    """

    version: int
    outputs: Tensors
    stages: Timings
    after_response: Optional[Callable[[], None]] = None


@serve.ingress()  # the app is built per replica by __serve_build_asgi_app__
class Ingress(GrpcInferenceMixin):  # the OIP v2 gRPC RPCs: maas_ray.serving.grpc
    def __init__(
        self,
        args: dict[str, Any],
        routes: dict[str, dict[int, dict[str, Any]]],
        resolved: dict[str, dict[str, int]],
    ) -> None:
        """``resolved``: per model, each configured version reference -> the number the builder
        resolved it to; reused here so the routes and the router can never disagree."""
        use_serve_logging()
        self.args = AppArgs.model_validate(args)
        self.limits = self.args.limits
        self.metrics = ServingMetrics(app=app_name(), models=[m.name for m in self.args.models])
        self.metrics.start()
        auth = resolve_auth(self.args.auth)  # cluster nodes may switch keys on through MAAS_AUTH_*
        self.keys: Optional[KeyStore] = KeyStore.from_config(auth) if auth.enabled else None
        self.rate: Optional[RateLimiter] = RateLimiter.from_limits(self.limits)
        self.deadlines = RequestDeadlines(self.limits.request_timeout_s)
        registry = Registry(self.args.registry_root)
        self.aliases: dict[str, dict[str, int]] = {}
        self.slots: dict[str, dict[int, VersionSlot]] = {}
        self.weights: dict[str, dict[int, float]] = {}
        self.routers: dict[str, Optional[TrafficRouter]] = {}
        self.loading: dict[str, bool] = {}  # model -> has a version still loading (checked per request)
        self.refs: dict[str, dict[str, float]] = {}  # model -> configured version reference -> weight
        self.registry = registry
        for m in self.args.models:
            self.aliases[m.name] = resolved[m.name]
            self.slots[m.name] = {}
            for v, handles in routes[m.name].items():
                number = int(v)
                slot = VersionSlot(number, manifest=None)
                self.slots[m.name][number] = slot
                try:
                    slot.manifest = registry.describe(m.name, number)
                    if m.placement == "ingress":
                        pipeline = LocalPipeline(
                            self.args.registry_root, m, number, limits=self.limits, metrics=self.metrics
                        )
                        slot.route = _Route(local=pipeline)
                        self._settle(m.name, slot, pipeline.describe())
                    else:
                        bound = m.inference.max_queued_requests or self.limits.max_queued_requests
                        slot.route = _Route(handles=handles, model=m, max_queued=bound,
                                            callers=self.args.ingress.min_replicas())
                except Exception as exc:  # one bad version must not take the others down
                    self._fail(m.name, slot, exc)
            self.refs[m.name] = {str(v.version): v.weight for v in m.versions}
            self.weights[m.name] = self._weights_from_refs(m.name)
            self._rebuild_router(m.name)
        self.shadow = ShadowMirror(self._shadow_call, self.metrics)
        self.batching: dict[str, Any] = {}  # model -> the user_config batching entry last applied
        self.key_header = self.args.request_key_header.lower()
        self._background: list[asyncio.Task] = []
        freeze_startup_objects()

    # ---- version states -------------------------------------------------------------
    def _settle(self, model: str, slot: VersionSlot, info: dict[str, Any]) -> None:
        slot.describe = info
        slot.state, slot.reason = info.get("state", "ready"), info.get("reason")
        slot.schema = info.get("schema")
        self.metrics.version_state(model, slot.number, slot.state)
        if slot.state == "failed":
            logger.error("%s:%d failed to load and gets no traffic: %s", model, slot.number, slot.reason)

    def _fail(self, model: str, slot: VersionSlot, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        self._settle(model, slot, {"state": "failed", "reason": reason})

    def _rebuild_router(self, model: str) -> None:
        """Split traffic over the ready versions only; None while none is ready."""
        ready = {v: w for v, w in self.weights[model].items() if self.slots[model][v].state == "ready"}
        live = {v: w for v, w in ready.items() if w > 0}
        self.routers[model] = TrafficRouter(ready) if live else None
        self.loading[model] = any(s.state == "loading" for s in self.slots[model].values())

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

    async def _poll_remote_versions(self) -> None:
        """Ask fused/split versions whether they are up, forever."""
        while True:
            settled = True
            for model, slots in self.slots.items():
                settled = await self._ask_remote(model, slots.values()) and settled
            await asyncio.sleep(POLL_SETTLED_S if settled else POLL_LOADING_S)

    async def _refresh_loading(self, model: str) -> None:
        """Ask this model's still-loading remote versions now (the first requests after a
        deploy must not wait for the background poll)."""
        await self._ask_remote(model, (s for s in self._slots(model).values() if s.state == "loading"), timeout_s=10)

    def _weights_from_refs(self, model: str) -> dict[int, float]:
        """Weights per version number from the weights per configured reference (two aliases on
        one version add up)."""
        weights: dict[int, float] = {}
        for ref, weight in self.refs[model].items():
            number = self._resolve(model, ref)
            weights[number] = weights.get(number, 0.0) + weight
        return weights

    async def _follow_aliases(self) -> None:
        """Re-read the registry's aliases; when one this app routes by moves, load the version it
        now names (in process, for ``ingress`` placement) and only then move its traffic."""
        placements = {m.name: m for m in self.args.models}
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
                    if target not in self.slots[model]:
                        if placements[model].placement != "ingress":
                            logger.warning("%s alias %r moved to %d, which this app does not deploy (placement %s):"
                                           " rebuild the app to follow it", model, ref, target,
                                           placements[model].placement)
                            continue
                        await self._load_local(placements[model], target)
                    if self.slots[model][target].state != "ready":
                        logger.warning("%s alias %r moved to %d, which is %s: traffic stays on %d", model, ref,
                                       target, self.slots[model][target].state, mapping.get(ref))
                        continue
                    logger.info("%s alias %r moved %s -> %d: traffic follows", model, ref, mapping.get(ref), target)
                    mapping[ref] = target
                    self.weights[model] = self._weights_from_refs(model)
                    self._rebuild_router(model)

    async def _load_local(self, m: Any, number: int) -> None:
        """Load one more version into this replica (off the event loop) as a new slot."""
        slot = VersionSlot(number, manifest=None)
        try:
            slot.manifest = await asyncio.to_thread(self.registry.describe, m.name, number)
            pipeline = await asyncio.to_thread(
                LocalPipeline, self.args.registry_root, m, number, limits=self.limits, metrics=self.metrics)
            slot.route = _Route(local=pipeline)
            self._settle(m.name, slot, pipeline.describe())
        except Exception as exc:
            self._fail(m.name, slot, exc)
        self.slots[m.name][number] = slot
        self.weights[m.name].setdefault(number, 0.0)

    def _ensure_background(self) -> None:
        """Start the background loops on the replica's event loop (the constructor has none)."""
        if self._background:
            return
        loop = asyncio.get_running_loop()
        self._background = [loop.create_task(self._poll_remote_versions()), loop.create_task(self._follow_aliases()),
                            loop.create_task(self.deadlines.watch_forever())]
        if self.keys is not None:
            self._background.append(loop.create_task(self.keys.refresh_forever()))

    async def check_health(self) -> None:
        """Serve calls this periodically on the user-code loop: keep the background loops alive."""
        for task in self._background:
            if task.done():
                logger.error("a background loop stopped (%r); restarting them", task)
                for other in self._background:
                    other.cancel()
                self._background = []
                break
        self._ensure_background()

    # ---- traffic --------------------------------------------------------------------
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """user_config: {"traffic": {model: {version: weight}}, "shadow": {model: {version, share}},
        "batching": {model: {...}}}."""
        for model, weights in (user_config.get("traffic") or {}).items():
            slots = self._slots(model)
            parsed: dict[int, float] = {}
            for ref, weight in weights.items():  # keys: version numbers or build-time aliases
                number = self._resolve(model, str(ref))
                if number not in slots:
                    raise ConfigError(
                        f"user_config.traffic.{model}: version {ref!r} is not deployed; deployed: {sorted(slots)}"
                    )
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                    raise ConfigError(
                        f"user_config.traffic.{model}.{ref}: weight must be a number >= 0, got {weight!r}"
                    )
                parsed[number] = float(weight)
            if sum(parsed.values()) <= 0:
                raise ConfigError(f"user_config.traffic.{model}: all weights are 0: {weights}")
            self.refs[model] = {str(ref): float(weight) for ref, weight in weights.items()}
            self.weights[model] = self._weights_from_refs(model)
            self._rebuild_router(model)
            logger.info("traffic for %s is now %s", model, parsed)
        # The shadow map is declarative, like the rest of user_config: a model it leaves out is
        # not mirrored (a rollout's rollback restores the map it found, and that must stop the
        # mirroring to the rolled-back candidate). No "shadow" key at all: the models' build-time
        # `shadow:` settings.
        shadow = user_config.get("shadow")
        if shadow is None:
            shadow = self.args.shadow_targets()
        if not isinstance(shadow, dict):
            raise ConfigError(f"user_config.shadow: expected {{model: {{version, share}}}}, got {shadow!r}")
        targets = {}
        for model, target in shadow.items():
            slots = self._slots(model)
            parsed_target = parse_shadow(model, target, lambda ref: self._resolve(model, ref), set(slots))
            if parsed_target is not None:
                targets[model] = parsed_target
        if targets != self.shadow.targets:
            logger.info("shadow targets are now %s", targets or "none")
        self.shadow.targets = targets
        for model, batching in (user_config.get("batching") or {}).items():
            self.batching[model] = batching
            for slot in self._slots(model).values():
                if slot.route is not None and slot.route.local is not None:
                    slot.route.local.reconfigure(batching)

    def _slots(self, model: str) -> dict[int, VersionSlot]:
        slots = self.slots.get(model)
        if slots is None:
            raise ModelNotFoundError(f"model {model!r} is not served here; models: {sorted(self.slots)}")
        return slots

    def _resolve(self, model: str, ref: str) -> Optional[int]:
        """A version number or a build-time alias -> the version number (None if neither)."""
        if ref in self.aliases[model]:
            return self.aliases[model][ref]
        parsed = protocol.parse_version_ref(ref)
        return parsed if isinstance(parsed, int) else None

    def pick(self, model: str, version: Optional[str], key: Optional[str]) -> VersionSlot:
        """The version a request reaches: its pin, else the weighted (optionally sticky) split."""
        slots = self._slots(model)
        if version is None:
            router = self.routers[model]
            if router is None:
                states = {v: s.state for v, s in slots.items()}
                raise ModelNotReadyError(f"model {model!r} has no ready version with traffic: {states}", 5.0)
            return slots[router.choose(key)]
        number = self._resolve(model, version)
        if number not in slots:
            raise VersionNotFoundError(f"model {model!r} has no served version {version!r}; served: {sorted(slots)}")
        return slots[number]

    def likely_version(self, model: str) -> int:
        """The version an unpinned request most likely reaches (the largest weight)."""
        router = self.routers[model]
        if router is not None:
            return max(router.weights.items(), key=lambda kv: (kv[1], kv[0]))[0]
        return max(self._slots(model))

    # ---- admission ------------------------------------------------------------------
    def admit(self, api_key: Optional[str], client: str, model: Optional[str], *, admin: bool = False) -> Principal:
        """Keys and rate limits, before any body is read or parsed (401/403/429)."""
        principal = ANONYMOUS if self.keys is None else self.keys.authenticate(api_key)
        if admin:
            principal.check_admin()
        elif model is not None:
            principal.check_model(model)
        if self.rate is not None:
            self.rate.check(principal.key_id if self.keys is not None else client)
        return principal

    # ---- the one inference path -----------------------------------------------------
    async def infer(
        self,
        model: str,
        version: Optional[str],
        key: Optional[str],
        decode: Callable[[protocol.RequestSchema], Any],
        strict: bool,
    ) -> tuple[InferResult, Any]:
        """Pick the version, decode the request against its schema, run it.

        ``decode(schema)`` returns either a tensor dict or an object with ``.tensors``
        (:class:`protocol.InferRequest`); it is returned unchanged as the second element.
        """
        self._ensure_background()
        if self.loading.get(model):
            await self._refresh_loading(model)
        slot = self.pick(model, version, key)
        if slot.state != "ready":
            slot.require_ready(model)
        t0 = time.perf_counter()
        request = decode(slot.schema)
        tensors = request if isinstance(request, dict) else request.tensors
        decode_s = time.perf_counter() - t0
        outputs, stages = await slot.route.infer(tensors, strict)
        stages["decode"] = decode_s + stages.get("decode", 0.0)  # a fresh dict per request
        mirror = self.shadow.plan(model, slot.number, tensors, outputs, strict)
        return InferResult(slot.number, outputs, stages, mirror), request

    async def _shadow_call(self, model: str, version: int, tensors: Tensors, strict: bool) -> Tensors:
        slot = self.slots[model][version]
        slot.require_ready(model)
        outputs, _ = await slot.route.infer(tensors, strict)
        return outputs

    # ---- Python handle API ----------------------------------------------------------
    async def predict(
        self, model: str, inputs: dict[str, Any], version: Optional[str] = None, key: Optional[str] = None
    ) -> dict[str, Any]:
        """Handle entry point: returns the OIP v2 response body, as HTTP would.

        Handle calls come from inside the Ray cluster, which Ray's token authentication
        guards; API keys and rate limits apply to the HTTP (and gRPC) edge only.
        """
        start = time.perf_counter()
        self.metrics.request_started(model)
        number, status, error = None, 200, None
        try:
            if not isinstance(inputs, dict) or not inputs:
                raise InvalidInputError("inputs must be a non-empty dict of name -> array")

            def decode(schema: protocol.RequestSchema) -> Tensors:
                return _decode_handle(inputs, schema, self.limits)

            result, _ = await self.infer(model, None if version is None else str(version), key, decode, False)
            number = result.version
            response = protocol.v2_response(model, result.version, result.outputs)
            if result.after_response is not None:
                result.after_response()
            return response
        except MaasError as exc:
            status, error = exc.status_code, type(exc).__name__
            raise
        except Exception as exc:
            status, error = 500, type(exc).__name__
            raise
        finally:
            self.metrics.request_finished(model, number, "handle", status, error, time.perf_counter() - start)

    async def current_config(self) -> dict[str, Any]:
        """The user_config this replica runs with (what the rollout controller edits and restores),
        plus the version each reference resolves to now and each version's state."""
        return {
            "user_config": {
                "traffic": {m: dict(refs) for m, refs in self.refs.items()},
                "shadow": {m: {"version": str(t.version), "share": t.share} for m, t in self.shadow.targets.items()},
                "batching": dict(self.batching),
            },
            "resolved": {m: dict(a) for m, a in self.aliases.items()},
            "weights": {m: {str(v): w for v, w in ws.items()} for m, ws in self.weights.items()},
            "states": {m: {str(v): s.state for v, s in slots.items()} for m, slots in self.slots.items()},
        }

    async def replicas(self) -> dict[str, Any]:
        """Which process and onnxruntime provider serve each version (ops and tests)."""
        import sys

        return {
            "ingress_pid": os.getpid(),
            "torch_imported": "torch" in sys.modules,
            "models": {m: {v: {k: d for k, d in s.describe.items() if k != "schema"} for v, s in slots.items()}
                       for m, slots in self.slots.items()},
        }

    # ---- metadata and readiness (every protocol) ------------------------------------
    def __serve_build_asgi_app__(self) -> HttpApp:
        return HttpApp(self, build_api(self))

    async def metadata(self, model: str, version: Optional[str]) -> dict[str, Any]:
        slots = self._slots(model)
        await self._refresh_loading(model)
        slot = slots[self.likely_version(model)] if version is None else self.pick(model, version, None)
        manifest = slot.manifest
        return {
            "name": model,
            "versions": [str(v) for v in sorted(slots)],
            "platform": "onnxruntime_onnx",
            "inputs": slot.describe.get("inputs", []),
            "outputs": slot.describe.get("outputs", []),
            "parameters": {
                "version": str(slot.number),
                "state": slot.state,
                **({"reason": slot.reason} if slot.reason else {}),
                "preprocessor": manifest.preprocessor.name if manifest else None,
                "postprocessor": manifest.postprocessor.name if manifest else None,
                "traffic": {str(k): w for k, w in self.weights[model].items()},
                "states": {str(v): s.state for v, s in sorted(slots.items())},
            },
        }

    async def model_ready(self, model: str, version: Optional[str]) -> dict[str, Any]:
        """{"name", "ready", ...}; ready means: answers unpinned requests (or this version's)."""
        self._ensure_background()
        await self._refresh_loading(model)
        if version is None:
            self._slots(model)
            ready = self.routers[model] is not None
            return {"name": model, "ready": ready}
        slot = self.pick(model, version, None)
        out = {"name": model, "version": str(slot.number), "ready": slot.state == "ready"}
        if slot.reason:
            out["reason"] = slot.reason
        return out

    async def server_ready(self) -> bool:
        self._ensure_background()
        for model in self.slots:
            await self._refresh_loading(model)
        return all(router is not None for router in self.routers.values())

    def index(self) -> list[dict[str, Any]]:
        """Triton's repository index: every configured model version and its state."""
        return [
            {"name": m, "version": str(v), "state": s.state.upper(), "reason": s.reason or ""}
            for m, slots in sorted(self.slots.items()) for v, s in sorted(slots.items())
        ]
