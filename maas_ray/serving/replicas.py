"""Per-version Serve deployments, and the in-process pipeline they share.

Placement (ModelConfig.placement) decides where the three stages run:

- ``split``:   Preprocess -> Inference -> Postprocess, three deployments that scale apart;
- ``fused``:   one ModelServer deployment runs pre, batched inference and post;
- ``ingress``: the ingress replica runs a LocalPipeline itself (no hops at all).

These are plain classes; :mod:`maas_ray.serving.app` turns them into deployments.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import os
import time
from typing import Any, Callable, Optional, Union

import numpy as np

from maas_ray.errors import ConfigError, InferenceError, IntegrityError, MaasError, ModelNotReadyError
from maas_ray.registry import ONNX_EXTERNAL_DATA, LoadedModel, Manifest, Registry
from maas_ray.serving.config import BatchingConfig, Limits, ModelConfig
from maas_ray.serving.metrics import ServingMetrics
from maas_ray.serving.processors import make_postprocessor, make_preprocessor
from maas_ray.serving.runner import BatchedRunner, OnnxRunner
from maas_ray.serving.types import RequestSchema

logger = logging.getLogger(__name__)
Tensors = dict[str, np.ndarray]
Timings = dict[str, float]  # seconds per stage: decode (+ preprocess), queue, inference, encode (+ postprocess)


def use_serve_logging() -> None:
    """In a Serve replica, write maas_ray's log lines through Serve's replica handlers.

    Serve's handlers stamp every record with the request id of the request being served
    (the ``x-request-id`` header, or the one Serve generated and returns), so each line
    a request causes carries the id the client got back. Outside a replica: no-op.
    """
    serve_logger = logging.getLogger("ray.serve")
    ours = logging.getLogger("maas_ray")
    if not serve_logger.handlers or ours.handlers:
        return
    for handler in serve_logger.handlers:
        ours.addHandler(handler)
    ours.setLevel(serve_logger.level)
    ours.propagate = False


def freeze_startup_objects() -> None:
    """Move everything a replica allocated while starting (Ray, Serve, onnxruntime, the
    loaded model) out of the garbage collector's reach.

    None of it is garbage, yet every full collection walks it: with ~64 requests in flight
    per replica, one such pause delays all of them. ``gc.freeze`` (CPython 3.7+) is made for
    long-lived processes. Measured on an ingress replica under load: the longest pause went
    from 80-168 ms to 13-20 ms (benchmarks/README.md).
    """
    gc.collect()
    gc.freeze()


def release_free_memory() -> float:
    """Give the pages the allocator holds free back to the OS (glibc ``malloc_trim``); returns the
    seconds it took (0 where it is not glibc).

    glibc keeps freed memory for reuse, and a long-lived replica's freed pages scatter: a model
    pool replica's resident memory grew to 1.1 GB under a 245 MiB budget of held versions, and an
    ingress serving 200 pool models from 220 MiB to ~600-800 MiB, with no growth in live Python
    objects; ``malloc_trim(0)`` brought the ingress back to ~290 MiB (benchmarks/README.md, the
    many-models round)."""
    import ctypes

    start = time.perf_counter()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        return 0.0
    return time.perf_counter() - start


def app_name() -> str:
    """The Serve application this replica belongs to (the metrics' ``app`` label)."""
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # not inside a replica (unit tests, scripts)
        return "maas"


def replica_cpus(default: int = 1) -> int:
    """CPUs Ray assigned to this replica (rounded up): the onnxruntime thread count."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    except Exception:  # not inside a Ray worker
        return default
    return max(1, math.ceil(cpus)) if cpus else default


# Extra files a serving replica does not read: torch weights are for fine-tuning only.
SKIP_ROLES = ("weights",)
# ...and preprocessors get neither the weights nor ONNX external data.
PROCESSOR_SKIP_ROLES = ("weights", ONNX_EXTERNAL_DATA)


def load_batched_runner(
    registry_root: Optional[str],
    model: ModelConfig,
    version: int,
    loaded: Optional[LoadedModel] = None,
    *,
    on_batch: Optional[Callable[[int], None]] = None,
) -> BatchedRunner:
    loaded = loaded or Registry(registry_root).load(model.name, version, skip_roles=SKIP_ROLES)  # checksums verified
    cores = replica_cpus()
    runner = OnnxRunner(
        loaded.manifest,
        loaded.model_bytes,
        device=model.device,
        intra_op_threads=model.intra_op_threads or cores,
        spinning=model.intra_op_spinning,
        # Weights in ONNX external data (> 2 GB) go to onnxruntime from memory, never to disk.
        external_data=loaded.external_data(),
    )
    runner.warm_up()
    return BatchedRunner(runner, model.batching, on_batch=on_batch, cores=cores)


def artifact_registry(registry_root: Optional[str], security: Optional[dict[str, Any]] = None) -> Registry:
    """The registry as this app may read it: ``security`` (AppArgs.security, as a dict) gives the
    KEK for encrypted versions and the keys a version must be signed by."""
    sec = security or {}
    return Registry(registry_root, kek_uri=sec.get("kek_uri"), trusted_signing_keys=sec.get("trusted_signing_keys"))


def _processor_files(loaded: LoadedModel) -> dict[str, bytes]:
    roles = {n: e.role for n, e in loaded.manifest.files.items()}
    return {n: b for n, b in loaded.files.items() if roles.get(n) not in PROCESSOR_SKIP_ROLES}


def _per_item(results: list) -> list:
    """Results of coalesced requests for the trip back: errors that are not ours become
    InferenceError (500), so that every one unpickles in the ingress as a MaasError."""
    return [
        InferenceError(f"{type(r).__name__}: {r}") if isinstance(r, Exception) and not isinstance(r, MaasError) else r
        for r in results
    ]


def _map_items(fn: Callable[[Any], Any], items: list) -> list:
    """Apply ``fn`` per item of a coalesced call; an item's error stays that item's, and an
    item that already failed upstream passes through."""
    out = []
    for item in items:
        if isinstance(item, BaseException):
            out.append(item)
            continue
        try:
            out.append(fn(item))
        except Exception as exc:  # noqa: BLE001 - one request's failure is its own answer
            out.append(exc)
    return _per_item(out)


class LocalPipeline:
    """pre -> batched inference -> post, all in this process, timed per stage."""

    def __init__(
        self,
        registry_root: Optional[str],
        model: ModelConfig,
        version: int,
        *,
        limits: Optional[Limits] = None,
        metrics: Optional[ServingMetrics] = None,
        security: Optional[dict[str, Any]] = None,
    ) -> None:
        on_batch = None
        if metrics is not None:
            on_batch = functools.partial(metrics.batch, model.name, version)
        loaded = artifact_registry(registry_root, security).load(model.name, version, skip_roles=SKIP_ROLES)
        self.batched = load_batched_runner(registry_root, model, version, loaded, on_batch=on_batch)
        manifest = self.batched.runner.manifest
        self.pre = make_preprocessor(manifest, model.preprocessor, limits=limits, files=_processor_files(loaded))
        self.post = make_postprocessor(manifest, model.postprocessor, limits=limits, files=_processor_files(loaded))
        self.schema = RequestSchema.of(self.pre, self.post)

    @property
    def provider(self) -> str:
        return self.batched.runner.provider

    def describe(self) -> dict[str, Any]:
        """Process, provider, state and the request/response schema of this version."""
        return {
            "pid": os.getpid(),
            "provider": self.provider,
            "state": "ready",
            "schema": self.schema,
            # OIP metadata: what a request sends and what the infer route returns (after
            # postprocessing), so a client can ask for an output by the name given here.
            "inputs": [{"name": i.name, "datatype": i.datatypes[0], "shape": list(i.shape)}
                       for i in self.pre.request_inputs],
            "outputs": [o.model_dump() for o in self.post.response_outputs],
        }

    def reconfigure(self, batching: dict[str, Any]) -> None:
        self.batched.set_batching(BatchingConfig.model_validate(batching))

    async def infer(self, tensors: Tensors, strict: bool) -> tuple[Tensors, Timings]:
        t0 = time.perf_counter()
        feeds = self.pre(tensors, strict_dtypes=strict)
        t1 = time.perf_counter()
        outputs, run_s = await self.batched.infer(feeds)
        t2 = time.perf_counter()
        result = self.post(outputs)
        t3 = time.perf_counter()
        return result, {"decode": t1 - t0, "queue": max(0.0, t2 - t1 - run_s), "inference": run_s, "encode": t3 - t2}

    async def infer_many(self, items: list[tuple[Tensors, bool]]) -> list:
        """The requests of one coalesced handle call: each preprocessed, all run as one entry of the
        batch queue, each postprocessed. One (outputs, timings) or exception per request: an
        item's error stays that item's."""
        out: list = [None] * len(items)
        feeds, where, pre_s = [], [], []
        for i, (tensors, strict) in enumerate(items):
            t0 = time.perf_counter()
            try:
                feeds.append(self.pre(tensors, strict_dtypes=strict))
            except Exception as exc:  # noqa: BLE001 - one request's failure is its own answer
                out[i] = exc
                continue
            where.append(i)
            pre_s.append(time.perf_counter() - t0)
        if not feeds:
            return out
        t1 = time.perf_counter()
        try:
            ran = await self.batched.infer_many(feeds)
        except Exception as exc:  # noqa: BLE001 - the whole batch failed: each of its requests says so
            for i in where:
                out[i] = exc
            return out
        waited = time.perf_counter() - t1
        for i, decode_s, (outputs, run_s) in zip(where, pre_s, ran):
            if isinstance(outputs, BaseException):
                out[i] = outputs
                continue
            t2 = time.perf_counter()
            try:
                result = self.post(outputs)
            except Exception as exc:  # noqa: BLE001
                out[i] = exc
                continue
            out[i] = (result, {"decode": decode_s, "queue": max(0.0, waited - run_s), "inference": run_s,
                               "encode": time.perf_counter() - t2})
        return out


class VersionServer:
    """The start every per-version deployment shares (classifier and generative): its label and
    metrics, and the version loaded by :meth:`_load`.

    A version that fails to load (checksum mismatch, broken graph) keeps its replica up and
    reports ``failed`` with the reason: restarting would fail the same way, and the ingress
    routes no traffic to it while the other versions keep serving.
    """

    def __init__(
        self, registry_root: Optional[str], model: dict[str, Any], version: int, limits: Optional[dict] = None,
        security: Optional[dict[str, Any]] = None,
    ) -> None:
        use_serve_logging()
        cfg = ModelConfig.model_validate(model)
        self.label = f"{cfg.name}:{version}"
        self.metrics = ServingMetrics(app=app_name(), models=[cfg.name])
        self.metrics.start()
        self.pipeline: Any = None
        self.reason: Optional[str] = None
        try:
            self.pipeline = self._load(registry_root, cfg, version, limits, security)
        except Exception as exc:
            self.reason = f"{type(exc).__name__}: {exc}"
            logger.error("%s failed to load: %s", self.label, self.reason)
        self.metrics.version_state(cfg.name, version, "ready" if self.pipeline else "failed")
        freeze_startup_objects()

    def _load(self, registry_root: Optional[str], cfg: ModelConfig, version: int, limits: Optional[dict],
              security: Optional[dict[str, Any]]) -> Any:
        raise NotImplementedError

    def _ready(self) -> Any:
        if self.pipeline is None:
            raise ModelNotReadyError(f"{self.label} failed to load: {self.reason}", 5.0)
        return self.pipeline


class ModelServer(VersionServer):
    """Deployment for ``fused`` placement (pre+infer+post) and ``split`` inference (infer only)."""

    def _load(self, registry_root: Optional[str], cfg: ModelConfig, version: int, limits: Optional[dict],
              security: Optional[dict[str, Any]]) -> LocalPipeline:
        return LocalPipeline(registry_root, cfg, version,
                             limits=None if limits is None else Limits.model_validate(limits),
                             metrics=self.metrics, security=security)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        if self.pipeline is not None:
            self.pipeline.reconfigure(user_config)

    async def infer_many(self, items: list[tuple[Tensors, bool]]) -> list:
        """Requests the ingress coalesced into one handle call: they join this replica's batch
        queue together. One result per request: (outputs, timings), or its error."""
        return _per_item(await self._ready().infer_many(items))

    async def run_many(self, feeds: list) -> list:
        """``split``: the inference stage of coalesced requests (an item may be an upstream error)."""
        batched = self._ready().batched
        out = list(feeds)
        where = [i for i, f in enumerate(feeds) if not isinstance(f, BaseException)]
        if where:
            try:
                ran = await batched.infer_many([feeds[i] for i in where])
            except Exception as exc:  # noqa: BLE001 - the whole batch failed: each of its requests says so
                ran = [(exc, 0.0)] * len(where)
            for i, (outputs, _) in zip(where, ran):
                out[i] = outputs
        return _per_item(out)

    def describe(self) -> dict[str, Any]:
        if self.pipeline is None:
            return {"pid": os.getpid(), "state": "failed", "reason": self.reason}
        return self.pipeline.describe()


def _processor_inputs(
    registry_root: Optional[str], model: str, version: int, security: Optional[dict[str, Any]] = None
) -> tuple[Manifest, dict[str, bytes]]:
    """A split stage's manifest and the version's files its processor may read (checksummed)."""
    reg = artifact_registry(registry_root, security)
    manifest = reg.describe(model, version)
    files = {n: reg.read_file(model, version, n)
             for n, e in manifest.files.items() if e.role not in PROCESSOR_SKIP_ROLES}
    return manifest, files


def _stage_inputs(
    registry_root: Optional[str], model: str, version: int, security: Optional[dict[str, Any]]
) -> Union[tuple[Manifest, dict[str, bytes]], ModelNotReadyError]:
    """:func:`_processor_inputs`, or the error every request gets when the version's files do not
    open (a wrong KEK, a bad signature, a damaged file): the stage stays up, as ModelServer does,
    and its inference stage reports the version ``failed``, so the ingress sends it nothing."""
    try:
        return _processor_inputs(registry_root, model, version, security)
    except (IntegrityError, ConfigError) as exc:
        logger.error("%s:%d failed to load: %s", model, version, exc)
        return ModelNotReadyError(f"{model}:{version} failed to load: {type(exc).__name__}: {exc}", 5.0)


class PreprocessServer:
    """Deployment for the ``split`` preprocess stage (CPU work that scales apart)."""

    def __init__(
        self, registry_root: Optional[str], model: dict[str, Any], version: int, limits: Optional[dict] = None,
        security: Optional[dict[str, Any]] = None,
    ) -> None:
        cfg = ModelConfig.model_validate(model)
        self.pre = None
        inputs = _stage_inputs(registry_root, cfg.name, version, security)
        if isinstance(inputs, ModelNotReadyError):
            self.failed = inputs
            return
        self.pre = make_preprocessor(
            inputs[0], cfg.preprocessor, limits=None if limits is None else Limits.model_validate(limits), files=inputs[1],
        )

    def many(self, items: list[tuple[Tensors, bool]]) -> list:
        if self.pre is None:
            return [self.failed] * len(items)
        return _map_items(lambda item: self.pre(item[0], strict_dtypes=item[1]), items)


class PostprocessServer:
    """Deployment for the ``split`` postprocess stage."""

    def __init__(
        self, registry_root: Optional[str], model: dict[str, Any], version: int, limits: Optional[dict] = None,
        security: Optional[dict[str, Any]] = None,
    ) -> None:
        cfg = ModelConfig.model_validate(model)
        self.post = None
        inputs = _stage_inputs(registry_root, cfg.name, version, security)
        if isinstance(inputs, ModelNotReadyError):
            self.failed = inputs
            return
        self.post = make_postprocessor(
            inputs[0], cfg.postprocessor, limits=None if limits is None else Limits.model_validate(limits),
            files=inputs[1],
        )

    def many(self, outputs: list) -> list:
        if self.post is None:
            return [self.failed] * len(outputs)
        return _map_items(self.post, outputs)
