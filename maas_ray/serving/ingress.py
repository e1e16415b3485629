"""The ingress Serve deployment: the composition root of an ingress replica.

It builds one :class:`~maas_ray.serving.core.IngressCore` (admission, versions, traffic,
shadow, metrics: no transport) and puts every transport in front of it:

- HTTP (OIP v2, v1, health, metadata, OpenAPI): :mod:`maas_ray.serving.http`, the ASGI app
  Serve builds per replica;
- gRPC (OIP v2 ``inference.GRPCInferenceService``): :mod:`maas_ray.serving.grpc`, and its
  streaming ``ModelStreamInfer`` for generative versions: :mod:`maas_ray.serving.grpc_generate`;
  Serve's gRPC proxy calls the deployment method named like the RPC, so each RPC is forwarded below;
- Python handles (``MaasClient``, other Ray jobs): :mod:`maas_ray.serving.handle`.

Nothing else lives here: what a request does is in the core, how it is spelled on the wire
in the transports and :mod:`maas_ray.serving.codecs`.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Optional

from maas_ray.serving import handle
from maas_ray.serving.compat import asgi_ingress
from maas_ray.serving.config import AppArgs
from maas_ray.serving.core import IngressCore
from maas_ray.serving.grpc import GrpcService
from maas_ray.serving.grpc_generate import GrpcGenerateService
from maas_ray.serving.http import HttpApp, build_api
from maas_ray.serving.replicas import freeze_startup_objects, use_serve_logging
from maas_ray.serving.types import GenerateRequest, GenerationChunk


@asgi_ingress(lambda self: HttpApp(self.core, build_api(self.core)))
class Ingress:
    def __init__(
        self,
        args: dict[str, Any],
        routes: dict[str, dict[int, dict[str, Any]]],
        resolved: dict[str, dict[str, int]],
        pool: Any = None,
    ) -> None:
        """``routes``: per model, version -> handles of its deployments; ``resolved``: per model,
        each configured version reference -> the number the builder resolved it to; ``pool``: the
        model pool's handle (``dynamic`` apps)."""
        use_serve_logging()
        self.core = IngressCore(AppArgs.model_validate(args), routes, resolved, pool=pool)
        self.grpc = GrpcService(self.core)
        self.grpc_generate = GrpcGenerateService(self.core)
        freeze_startup_objects()

    # ---- Serve's lifecycle hooks ------------------------------------------------------
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.core.reconfigure(user_config)

    async def check_health(self) -> None:
        self.core.check_health()

    # ---- Python handle API ------------------------------------------------------------
    async def predict(
        self, model: str, inputs: dict[str, Any], version: Optional[str] = None, key: Optional[str] = None
    ) -> dict[str, Any]:
        """Returns the OIP v2 response body, as HTTP would."""
        return await handle.predict(self.core, model, inputs, version, key)

    async def generate(
        self, model: str, request: GenerateRequest, version: Optional[str] = None, key: Optional[str] = None
    ) -> AsyncIterator[GenerationChunk]:
        """Streaming (``handle.options(stream=True).generate``): the chunks of one generation."""
        async for chunk in handle.generate(self.core, model, request, version, key):
            yield chunk

    async def generation_stats(self) -> dict[str, Any]:
        """Per generative model and version: its engine's stats (running, waiting, KV use, ...)."""
        return await self.core.generation_stats()

    async def current_config(self, model: Optional[str] = None) -> dict[str, Any]:
        return self.core.current_config(model)

    async def replicas(self) -> dict[str, Any]:
        return self.core.replicas()

    # ---- gRPC: Serve's proxy calls the method named like the RPC -----------------------
    async def ServerLive(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 - RPC names
        return await self.grpc.ServerLive(request, grpc_context)

    async def ServerReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.grpc.ServerReady(request, grpc_context)

    async def ServerMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.grpc.ServerMetadata(request, grpc_context)

    async def ModelReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.grpc.ModelReady(request, grpc_context)

    async def ModelMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.grpc.ModelMetadata(request, grpc_context)

    async def ModelInfer(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.grpc.ModelInfer(request, grpc_context)

    async def ModelStreamInfer(self, requests: Any, grpc_context: Any = None) -> AsyncIterator[Any]:  # noqa: N802
        """Bidi streaming: Serve passes the client's request messages as an async iterator."""
        async for response in self.grpc_generate.stream(requests, grpc_context):
            yield response

    async def RepositoryIndex(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.grpc.RepositoryIndex(request, grpc_context)

    async def RepositoryModelLoad(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.grpc.RepositoryModelLoad(request, grpc_context)

    async def RepositoryModelUnload(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.grpc.RepositoryModelUnload(request, grpc_context)
