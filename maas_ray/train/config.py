"""TrainConfig: one pydantic model for YAML files, CLI flags and the worker loop."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from maas_ray.errors import ConfigError, format_validation_error
from maas_ray.registry.manifest import ModelName

# Kept here (not imported from model.py / data.py) so validating a config imports no torch.
BUILTIN_DATA = ("digits", "digits-images", "text-order")
DATA_SUFFIXES = (".npz", ".parquet", ".csv", ".tsv", ".jsonl")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class MLPArgs(BaseModel):
    """model_args of the built-in ``mlp`` (flattened features)."""

    model_config = ConfigDict(extra="forbid")

    hidden_sizes: list[int] = Field(default=[128, 64], description="Hidden layer widths.")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout after each hidden layer.")

    @field_validator("hidden_sizes")
    @classmethod
    def _hidden_sizes(cls, v: list[int]) -> list[int]:
        if any(h < 1 for h in v):
            raise ValueError(f"hidden_sizes must be positive, got {v}")
        return v


class CNNArgs(BaseModel):
    """model_args of the built-in ``cnn`` (images (C, H, W))."""

    model_config = ConfigDict(extra="forbid")

    channels: list[int] = Field(default=[32, 64], description="Output channels of each conv block (3x3 conv, BN, ReLU, 2x2 max-pool).")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout before the classifier.")

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: list[int]) -> list[int]:
        if not v or any(c < 1 for c in v):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {v}")
        return v


class TextTransformerArgs(BaseModel):
    """model_args of the built-in ``text-transformer`` (token ids)."""

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(default=64, ge=8, description="Embedding width.")
    heads: int = Field(default=4, ge=1, description="Attention heads; must divide dim.")
    layers: int = Field(default=2, ge=1, description="Transformer blocks.")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout in attention and MLP.")

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> "TextTransformerArgs":
        if self.dim % self.heads:
            raise ValueError(f"heads must divide dim, got dim={self.dim} heads={self.heads}")
        return self


FAMILY_ARGS: dict[str, type[BaseModel]] = {"mlp": MLPArgs, "cnn": CNNArgs, "text-transformer": TextTransformerArgs}


class TrainConfig(BaseModel):
    """How to train, export and publish one model version."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: ModelName = Field(default="digits", description="Registry model to publish to.")
    model: str = Field(
        default="mlp",
        description="Model: a built-in family ('mlp', 'cnn', 'text-transformer'; 'decoder-lm' trains a "
        "language model instead, see docs/generative.md) or an import path "
        "'package.module:factory'; factory(data_spec, **model_args) returns an nn.Module mapping "
        "(batch, *input_shape) to (batch, num_classes) logits.",
    )
    model_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for the model family or factory (a JSON object on the command "
        "line), e.g. mlp {hidden_sizes: [128, 64], dropout: 0.1}, cnn {channels: [32, 64]}, "
        "text-transformer {dim: 64, heads: 4, layers: 2}.",
    )
    data: str = Field(
        default="digits",
        description="A built-in dataset ('digits', 'digits-images', 'text-order'), a file (.npz with "
        "arrays 'x' and 'y'; .parquet/.csv/.tsv/.jsonl with feature columns or a 'text' column, plus "
        "'label'), a folder of images in one sub-folder per class, or 'package.module:loader'.",
    )
    epochs: int = Field(default=30, ge=1, description="Epochs to train (at most; see patience).")
    batch_size: int = Field(default=64, ge=1, description="Per-worker batch size (per micro-step).")
    lr: float = Field(default=3e-3, gt=0.0, description="Peak Adam learning rate.")
    weight_decay: float = Field(default=1e-4, ge=0.0, description="Adam weight decay.")
    warmup_fraction: float = Field(
        default=0.0, ge=0.0, lt=1.0,
        description="Share of optimizer steps with linear LR warm-up; cosine decay to 0 after it.",
    )
    grad_accum_steps: int = Field(
        default=1, ge=1, description="Micro-batches whose gradients are summed before each optimizer step."
    )
    grad_clip_norm: Optional[float] = Field(
        default=None, gt=0.0, description="Clip the global gradient norm to this value (default: no clipping)."
    )
    mixed_precision: Literal["auto", "off", "bf16", "fp16"] = Field(
        default="auto",
        description="Autocast on GPU: 'auto' = bf16 where the GPU supports it, else fp16 with a "
        "GradScaler; always off on CPU.",
    )
    patience: Optional[int] = Field(
        default=None, ge=1,
        description="Early stopping: stop after this many epochs without a better validation accuracy.",
    )
    val_fraction: float = Field(
        default=0.1, gt=0.0, lt=1.0, description="Validation share: picks the best checkpoint, early stopping."
    )
    test_fraction: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="Test share, evaluated once on the chosen checkpoint."
    )
    seed: int = Field(default=0, description="Seed for the splits and the initial weights.")
    data_loading: Literal["auto", "memory", "ray_data"] = Field(
        default="auto",
        description="How workers get the data: 'memory' (loaded on the driver, one copy in the object "
        "store), 'ray_data' (parquet of feature columns + 'label', one file or a directory or s3:// prefix "
        "of them, streamed to each worker as a Ray Dataset shard, never collected on the driver), 'auto' "
        "(ray_data for s3:// data and .parquet files larger than ray_data_threshold_bytes). Language models "
        "(kind: generative): 'ray_data' tokenizes a folder or prefix of parquet/jsonl 'text' files in Ray Data "
        "(docs/generative.md, Data).",
    )
    ray_data_threshold_bytes: int = Field(
        default=256 * 1024**2, ge=0,
        description="'auto' data_loading streams .parquet files (a language model's table files) above this size."
    )
    vocab_size: int = Field(default=2000, ge=3, description="Text data: most tokens the trained tokenizer keeps.")
    max_seq_len: int = Field(default=32, ge=1, description="Text data: tokens per text (padded/truncated).")
    num_workers: int = Field(default=2, ge=1, description="DDP workers (Ray Train actors).")
    cpus_per_worker: float = Field(default=1.0, gt=0.0, description="CPUs each worker reserves.")
    use_gpu: Optional[bool] = Field(
        default=None, description="Train on GPUs; default: whether the Ray cluster has any."
    )
    storage_path: str = Field(
        default="~/.maas_ray/runs",
        description="Ray Train storage for checkpoints (local dir, or s3:// on clusters).",
    )
    run_name: Optional[str] = Field(
        default=None,
        description="Run name; re-running with the same name resumes from its last checkpoint.",
    )
    checkpoint_every: int = Field(
        default=5, ge=1, description="Checkpoint every N epochs (and always after the last)."
    )
    max_failures: int = Field(
        default=3, ge=-1, description="Worker-group restarts allowed (-1: unlimited)."
    )
    class_labels: Optional[list[str]] = Field(
        default=None, description="Class names; default: the label values as strings."
    )
    parent: Optional[str] = Field(
        default=None, description="Fine-tune from a published version, 'model:version|alias'."
    )
    min_test_accuracy: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Refuse to publish below this test accuracy."
    )
    parity_tolerance: float = Field(
        default=1e-4, gt=0.0,
        description="Max abs diff allowed between torch and onnxruntime fp32 logits on the validation split.",
    )
    external_data_threshold_bytes: int = Field(
        default=2 * 1024**3, ge=1,
        description="Export weights to an ONNX external data file above this size (protobuf's 2 GB cap).",
    )

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v not in FAMILY_ARGS and not _IMPORT_PATH.match(v):
            raise ValueError(
                f"model must be one of {list(FAMILY_ARGS)} or an import path 'package.module:factory', got {v!r}"
            )
        return v

    @field_validator("model_args", mode="before")
    @classmethod
    def _model_args(cls, v: Any) -> Any:
        if isinstance(v, str):  # from the command line
            try:
                v = json.loads(v)
            except json.JSONDecodeError as exc:
                raise ValueError(f"model_args must be a JSON object, got {v!r}: {exc}") from exc
        if not isinstance(v, dict):
            raise ValueError(f"model_args must be a mapping, got {v!r}")
        return v

    @field_validator("data")
    @classmethod
    def _data(cls, v: str) -> str:
        if v in BUILTIN_DATA or (_IMPORT_PATH.match(v) and not os.path.exists(v)):
            return v
        if v.startswith(("s3://", "gs://")):  # parquet streamed with Ray Data (one file or a prefix)
            return v
        path = os.path.abspath(os.path.expanduser(v))
        if not (os.path.isdir(path) or v.endswith(DATA_SUFFIXES)):
            raise ValueError(
                f"data must be one of {list(BUILTIN_DATA)}, a {'/'.join(DATA_SUFFIXES)} file, a folder of "
                f"images or 'package.module:loader', got {v!r}"
            )
        return path

    @field_validator("parent")
    @classmethod
    def _parent(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (v.count(":") != 1 or not all(v.split(":"))):
            raise ValueError(f"parent must look like 'model:version' or 'model:alias', got {v!r}")
        return v

    @model_validator(mode="after")
    def _resolve_paths(self) -> "TrainConfig":
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction must leave >= 10 % for training, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )
        if self.data_loading == "ray_data" and not (
            self.data.endswith(".parquet") or "://" in self.data or os.path.isdir(self.data)
        ):
            raise ValueError(
                f"data_loading 'ray_data' needs a .parquet file, got data {self.data!r} "
                "(or a directory or s3:// prefix of .parquet files)"
            )
        if self.model in FAMILY_ARGS:  # built-ins: check model_args now, not in a worker
            try:
                self.model_args = FAMILY_ARGS[self.model].model_validate(self.model_args).model_dump()
            except ValidationError as exc:
                raise ValueError(format_validation_error(exc, f"model_args of {self.model}")) from exc
        if "://" not in self.storage_path:
            self.storage_path = os.path.abspath(os.path.expanduser(self.storage_path))
        return self

    @classmethod
    def load(cls, path: Optional[str] = None, **overrides: Any) -> "TrainConfig":
        """Read a YAML file (optional), apply non-None overrides, validate."""
        return load_config(cls, path, overrides, "training config")


_Config = TypeVar("_Config", bound=BaseModel)


def load_config(cls: type[_Config], path: Optional[str], overrides: dict[str, Any], what: str) -> _Config:
    """A YAML file (optional) with the non-None ``overrides`` applied, validated as ``cls``;
    ConfigError naming ``what``, the file and the bad fields otherwise."""
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read {what} {path!r}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{what} {path!r} must be a mapping, got {type(raw).__name__}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, what)) from exc
