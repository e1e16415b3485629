"""One mapping from an exception to what a client is told: HTTP status + ``{"error"}`` body +
headers, or gRPC status code + details. Every transport answers errors through here.

Ours (:class:`~maas_ray.errors.MaasError`) carry their HTTP status and gRPC code; errors that
crossed a Ray hop are unwrapped first; Serve's overload errors become 503 (UNAVAILABLE) with
Retry-After; anything else is a logged 500 (INTERNAL) that names the request id, never a
traceback. The OpenAI-compatible routes answer the same :class:`ErrorAnswer` in OpenAI's
shape (:func:`openai_error`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Optional

from maas_ray.errors import MaasError, ModelNotReadyError, unwrap_remote

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """What a failed request answers, whatever the transport."""

    status: int  # HTTP status (gRPC answers record it in metrics too, so dashboards agree)
    grpc_code: str  # grpc.StatusCode member name
    message: str
    error: str  # the error's class name (metrics label)
    retry_after: Optional[str] = None  # seconds, for 429/503

    @property
    def body(self) -> dict[str, str]:
        return {"error": self.message}

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return [] if self.retry_after is None else [(b"retry-after", self.retry_after.encode())]


def from_serve(exc: BaseException) -> Optional[MaasError]:
    """Serve's own overload errors, raised by handle calls to a full deployment."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, BackPressureError):
        return ModelNotReadyError(f"overloaded: {exc.message}", exc.retry_after_s or 1.0)
    if isinstance(exc, DeploymentUnavailableError):
        return ModelNotReadyError(f"unavailable: {exc}", 1.0)
    return None


def answer_error(exc: BaseException, request_id: Optional[str] = None) -> ErrorAnswer:
    """The one exception -> client answer mapping (HTTP and gRPC alike)."""
    inner = unwrap_remote(exc)
    mapped = inner if isinstance(inner, MaasError) else (from_serve(inner) or inner)
    if isinstance(mapped, MaasError):
        retry = getattr(mapped, "retry_after_header", None)
        if mapped.status_code >= 500:
            logger.warning("request %s failed: %s: %s", request_id, type(mapped).__name__, mapped.message)
        return ErrorAnswer(mapped.status_code, mapped.grpc_code, mapped.message, type(inner).__name__,
                           retry() if retry is not None else None)
    logger.error("request %s failed with an unexpected error", request_id, exc_info=inner)
    return ErrorAnswer(500, "INTERNAL", f"internal error ({type(inner).__name__}); request id {request_id}",
                       type(inner).__name__)


# ---- OpenAI's error shape (the /v1/completions, /v1/chat/completions and /v1/models routes) ----
# The ``type`` per status, named as the openai client's exception classes are (BadRequestError,
# AuthenticationError, PermissionDeniedError, NotFoundError, RateLimitError, InternalServerError).
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 429: "rate_limit_error"}
_OPENAI_CODES = {"ModelNotFoundError": "model_not_found", "VersionNotFoundError": "model_not_found",
                 "RateLimitedError": "rate_limit_exceeded", "PayloadTooLargeError": "payload_too_large",
                 "RequestTimeoutError": "timeout", "ModelNotReadyError": "model_not_ready"}
# Our 4xx messages start with the field they are about ("max_tokens: expected ...",
# "messages[0].content: ..."): that field is OpenAI's ``param``.
_PARAM = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\[\d+\]|\.[A-Za-z_][A-Za-z0-9_]*)*): ")


def openai_error(answer: ErrorAnswer) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` as OpenAI answers errors.

    ``type``: ``authentication_error`` (401), ``permission_error`` (403), ``not_found_error``
    (404), ``rate_limit_error`` (429), ``invalid_request_error`` (other 4xx), ``server_error`` (5xx);
    ``param``: the request field a 400/413 message starts with (None if none); ``code``: a
    short machine name for some errors (``model_not_found``, ``rate_limit_exceeded``), else None.
    """
    status = answer.status
    if status >= 500:
        kind = "server_error"
    else:
        kind = _OPENAI_TYPES.get(status, "invalid_request_error")
    param = None
    if status in (400, 413):  # our InvalidInputError / PayloadTooLargeError messages
        m = _PARAM.match(answer.message)
        if m is not None and m.group(1) not in ("request", "version", "body"):
            param = m.group(1)
    code = _OPENAI_CODES.get(answer.error)
    return {"error": {"message": answer.message, "type": kind, "param": param, "code": code}}
