"""The maas_ray exception hierarchy.

Every error carries the HTTP status and the gRPC status code the ingress answers
with, pickles across Ray processes (all constructor arguments go to
``super().__init__``), and wraps third-party errors with ``raise ... from exc``::

    MaasError (500, INTERNAL)
    ├── ConfigError (400, INVALID_ARGUMENT)      bad config value; raised at build time
    ├── DependencyError (500, INTERNAL)          broken install, e.g. two onnxruntime builds
    ├── RegistryError (500, INTERNAL)
    │   ├── ModelNotFoundError (404, NOT_FOUND)
    │   ├── VersionNotFoundError (404, NOT_FOUND)
    │   ├── PublishConflictError (409, ALREADY_EXISTS)
    │   ├── VersionInUseError (409, FAILED_PRECONDITION)  delete refused: an alias or app uses it
    │   └── IntegrityError (500, DATA_LOSS)      sha256 mismatch, truncated artifact
    ├── ParityError (500, INTERNAL)              exported ONNX disagrees with torch
    ├── TrainingError (500, INTERNAL)            training failed, left no checkpoint, or missed
    │                                            min_test_accuracy; nothing is published
    ├── InvalidInputError (400, INVALID_ARGUMENT) malformed body, wrong shape/dtype, missing input
    │   └── PayloadTooLargeError (413, RESOURCE_EXHAUSTED)  body, elements or pixels over a limit
    ├── NotFoundError (404, NOT_FOUND)           no such route
    ├── MethodNotAllowedError (405, UNIMPLEMENTED)
    ├── UnauthenticatedError (401, UNAUTHENTICATED)  missing or unknown API key
    ├── PermissionDeniedError (403, PERMISSION_DENIED)  the key lacks the scope
    ├── RateLimitedError (429, RESOURCE_EXHAUSTED)   per-key rate limit; carries retry_after_s
    ├── ModelNotReadyError (503, UNAVAILABLE)    not loaded, failed to load, or overloaded;
    │                                            carries retry_after_s
    ├── RequestTimeoutError (504, DEADLINE_EXCEEDED)
    └── InferenceError (500, INTERNAL)           onnxruntime failed on valid input
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from pydantic import ValidationError

__all__ = [
    "ConfigError",
    "DependencyError",
    "InferenceError",
    "IntegrityError",
    "InvalidInputError",
    "MaasError",
    "ModelNotFoundError",
    "MethodNotAllowedError",
    "ModelNotReadyError",
    "NotFoundError",
    "ParityError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PublishConflictError",
    "RateLimitedError",
    "RegistryError",
    "RequestTimeoutError",
    "TrainingError",
    "UnauthenticatedError",
    "VersionInUseError",
    "VersionNotFoundError",
]


class MaasError(Exception):
    """Base of all maas_ray errors. HTTP servers answer 500."""

    status_code: int = 500
    grpc_code: str = "INTERNAL"  # a grpc.StatusCode name; grpc is not imported here
    retry_after_s: Optional[float] = None  # sent as Retry-After where set

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, str]:
        return {"error": self.message}


class ConfigError(MaasError, ValueError):
    """A config value is invalid. HTTP servers answer 400."""

    status_code = 400
    grpc_code = "INVALID_ARGUMENT"


class DependencyError(MaasError):
    """The installation is broken (e.g. both onnxruntime builds). 500."""


class RegistryError(MaasError):
    """The model registry failed. 500."""


class ModelNotFoundError(RegistryError):
    """No such model in the registry or app. HTTP servers answer 404."""

    status_code = 404
    grpc_code = "NOT_FOUND"


class VersionNotFoundError(RegistryError):
    """No such version or alias of a model. HTTP servers answer 404."""

    status_code = 404
    grpc_code = "NOT_FOUND"


class PublishConflictError(RegistryError):
    """Publishing lost a race it could not retry out of. HTTP servers answer 409."""

    status_code = 409
    grpc_code = "ALREADY_EXISTS"


class VersionInUseError(RegistryError):
    """Deleting a version was refused: an alias names it or a running app serves it. 409.

    FAILED_PRECONDITION, not ALREADY_EXISTS: retrying cannot help until the alias is moved or
    the app stops serving the version (gRPC's own example: rmdir on a non-empty directory).
    """

    status_code = 409
    grpc_code = "FAILED_PRECONDITION"


class IntegrityError(RegistryError):
    """A stored artifact does not match its manifest checksum. 500; never served."""

    grpc_code = "DATA_LOSS"


class ParityError(MaasError):
    """The exported ONNX graph disagrees with torch beyond the tolerance; nothing is published."""


class TrainingError(MaasError):
    """A training run failed (a worker error Ray Train could not recover from), produced no
    checkpoint, or its test accuracy is below ``min_test_accuracy``; nothing is published. 500."""


class InvalidInputError(MaasError, ValueError):
    """The request is malformed or does not match the model schema. 400."""

    status_code = 400
    grpc_code = "INVALID_ARGUMENT"


class PayloadTooLargeError(InvalidInputError):
    """The body, a tensor's element count or an image's pixels exceed a limit. 413."""

    status_code = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class NotFoundError(MaasError):
    """No such route. 404."""

    status_code = 404
    grpc_code = "NOT_FOUND"


class MethodNotAllowedError(MaasError):
    """The route exists, the method does not. 405."""

    status_code = 405
    grpc_code = "UNIMPLEMENTED"


class UnauthenticatedError(MaasError):
    """No API key, or one the service does not know (or revoked). 401."""

    status_code = 401
    grpc_code = "UNAUTHENTICATED"


class PermissionDeniedError(MaasError):
    """The API key is valid but lacks the scope (model or admin). 403."""

    status_code = 403
    grpc_code = "PERMISSION_DENIED"


class _RetryableError(MaasError):
    """An error the client may retry after ``retry_after_s`` seconds (sent as Retry-After)."""

    def __init__(self, message: str, retry_after_s: Optional[float] = None) -> None:
        Exception.__init__(self, message, retry_after_s)  # both arguments survive pickling
        self.message = message
        self.retry_after_s = retry_after_s

    def retry_after_header(self) -> Optional[str]:
        """Retry-After is whole seconds (RFC 9110); never 0, which reads as 'now'."""
        return None if self.retry_after_s is None else str(max(1, math.ceil(self.retry_after_s)))


class RateLimitedError(_RetryableError):
    """The API key (or client) is over its rate limit. 429 with Retry-After."""

    status_code = 429
    grpc_code = "RESOURCE_EXHAUSTED"


class ModelNotReadyError(_RetryableError):
    """The version is not loaded, failed to load, its replica died, or the queue is full.

    503 with Retry-After: inference is idempotent, so clients may safely retry.
    """

    status_code = 503
    grpc_code = "UNAVAILABLE"


class RequestTimeoutError(MaasError):
    """The request did not finish within the app's ``limits.request_timeout_s``. 504."""

    status_code = 504
    grpc_code = "DEADLINE_EXCEEDED"


class InferenceError(MaasError):
    """The runtime failed on input that passed validation. 500."""


def format_validation_error(exc: "ValidationError", what: str) -> str:
    """One line per bad field of a pydantic error: 'what: field.path: message (got value)'."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"{what}: {loc}: {err['msg']}{got}")
    return "; ".join(lines)


def unwrap_remote(exc: BaseException) -> BaseException:
    """Ray re-raises a replica's or task's error as RayTaskError; return our own error inside.

    The maas_ray error pickles across processes intact (status code and message), so the
    caller can answer with it as if it had been raised locally.
    """
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, MaasError) else exc
