"""The maas_ray exception hierarchy.

Every error carries the HTTP status the ingress answers with, pickles across
Ray processes (all constructor arguments go to ``super().__init__``), and wraps
third-party errors with ``raise ... from exc``::

    MaasError (500)
    ├── ConfigError (400)              bad config value; raised at build time
    ├── DependencyError (500)          broken install, e.g. two onnxruntime builds
    ├── RegistryError (500)
    │   ├── ModelNotFoundError (404)
    │   ├── VersionNotFoundError (404)
    │   ├── PublishConflictError (409)
    │   └── IntegrityError (500)       sha256 mismatch, truncated artifact
    ├── InvalidInputError (400)        malformed body, wrong shape/dtype, missing input
    ├── ModelNotReadyError (503)
    └── InferenceError (500)           onnxruntime failed on valid input
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DependencyError",
    "InferenceError",
    "IntegrityError",
    "InvalidInputError",
    "MaasError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "PublishConflictError",
    "RegistryError",
    "VersionNotFoundError",
]


class MaasError(Exception):
    """Base of all maas_ray errors. HTTP servers answer 500."""

    status_code: int = 500

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


class DependencyError(MaasError):
    """The installation is broken (e.g. both onnxruntime builds). 500."""


class RegistryError(MaasError):
    """The model registry failed. 500."""


class ModelNotFoundError(RegistryError):
    """No such model in the registry or app. HTTP servers answer 404."""

    status_code = 404


class VersionNotFoundError(RegistryError):
    """No such version or alias of a model. HTTP servers answer 404."""

    status_code = 404


class PublishConflictError(RegistryError):
    """Publishing lost a race it could not retry out of. HTTP servers answer 409."""

    status_code = 409


class IntegrityError(RegistryError):
    """A stored artifact does not match its manifest checksum. 500; never served."""


class InvalidInputError(MaasError, ValueError):
    """The request is malformed or does not match the model schema. 400."""

    status_code = 400


class ModelNotReadyError(MaasError):
    """The model is still loading or has no healthy replica. 503."""

    status_code = 503


class InferenceError(MaasError):
    """The runtime failed on input that passed validation. 500."""


def unwrap_remote(exc: BaseException) -> BaseException:
    """Ray re-raises a replica's or task's error as RayTaskError; return our own error inside.

    The maas_ray error pickles across processes intact (status code and message), so the
    caller can answer with it as if it had been raised locally.
    """
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, MaasError) else exc
