"""The types every serving module shares: tensors, request schemas, decoded requests (tensor
requests and generative ones).

The bottom of ``maas_ray.serving``: it imports nothing of the package (only the registry's
datatype table), so codecs, processors,
the ingress core and the transports can all depend on it without a circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from maas_ray.registry.manifest import NUMPY_TO_OIP

Tensors = dict[str, np.ndarray]
"""Named arrays: request inputs, model feeds and outputs, response outputs."""

Scalar = Union[str, int, float, bool]
"""A parameter value (OIP ``parameters``)."""

Timings = dict[str, float]
"""Seconds per stage: decode (+ preprocess), queue, inference, encode (+ postprocess), hop."""


def datatype_of(arr: np.ndarray) -> str:
    """The OIP datatype of an output array (object and string arrays are BYTES)."""
    return "BYTES" if arr.dtype == object or arr.dtype.kind in "SU" else NUMPY_TO_OIP[arr.dtype]


@dataclass(frozen=True)
class RequestInput:
    """One input as requests name it; the first datatype is the one model metadata advertises.

    ``nullable``: values may be missing (JSON ``null``, or NaN in binary and gRPC float
    tensors), decoded as NaN for the processor; every other input must be finite.
    """

    name: str
    datatypes: tuple[str, ...]
    shape: list[int]
    nullable: bool = False


class _DeclaresInputs(Protocol):
    @property
    def request_inputs(self) -> Sequence[RequestInput]: ...


class _DeclaresOutputs(Protocol):
    @property
    def response_outputs(self) -> Sequence[Any]: ...  # TensorSpec-like: has .name


@dataclass(frozen=True)
class RequestSchema:
    """What one model version accepts and returns, built once per version."""

    inputs: dict[str, frozenset[str]]  # request input name -> accepted OIP datatypes
    outputs: tuple[str, ...]  # output names the response can carry (after postprocessing)
    nullable: frozenset[str] = frozenset()  # inputs whose values may be missing (null / NaN)
    optional: frozenset[str] = frozenset()  # inputs a request may leave out

    @classmethod
    def of(cls, pre: _DeclaresInputs, post: _DeclaresOutputs) -> "RequestSchema":
        return cls(
            inputs={r.name: frozenset(r.datatypes) for r in pre.request_inputs},
            outputs=tuple(t.name for t in post.response_outputs),
            nullable=frozenset(r.name for r in pre.request_inputs if getattr(r, "nullable", False)),
        )


@dataclass
class InferRequest:
    """A decoded, validated infer request (OIP v2 over HTTP or gRPC; v1 and handle calls carry
    only tensors)."""

    tensors: Tensors
    id: Optional[str] = None
    outputs: Optional[list[str]] = None  # requested output names; None = all
    binary_outputs: frozenset[str] = frozenset()  # outputs to send as binary (parameters.binary_data)
    parameters: Optional[dict[str, Scalar]] = None


@dataclass(slots=True)
class InferResult:
    """What the ingress core hands back to the transport that called it.

    ``after_response``: call it once the response is written (starts the shadow call, if
    this request is mirrored; None otherwise).
    """

    version: int
    outputs: Tensors
    stages: Timings
    after_response: Optional[Callable[[], None]] = None


# ---- generative requests (decoder language models) -------------------------------------
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256


class SamplingParams(BaseModel):
    """How one generative request samples its tokens; the same for every protocol (OpenAI
    routes, OIP generate, the Python handle). Bounds that depend on the version (``max_tokens``
    plus the prompt against its context length) are checked where the prompt is tokenized."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(default=16, ge=1, le=1_000_000, description="Most tokens to generate.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 = greedy (argmax).")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of tokens with this much probability.")
    top_k: int = Field(default=0, ge=0, le=1_000_000, description="Keep the k most likely tokens; 0 = all.")
    seed: Optional[int] = Field(default=None, ge=0, lt=2**63, description="Makes sampling reproducible for this request.")
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES,
                            description="Generation stops before any of these strings; they are not returned.")

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: list[str]) -> list[str]:
        for s in v:
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"each stop string must have 1..{MAX_STOP_CHARS} characters, got {s[:40]!r}")
        return v


@dataclass
class GenerateRequest:
    """A decoded, validated generative request, whichever protocol it came by: a ``prompt``
    (completions, OIP generate) or chat ``messages`` (role/content dicts, rendered with the
    version's chat template where the tokenizer lives)."""

    sampling: SamplingParams
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, str]]] = None
    stream: bool = False
    include_usage: bool = False  # OpenAI stream_options.include_usage: a last chunk with usage
    id: Optional[str] = None


@dataclass
class GenerationChunk:
    """One event of a generation, as the engine streams it: the text and tokens new since the
    last event; the last event has ``finish_reason`` (``stop``: EOS or a stop string,
    ``length``: max_tokens or the context is full)."""

    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated so far, cumulative
