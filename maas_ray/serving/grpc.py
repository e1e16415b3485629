"""Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``) on the ingress.

Serve's gRPC proxy calls the ingress method named like the RPC (``ModelInfer``, ...) with
the decoded request message and a ``grpc_context``; the servicer registration that tells
the proxy about the service is tritonclient's
``tritonclient.grpc.service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server`` (the
exact service stock ``tritonclient.grpc`` and KServe's InferenceGRPCClient speak), named in
the Serve config's ``grpc_options.grpc_servicer_functions``.

:class:`GrpcService` holds the RPCs over an :class:`~maas_ray.serving.core.InferenceService`,
the same core as HTTP, so keys, rate limits, validation (:mod:`maas_ray.serving.codecs.grpc`),
version routing and metrics are one code path; the Serve deployment class
(:mod:`maas_ray.serving.ingress`) forwards each RPC method to it. Errors set the status code
and message from :func:`maas_ray.serving.status.answer_error`, the mapping HTTP uses; metrics
record the HTTP status the error would have had, so dashboards agree across protocols.

Request metadata: ``authorization: Bearer <key>`` or ``x-api-key`` (as HTTP headers), the
sticky key as the app's ``request_key_header`` (metadata or a request parameter of that name),
and the version pin as ``model_version``.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from typing import Any, Awaitable, Callable, Optional

from maas_ray.errors import InvalidInputError, RequestTimeoutError
from maas_ray.serving.codecs.grpc import decode_grpc, encode_grpc_outputs
from maas_ray.serving.core import InferenceService
from maas_ray.serving.keys import extract_key
from maas_ray.serving.metrics import UNKNOWN_MODEL
from maas_ray.serving.status import answer_error

logger = logging.getLogger(__name__)

# What the Serve config names in grpc_options.grpc_servicer_functions.
SERVICER_FUNCTION = "maas_ray.serving.grpc.add_inference_servicer"
PROTOCOL = "grpc"


def _pb():
    """tritonclient's generated messages, importable by the names pickle records for them.

    Serve's proxy pickles each request message to the replica. tritonclient generates its
    messages with the proto file's module names (``ModelInferRequest.__module__`` is
    ``grpc_service_pb2``, not ``tritonclient.grpc.service_pb2``), which no process can
    import, so pickling fails (UNKNOWN: "Can't pickle ... import of module
    'grpc_service_pb2' failed"). Registering the modules under those names fixes both ends:
    the proxy imports this module through :func:`add_inference_servicer`, the replica
    through :mod:`maas_ray.serving.ingress`.
    """
    from tritonclient.grpc import model_config_pb2, service_pb2

    for module in (service_pb2, model_config_pb2):
        sys.modules.setdefault(module.DESCRIPTOR.name.replace("/", ".").removesuffix(".proto") + "_pb2", module)
    return service_pb2


class MalformedRequest:
    """Stands in for a request whose bytes do not parse as the RPC's message.

    grpc's server deserializes before any handler runs, and a parse error there escapes as
    UNKNOWN ("Unexpected DecodeError"), with a traceback logged per request. The request
    deserializers registered by :func:`add_inference_servicer` return this instead, so the
    RPC method answers INVALID_ARGUMENT like any other bad request (the HTTP path's 400
    for a body that is not JSON). Picklable: Serve's proxy pickles it to the replica.
    """

    __slots__ = ("message_type", "reason")

    def __init__(self, message_type: str, reason: str) -> None:
        self.message_type = message_type
        self.reason = reason

    def __reduce__(self) -> tuple:
        return MalformedRequest, (self.message_type, self.reason)

    def error(self) -> InvalidInputError:
        return InvalidInputError(f"request: not a valid {self.message_type} message ({self.reason})")


def _tolerant(handler: Any) -> Any:
    """The method handler with a request deserializer that returns :class:`MalformedRequest`
    for bytes that do not parse (grpc's ``RpcMethodHandler`` is a namedtuple)."""
    from google.protobuf.message import DecodeError

    parse = handler.request_deserializer
    if parse is None:
        return handler
    message_type = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    message_type = message_type.full_name if message_type is not None else "request"

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return MalformedRequest(message_type, str(exc))

    return handler._replace(request_deserializer=deserialize)


class _TolerantServer:
    """The server as the generated ``add_..._to_server`` sees it: every method handler it
    registers gets a :func:`_tolerant` deserializer; everything else is the server's."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        for handler in handlers:  # grpc's DictionaryGenericHandler, which Serve's server rewrites too
            handler._method_handlers = {k: _tolerant(v) for k, v in handler._method_handlers.items()}
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, handlers: dict[str, Any]) -> None:
        self._server.add_registered_method_handlers(service_name, {k: _tolerant(v) for k, v in handlers.items()})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def add_inference_servicer(servicer: Any, server: Any) -> None:
    """The servicer function for ``grpc_options.grpc_servicer_functions``: registers
    ``inference.GRPCInferenceService`` (tritonclient's, the service stock Triton and KServe
    clients call) after making its messages picklable (see :func:`_pb`), with request
    deserializers that turn unparsable bytes into INVALID_ARGUMENT (:class:`MalformedRequest`)."""
    from tritonclient.grpc import service_pb2_grpc

    _pb()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, _TolerantServer(server))


def _parsed(response: str, counted: bool = False) -> Callable[[Any], Any]:
    """An RPC method that answers a :class:`MalformedRequest` with INVALID_ARGUMENT through
    :meth:`GrpcInferenceMixin._grpc_answer` (after keys and rate limits, as HTTP checks them
    before it reads a body) and an empty ``response``; ``counted`` records it in the request
    metrics under the unknown model."""

    def wrap(method: Any) -> Any:
        @functools.wraps(method)
        async def rpc(self: "GrpcService", request: Any, grpc_context: Any = None) -> Any:
            if not isinstance(request, MalformedRequest):
                return await method(self, request, grpc_context)

            async def reject(_: dict[str, str]) -> None:
                raise request.error()

            failed = None
            if counted:
                self.core.metrics.request_started(UNKNOWN_MODEL)
                start = time.perf_counter()

                def failed(status: int, error: str) -> None:
                    self.core.metrics.request_finished(
                        UNKNOWN_MODEL, None, PROTOCOL, status, error, time.perf_counter() - start
                    )

            empty = getattr(_pb(), response)
            return await self._grpc_answer(grpc_context, None, empty, lambda _: empty(), reject, failed)

        return rpc

    return wrap


_pb()  # at import: the replica unpickles request messages before any RPC method runs


def _metadata(grpc_context: Any) -> dict[str, str]:
    if grpc_context is None:
        return {}
    return {k.lower(): v for k, v in grpc_context.invocation_metadata() if isinstance(v, str)}


def _peer(grpc_context: Any) -> str:
    """The client's address for per-client rate limits: ``ipv4:1.2.3.4:5678`` -> ``1.2.3.4``."""
    peer = grpc_context.peer() if grpc_context is not None else ""
    if not peer:
        return "-"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


class GrpcService:
    """The ``inference.GRPCInferenceService`` RPCs over one :class:`InferenceService`."""

    def __init__(self, core: InferenceService) -> None:
        self.core = core

    def _grpc_fail(self, grpc_context: Any, exc: BaseException) -> tuple[int, str]:
        """Set the code and details on the call; returns (HTTP-equivalent status, error name).

        The RPC method then returns an empty message: with a non-OK code set, the proxy sends
        the status and no message, and Serve logs no traceback for an expected client error.
        """
        import grpc

        answer = answer_error(exc)
        if grpc_context is not None:
            grpc_context.set_code(grpc.StatusCode[answer.grpc_code])
            grpc_context.set_details(answer.message)
        return answer.status, answer.error

    def _grpc_admit(self, grpc_context: Any, model: Optional[str], admin: bool = False) -> dict[str, str]:
        meta = _metadata(grpc_context)
        self.core.admit(extract_key(meta), _peer(grpc_context), model, admin=admin)
        return meta

    async def _grpc_answer(
        self,
        grpc_context: Any,
        model: Optional[str],
        empty: Callable[[], Any],
        answer: Callable[[Any], Any],
        call: Optional[Callable[[dict[str, str]], Awaitable[Any]]] = None,
        failed: Optional[Callable[[int, str], None]] = None,
        admin: bool = False,
    ) -> Any:
        """One RPC: admission, ``call(request metadata)``, then ``answer(its result)``.

        An exception from admission or ``call`` sets the code and details (:meth:`_grpc_fail`),
        goes to ``failed(HTTP-equivalent status, error name)`` and the RPC returns ``empty()``.
        ``answer`` runs outside the try: only admission and the call map to a status.
        """
        try:
            meta = self._grpc_admit(grpc_context, model, admin)
            result = None if call is None else await call(meta)
        except Exception as exc:
            status, error = self._grpc_fail(grpc_context, exc)
            if failed is not None:
                failed(status, error)
            return empty()
        return answer(result)

    # ---- health and metadata ----------------------------------------------------------
    @_parsed("ServerLiveResponse")
    async def ServerLive(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 - RPC name
        return _pb().ServerLiveResponse(live=True)

    @_parsed("ServerReadyResponse")
    async def ServerReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return _pb().ServerReadyResponse(ready=await self.core.server_ready())

    @_parsed("ServerMetadataResponse")
    async def ServerMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        pb = _pb()
        return await self._grpc_answer(
            grpc_context, None, pb.ServerMetadataResponse,
            lambda _: pb.ServerMetadataResponse(**self.core.server_metadata()),
        )

    @_parsed("ModelReadyResponse")
    async def ModelReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        pb = _pb()
        return await self._grpc_answer(
            grpc_context, request.name, pb.ModelReadyResponse,
            lambda body: pb.ModelReadyResponse(ready=body["ready"]),
            lambda _: self.core.model_ready(request.name, request.version or None),
        )

    @_parsed("ModelMetadataResponse")
    async def ModelMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        pb = _pb()

        def tensors(items: list[dict[str, Any]]) -> list[Any]:
            return [
                pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                for t in items
            ]

        def answer(body: dict[str, Any]) -> Any:
            return pb.ModelMetadataResponse(
                name=body["name"], versions=body["versions"], platform=body["platform"],
                inputs=tensors(body["inputs"]), outputs=tensors(body["outputs"]),
            )

        return await self._grpc_answer(
            grpc_context, request.name, pb.ModelMetadataResponse, answer,
            lambda _: self.core.metadata(request.name, request.version or None),
        )

    # ---- Triton's model repository extension (admin scope) ---------------------------
    @_parsed("RepositoryIndexResponse")
    async def RepositoryIndex(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        pb = _pb()

        def answer(rows: list[dict[str, Any]]) -> Any:
            return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

        return await self._grpc_answer(grpc_context, None, pb.RepositoryIndexResponse, answer,
                                       lambda _: self.core.index(request.ready), admin=True)

    @_parsed("RepositoryModelLoadResponse")
    async def RepositoryModelLoad(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        pb = _pb()
        return await self._grpc_answer(grpc_context, request.model_name, pb.RepositoryModelLoadResponse,
                                       lambda _: pb.RepositoryModelLoadResponse(),
                                       lambda _: self.core.load(request.model_name), admin=True)

    @_parsed("RepositoryModelUnloadResponse")
    async def RepositoryModelUnload(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        pb = _pb()
        return await self._grpc_answer(grpc_context, request.model_name, pb.RepositoryModelUnloadResponse,
                                       lambda _: pb.RepositoryModelUnloadResponse(),
                                       lambda _: self.core.unload(request.model_name), admin=True)

    # ---- inference --------------------------------------------------------------------
    @_parsed("ModelInferResponse", counted=True)
    async def ModelInfer(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        import asyncio

        pb = _pb()
        start = time.perf_counter()
        model = request.model_name
        core = self.core
        core.metrics.request_started(model)
        number: Optional[int] = None  # set once a version answered: a failed encode is counted on it

        async def infer(meta: dict[str, str]) -> tuple[Any, Any]:
            nonlocal number
            key = meta.get(core.key_header)
            if key is None and core.key_header in request.parameters:
                param = request.parameters[core.key_header]
                which = param.WhichOneof("parameter_choice")
                key = None if which is None else str(getattr(param, which))
            task = core.deadlines.enter()  # one watchdog per replica, as on HTTP
            try:
                slot = await core.pick(model, request.model_version or None, key)
                if slot.schema is None:  # a generative version: not an infer RPC
                    raise core.wrong_route(model, slot)
                t0 = time.perf_counter()
                decoded = decode_grpc(request, slot.schema, core.limits)
                result = await core.run(model, slot, decoded.tensors, True, time.perf_counter() - t0,
                                        request_id=request.id or meta.get("x-request-id"), protocol=PROTOCOL)
            except asyncio.CancelledError as exc:
                if not core.deadlines.exit(task):  # the client cancelled, or the replica is stopping
                    failed(499, "ClientDisconnected")
                    raise
                raise RequestTimeoutError(
                    f"request not answered within limits.request_timeout_s={core.limits.request_timeout_s}"
                ) from exc
            finally:
                core.deadlines.exit(task)  # idempotent
            number = result.version
            t0 = time.perf_counter()
            response = pb.ModelInferResponse(model_name=model, model_version=str(number))
            if decoded.id is not None:
                response.id = decoded.id
            for name, datatype, shape, raw in encode_grpc_outputs(result.outputs, decoded):
                response.outputs.add(name=name, datatype=datatype, shape=shape)
                response.raw_output_contents.append(raw)
            result.stages["encode"] = result.stages.get("encode", 0.0) + time.perf_counter() - t0
            return result, response

        def failed(status: int, error: str) -> None:
            core.metrics.request_finished(model, number, PROTOCOL, status, error, time.perf_counter() - start)

        def answer(done: tuple[Any, Any]) -> Any:
            result, response = done
            core.metrics.request_finished(
                model, result.version, PROTOCOL, 200, None, time.perf_counter() - start, result.stages
            )
            if result.after_response is not None:  # shadow: starts as the response is returned
                result.after_response()
            return response

        return await self._grpc_answer(grpc_context, model, pb.ModelInferResponse, answer, infer, failed)
