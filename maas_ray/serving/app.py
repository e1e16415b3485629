"""``build_app(args) -> Application``: what ``serve run deployments/<app>.yaml`` imports.

Every Serve option comes from AppArgs; defaults below are sized for small CPU
boxes and merged under the user's options (as Ray Serve LLM's builders do).
"""

from __future__ import annotations

import logging
from typing import Any, Union

from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from maas_ray.errors import ConfigError, MaasError, format_validation_error
from maas_ray.registry import Registry
from maas_ray.serving.config import AppArgs, ModelConfig
from maas_ray.serving.generation import GenerativeServer, engine_config
from maas_ray.serving.ingress import Ingress
from maas_ray.serving.keys import KeyStore, resolve_auth
from maas_ray.serving.pool import ModelPool
from maas_ray.serving.pool_router import ROUTER_PATH
from maas_ray.serving.processors import resolve_processor
from maas_ray.serving.replicas import ModelServer, PostprocessServer, PreprocessServer

logger = logging.getLogger(__name__)

INGRESS_NAME = "Ingress"
POOL_NAME = "ModelPool"
DEFAULTS: dict[str, dict[str, Any]] = {
    "ingress": {"max_ongoing_requests": 512, "ray_actor_options": {"num_cpus": 0.25}},
    "inference": {"max_ongoing_requests": 512, "ray_actor_options": {"num_cpus": 1}},
    "preprocess": {"max_ongoing_requests": 512, "ray_actor_options": {"num_cpus": 0.25}},
    "postprocess": {"max_ongoing_requests": 512, "ray_actor_options": {"num_cpus": 0.25}},
    "pool": {"max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 1}},
}


def parse_args(args: Union[AppArgs, dict[str, Any]]) -> AppArgs:
    if isinstance(args, AppArgs):
        return args
    try:
        return AppArgs.model_validate(args)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "app args")) from exc


def _check_against_registry(args: AppArgs) -> dict[str, list[int]]:
    """Resolve every version/alias now, so a bad config fails at build time, not in a replica."""
    registry = Registry(args.registry_root)
    resolved = {}
    for i, m in enumerate(args.models):
        versions = []
        for j, v in enumerate(m.versions):
            try:
                number = registry.resolve(m.name, v.version)
            except MaasError as exc:
                raise ConfigError(f"app args: models.{i}.versions.{j}.version: {exc}") from exc
            manifest = registry.describe(m.name, number)
            if manifest.generation is not None:  # a decoder LM: no processors, the engine's knobs instead
                try:
                    engine_config(m)
                except ConfigError as exc:
                    raise ConfigError(f"app args: models.{i}.generation: {exc} (for {m.name}:{number})") from exc
                versions.append(number)
                continue
            for stage, spec in (
                ("preprocessor", m.preprocessor or manifest.preprocessor),
                ("postprocessor", m.postprocessor or manifest.postprocessor),
            ):
                try:  # a built-in name or a plug-in's import path (imported here, and in replicas)
                    resolve_processor(stage, spec.name)
                except ConfigError as exc:
                    raise ConfigError(f"app args: models.{i}.{stage}: {exc} (for {m.name}:{number})") from exc
            versions.append(number)
        if len(set(versions)) != len(versions):
            raise ConfigError(f"app args: models.{i}.versions: two entries resolve to the same version: {versions}")
        resolved[m.name] = versions
    return resolved


def _version_routes(args: AppArgs, m: ModelConfig, version: int, generative: bool = False) -> dict[str, Any]:
    common = dict(registry_root=args.registry_root, model=m.model_dump(mode="json"), version=version,
                  limits=args.limits.model_dump(), security=args.security.model_dump())
    batching = m.batching.model_dump()
    if m.placement == "ingress":
        return {}
    if generative:  # fused and split alike: the engine in a deployment of its own
        return {"infer": serve.deployment(GenerativeServer, name=f"{m.name}-v{version}",
                                          **_queue_bound(args, m.inference.serve_options(DEFAULTS["inference"])))
                .bind(**common)}
    infer = serve.deployment(ModelServer, name=f"{m.name}-v{version}", user_config=batching,
                             **_queue_bound(args, m.inference.serve_options(DEFAULTS["inference"]))).bind(**common)
    if m.placement == "fused":
        return {"infer": infer}
    return {
        "pre": serve.deployment(PreprocessServer, name=f"{m.name}-v{version}-pre",
                                **m.preprocess.serve_options(DEFAULTS["preprocess"])).bind(**common),
        "infer": infer,
        "post": serve.deployment(PostprocessServer, name=f"{m.name}-v{version}-post",
                                 **m.postprocess.serve_options(DEFAULTS["postprocess"])).bind(**common),
    }


def _queue_bound(args: AppArgs, options: dict[str, Any]) -> dict[str, Any]:
    """Bound the queue in front of a deployment: beyond it callers get 503 + Retry-After, not
    unbounded latency (Serve's max_queued_requests; an explicit deployment option wins)."""
    if args.limits.max_queued_requests is not None:
        options.setdefault("max_queued_requests", args.limits.max_queued_requests)
    return options


def build_app(args: Union[AppArgs, dict[str, Any]]) -> Application:
    """Build the Serve application for ``args`` (a dict from YAML, or AppArgs)."""
    args = parse_args(args)
    resolved = _check_against_registry(args)
    auth = resolve_auth(args.auth)  # cluster nodes switch keys on through MAAS_AUTH_*
    if auth.enabled:
        KeyStore.from_config(auth)  # an unreadable or malformed key file fails the build, not a replica
    registry = Registry(args.registry_root)
    generative = {(m.name, v) for m in args.models for v in resolved[m.name]
                  if registry.describe(m.name, v).generation is not None}
    routes = {m.name: {v: _version_routes(args, m, v, (m.name, v) in generative) for v in resolved[m.name]}
              for m in args.models}
    ingress_defaults = DEFAULTS["ingress"]
    if any(m.placement == "ingress" for m in args.models):  # the ingress runs the models too
        ingress_defaults = {**ingress_defaults, "ray_actor_options": {"num_cpus": 1}}
    ingress = serve.deployment(Ingress, name=INGRESS_NAME, user_config=args.ingress_user_config(),
                               **_queue_bound(args, args.ingress.serve_options(ingress_defaults)))
    pool = None
    if args.dynamic is not None:  # the registry's other models, loaded on demand (serving/pool.py)
        options = _queue_bound(args, args.dynamic.pool.serve_options(DEFAULTS["pool"]))
        options.setdefault("request_router_config", {"request_router_class": ROUTER_PATH})
        pool = serve.deployment(ModelPool, name=POOL_NAME, **options).bind(
            registry_root=args.registry_root, dynamic=args.dynamic.model_dump(mode="json"),
            limits=args.limits.model_dump(), security=args.security.model_dump())
        logger.info("built a model pool for registry models matching %s", args.dynamic.models)
    logger.info("built app for %s", {m: v for m, v in resolved.items()})
    refs = {m.name: {str(v.version): n for v, n in zip(m.versions, resolved[m.name])} for m in args.models}
    return ingress.bind(args=args.model_dump(mode="json"), routes=routes, resolved=refs, pool=pool)
