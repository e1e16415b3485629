"""maas-ray: train with Ray Train, publish versioned ONNX, serve with Ray Serve.

The public API is ``__all__``; everything else (``maas_ray.serving.ingress`` ...) may change.
Training and serving names load lazily, so ``import maas_ray`` does not import torch or Ray.
"""

from importlib import import_module
from typing import Any

from maas_ray.errors import (
    ConfigError,
    DependencyError,
    InferenceError,
    IntegrityError,
    InvalidInputError,
    MaasError,
    MethodNotAllowedError,
    ModelNotFoundError,
    ModelNotReadyError,
    NotFoundError,
    ParityError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PublishConflictError,
    RateLimitedError,
    RegistryError,
    RequestTimeoutError,
    TrainingError,
    UnauthenticatedError,
    VersionInUseError,
    VersionNotFoundError,
)
from maas_ray.registry import Manifest, ProcessorSpec, Registry, TensorSpec

from maas_ray._version import __version__  # noqa: F401 - re-exported

_LAZY = {
    "AppArgs": "maas_ray.serving",
    "MaasClient": "maas_ray.serving",
    "TrainConfig": "maas_ray.train",
    "TrainReport": "maas_ray.train",
    "build_app": "maas_ray.serving",
    "train_and_publish": "maas_ray.train",
}

__all__ = [
    "AppArgs",
    "ConfigError",
    "DependencyError",
    "InferenceError",
    "IntegrityError",
    "InvalidInputError",
    "MaasClient",
    "MaasError",
    "Manifest",
    "MethodNotAllowedError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "NotFoundError",
    "ParityError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ProcessorSpec",
    "PublishConflictError",
    "RateLimitedError",
    "Registry",
    "RegistryError",
    "RequestTimeoutError",
    "TensorSpec",
    "TrainConfig",
    "TrainReport",
    "TrainingError",
    "UnauthenticatedError",
    "VersionInUseError",
    "VersionNotFoundError",
    "build_app",
    "train_and_publish",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'maas_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
