"""The ingress replica's HTTP surface (an ASGI app): OIP v2 and v1 routes over :class:`Ingress`.

The infer routes are the hot path, so they are plain ASGI: a compiled pattern picks the
route, the body is read once and the JSON response is written in two messages. On a tiny
model FastAPI's routing, dependency solving and middleware stack cost more CPU than
decoding, inference and encoding together (py-spy, benchmarks/README.md). Every other
route (health, metadata, readiness) is cold and stays on FastAPI.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, Callable, Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from maas_ray.errors import MaasError, unwrap_remote
from maas_ray.serving import protocol

if TYPE_CHECKING:
    from maas_ray.serving.ingress import Ingress

logger = logging.getLogger(__name__)

VERSION_HEADER = "x-model-version"
# (protocol, pattern) for the infer routes; groups: model, optional version.
INFER_ROUTES = (
    ("v2", re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")),
    ("v1", re.compile(r"/v1/models/([^/:]+)(?:/versions/([^/:]+))?:predict")),
)
_JSON_HEADERS = [(b"content-type", b"application/json")]


def error_body(exc: BaseException) -> tuple[int, dict[str, str]]:
    """(status, JSON body) for an error: our own errors carry their status; others are 500s."""
    exc = unwrap_remote(exc)
    if isinstance(exc, MaasError):
        return exc.status_code, {"error": exc.message}
    logger.exception("unhandled error", exc_info=exc)
    return 500, {"error": f"internal error: {type(exc).__name__}: {exc}"}


def _error_response(exc: BaseException) -> JSONResponse:
    status, body = error_body(exc)
    return JSONResponse(body, status_code=status)


def build_api(ingress: "Ingress") -> FastAPI:
    """FastAPI for the cold routes: health, server and model metadata, readiness."""
    from maas_ray import __version__

    api = FastAPI(title="maas-ray", description="Open Inference Protocol v2 and v1 predict")
    api.add_exception_handler(MaasError, lambda request, exc: _error_response(exc))
    api.add_exception_handler(Exception, lambda request, exc: _error_response(exc))

    @api.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready() -> dict:
        return {"ready": True}

    @api.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "maas-ray", "version": __version__, "extensions": ["binary_tensor_data"]}

    @api.get("/v2/models/{model}")
    async def model_metadata(model: str) -> dict:
        return ingress.metadata(model, None)

    @api.get("/v2/models/{model}/versions/{version}")
    async def version_metadata(model: str, version: str) -> dict:
        return ingress.metadata(model, version)

    @api.get("/v2/models/{model}/ready")
    async def model_ready(model: str) -> dict:
        return ingress.model_ready(model, None)

    @api.get("/v2/models/{model}/versions/{version}/ready")
    async def version_ready(model: str, version: str) -> dict:
        return ingress.model_ready(model, version)

    return api


class HttpApp:
    """ASGI app: infer routes on the lean path, everything else (and lifespan) to FastAPI."""

    def __init__(self, ingress: "Ingress", api: FastAPI) -> None:
        self.ingress, self.api = ingress, api
        # Exception handlers Serve registers (BackPressureError -> 503, ...) apply here too.
        self.handlers: dict[type, Callable] = {}

    def add_exception_handler(self, exc_class: type, handler: Callable) -> None:
        self.handlers[exc_class] = handler
        self.api.add_exception_handler(exc_class, handler)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            path, root = scope["path"], scope.get("root_path", "")
            if root and path.startswith(root):  # mounted under a route_prefix
                path = path[len(root):]
            for route, pattern in INFER_ROUTES:
                match = pattern.fullmatch(path)
                if match is None:
                    continue
                if scope["method"] != "POST":
                    body = protocol.dumps({"error": f"method {scope['method']} is not allowed here; use POST"})
                    await _send_json(send, 405, body, [(b"allow", b"POST")])
                else:
                    await self._infer(route, match.group(1), match.group(2), scope, receive, send)
                return
        await self.api(scope, receive, send)

    async def _infer(
        self, route: str, model: str, version: Optional[str], scope: dict, receive: Callable, send: Callable
    ) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            if route == "v2":
                payload, number = await self.ingress.infer_v2(model, version, body, headers)
            else:
                payload, number = await self.ingress.infer_v1(model, version, body, headers)
        except Exception as exc:
            await self._send_error(exc, scope, receive, send)
            return
        await _send_json(send, 200, payload, [(VERSION_HEADER.encode(), str(number).encode())])

    async def _send_error(self, exc: Exception, scope: dict, receive: Callable, send: Callable) -> None:
        for exc_class, handler in self.handlers.items():
            if isinstance(exc, exc_class):
                response = handler(None, exc)  # Serve's own (e.g. backpressure -> 503)
                await response(scope, receive, send)
                return
        status, body = error_body(exc)
        await _send_json(send, status, protocol.dumps(body))


async def _send_json(send: Callable, status: int, payload: bytes, extra: Optional[list] = None) -> None:
    headers: list[Any] = [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
