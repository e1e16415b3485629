"""Versioned, immutable ONNX model registry."""

from maas_ray.registry.manifest import Manifest, ParentRef, ProcessorSpec, TensorSpec
from maas_ray.registry.store import LoadedModel, Registry, default_root, schema_from_onnx

__all__ = [
    "LoadedModel",
    "Manifest",
    "ParentRef",
    "ProcessorSpec",
    "Registry",
    "TensorSpec",
    "default_root",
    "schema_from_onnx",
]
