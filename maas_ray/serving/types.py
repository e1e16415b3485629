"""The types every serving module shares: tensors, request schemas, decoded requests.

The bottom of ``maas_ray.serving``: it imports nothing of the package (only the registry's
datatype table), so codecs, processors,
the ingress core and the transports can all depend on it without a circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import numpy as np

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
    """One input as requests name it; the first datatype is the one model metadata advertises."""

    name: str
    datatypes: tuple[str, ...]
    shape: list[int]


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

    @classmethod
    def of(cls, pre: _DeclaresInputs, post: _DeclaresOutputs) -> "RequestSchema":
        return cls(
            inputs={r.name: frozenset(r.datatypes) for r in pre.request_inputs},
            outputs=tuple(t.name for t in post.response_outputs),
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
