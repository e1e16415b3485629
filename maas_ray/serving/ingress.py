"""The HTTP and Python entry point: OIP v2 + v1 routes, traffic split, errors as JSON."""


import json
import logging
import os
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from maas_ray.errors import (
    ConfigError,
    InvalidInputError,
    MaasError,
    ModelNotFoundError,
    VersionNotFoundError,
    unwrap_remote,
)
from maas_ray.registry import Manifest, Registry
from maas_ray.serving import protocol
from maas_ray.serving.config import AppArgs, ModelConfig
from maas_ray.serving.deployments import LocalPipeline
from maas_ray.serving.router import TrafficRouter

logger = logging.getLogger(__name__)
VERSION_HEADER = "x-model-version"
Tensors = dict[str, np.ndarray]


def _error_response(exc: BaseException) -> JSONResponse:
    exc = unwrap_remote(exc)
    if isinstance(exc, MaasError):
        return JSONResponse({"error": exc.message}, status_code=exc.status_code)
    logger.exception("unhandled error", exc_info=exc)
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


api = FastAPI(title="maas-ray", description="Open Inference Protocol v2 and v1 predict")
api.add_exception_handler(MaasError, lambda request, exc: _error_response(exc))
api.add_exception_handler(Exception, lambda request, exc: _error_response(exc))


class _Route:
    """How the ingress reaches one version: in process, one deployment, or three."""

    def __init__(self, local: Optional[LocalPipeline] = None, handles: Optional[dict[str, Any]] = None):
        self.local, self.handles = local, handles or {}

    async def infer(self, tensors: Tensors, strict: bool) -> Tensors:
        if self.local is not None:
            return await self.local.infer(tensors, strict)
        if "pre" in self.handles:  # split: chained responses pass through the object store
            feeds = self.handles["pre"].remote(tensors, strict)
            outputs = self.handles["infer"].run.remote(feeds)
            return await self.handles["post"].remote(outputs)
        return await self.handles["infer"].infer.remote(tensors, strict)

    async def describe(self) -> dict[str, Any]:
        if self.local is not None:
            return {"pid": os.getpid(), "provider": self.local.provider}
        return await self.handles["infer"].describe.remote()


