"""The manifest stored next to every model.onnx: everything needed to serve,
audit and reproduce a version without the code that trained it."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Optional

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

# Open Inference Protocol v2 datatypes <-> numpy; ONNX element types map onto these.
OIP_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_OIP: dict[np.dtype, str] = {v: k for k, v in OIP_TO_NUMPY.items()}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_sha256(value: str) -> str:
    """Checksums in manifests are lowercase hex sha256 digests."""
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {value!r}")
    return value


def check_name(kind: str, value: str) -> str:
    """Model and alias names become path segments and URL parts: keep them plain."""
    if not _NAME_RE.match(value):
        raise ValueError(
            f"invalid {kind} name {value!r}: use letters, digits, '_', '.', '-' "
            "(starting with a letter or digit, at most 128 characters)"
        )
    return value


# A model name, checked wherever one enters: manifests, TrainConfig.model_name, an app's
# ModelConfig.name. The error quotes the bad value: "invalid model name 'bad name': ...".
def _model_name(value: str) -> str:
    return check_name("model", value)


ModelName = Annotated[str, AfterValidator(_model_name)]


class TensorSpec(BaseModel):
    """One named input or output tensor."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Tensor name as in the ONNX graph.")
    datatype: str = Field(description="OIP v2 datatype, e.g. FP32, INT64.")
    shape: list[int] = Field(description="Dimensions; -1 marks a dynamic one (the batch).")

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, v: str) -> str:
        if v not in OIP_TO_NUMPY:
            raise ValueError(f"unknown datatype {v!r}; expected one of {sorted(OIP_TO_NUMPY)}")
        return v

    @field_validator("shape")
    @classmethod
    def _valid_shape(cls, v: list[int]) -> list[int]:
        if any(d < -1 or d == 0 for d in v):
            raise ValueError(f"invalid shape {v}: dimensions are positive or -1 (dynamic)")
        return v

    @property
    def numpy_dtype(self) -> np.dtype:
        return OIP_TO_NUMPY[self.datatype]


