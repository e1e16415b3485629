"""Versioned, immutable ONNX model registry."""

from maas_ray.registry.manifest import FileEntry, Manifest, ModelName, ParentRef, ProcessorSpec, TensorSpec
from maas_ray.registry.store import (
    ONNX_EXTERNAL_DATA,
    ExtraFile,
    LoadedModel,
    Registry,
    default_root,
    schema_from_onnx,
)

__all__ = [
    "ONNX_EXTERNAL_DATA",
    "ExtraFile",
    "FileEntry",
    "LoadedModel",
    "Manifest",
    "ModelName",
    "ParentRef",
    "ProcessorSpec",
    "Registry",
    "TensorSpec",
    "default_root",
    "schema_from_onnx",
]
