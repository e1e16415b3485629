"""maas-ray: train with Ray Train, publish versioned ONNX, serve with Ray Serve."""

from maas_ray.errors import (
    ConfigError,
    DependencyError,
    InferenceError,
    IntegrityError,
    InvalidInputError,
    MaasError,
    ModelNotFoundError,
    ModelNotReadyError,
    PublishConflictError,
    RegistryError,
    VersionNotFoundError,
)
from maas_ray.registry import Manifest, ProcessorSpec, Registry, TensorSpec

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DependencyError",
    "InferenceError",
    "IntegrityError",
    "InvalidInputError",
    "MaasError",
    "Manifest",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "ProcessorSpec",
    "PublishConflictError",
    "Registry",
    "RegistryError",
    "TensorSpec",
    "VersionNotFoundError",
]
