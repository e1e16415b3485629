"""The contract every pre- and postprocessor fulfils, built-in or a user's plug-in.

A processor is a class named in the manifest or the app config, either by a built-in name
(``tensor``, ``image``, ``text``; ``tensor``, ``classification``) or by import path
(``package.module:Class``); :func:`maas_ray.serving.processors.resolve_processor` turns the
name into the class. Plug-ins subclass :class:`Preprocessor` or :class:`Postprocessor` from
this module (itself light: no Pillow or tokenizers)::

    class Celsius(Preprocessor):
        def __init__(self, manifest, params, *, limits=None, files=None):
            super().__init__(manifest, params, limits=limits, files=files)
            self.request_inputs = [RequestInput("celsius", ("FP32",), [-1, 4])]

        def __call__(self, tensors, *, strict_dtypes):
            return {self.inputs[0].name: tensors["celsius"] * 1.8 + 32}

One constructor for all: ``cls(manifest, params, *, limits, files)``, where ``manifest`` is
the served version's Manifest (graph ``inputs``/``outputs``), ``params`` the processor's
``params`` from the manifest or the app config, ``limits`` the app's Limits, and ``files``
the version's verified extra files (name -> bytes; weights and ONNX external data left out).
Raise :class:`~maas_ray.errors.ConfigError` there for bad params or a model the processor
cannot serve: the replica fails to start with that message.

What a processor declares is all the serving layer knows of it: ``request_inputs`` (what
requests send: names, accepted OIP datatypes, shape) drives request validation (an unknown
name or a datatype not listed is a 400 / INVALID_ARGUMENT before the processor runs), model
metadata and the OpenAPI examples; ``response_outputs`` (TensorSpecs) names what responses
carry. Declare them as a property, a class attribute, or an attribute set in ``__init__``.

``__call__`` runs per request (a batch of items along the first axis) in whichever replica
the placement puts it; raise :class:`~maas_ray.errors.InvalidInputError` (400) for a bad
request; any other exception is a 500. Shapes are not checked before the preprocessor:
:func:`check_tensor` does it (and casts to the datatype).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Optional, Sequence

import numpy as np

from maas_ray.errors import InvalidInputError
from maas_ray.registry.manifest import NUMPY_TO_OIP, Manifest, TensorSpec
from maas_ray.serving.config import Limits
from maas_ray.serving.types import RequestInput, Tensors

__all__ = [
    "Limits",
    "Manifest",
    "Postprocessor",
    "Preprocessor",
    "Processor",
    "RequestInput",
    "TensorSpec",
    "Tensors",
    "check_tensor",
    "datatype_of",
]


class Processor:
    """What pre- and postprocessors share: the constructor contract."""

    name: ClassVar[str] = ""  # the built-in name; plug-ins are named by their import path
    kind: ClassVar[str] = ""  # "preprocessor" or "postprocessor"

    def __init__(
        self,
        manifest: Manifest,
        params: Mapping[str, Any],
        *,
        limits: Optional[Limits] = None,
        files: Optional[Mapping[str, bytes]] = None,
    ) -> None:
        self.manifest = manifest
        self.inputs: list[TensorSpec] = manifest.inputs  # the graph's
        self.outputs: list[TensorSpec] = manifest.outputs
        self.params: dict[str, Any] = dict(params)
        self.limits = limits if limits is not None else Limits()
        self.files: Mapping[str, bytes] = files if files is not None else {}


class Preprocessor(Processor):
    """Request tensors (as ``request_inputs`` names them) -> the graph's feeds.

    ``strict_dtypes`` is true for OIP v2 requests (HTTP and gRPC), which declare each
    datatype, and false for v1 JSON (numbers arrive as int64/float64: cast if lossless).
    """

    kind = "preprocessor"
    request_inputs: Sequence[RequestInput]  # the first datatype of each is what metadata advertises

    def __call__(self, tensors: Tensors, *, strict_dtypes: bool) -> Tensors:
        raise NotImplementedError


class Postprocessor(Processor):
    """The graph's outputs -> the response's tensors (as ``response_outputs`` names them)."""

    kind = "postprocessor"
    response_outputs: Sequence[TensorSpec]

    def __call__(self, outputs: Tensors) -> Tensors:
        raise NotImplementedError


def datatype_of(arr: np.ndarray) -> str:
    """The OIP datatype of an array (BYTES for strings and objects)."""
    if arr.dtype == object or arr.dtype.kind in "SU":
        return "BYTES"
    return NUMPY_TO_OIP.get(arr.dtype, str(arr.dtype))


def check_tensor(spec: TensorSpec, arr: np.ndarray) -> np.ndarray:
    """Validate one batched tensor against ``spec`` (shape, -1 = any; datatype, casting
    numbers only where lossless); returns it in the spec's dtype."""
    if arr.ndim != len(spec.shape):
        raise InvalidInputError(
            f"input {spec.name!r}: expected shape {spec.shape} ({len(spec.shape)} dims, -1 = any), "
            f"got {list(arr.shape)}"
        )
    for got, want in zip(arr.shape, spec.shape):
        if want != -1 and got != want:
            raise InvalidInputError(
                f"input {spec.name!r}: expected shape {spec.shape} (-1 = any), got {list(arr.shape)}"
            )
    if arr.shape[0] == 0:
        raise InvalidInputError(f"input {spec.name!r}: empty batch")
    dtype = spec.numpy_dtype
    if arr.dtype == dtype:
        return arr
    if arr.dtype == object or arr.dtype.kind in "SU":
        raise InvalidInputError(f"input {spec.name!r}: expected datatype {spec.datatype}, got {arr.dtype}")
    if dtype.kind in "iu" and arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0):
        raise InvalidInputError(f"input {spec.name!r}: expected datatype {spec.datatype}, got fractional numbers")
    if dtype.kind in "iuf" and arr.size and not np.can_cast(arr.dtype, dtype, casting="safe"):
        # Narrowing (v1 numbers arrive as int64/float64): only if every value fits.
        info = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype)
        if arr.dtype.kind == "b" or arr.min() < info.min or arr.max() > info.max:
            raise InvalidInputError(
                f"input {spec.name!r}: values do not fit {spec.datatype} (range {info.min} to {info.max})"
            )
    return arr.astype(dtype)
