"""One mapping from an exception to what a client is told: HTTP status + ``{"error"}`` body +
headers, or gRPC status code + details. Every transport answers errors through here.

Ours (:class:`~maas_ray.errors.MaasError`) carry their HTTP status and gRPC code; errors that
crossed a Ray hop are unwrapped first; Serve's overload errors become 503 (UNAVAILABLE) with
Retry-After; anything else is a logged 500 (INTERNAL) that names the request id, never a
traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

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
