"""The settings of one batch-scoring job."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator




class BatchConfig(BaseModel):
    """What to score, where to write it, and how many actors do it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(min_length=1, description="Registry model name.")
    version: str = Field(default="latest", min_length=1, description="Version number or alias.")
    input: str = Field(min_length=1, description="A file or folder, local or s3://bucket/prefix.")
    output: str = Field(min_length=1, description="Output folder (local or s3://): one sub-folder per input unit.")
    format: Literal["auto", "parquet", "csv", "images", "text"] = Field(
        default="auto",
        description="Input format; auto: images for an image model, else by file extension "
        "(.parquet, .csv, .txt).",
    )
    actors: int = Field(default=2, ge=1, le=1024, description="Scoring actors (each loads the version once).")
    batch_size: int = Field(default=4096, ge=1, le=1_000_000, description="Rows per scoring call.")
    cpus_per_actor: float = Field(default=1.0, gt=0, description="CPUs per actor (its onnxruntime threads).")
    gpus_per_actor: float = Field(default=0.0, ge=0, description="GPUs per actor; > 0 runs onnxruntime on CUDA.")
    registry: Optional[str] = Field(default=None, description="Registry root (default $MAAS_REGISTRY_ROOT).")

    @field_validator("input", "output")
    @classmethod
    def _no_scheme_but_s3(cls, v: str) -> str:
        if "://" in v and not v.startswith(("s3://", "file://")):
            raise ValueError(f"only local paths and s3:// are supported, got {v!r}")
        if v.startswith("s3://") and "?" in v:
            raise ValueError(f"query parameters are not supported in an s3:// URI, got {v!r}; set "
                             "AWS_ENDPOINT_URL (and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) instead")
        return v
