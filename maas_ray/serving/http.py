"""The HTTP transport (an ASGI app per ingress replica): OIP v2 and v1 routes over an
:class:`~maas_ray.serving.core.InferenceService`.

The infer routes are the hot path, so they are plain ASGI: a compiled pattern picks the
route, the body is read once (bounded by ``limits.max_body_bytes``) and the JSON response is
written in two messages. On a tiny model FastAPI's routing, dependency solving and middleware
stack cost more CPU than decoding, inference and encoding together (py-spy,
benchmarks/README.md). Every other route (health, metadata, readiness, the OpenAPI document)
is cold and stays on FastAPI, whose own errors (unknown path, wrong method, bad path
parameter) are answered as ``{"error": ...}`` like everything else.

Order on an infer route: API key and rate limit (no body read yet) -> Content-Length
against the body limit -> read (counting, for chunked bodies) -> pick the version -> decode
and validate against its schema (:mod:`maas_ray.serving.codecs`) -> inference -> encode.
The whole request runs under ``limits.request_timeout_s`` (504).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any, Callable, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from maas_ray.errors import (
    InvalidInputError,
    MaasError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
)
from maas_ray.registry.manifest import OIP_TO_NUMPY
from maas_ray.serving.codecs import v1, v2
from maas_ray.serving.codecs.common import BINARY_HEADER, dumps, parse_json
from maas_ray.serving.core import InferenceService
from maas_ray.serving.http_generate import GenerativeRoutes
from maas_ray.serving.keys import extract_key
from maas_ray.serving.status import answer_error

logger = logging.getLogger(__name__)

VERSION_HEADER = "x-model-version"
REQUEST_ID_HEADER = "x-request-id"
# (protocol, pattern) for the infer routes; groups: model, optional version.
INFER_ROUTES = (
    ("http_v2", re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")),
    ("http_v1", re.compile(r"/v1/models/([^/:]+)(?:/versions/([^/:]+))?:predict")),
)
_JSON = (b"content-type", b"application/json")
_OCTETS = (b"content-type", b"application/octet-stream")

def _json_error(exc: BaseException) -> JSONResponse:
    answer = answer_error(exc)
    return JSONResponse(answer.body, status_code=answer.status,
                        headers={k.decode(): v.decode() for k, v in answer.headers})


# ---- OpenAPI request models of the infer routes (documentation and fuzzing) -------------
Scalar = Union[str, int, float, bool]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InferInputTensor(_Strict):
    name: str = Field(description="Input name, as in the model metadata.")
    shape: list[int] = Field(description="Dimensions (non-negative integers).")
    datatype: Literal[tuple(OIP_TO_NUMPY)] = Field(description="OIP v2 datatype.")  # type: ignore[valid-type]
    parameters: Optional[dict[str, Scalar]] = Field(default=None, description="e.g. binary_data_size.")
    data: Optional[list[Any]] = Field(default=None, description="Flat or nested as the shape; row-major.")


class InferRequestedOutput(_Strict):
    name: str = Field(description="Output name, as in the model metadata.")
    parameters: Optional[dict[str, Scalar]] = Field(default=None, description="binary_data: true for raw bytes.")


class InferenceRequest(_Strict):
    """Open Inference Protocol v2 infer request."""

    id: Optional[str] = Field(default=None, description="Echoed in the response.")
    parameters: Optional[dict[str, Scalar]] = Field(default=None, description="binary_data_output, ...")
    inputs: list[InferInputTensor] = Field(description="Input tensors.")
    outputs: Optional[list[InferRequestedOutput]] = Field(default=None, description="Outputs wanted (default: all).")


class PredictRequest(BaseModel):
    """TF Serving / KServe v1 predict request: row (instances) or columnar (inputs) format."""

    instances: Optional[list[Any]] = Field(default=None, description="One item per row; {\"b64\": ...} for binary.")
    inputs: Optional[Any] = Field(default=None, description="Columnar form.")


class ErrorBody(BaseModel):
    error: str


_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 405, 413, 429, 503, 504)}


def build_api(ingress: InferenceService) -> FastAPI:
    """FastAPI for the cold routes: health, server and model metadata, readiness, repository index.

    The infer routes are declared too, so that ``/openapi.json`` documents the whole
    surface; :class:`HttpApp` answers them on its lean path before FastAPI sees them.
    """
    from maas_ray._version import __version__

    api = FastAPI(
        title="maas-ray", version=__version__, redirect_slashes=False,
        description="Open Inference Protocol v2 (KServe/Triton REST) and v1 predict. Every error is "
        '{"error": "..."}. With API keys on, send `authorization: Bearer <key>` or `x-api-key`.',
    )
    api.add_exception_handler(MaasError, lambda request, exc: _json_error(exc))
    api.add_exception_handler(
        RequestValidationError,
        lambda request, exc: _json_error(InvalidInputError(f"bad request: {exc.errors()[0]['msg']}")),
    )

    def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            return _json_error(MethodNotAllowedError(f"method {request.method} is not allowed on {request.url.path}"))
        if exc.status_code == 404:
            return _json_error(NotFoundError(f"no route {request.url.path}; see /openapi.json"))
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(Exception, lambda request, exc: _json_error(exc))

    def admit(request: Request, model: Optional[str] = None, *, admin: bool = False) -> None:
        headers = {k.lower(): v for k, v in request.headers.items()}
        client = request.client.host if request.client else "-"
        ingress.admit(extract_key(headers), client, model, admin=admin)

    @api.get("/v2/health/live", responses=_ERRORS)
    async def live() -> dict:
        return {"live": True}

    @api.get("/v2/health/ready", responses=_ERRORS)
    async def ready() -> JSONResponse:
        ok = await ingress.server_ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503, headers={} if ok else {"retry-after": "5"})

    @api.get("/v2", responses=_ERRORS)
    async def server_metadata(request: Request) -> dict:
        admit(request)
        return ingress.server_metadata()

    @api.get("/v2/models/{model}", responses=_ERRORS)
    async def model_metadata(model: str, request: Request) -> dict:
        admit(request, model)
        return await ingress.metadata(model, None)

    @api.get("/v2/models/{model}/versions/{version}", responses=_ERRORS)
    async def version_metadata(model: str, version: str, request: Request) -> dict:
        admit(request, model)
        return await ingress.metadata(model, version)

    @api.get("/v2/models/{model}/ready", responses=_ERRORS)
    async def model_ready(model: str, request: Request) -> JSONResponse:
        admit(request, model)
        body = await ingress.model_ready(model, None)
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @api.get("/v2/models/{model}/versions/{version}/ready", responses=_ERRORS)
    async def version_ready(model: str, version: str, request: Request) -> JSONResponse:
        admit(request, model)
        body = await ingress.model_ready(model, version)
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    async def _body(request: Request) -> dict:
        """A repository request's optional JSON object body (Triton's clients send one or none)."""
        raw = await request.body()
        if not raw.strip():
            return {}
        body = parse_json(raw)  # 400 for malformed or too deeply nested JSON
        if not isinstance(body, dict):
            raise InvalidInputError(f"request body: expected a JSON object, got {type(body).__name__}")
        return body

    @api.post("/v2/repository/index", responses=_ERRORS)
    async def repository_index(request: Request) -> list:
        """Triton's repository index: every model version this app serves or can load, with its state
        (READY, LOADING, UNAVAILABLE) and reason; body ``{"ready": true}``: only the READY ones."""
        admit(request, admin=True)
        ready = (await _body(request)).get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInputError(f"ready: expected true or false, got {ready!r}")
        return await ingress.index(ready)

    @api.post("/v2/repository/models/{model}/load", responses=_ERRORS)
    async def repository_load(model: str, request: Request) -> dict:
        """Load a dynamic model's unpinned version into the model pool (returns when it is READY)."""
        admit(request, model, admin=True)
        await _body(request)
        return {"name": model, "version": str(await ingress.load(model))}

    @api.post("/v2/repository/models/{model}/unload", responses=_ERRORS)
    async def repository_unload(model: str, request: Request) -> dict:
        """Unload a dynamic model from the model pool; its requests get 503 until it is loaded again."""
        admit(request, model, admin=True)
        await _body(request)
        return {"name": model, "unloaded": [str(v) for v in await ingress.unload(model)]}

    # Documentation only: HttpApp serves these on the lean path (see the module docstring).
    @api.post("/v2/models/{model}/infer", responses=_ERRORS, include_in_schema=True)
    async def infer_v2(model: str, body: InferenceRequest) -> dict:  # pragma: no cover
        raise MethodNotAllowedError("served by the lean path")

    @api.post("/v2/models/{model}/versions/{version}/infer", responses=_ERRORS)
    async def infer_v2_version(model: str, version: str, body: InferenceRequest) -> dict:  # pragma: no cover
        raise MethodNotAllowedError("served by the lean path")

    @api.post("/v1/models/{model}:predict", responses=_ERRORS)
    async def predict_v1(model: str, body: PredictRequest) -> dict:  # pragma: no cover
        raise MethodNotAllowedError("served by the lean path")

    def openapi() -> dict:
        """FastAPI's document, with the served model names as the ``model`` parameter's enum
        (clients and fuzzers then reach real models; other names still get a JSON 404)."""
        if api.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
            models = ingress.model_names
            for item in doc["paths"].values():
                for op in item.values():
                    for param in op.get("parameters", []):
                        if param.get("in") == "path" and param.get("name") == "model":
                            param["schema"] = {"type": "string", "enum": models, "title": "Model"}
            api.openapi_schema = doc
        return api.openapi_schema

    api.openapi = openapi
    return api