@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        args: dict[str, Any],
        routes: dict[str, dict[int, dict[str, Any]]],
        resolved: dict[str, dict[str, int]],
    ) -> None:
        """``resolved``: per model, each configured version reference -> the number the builder
        resolved it to; reused here so the routes and the router can never disagree."""
        self.args = AppArgs.model_validate(args)
        registry = Registry(self.args.registry_root)
        self.configs: dict[str, ModelConfig] = {m.name: m for m in self.args.models}
        self.manifests: dict[str, dict[int, Manifest]] = {}
        self.aliases: dict[str, dict[str, int]] = {}
        self.routes: dict[str, dict[int, _Route]] = {}
        self.routers: dict[str, TrafficRouter] = {}
        for m in self.args.models:
            self.manifests[m.name] = {v: registry.describe(m.name, v) for v in routes[m.name]}
            self.aliases[m.name] = resolved[m.name]
            self.routes[m.name] = {
                int(v): _Route(LocalPipeline(self.args.registry_root, m, int(v))) if m.placement == "ingress"
                else _Route(handles=h)
                for v, h in routes[m.name].items()
            }
            self.routers[m.name] = TrafficRouter({self.aliases[m.name][str(v.version)]: v.weight for v in m.versions})
        self.key_header = self.args.request_key_header.lower()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """user_config: {"traffic": {model: {version: weight}}, "batching": {model: {...}}}."""
        for model, weights in (user_config.get("traffic") or {}).items():
            versions = self._versions(model)
            parsed: dict[int, float] = {}
            for ref, weight in weights.items():  # keys: version numbers or build-time aliases
                number = self._resolve(model, str(ref))
                if number not in versions:
                    raise ConfigError(
                        f"user_config.traffic.{model}: version {ref!r} is not deployed; deployed: {sorted(versions)}"
                    )
                if not isinstance(weight, (int, float)):
                    raise ConfigError(f"user_config.traffic.{model}.{ref}: weight must be a number, got {weight!r}")
                parsed[number] = float(weight)
            self.routers[model] = TrafficRouter(parsed)
            logger.info("traffic for %s is now %s", model, parsed)
        for model, batching in (user_config.get("batching") or {}).items():
            for route in self._versions(model).values():
                if route.local is not None:
                    route.local.reconfigure(batching)

    # ---- routing -------------------------------------------------------------------
    def _versions(self, model: str) -> dict[int, _Route]:
        if model not in self.routes:
            raise ModelNotFoundError(f"model {model!r} is not served here; models: {sorted(self.routes)}")
        return self.routes[model]

    def _resolve(self, model: str, ref: str) -> Optional[int]:
        """A version number or a build-time alias -> the version number (None if neither)."""
        return self.aliases[model].get(ref, int(ref) if ref.isdigit() else None)

    def _pick(self, model: str, version: Optional[str], key: Optional[str]) -> int:
        versions = self._versions(model)
        if version is None:
            return self.routers[model].choose(key)
        number = self._resolve(model, version)
        if number not in versions:
            raise VersionNotFoundError(
                f"model {model!r} has no served version {version!r}; served: {sorted(versions)}"
            )
        return number

    # ---- Python handle API ---------------------------------------------------------
    async def predict(
        self, model: str, inputs: dict[str, Any], version: Optional[str] = None, key: Optional[str] = None
    ) -> dict[str, Any]:
        """Handle entry point: returns the OIP v2 response body, as HTTP would."""
        if not isinstance(inputs, dict) or not inputs:
            raise InvalidInputError("inputs must be a non-empty dict of name -> array")
        tensors = {n: np.asarray(a) for n, a in inputs.items()}
        v = self._pick(model, None if version is None else str(version), key)
        outputs = await self.routes[model][v].infer(tensors, False)
        return protocol.encode_v2(model, v, outputs)

    async def replicas(self) -> dict[str, Any]:
        """Which process and onnxruntime provider serve each version (ops and tests)."""
        return {
            "ingress_pid": os.getpid(),
            "models": {m: {v: await r.describe() for v, r in rs.items()} for m, rs in self.routes.items()},
        }

    # ---- OIP v2 ---------------------------------------------------------------------
    @api.get("/v2/health/live")
    def live(self) -> dict:
        return {"live": True}

    @api.get("/v2/health/ready")
    def ready(self) -> dict:
        return {"ready": True}

    @api.get("/v2")
    def server_metadata(self) -> dict:
        from maas_ray import __version__

        return {"name": "maas-ray", "version": __version__, "extensions": ["binary_tensor_data"]}

    def _metadata(self, model: str, version: int) -> dict:
        m = self.manifests[model][version]
        return {
            "name": model,
            "versions": [str(v) for v in sorted(self._versions(model))],
            "platform": "onnxruntime_onnx",
            "inputs": [t.model_dump() for t in m.inputs],
            "outputs": [t.model_dump() for t in m.outputs],
            "parameters": {
                "version": str(version),
                "preprocessor": m.preprocessor.name,
                "postprocessor": m.postprocessor.name,
                "traffic": {str(k): w for k, w in self.routers[model].weights.items()},
            },
        }

    @api.get("/v2/models/{model}")
    def model_metadata(self, model: str) -> dict:
        return self._metadata(model, max(self._versions(model)))

    @api.get("/v2/models/{model}/versions/{version}")
    def version_metadata(self, model: str, version: str) -> dict:
        return self._metadata(model, self._pick(model, version, None))

    @api.get("/v2/models/{model}/ready")
    def model_ready(self, model: str) -> dict:
        self._versions(model)
        return {"name": model, "ready": True}

    @api.get("/v2/models/{model}/versions/{version}/ready")
    def version_ready(self, model: str, version: str) -> dict:
        return {"name": model, "version": str(self._pick(model, version, None)), "ready": True}

    async def _v2(self, request: Request, model: str, version: Optional[str]) -> Response:
        v = self._pick(model, version, request.headers.get(self.key_header))
        header = request.headers.get(protocol.BINARY_HEADER)
        if header is not None and not header.isdigit():
            raise InvalidInputError(f"{protocol.BINARY_HEADER} must be an integer, got {header!r}")
        tensors, meta = protocol.decode_v2(await request.body(), int(header) if header else None)
        outputs = await self.routes[model][v].infer(tensors, True)
        if meta["outputs"]:
            outputs = {n: a for n, a in outputs.items() if n in meta["outputs"]}
        body = protocol.encode_v2(model, v, outputs, meta["id"])
        return Response(json.dumps(body), media_type="application/json", headers={VERSION_HEADER: str(v)})

    @api.post("/v2/models/{model}/infer")
    async def infer(self, request: Request, model: str) -> Response:
        return await self._v2(request, model, None)

    @api.post("/v2/models/{model}/versions/{version}/infer")
    async def infer_version(self, request: Request, model: str, version: str) -> Response:
        return await self._v2(request, model, version)

    # ---- v1 (TF Serving / KServe v1) ------------------------------------------------
    async def _v1(self, request: Request, model: str, version: Optional[str]) -> Response:
        v = self._pick(model, version, request.headers.get(self.key_header))
        names = [t.name for t in self.manifests[model][v].inputs]
        tensors = protocol.decode_v1(await request.body(), names)
        outputs = await self.routes[model][v].infer(tensors, False)
        body = protocol.encode_v1(outputs)
        body["model_version"] = str(v)
        return Response(json.dumps(body), media_type="application/json", headers={VERSION_HEADER: str(v)})

    @api.post("/v1/models/{model}:predict")
    async def predict_v1(self, request: Request, model: str) -> Response:
        return await self._v1(request, model, None)

    @api.post("/v1/models/{model}/versions/{version}:predict")
    async def predict_v1_version(self, request: Request, model: str, version: str) -> Response:
        return await self._v1(request, model, version)
