"""The ingress deployment: traffic split, version pins, and the models' entry points.

:mod:`maas_ray.serving.http` maps the OIP v2 / v1 HTTP routes onto the methods here;
:meth:`Ingress.predict` is the Python handle API.
"""


import logging
import os
from typing import Any, Optional

import numpy as np
from ray import serve

from maas_ray.errors import (
    ConfigError,
    InvalidInputError,
    ModelNotFoundError,
    VersionNotFoundError,
)
from maas_ray.registry import Manifest, Registry
from maas_ray.serving import protocol
from maas_ray.serving.config import AppArgs
from maas_ray.serving.deployments import LocalPipeline
from maas_ray.serving.http import HttpApp, build_api
from maas_ray.serving.router import TrafficRouter

logger = logging.getLogger(__name__)
Tensors = dict[str, np.ndarray]


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
            return self.local.describe()
        return await self.handles["infer"].describe.remote()


@serve.ingress()  # the app is built per replica by __serve_build_asgi_app__
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

    # ---- HTTP (maas_ray.serving.http) ------------------------------------------------
    def __serve_build_asgi_app__(self) -> HttpApp:
        return HttpApp(self, build_api(self))

    def metadata(self, model: str, version: Optional[str]) -> dict:
        number = max(self._versions(model)) if version is None else self._pick(model, version, None)
        m = self.manifests[model][number]
        return {
            "name": model,
            "versions": [str(v) for v in sorted(self._versions(model))],
            "platform": "onnxruntime_onnx",
            "inputs": [t.model_dump() for t in m.inputs],
            "outputs": [t.model_dump() for t in m.outputs],
            "parameters": {
                "version": str(number),
                "preprocessor": m.preprocessor.name,
                "postprocessor": m.postprocessor.name,
                "traffic": {str(k): w for k, w in self.routers[model].weights.items()},
            },
        }

    def model_ready(self, model: str, version: Optional[str]) -> dict:
        if version is None:
            self._versions(model)
            return {"name": model, "ready": True}
        return {"name": model, "version": str(self._pick(model, version, None)), "ready": True}

    async def infer_v2(
        self, model: str, version: Optional[str], body: bytes, headers: dict[str, str]
    ) -> tuple[bytes, int]:
        """OIP v2 infer: request body and (lower-case) headers -> (JSON response body, version)."""
        v = self._pick(model, version, headers.get(self.key_header))
        header = headers.get(protocol.BINARY_HEADER)
        if header is not None and not header.isdigit():
            raise InvalidInputError(f"{protocol.BINARY_HEADER} must be an integer, got {header!r}")
        tensors, meta = protocol.decode_v2(body, int(header) if header else None)
        outputs = await self.routes[model][v].infer(tensors, True)
        if meta["outputs"]:
            outputs = {n: a for n, a in outputs.items() if n in meta["outputs"]}
        return protocol.dumps(protocol.encode_v2(model, v, outputs, meta["id"])), v

    async def infer_v1(
        self, model: str, version: Optional[str], body: bytes, headers: dict[str, str]
    ) -> tuple[bytes, int]:
        """v1 (TF Serving / KServe v1) ``:predict``: -> (JSON response body, version)."""
        v = self._pick(model, version, headers.get(self.key_header))
        names = [t.name for t in self.manifests[model][v].inputs]
        outputs = await self.routes[model][v].infer(protocol.decode_v1(body, names), False)
        response = protocol.encode_v1(outputs)
        response["model_version"] = str(v)
        return protocol.dumps(response), v