class HttpApp:
    """ASGI app: infer routes on the lean path, everything else (and lifespan) to FastAPI."""

    def __init__(self, ingress: InferenceService, api: FastAPI) -> None:
        self.ingress, self.api = ingress, api
        self.limits = ingress.limits
        self.max_body = ingress.limits.max_body_bytes
        # Serve registers its exception handlers here; we map its errors ourselves
        # (error_body), so that the lean path answers JSON like every other route.
        self.handlers: dict[type, Callable] = {}
        # /v1/completions, /v1/chat/completions, /v1/models, /v2/models/{m}/generate[_stream]
        self.generative = GenerativeRoutes(ingress, self._read_body)

    def add_exception_handler(self, exc_class: type, handler: Callable) -> None:
        self.handlers[exc_class] = handler

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
                    body = dumps({"error": f"method {scope['method']} is not allowed on {path}; use POST"})
                    await _send(send, 405, body, [(b"allow", b"POST")])
                else:
                    await self._infer(route, match.group(1), match.group(2), scope, receive, send)
                return
            if await self.generative.dispatch(path, scope, receive, send):
                return
        await self.api(scope, receive, send)

    async def _infer(
        self, route: str, model: str, version: Optional[str], scope: dict, receive: Callable, send: Callable
    ) -> None:
        start = time.perf_counter()
        ingress = self.ingress
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        # Serve's RequestIdMiddleware (proxy and direct ingress alike) puts x-request-id in the
        # scope, yours or a generated one, and returns it on the response; its log lines carry it.
        request_id = headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        ingress.metrics.request_started(model)
        extra: list = []
        task = ingress.deadlines.enter()  # the whole request, body read included, is under the timeout
        try:
            answer = await self._answer(route, model, version, scope, headers, receive, request_id)
        except asyncio.CancelledError:
            if not ingress.deadlines.exit(task):  # the client went away or the replica is stopping
                ingress.metrics.request_finished(model, None, route, 499, "ClientDisconnected",
                                                 time.perf_counter() - start)
                raise
            timeout = RequestTimeoutError(
                f"request not answered within limits.request_timeout_s={self.limits.request_timeout_s}")
            await self._error(timeout, model, None, route, start, extra, send, request_id)
            return
        except Exception as exc:
            ingress.deadlines.exit(task)
            await self._error(exc, model, None, route, start, extra, send, request_id)
            return
        ingress.deadlines.exit(task)
        if answer is None:  # the client went away before sending its body
            ingress.metrics.request_finished(model, None, route, 499, "ClientDisconnected", time.perf_counter() - start)
            return
        result, payload, header_length = answer
        extra.append((VERSION_HEADER.encode(), str(result.version).encode()))
        if header_length is None:
            await _send(send, 200, payload, extra)
        else:  # binary tensor extension: JSON header of this length, then raw output bytes
            extra.append((BINARY_HEADER.encode(), str(header_length).encode()))
            await _send(send, 200, payload, extra, content_type=_OCTETS)
        ingress.metrics.request_finished(model, result.version, route, 200, None, time.perf_counter() - start,
                                         result.stages)
        if result.after_response is not None:  # the shadow call starts once the caller has its answer
            result.after_response()

    async def _answer(
        self, route: str, model: str, version: Optional[str], scope: dict, headers: dict[str, str], receive: Callable,
        request_id: Optional[str] = None,
    ) -> Optional[tuple[Any, bytes, Optional[int]]]:
        """Admission, body, decode + inference, encode -> (result, payload, binary header length)."""
        ingress = self.ingress
        client = scope["client"][0] if scope.get("client") else "-"
        ingress.admit(extract_key(headers), client, model)
        body = await self._read_body(headers, receive)
        if body is None:
            return None
        slot = await ingress.pick(model, version, headers.get(ingress.key_header))
        if slot.schema is None:  # a generative version: its routes are elsewhere
            raise ingress.wrong_route(model, slot)
        t0 = time.perf_counter()
        if route == "http_v2":
            request = v2.decode_v2(body, headers.get(BINARY_HEADER), slot.schema, self.limits)
            tensors = request.tensors
        else:
            tensors = v1.decode_v1(body, slot.schema, self.limits)
        result = await ingress.run(model, slot, tensors, route == "http_v2", time.perf_counter() - t0,
                                   request_id=request_id, protocol=route)
        t0 = time.perf_counter()
        if route == "http_v2":
            payload, header_length = v2.encode_v2(model, result.version, result.outputs, request)
        else:
            payload, header_length = v1.encode_v1(result.outputs, result.version), None
        result.stages["encode"] = result.stages.get("encode", 0.0) + time.perf_counter() - t0
        return result, payload, header_length

    async def _read_body(self, headers: dict[str, str], receive: Callable) -> Optional[bytes]:
        """The body, or None if the client disconnected; 413 before reading when Content-Length
        is over the limit, and while reading a chunked body as soon as it passes it."""
        declared = headers.get("content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()) or len(declared) > 18:
                raise InvalidInputError(f"content-length must be a decimal integer, got {declared[:32]!r}")
            if int(declared) > self.max_body:
                raise PayloadTooLargeError(
                    f"request body of {int(declared)} bytes is over limits.max_body_bytes={self.max_body}")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise PayloadTooLargeError(f"request body is over limits.max_body_bytes={self.max_body}")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _error(
        self, exc: BaseException, model: str, number: Optional[int], route: str, start: float,
        extra: list, send: Callable, request_id: str,
    ) -> None:
        answer = answer_error(exc, request_id)
        await _send(send, answer.status, dumps(answer.body), extra + answer.headers)
        self.ingress.metrics.request_finished(model, number, route, answer.status, answer.error,
                                              time.perf_counter() - start)


async def _send(send: Callable, status: int, payload: bytes, extra: list, *, content_type: tuple = _JSON) -> None:
    headers: list[Any] = [content_type, (b"content-length", str(len(payload)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
