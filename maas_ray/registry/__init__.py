"""Versioned, immutable ONNX model registry."""

from maas_ray.registry.audit import AuditEvent
from maas_ray.registry.crypto import KeyProvider, register_key_provider
from maas_ray.registry.manifest import EncryptionInfo, FileEntry, GenerationSpec, Manifest, ModelName, ParentRef, ProcessorSpec, TensorSpec
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
    "AuditEvent",
    "EncryptionInfo",
    "ExtraFile",
    "FileEntry",
    "GenerationSpec",
    "KeyProvider",
    "LoadedModel",
    "Manifest",
    "ModelName",
    "ParentRef",
    "ProcessorSpec",
    "Registry",
    "TensorSpec",
    "default_root",
    "register_key_provider",
    "schema_from_onnx",
]