class ProcessorSpec(BaseModel):
    """A named pre- or postprocessor and its parameters."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        default="tensor",
        description="A built-in processor name (e.g. 'image', 'classification') or a plug-in's import path, "
        "'package.module:Class' (see docs/plugins.md); resolved when the app is built.",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Processor parameters.")


class ParentRef(BaseModel):
    """The version a model was fine-tuned from."""

    model_config = ConfigDict(extra="forbid")

    model: ModelName = Field(description="Parent model name.")
    version: int = Field(ge=1, description="Parent version.")


class FileEntry(BaseModel):
    """One extra file of a version (weights, model spec, tokenizer, ONNX external data)."""

    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(description="sha256 of the file, checked whenever it is read.")
    size_bytes: int = Field(ge=0, description="Size of the file.")
    role: str = Field(
        default="",
        description="What the file is for: 'weights', 'model_spec', 'tokenizer', 'onnx_external_data', ...",
    )

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: str) -> str:
        return check_sha256(v)


_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
RESERVED_FILES = ("model.onnx", "manifest.json", "manifest.sig")


def check_file_name(value: str) -> str:
    """Extra files sit flat beside model.onnx: plain names, no directories."""
    if not _FILE_NAME_RE.match(value) or value in RESERVED_FILES:
        raise ValueError(
            f"invalid extra file name {value!r}: a plain name (letters, digits, '_', '.', '-'), "
            f"not one of {list(RESERVED_FILES)}"
        )
    return value


class EncryptionInfo(BaseModel):
    """How a version's files are encrypted (maas_ray/registry/crypto.py): the manifest stays
    plaintext, the files are AES-256-GCM under a per-version data key wrapped by a KEK."""

    model_config = ConfigDict(extra="forbid")

    algorithm: str = Field(default="AES-256-GCM", description="File cipher; each file is nonce || ciphertext || tag.")
    kek_id: str = Field(min_length=1, description="Which key-encryption key wrapped the data key (never the key).")
    wrapped_dek: str = Field(min_length=1, description="The version's data key, wrapped by the KEK, base64.")
    files: list[str] = Field(min_length=1, description="The encrypted files (model.onnx and extras).")

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, v: str) -> str:
        if v != "AES-256-GCM":
            raise ValueError(f"unsupported encryption algorithm {v!r}; expected 'AES-256-GCM'")
        return v


class GenerationSpec(BaseModel):
    """What a generative (decoder language model) version needs to be served: the shape of its
    KV cache, read from the graph, its context and vocabulary, its special tokens and chat
    template. Present exactly when the version is ``kind: generative``.

    The graph contract (the layout of optimum's ``text-generation-with-past`` export): inputs
    ``input_ids`` (B, S) int64, ``attention_mask`` (B, P + S) int64 (1 = attend),
    ``position_ids`` (B, S) int64 (optional: ``has_position_ids``), and per layer
    ``past_key_values.{i}.key|value`` (B, heads, P, head_dim); outputs ``logits``
    (B, S, vocab) and ``present.{i}.key|value`` (B, heads, P + S, head_dim).
    """

    model_config = ConfigDict(extra="forbid")

    context_length: int = Field(ge=2, description="Most tokens (prompt + generated) one sequence may hold.")
    vocab_size: int = Field(ge=2, description="Size of the logits' last axis.")
    num_layers: int = Field(ge=1, description="Transformer blocks: one key and one value cache each.")
    num_kv_heads: int = Field(ge=1, description="Heads of the key/value cache (axis 1 of past_key_values.*).")
    head_dim: int = Field(ge=1, description="Axis 3 of past_key_values.*.")
    kv_dtype: str = Field(default="FP32", description="OIP datatype of the cache tensors.")
    past_key: str = Field(default="past_key_values.{i}.key", description="Input name pattern of layer i's key cache.")
    past_value: str = Field(default="past_key_values.{i}.value", description="Input name pattern of layer i's value cache.")
    present_key: str = Field(default="present.{i}.key", description="Output name pattern of layer i's new key cache.")
    present_value: str = Field(default="present.{i}.value", description="Output name pattern of layer i's new value cache.")
    has_position_ids: bool = Field(default=True, description="Whether the graph takes position_ids.")
    tokenizer_file: str = Field(default="tokenizer.json", description="The version's Hugging Face tokenizer (an extra file).")
    bos_token_id: Optional[int] = Field(default=None, ge=0, description="Prepended to every prompt when set.")
    eos_token_id: int = Field(ge=0, description="Generation stops when the model emits it.")
    pad_token_id: Optional[int] = Field(default=None, ge=0, description="Padding token, if the tokenizer has one.")
    special_tokens: dict[str, int] = Field(default_factory=dict, description="Special token text -> id.")
    chat_template: Optional[str] = Field(
        default=None, description="Jinja template turning a message list into a prompt (Hugging Face's convention).")

    @field_validator("kv_dtype")
    @classmethod
    def _kv_datatype(cls, v: str) -> str:
        if v not in ("FP32", "FP16", "BF16"):
            raise ValueError(f"kv_dtype must be FP32, FP16 or BF16, got {v!r}")
        return v

    @field_validator("past_key", "past_value", "present_key", "present_value")
    @classmethod
    def _layer_pattern(cls, v: str) -> str:
        if "{i}" not in v:
            raise ValueError(f"a cache name pattern must contain '{{i}}' (the layer), got {v!r}")
        return v


class Manifest(BaseModel):
    """Self-description of one immutable model version."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelName = Field(description="Model name.")
    version: int = Field(ge=1, description="Integer version, assigned by the registry.")
    inputs: list[TensorSpec] = Field(min_length=1, description="Input tensors of the graph.")
    outputs: list[TensorSpec] = Field(min_length=1, description="Output tensors of the graph.")
    preprocessor: ProcessorSpec = Field(default_factory=ProcessorSpec)
    postprocessor: ProcessorSpec = Field(default_factory=ProcessorSpec)
    metrics: dict[str, float] = Field(default_factory=dict, description="e.g. test_accuracy.")
    training_config: Optional[dict[str, Any]] = Field(
        default=None, description="The TrainConfig the version was trained with, if any."
    )
    parent: Optional[ParentRef] = Field(default=None, description="Fine-tuned from.")
    frameworks: dict[str, str] = Field(
        default_factory=dict, description="Versions of onnx, onnxruntime, torch, maas_ray."
    )
    sha256: str = Field(description="sha256 of model.onnx, checked on every load.")
    size_bytes: int = Field(ge=1, description="Size of model.onnx.")
    files: dict[str, FileEntry] = Field(
        default_factory=dict,
        description="Extra files beside model.onnx (name -> checksum, size, role); all checked on load.",
    )
    model_spec: Optional[dict[str, Any]] = Field(
        default=None, description="How the torch model is built: family or import path, and model_args."
    )
    dataset: Optional[dict[str, Any]] = Field(
        default=None, description="Dataset identity: source, rows per split, content hash."
    )
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    description: str = Field(default="", description="Free text.")
    encryption: Optional[EncryptionInfo] = Field(
        default=None, description="Set when the files are encrypted; sha256 and sizes are of the plaintext."
    )
    generation: Optional[GenerationSpec] = Field(
        default=None, description="Set for generative (decoder LM) versions: KV cache layout, context, tokens."
    )

    @property
    def kind(self) -> str:
        """``generative`` for decoder language models, else ``predictive`` (one forward pass)."""
        return "generative" if self.generation is not None else "predictive"

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: str) -> str:
        return check_sha256(v)

    @field_validator("files")
    @classmethod
    def _file_names(cls, v: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in v:
            check_file_name(name)
        return v
