"""The ingress core: one request path behind every transport, knowing none of them.

A transport (HTTP, gRPC, the Python handle) does, per infer request::

    core.admit(key, client, model)         # 401/403/429 before any body is read
    slot = await core.pick(model, version, sticky_key)
    decoded = codecs.<protocol>.decode(body, slot.schema, core.limits)
    result = await core.run(model, slot, decoded.tensors, strict, decode_s)
    ... encode result.outputs, send, then result.after_response()

and per generative request (a version whose manifest has ``generation``)::

    principal = core.admit(key, client, model)
    request = codecs.openai / codecs.generate .decode(body)
    slot = await core.pick_generative(model, version, sticky_key)
    async for chunk in core.generate(model, slot, request, who=core.token_key(principal, client), ...):
        ... encode and send each chunk; closing the iterator stops the sequence

:class:`InferenceService` is that interface, all a transport may use; :class:`IngressCore`
implements it over the version table (:mod:`.versions`), admission (:mod:`.admission`),
shadow mirroring, request deadlines and metrics.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import time
from typing import Any, AsyncIterator, Mapping, Optional, Protocol

import numpy as np
from pydantic import ValidationError

from maas_ray._version import __version__
from maas_ray.errors import ConfigError, InvalidInputError, format_validation_error
from maas_ray.serving.admission import Admission
from maas_ray.serving.config import AppArgs, BatchingConfig, Limits
from maas_ray.serving.keys import Principal
from maas_ray.serving.limits import RequestDeadlines, TokenLimiter, check_work
from maas_ray.serving.metrics import ServingMetrics
from maas_ray.serving.payload_log import PayloadLogger
from maas_ray.serving.replicas import app_name, release_free_memory
from maas_ray.serving.shadow import ShadowMirror, parse_shadow
from maas_ray.serving.shadow_generate import COMPLETED, GenerativeMirror
from maas_ray.serving.types import GenerateRequest, GenerationChunk, InferResult, Tensors
from maas_ray.serving.versions import VersionSlot, VersionTable

logger = logging.getLogger(__name__)

# How often an ingress replica hands the allocator's free pages back to the OS.
TRIM_INTERVAL_S = 10.0
# The OIP extensions the server metadata advertises.
EXTENSIONS = ("binary_tensor_data", "model_repository")


class InferenceService(Protocol):
    """What the transports (:mod:`.http`, :mod:`.grpc`, :mod:`.handle`) depend on."""

    limits: Limits
    metrics: ServingMetrics
    deadlines: RequestDeadlines
    key_header: str  # the request header (or gRPC metadata / parameter) carrying the sticky key

    @property
    def model_names(self) -> list[str]: ...

    def admit(self, api_key: Optional[str], client: str, model: Optional[str], *,
              admin: bool = False) -> Principal: ...

    async def pick(self, model: str, version: Optional[str], key: Optional[str]) -> VersionSlot: ...

    async def run(self, model: str, slot: VersionSlot, tensors: Tensors, strict: bool,
                  decode_s: float = 0.0, *, request_id: Optional[str] = None,
                  protocol: Optional[str] = None) -> InferResult: ...

    def server_metadata(self) -> dict[str, Any]: ...

    async def pick_generative(self, model: str, version: Optional[str], key: Optional[str]) -> VersionSlot: ...

    def wrong_route(self, model: str, slot: VersionSlot) -> InvalidInputError: ...

    def token_key(self, principal: Principal, client: str) -> Optional[str]: ...

    def generate(self, model: str, slot: VersionSlot, request: GenerateRequest, *, protocol: str,
                 who: Optional[str] = None, start: Optional[float] = None) -> AsyncIterator[GenerationChunk]: ...

    def generative_models(self) -> list[tuple[str, list[int]]]: ...

    async def metadata(self, model: str, version: Optional[str]) -> dict[str, Any]: ...

    async def model_ready(self, model: str, version: Optional[str]) -> dict[str, Any]: ...

    async def server_ready(self) -> bool: ...

    async def index(self, ready: bool = False) -> list[dict[str, Any]]: ...

    async def load(self, model: str) -> int: ...

    async def unload(self, model: str) -> list[int]: ...


class IngressCore:
    """The ingress replica's state and request path; implements :class:`InferenceService`."""

    def __init__(
        self,
        args: AppArgs,
        routes: Mapping[str, Mapping[Any, dict[str, Any]]],
        resolved: Mapping[str, dict[str, int]],
        pool: Any = None,
    ) -> None:
        """``pool``: the model pool's handle, when ``args.dynamic`` serves the registry's other models."""
        self.args = args
        self.limits = args.limits
        self.metrics = ServingMetrics(app=app_name(), models=[m.name for m in args.models],
                                      max_models=args.dynamic.metrics_max_models if args.dynamic else None)
        self.metrics.start()
        self.admission = Admission(args)
        self.tokens: Optional[TokenLimiter] = TokenLimiter.from_limits(self.limits)
        self.deadlines = RequestDeadlines(self.limits.request_timeout_s)
        self.versions = VersionTable(args, routes, resolved, self.metrics, pool=pool)
        self.shadow = ShadowMirror(self._shadow_call, self.metrics)
        self.generative_shadow = GenerativeMirror(self.shadow, self._shadow_generate, self.metrics)
        self.batching: dict[str, Any] = {}  # model -> the user_config batching entry last applied
        self.key_header = args.request_key_header.lower()
        self._background: list[asyncio.Task] = []
        # model -> (max items, max text characters, items per chunk): a request's work bound
        self.work = {m.name: (m.max_items or self.limits.max_items, m.max_text_chars or self.limits.max_text_chars,
                              m.batching.max_batch_size) for m in args.models}
        dyn = args.dynamic
        self.dynamic_work = None if dyn is None else (
            dyn.max_items or self.limits.max_items, dyn.max_text_chars or self.limits.max_text_chars,
            dyn.batching.max_batch_size)
        self.payload_logs = {
            m.name: PayloadLogger(m.name, m.payload_log, app=app_name(),
                                  on_drop=functools.partial(self.metrics.payload_log_dropped, m.name))
            for m in args.models if m.payload_log is not None}

    @property
    def model_names(self) -> list[str]:
        return sorted(self.versions.slots)

    def admit(self, api_key: Optional[str], client: str, model: Optional[str], *, admin: bool = False) -> Principal:
        return self.admission.admit(api_key, client, model, admin=admin)

    # ---- background loops -------------------------------------------------------------
    def ensure_background(self) -> None:
        """Start the background loops on the replica's event loop (the constructor has none)."""
        if self._background:
            return
        loop = asyncio.get_running_loop()
        self._background = [loop.create_task(self.versions.poll_remote_versions()),
                            loop.create_task(self.versions.follow_aliases()),
                            loop.create_task(self.deadlines.watch_forever()),
                            loop.create_task(self.versions.refresh_dynamic_forever()),
                            loop.create_task(self._release_memory_forever())]
        if self.admission.keys is not None:
            self._background.append(loop.create_task(self.admission.keys.refresh_forever()))

    @staticmethod
    async def _release_memory_forever(interval_s: float = TRIM_INTERVAL_S) -> None:
        """Hand the allocator's free pages back to the OS now and then (off the loop): requests for
        many models leave freed memory the allocator would otherwise keep (replicas.release_free_memory)."""
        while True:
            await asyncio.sleep(interval_s)
            seconds = await asyncio.to_thread(release_free_memory)
            logger.debug("released free memory in %.1f ms", seconds * 1e3)

    def check_health(self) -> None:
        """Keep the background loops alive (Serve's periodic health check calls this). A loop
        that returned had nothing to do in this app (no dynamic models, no request timeout);
        one that raised or was cancelled is restarted, with the others."""
        for task in self._background:
            if task.done() and (task.cancelled() or task.exception() is not None):
                logger.error("a background loop stopped (%r); restarting them", task)
                for other in self._background:
                    other.cancel()
                self._background = []
                break
        self.ensure_background()

    # ---- configuration ----------------------------------------------------------------
    def reconfigure(self, user_config: Mapping[str, Any]) -> None:
        """Apply ``{"traffic": {model: {version: weight}}, "shadow": {model: {version, share}},
        "batching": {model: {...}}}`` over what the args built: a model (or batching field) that
        user_config leaves out keeps its built value, so weights are stated once, in args, and a
        YAML ``user_config`` overrides only what it names. All of it is checked before any of it
        applies.

        The shadow map is declarative: a model it leaves out is not mirrored (a rollout's
        rollback restores the map it found, and that must stop the mirroring to the
        rolled-back candidate); no ``shadow`` key at all means the models' build-time settings.
        """
        if not isinstance(user_config, Mapping):
            raise ConfigError(f"user_config: expected an object, got {user_config!r}")
        built = self.args.ingress_user_config()
        sections = {}
        for section in ("traffic", "batching", "shadow"):
            given = user_config.get(section)
            if given is not None and not isinstance(given, Mapping):
                raise ConfigError(f"user_config.{section}: expected {{model: ...}}, got {given!r}")
            sections[section] = given or {}
        for model in {*sections["traffic"], *sections["shadow"]}:  # a dynamic model may be named before its first request
            self.versions.ensure_sync(model)
            if self.versions.is_dynamic(model) and model in self.versions.slots:
                self.metrics.add_model(model, always=True)  # a rollout reads its versions by name
        traffic = {**built["traffic"], **sections["traffic"]}
        parsed_traffic = {model: self.versions.check_traffic(model, w) for model, w in traffic.items()}
        batching = {model: {**built["batching"].get(model, {}), **(entry or {})}
                    for model, entry in {**built["batching"], **sections["batching"]}.items()}
        for model, entry in batching.items():
            self.versions.of(model)
            try:
                BatchingConfig.model_validate(entry)
            except ValidationError as exc:
                raise ConfigError(format_validation_error(exc, f"user_config.batching.{model}")) from exc
        shadow = built["shadow"] if user_config.get("shadow") is None else sections["shadow"]
        targets = {}
        for model, target in shadow.items():
            parsed_target = parse_shadow(model, target, lambda ref, m=model: self.versions.resolve(m, ref),
                                         self.versions.servable(model))
            if parsed_target is not None:
                targets[model] = parsed_target

        for model, refs in parsed_traffic.items():
            if refs != self.versions.refs.get(model):
                logger.info("traffic for %s is now %s", model, refs)
            self.versions.set_traffic(model, refs)
        if targets != self.shadow.targets:
            logger.info("shadow targets are now %s", targets or "none")
        self.shadow.targets = targets
        for model, entry in batching.items():
            if entry != self.batching.get(model):
                self.versions.reconfigure_batching(model, entry)
            self.batching[model] = entry

    def current_config(self, model: Optional[str] = None) -> dict[str, Any]:
        """The user_config this replica runs with (what the rollout controller edits and restores),
        plus the version each reference resolves to now and each version's state. ``model``: a
        dynamic model to include even before its first request. A dynamic version is ``ready``
        unless its load failed or it was unloaded: the pool loads it on its first request."""
        v = self.versions
        if model is not None:
            v.ensure_sync(model)
        states = {m: {str(n): s.state for n, s in slots.items()} for m, slots in v.slots.items()}
        for m, numbers in v.known.items():
            states[m] = {str(n): v.dynamic_state(m, n) for n in numbers}
        return {
            "user_config": {
                "traffic": {m: dict(refs) for m, refs in v.refs.items()},
                "shadow": {m: {"version": str(t.version), "share": t.share,
                               **({} if t.min_overlap is None else {"min_overlap": t.min_overlap})}
                           for m, t in self.shadow.targets.items()},
                "batching": dict(self.batching),
            },
            "resolved": {m: dict(a) for m, a in v.aliases.items()},
            "weights": {m: {str(n): w for n, w in ws.items()} for m, ws in v.weights.items()},
            "states": states,
        }

    def replicas(self) -> dict[str, Any]:
        """Which process and onnxruntime provider serve each version (ops and tests)."""
        return {
            "ingress_pid": os.getpid(),
            "torch_imported": "torch" in sys.modules,
            "models": {m: {n: {k: d for k, d in s.describe.items() if k != "schema"} for n, s in slots.items()}
                       for m, slots in self.versions.slots.items()},
        }

    # ---- the one inference path -------------------------------------------------------
    async def pick(self, model: str, version: Optional[str], key: Optional[str]) -> VersionSlot:
        """The ready version this request goes to (404 unknown model/version, 503 not ready)."""
        self.ensure_background()
        if self.versions.dynamic is not None:
            await self.versions.ensure(model, version)
        if self.versions.loading.get(model):
            await self.versions.refresh_loading(model)
        slot = self.versions.pick(model, version, key)
        if slot.state != "ready":
            if slot.dynamic:  # loads it in a pool replica (or fails with the reason)
                await self.versions.warm(model, slot)
            slot.require_ready(model)
        return slot

    async def run(self, model: str, slot: VersionSlot, tensors: Tensors, strict: bool,
                  decode_s: float = 0.0, *, request_id: Optional[str] = None,
                  protocol: Optional[str] = None) -> InferResult:
        """Run decoded tensors through the version (pre -> batched inference -> post).

        ``strict``: the request's datatypes were declared (OIP v2), so the preprocessor casts
        nothing; v1 and handle calls send plain numbers. ``decode_s`` is added to the
        ``decode`` stage. The request's work is checked against the model's limits first (413);
        a request of more items than one batch runs a batch at a time, so that its deadline
        stops it between batches. ``request_id`` and ``protocol`` go to the payload log only."""
        max_items, max_chars, chunk = self.work.get(model) or self.dynamic_work
        items = check_work(model, tensors, max_items, max_chars)
        plog = self.payload_logs.get(model)
        try:
            if items > chunk:
                outputs, stages = await self._infer_in_chunks(slot, tensors, strict, items, chunk)
            else:
                outputs, stages = await slot.route.infer(tensors, strict)
        except Exception as exc:
            if plog is not None:
                plog.log(request_id, slot.number, protocol, tensors, None, getattr(exc, "status_code", 500))
            raise
        if plog is not None:
            plog.log(request_id, slot.number, protocol, tensors, outputs)
        stages["decode"] = decode_s + stages.get("decode", 0.0)  # a fresh dict per request
        mirror = self.shadow.plan(model, slot.number, tensors, outputs, strict)
        return InferResult(slot.number, outputs, stages, mirror)

    @staticmethod
    async def _infer_in_chunks(slot: VersionSlot, tensors: Tensors, strict: bool, items: int,
                               chunk: int) -> tuple[Tensors, dict[str, float]]:
        """A request of more items than a batch, ``chunk`` items at a time, outputs joined back.

        Between chunks the event loop runs, so the request deadline's watchdog can cancel it:
        the request answers 504 on time and no further chunk runs. A model whose outputs are
        not one row per item cannot be split: after the first chunk shows it, the request runs
        whole."""
        parts: list[Tensors] = []
        stages: dict[str, float] = {}
        for start in range(0, items, chunk):
            part = {n: a[start:start + chunk] if a.ndim and a.shape[0] == items else a for n, a in tensors.items()}
            out, part_stages = await slot.route.infer(part, strict)
            if not parts and any(np.ndim(a) == 0 or len(a) != min(chunk, items) for a in out.values()):
                return await slot.route.infer(tensors, strict)
            parts.append(out)
            for stage, seconds in part_stages.items():
                stages[stage] = stages.get(stage, 0.0) + seconds
            await asyncio.sleep(0)  # a chunk that ran on the loop: let the deadline watchdog in
        return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}, stages

    # ---- generative versions ----------------------------------------------------------
    async def pick_generative(self, model: str, version: Optional[str], key: Optional[str]) -> VersionSlot:
        """:meth:`pick` for a generative route: a classifier version is a 400 naming its route."""
        slot = await self.pick(model, version, key)
        if not slot.generative:
            raise InvalidInputError(
                f"model {model!r} version {slot.number} is not a generative model: send its requests to "
                f"POST /v2/models/{model}/infer (or the v1 :predict route, gRPC ModelInfer, MaasClient.infer)")
        return slot

    @staticmethod
    def wrong_route(model: str, slot: VersionSlot) -> InvalidInputError:
        """The 400 an infer request gets from a generative version (costs the infer path nothing:
        a generative slot has no schema, which the transports check after :meth:`pick`)."""
        return InvalidInputError(
            f"model {model!r} version {slot.number} is a generative model: send its requests to POST "
            f"/v1/completions or /v1/chat/completions (model {model!r}), POST /v2/models/{model}/generate or "
            "/generate_stream, gRPC ModelStreamInfer, or MaasClient.generate")

    def token_key(self, principal: Principal, client: str) -> Optional[str]:
        """Whose token budget a generation is charged to (None: no token limit)."""
        if self.tokens is None:
            return None
        return principal.key_id if self.admission.keys is not None else client

    def generative_models(self) -> list[tuple[str, list[int]]]:
        """(model, its generative version numbers) for every model with one (``GET /v1/models``)."""
        return [(m, [v for v, s in sorted(slots.items()) if s.generative])
                for m, slots in sorted(self.versions.slots.items()) if any(s.generative for s in slots.values())]

    async def generate(self, model: str, slot: VersionSlot, request: GenerateRequest, *, protocol: str,
                       who: Optional[str] = None, start: Optional[float] = None) -> AsyncIterator[GenerationChunk]:
        """Stream ``request``'s chunks from the version. Errors before the first chunk (a bad
        prompt, the context overflowed, the engine's queue full, the token budget used up)
        raise at the first ``__anext__``. Closing the iterator early (a client gone, a timeout)
        stops the sequence. Records time to first token, inter-token gaps, tokens and the
        finish reason, and charges ``who``'s token budget (:meth:`token_key`) at the end.

        ``start``: when the request arrived (``time.perf_counter()``), for the TTFT."""
        if who is not None and self.tokens is not None:
            self.tokens.check(who)
        start = time.perf_counter() if start is None else start
        stream = slot.route.generate(request)
        last, ttft, gaps, final, reason = start, None, [], None, "error"
        # A mirrored copy runs alongside (shadow_generate); it gets the primary's text at the end.
        mirror = self.generative_shadow.begin(model, slot.number, request, start)
        texts: Optional[list[str]] = None if mirror is None else []
        try:
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.token_ids:
                    if ttft is None:
                        ttft = now - start
                    else:
                        gaps.append(now - last)
                    last = now
                final = chunk
                if texts is not None:
                    texts.append(chunk.text)
                yield chunk
            reason = (final.finish_reason if final is not None else None) or "stop"
        except (asyncio.CancelledError, GeneratorExit):
            # Closed after the last chunk (a non-streaming route reads it and closes) is not a
            # cancellation: the generation had ended with that chunk's reason.
            reason = (final.finish_reason if final is not None else None) or "cancelled"
            raise
        finally:
            await stream.aclose()
            prompt, completion = (final.prompt_tokens, final.completion_tokens) if final is not None else (0, 0)
            self.metrics.generation(model, slot.number, prompt_tokens=prompt, completion_tokens=completion,
                                    finish_reason=reason, ttft_s=ttft, itl_s=gaps)
            if who is not None and self.tokens is not None:
                self.tokens.charge(who, prompt + completion)
            if mirror is not None and not mirror.done():
                completed = final is not None and final.finish_reason in COMPLETED
                mirror.set_result("".join(texts) if completed else None)

    async def generation_stats(self) -> dict[str, Any]:
        """Every generative version's engine stats (running, waiting, KV use, ...), ops and tests."""
        out: dict[str, Any] = {}
        for model, slots in self.versions.slots.items():
            for number, slot in slots.items():
                if slot.generative and slot.state == "ready":
                    out.setdefault(model, {})[str(number)] = await slot.route.stats()
        return out

    async def _shadow_generate(self, model: str, version: int,
                               request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        """A mirrored generation's chunks from ``version`` (:mod:`.shadow_generate`)."""
        slot = self.versions.slot(model, version)
        slot.require_ready(model)
        if not slot.generative:
            raise InvalidInputError(f"shadow target {model}:{version} is not a generative version")
        stream = slot.route.generate(request)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()

    async def _shadow_call(self, model: str, version: int, tensors: Tensors, strict: bool) -> Tensors:
        slot = self.versions.slot(model, version)
        if slot.dynamic and slot.state != "ready":
            await self.versions.warm(model, slot)
        slot.require_ready(model)
        outputs, _ = await slot.route.infer(tensors, strict)
        return outputs

    # ---- metadata and readiness -------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        """OIP server metadata (HTTP ``GET /v2``, gRPC ``ServerMetadata``)."""
        return {"name": "maas-ray", "version": __version__, "extensions": list(EXTENSIONS)}

    async def metadata(self, model: str, version: Optional[str]) -> dict[str, Any]:
        if self.versions.dynamic is not None:
            await self.versions.ensure(model, version)
        slots = self.versions.of(model)
        await self.versions.refresh_loading(model)
        if version is None:
            slot = self.versions.slot(model, self.versions.likely_version(model))
        else:
            slot = self.versions.pick(model, version, None)
        if slot.dynamic and slot.state != "ready":  # the schema comes from the loaded version
            await self.versions.warm(model, slot)
        manifest = slot.manifest
        return {
            "name": model,
            "versions": [str(v) for v in sorted(self.versions.servable(model))],
            "platform": "onnxruntime_onnx",
            "inputs": slot.describe.get("inputs", []),
            "outputs": slot.describe.get("outputs", []),
            "parameters": {
                "version": str(slot.number),
                "state": slot.state,
                **({"reason": slot.reason} if slot.reason else {}),
                "preprocessor": manifest.preprocessor.name if manifest else None,
                "postprocessor": manifest.postprocessor.name if manifest else None,
                "traffic": {str(k): w for k, w in self.versions.weights[model].items()},
                "states": {str(v): s.state for v, s in sorted(slots.items())},
            },
        }

    async def model_ready(self, model: str, version: Optional[str]) -> dict[str, Any]:
        """{"name", "ready", ...}; ready means: answers unpinned requests (or this version's)."""
        self.ensure_background()
        if self.versions.dynamic is not None:
            await self.versions.ensure(model, version)
        await self.versions.refresh_loading(model)
        if version is None:
            self.versions.of(model)
            return {"name": model, "ready": self.versions.routers[model] is not None}
        slot = self.versions.pick(model, version, None)
        out = {"name": model, "version": str(slot.number), "ready": slot.state == "ready"}
        if slot.reason:
            out["reason"] = slot.reason
        return out

    async def server_ready(self) -> bool:
        self.ensure_background()
        for model in list(self.versions.slots):
            await self.versions.refresh_loading(model)
        return all(router is not None for model, router in self.versions.routers.items()
                   if model not in self.versions.known)

    # ---- Triton's model repository extension ------------------------------------------
    async def index(self, ready: bool = False) -> list[dict[str, Any]]:
        """Every model version this app serves or can load, with its state (READY, LOADING,
        UNAVAILABLE) and reason; ``ready``: only the READY ones."""
        self.ensure_background()
        if self.versions.dynamic is not None and not self.versions.registry_models:
            await self.versions.refresh_dynamic()
        rows = self.versions.index()
        return [r for r in rows if r["state"] == "READY"] if ready else rows

    async def load(self, model: str) -> int:
        """Load a dynamic model's unpinned version into the pool (waits for it); its number."""
        self.ensure_background()
        return await self.versions.load(model)

    async def unload(self, model: str) -> list[int]:
        """Unload a dynamic model's versions from the pool; requests for it get 503 until a load."""
        self.ensure_background()
        return await self.versions.unload(model)
