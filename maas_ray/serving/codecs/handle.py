"""Python handle calls (``MaasClient.infer``, ``handle.predict.remote``): ``{name: array-like}``
in, the OIP v2 response body (a dict, every output inline) out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from maas_ray.errors import InvalidInputError, PayloadTooLargeError
from maas_ray.serving.types import RequestSchema, Tensors

if TYPE_CHECKING:
    from maas_ray.serving.config import Limits


def decode_handle(inputs: Any, schema: RequestSchema, limits: "Limits") -> Tensors:
    """Handle inputs (name -> array-like) against the version's schema and the element limit."""
    if not isinstance(inputs, dict) or not inputs:
        raise InvalidInputError("inputs must be a non-empty dict of name -> array")
    unknown = sorted(set(inputs) - set(schema.inputs))
    if unknown:
        raise InvalidInputError(f"unknown input(s) {unknown}; model expects {sorted(schema.inputs)}")
    tensors: Tensors = {}
    for name, value in inputs.items():
        try:
            tensors[name] = np.asarray(value)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"input {name!r}: not an array: {exc}") from exc
    elements = sum(a.size for a in tensors.values())
    if elements > limits.max_tensor_elements:
        raise PayloadTooLargeError(
            f"request has {elements} tensor elements; limits.max_tensor_elements is {limits.max_tensor_elements}"
        )
    return tensors
