"""OptimizeConfig: what `maas optimize` does to a published version."""

from __future__ import annotations

import os
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class OptimizeConfig(BaseModel):
    """How to derive an optimized version from a published one."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["int8", "fp16", "graph"] = Field(
        description="int8 (onnxruntime quantization), fp16 (float16 weights, FP32 graph I/O) or graph (offline graph optimization)."
    )
    static: bool = Field(default=False, description="int8 only: static quantization calibrated on the validation split.")
    calibration_size: int = Field(default=200, ge=1, description="int8 --static: validation rows used for calibration.")
    max_accuracy_drop: float = Field(
        default=0.01, description="Refuse to publish when parent accuracy - child accuracy exceeds this (absolute)."
    )
    threads: int = Field(default=1, ge=1, description="onnxruntime intra-op threads for both parent and child timings.")
    batch_sizes: list[int] = Field(default=[1, 8, 32, 128], description="Batch sizes timed; the best throughput is reported.")
    timing_seconds: float = Field(default=0.5, gt=0, description="Time spent per batch size per model.")
    # Generative (kind: generative) versions: perplexity and decode speed instead of accuracy and batches.
    max_perplexity_increase: float = Field(
        default=0.02,
        description="Generative versions: refuse to publish when child perplexity / parent perplexity - 1 exceeds "
        "this (relative; 0.02 = 2 % higher), both measured on the same held-out tokens.",
    )
    eval_text: Optional[str] = Field(
        default=None,
        description="Generative versions: a UTF-8 text file (documents separated by blank lines) to measure "
        "perplexity on, instead of the test split rebuilt from the version's training config (required when "
        "the version records none, e.g. one published with `maas models publish --tokenizer`).",
    )
    eval_tokens: int = Field(
        default=16384, ge=2, description="Generative versions: most held-out tokens scored for perplexity."
    )
    decode_tokens: int = Field(
        default=32, ge=1, description="Generative versions: greedy tokens decoded (batch 1) per tokens/s run."
    )

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError(f"batch_sizes must be positive integers, got {v}")
        return sorted(set(v) | {1})  # batch 1 is always reported

    @field_validator("max_accuracy_drop")
    @classmethod
    def _drop(cls, v: float) -> float:
        if not -1.0 <= v <= 1.0:
            raise ValueError(f"max_accuracy_drop is an accuracy difference in [-1, 1], got {v}")
        return v

    @field_validator("max_perplexity_increase")
    @classmethod
    def _ppl(cls, v: float) -> float:
        if not -1.0 < v <= 100.0:
            raise ValueError(f"max_perplexity_increase is a relative increase in (-1, 100], got {v}")
        return v

    @field_validator("eval_text")
    @classmethod
    def _eval_file(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not os.path.isfile(v):
            raise ValueError(f"eval_text must be a readable text file, got {v!r}")
        return v

    @model_validator(mode="after")
    def _static_needs_int8(self) -> "OptimizeConfig":
        if self.static and self.method != "int8":
            raise ValueError(f"static applies to int8 only, not to method {self.method!r}")
        return self
