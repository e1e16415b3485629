"""TrainConfig: one pydantic model for YAML files, CLI flags and the worker loop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from maas_ray.errors import ConfigError, format_validation_error
from maas_ray.registry.manifest import check_name


class TrainConfig(BaseModel):
    """How to train, export and publish one model version."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str = Field(default="digits", description="Registry model to publish to.")
    data: str = Field(
        default="digits",
        description="'digits' (scikit-learn's 8x8 digits, offline) or a path to an .npz "
        "(arrays 'x' and 'y') or .parquet file (feature columns plus a 'label' column).",
    )
    hidden_sizes: list[int] = Field(default=[128, 64], description="MLP hidden layer widths.")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout after each hidden layer.")
    epochs: int = Field(default=30, ge=1, description="Epochs to train.")
    batch_size: int = Field(default=64, ge=1, description="Per-worker batch size.")
    lr: float = Field(default=3e-3, gt=0.0, description="Adam learning rate.")
    weight_decay: float = Field(default=1e-4, ge=0.0, description="Adam weight decay.")
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0, description="Held-out share.")
    seed: int = Field(default=0, description="Seed for the split and the initial weights.")
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
        default=1e-4, gt=0.0, description="Max abs diff allowed between torch and onnxruntime."
    )

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return check_name("model", v)

    @field_validator("hidden_sizes")
    @classmethod
    def _hidden_sizes(cls, v: list[int]) -> list[int]:
        if any(h < 1 for h in v):
            raise ValueError(f"hidden_sizes must be positive, got {v}")
        return v

    @field_validator("data")
    @classmethod
    def _data(cls, v: str) -> str:
        if v != "digits" and not v.endswith((".npz", ".parquet")):
            raise ValueError(f"data must be 'digits', an .npz or a .parquet path, got {v!r}")
        return v if v == "digits" else os.path.abspath(os.path.expanduser(v))

    @field_validator("parent")
    @classmethod
    def _parent(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (v.count(":") != 1 or not all(v.split(":"))):
            raise ValueError(f"parent must look like 'model:version' or 'model:alias', got {v!r}")
        return v

    @model_validator(mode="after")
    def _resolve_paths(self) -> "TrainConfig":
        if "://" not in self.storage_path:
            self.storage_path = os.path.abspath(os.path.expanduser(self.storage_path))
        return self

    @classmethod
    def load(cls, path: Optional[str] = None, **overrides: Any) -> "TrainConfig":
        """Read a YAML file (optional), apply non-None overrides, validate."""
        raw: dict[str, Any] = {}
        if path:
            try:
                raw = yaml.safe_load(Path(path).read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"cannot read training config {path!r}: {exc}") from exc
            if not isinstance(raw, dict):
                raise ConfigError(f"training config {path!r} must be a mapping, got {type(raw).__name__}")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "training config")) from exc
