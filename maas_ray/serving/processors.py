"""The built-in pre- and postprocessors, the registry of their names, and the resolver that
turns a processor name (built-in, or a plug-in's ``package.module:Class``) into its class.

A preprocessor turns decoded request tensors into the model's feeds and validates them
against the model schema (shapes, dtypes, image contents), before batching; the wire format
was already checked by the codecs against what the preprocessor says requests may send
(``request_inputs``). A postprocessor turns model outputs into response tensors and says
which (``response_outputs``). The contract (base classes, constructor) is in
:mod:`maas_ray.serving.plugins`; built-ins follow it exactly as plug-ins do. Every request
error is an InvalidInputError (400) or PayloadTooLargeError (413); Pillow's exceptions on
client bytes are mapped to those.
"""

from __future__ import annotations

import binascii
import importlib
import io
import logging
import re
from typing import Any, Mapping, Optional, cast

import numpy as np

from maas_ray.errors import ConfigError, InvalidInputError, MaasError, PayloadTooLargeError
from maas_ray.registry.manifest import OIP_TO_NUMPY, Manifest, ProcessorSpec, TensorSpec
from maas_ray.serving.config import Limits
from maas_ray.serving.plugins import (
    Postprocessor,
    Preprocessor,
    Processor,
    check_tensor,
    datatype_of,
)
from maas_ray.serving.tabular import RegressionPostprocessor, TabularPreprocessor
from maas_ray.serving.text import TextPreprocessor
from maas_ray.serving.types import RequestInput, Tensors

logger = logging.getLogger(__name__)

# Datatypes the image preprocessor takes raw pixels in (after BYTES, for encoded images).
PIXEL_DATATYPES = (
    "FP32", "FP64", "FP16", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
)


class TensorPreprocessor(Preprocessor):
    """Pass-through: request tensors must match the graph inputs by name, shape and dtype."""

    name = "tensor"

    @property
    def request_inputs(self) -> list[RequestInput]:
        return [RequestInput(s.name, (s.datatype,), list(s.shape)) for s in self.inputs]

    def __call__(self, tensors: Tensors, *, strict_dtypes: bool) -> Tensors:
        expected = [s.name for s in self.inputs]
        missing = [n for n in expected if n not in tensors]
        if missing:
            raise InvalidInputError(f"missing input(s) {missing}; model expects {expected}")
        extra = [n for n in tensors if n not in expected]
        if extra:
            raise InvalidInputError(f"unknown input(s) {extra}; model expects {expected}")
        feeds = {}
        for spec in self.inputs:
            arr = tensors[spec.name]
            if strict_dtypes and arr.dtype != spec.numpy_dtype and arr.dtype != object:
                # OIP requests declare their datatype: a mismatch is the client's error.
                raise InvalidInputError(
                    f"input {spec.name!r}: expected datatype {spec.datatype}, got {datatype_of(arr)}"
                )
            feeds[spec.name] = check_tensor(spec, arr)
        sizes = {a.shape[0] for a in feeds.values()}
        if len(sizes) > 1:
            raise InvalidInputError(f"inputs disagree on the batch size: {sorted(sizes)}")
        return feeds


class ImagePreprocessor(Preprocessor):
    """Images in, model feeds out: decode PNG/JPEG (raw or base64), grey/RGB, resize, scale.

    Params: height, width, channels (1 or 3); pixel_max: the value of full
    intensity in raw pixel arrays (255 for 8-bit images, 16 for sklearn digits);
    invert_encoded: flip decoded images (dark ink on light paper -> bright ink);
    mean, std: normalisation after scaling to [0, 1]. The result is reshaped to the
    model's input shape, so flat (B, H*W) MLPs and (B, C, H, W) CNNs both work.
    """

    name = "image"

    def __init__(
        self,
        manifest: Manifest,
        params: Mapping[str, Any],
        *,
        limits: Optional[Limits] = None,
        files: Optional[Mapping[str, bytes]] = None,
    ) -> None:
        super().__init__(manifest, params, limits=limits, files=files)
        if len(self.inputs) != 1:
            raise ConfigError(f"image preprocessor needs a one-input model, {manifest.model} has {len(self.inputs)}")
        try:
            self.h, self.w = int(params["height"]), int(params["width"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"image preprocessor needs integer 'height' and 'width', got {params}") from exc
        self.c = int(params.get("channels", 1))
        if self.c not in (1, 3):
            raise ConfigError(f"image preprocessor channels must be 1 or 3, got {self.c}")
        self.pixel_max = float(params.get("pixel_max", 255.0))
        self.invert = bool(params.get("invert_encoded", False))
        self.mean = float(params.get("mean", 0.0))
        self.std = float(params.get("std", 1.0))
        self.spec = self.inputs[0]

    @property
    def request_inputs(self) -> list[RequestInput]:
        # Encoded images (BYTES, one per item) first: that is what metadata advertises.
        return [RequestInput(self.spec.name, ("BYTES", *PIXEL_DATATYPES), [-1])]

    def _decode(self, item: Any, i: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        if isinstance(item, str):
            try:
                raw = binascii.a2b_base64(item, strict_mode=True)
            except (binascii.Error, ValueError) as exc:
                raise InvalidInputError(f"image {i}: not base64: {exc}") from exc
        elif isinstance(item, (bytes, bytearray, memoryview)):
            raw = item
        else:
            raise InvalidInputError(f"image {i}: expected PNG/JPEG bytes or a base64 string, got {type(item).__name__}")
        try:
            # open() reads only the header: check the declared size before decoding anything.
            with Image.open(io.BytesIO(raw), formats=("PNG", "JPEG")) as img:
                w, h = img.size
                if w * h > self.limits.max_image_pixels:
                    raise PayloadTooLargeError(
                        f"image {i}: {w}x{h} = {w * h} pixels, over the limit of {self.limits.max_image_pixels} "
                        "(max_image_pixels)"
                    )
                small = img.convert("L" if self.c == 1 else "RGB").resize((self.w, self.h), Image.BILINEAR)
        except MaasError:
            raise
        except UnidentifiedImageError as exc:
            raise InvalidInputError(f"image {i}: not a PNG or JPEG image") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            # Over Pillow's own pixel limit (its warning is an error only where warnings are).
            raise PayloadTooLargeError(f"image {i}: too many pixels to decode: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - untrusted bytes into Pillow's decoders
            # Corrupt or truncated files raise OSError, SyntaxError (broken PNG chunks),
            # zlib.error, struct.error, EOFError, ValueError, even IndexError from format
            # plugins: whatever Pillow raises on client bytes is the client's 400.
            raise InvalidInputError(f"image {i}: cannot decode as PNG/JPEG: {type(exc).__name__}: {exc}") from exc
        x = np.asarray(small, dtype=np.float32) / 255.0  # (H, W) or (H, W, C)
        return 1.0 - x if self.invert else x

    def _pixels(self, arr: np.ndarray) -> np.ndarray:
        if arr.dtype.kind not in "iuf":
            raise InvalidInputError(f"input {self.spec.name!r}: pixels must be numbers, got {arr.dtype}")
        if arr.dtype.kind == "f" and arr.dtype.itemsize > 4 and np.abs(arr).max() > np.finfo(np.float32).max:
            raise InvalidInputError(f"input {self.spec.name!r}: pixel values overflow FP32")
        n = arr.shape[0]
        per_item = self.h * self.w * self.c
        if arr.ndim < 2 or arr[0].size != per_item:
            raise InvalidInputError(
                f"input {self.spec.name!r}: each image needs {self.h}x{self.w}x{self.c} = {per_item} "
                f"pixels, got shape {list(arr.shape[1:])}"
            )
        return arr.reshape(n, self.h, self.w, self.c).astype(np.float32) / self.pixel_max

    def __call__(self, tensors: Tensors, *, strict_dtypes: bool) -> Tensors:
        if len(tensors) != 1:
            raise InvalidInputError(f"expected one input (images), got {sorted(tensors)}")
        arr = tensors.get(self.spec.name)
        if arr is None:
            arr = next(iter(tensors.values()))
        if arr.ndim == 0:
            raise InvalidInputError(f"input {self.spec.name!r}: expected a batch of images, got a scalar")
        if arr.shape[0] == 0 or arr.size == 0:
            raise InvalidInputError(f"input {self.spec.name!r}: empty batch (no images), shape {list(arr.shape)}")
        if arr.dtype == object:  # encoded images
            x = np.stack([self._decode(v, i) for i, v in enumerate(arr.reshape(-1))])
            x = x.reshape(len(x), self.h, self.w, self.c)
        else:
            x = self._pixels(arr)  # (N, H, W, C)
        x = (x - self.mean) / self.std
        if len(self.spec.shape) == 4 and self.spec.shape[1] == self.c:
            x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        x = x.reshape(len(x), *[d for d in self.spec.shape[1:]]) if -1 not in self.spec.shape[1:] else x
        return {self.spec.name: check_tensor(self.spec, np.ascontiguousarray(x))}


class TensorPostprocessor(Postprocessor):
    """Pass the model outputs through unchanged."""

    name = "tensor"

    @property
    def response_outputs(self) -> list[TensorSpec]:
        return list(self.outputs)

    def __call__(self, outputs: Tensors) -> Tensors:
        return outputs


class ClassificationPostprocessor(Postprocessor):
    """Logits -> label, probabilities (softmax) and the top-k labels with their scores.

    Params: labels (class names; default "0".."C-1"), top_k (default 3),
    apply_softmax (default true; false if the graph already outputs probabilities).
    """

    name = "classification"

    def __init__(
        self,
        manifest: Manifest,
        params: Mapping[str, Any],
        *,
        limits: Optional[Limits] = None,
        files: Optional[Mapping[str, bytes]] = None,
    ) -> None:
        super().__init__(manifest, params, limits=limits, files=files)
        self.labels = params.get("labels")
        self.top_k = int(params.get("top_k", 3))
        self.softmax = bool(params.get("apply_softmax", True))
        self._labels_by_count: dict[int, np.ndarray] = {}
        if self.top_k < 1:
            raise ConfigError(f"classification top_k must be >= 1, got {self.top_k}")

    @property
    def response_outputs(self) -> list[TensorSpec]:
        c = self.outputs[0].shape[-1] if self.outputs[0].shape else -1
        if c == -1 and self.labels:
            c = len(self.labels)
        k = min(self.top_k, c) if c > 0 else self.top_k
        return [
            TensorSpec(name="label", datatype="BYTES", shape=[-1]),
            TensorSpec(name="probabilities", datatype="FP32", shape=[-1, c]),
            TensorSpec(name="top_k_labels", datatype="BYTES", shape=[-1, k]),
            TensorSpec(name="top_k_scores", datatype="FP32", shape=[-1, k]),
        ]

    def _label_array(self, classes: int) -> np.ndarray:
        """The class names as an object array (built once per class count, not per request)."""
        labels = self._labels_by_count.get(classes)
        if labels is None:
            names = self.labels if self.labels else [str(i) for i in range(classes)]
            labels = self._labels_by_count[classes] = np.asarray(names, dtype=object)
        return labels

    def __call__(self, outputs: Tensors) -> Tensors:
        # Per request on the hot path: one item of 10 classes takes 9.0 us, down from 13.6 (timeit),
        # with the label array built once and fancy indexing instead of take_along_axis.
        logits = next(iter(outputs.values()))  # (N, C)
        if logits.dtype != np.float32:
            logits = logits.astype(np.float32)
        if self.softmax:
            z = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = z / z.sum(axis=1, keepdims=True)
        else:
            probs = logits
        labels = self._label_array(probs.shape[1])
        top = np.argsort(-probs, axis=1)[:, : self.top_k]  # (N, k); C is small next to a request
        return {
            "label": labels[top[:, 0]],
            "probabilities": probs,
            "top_k_labels": labels[top],
            "top_k_scores": probs[np.arange(len(probs))[:, None], top],  # take_along_axis costs 2 us more
        }


KINDS = ("preprocessor", "postprocessor")
_BASES: dict[str, type[Processor]] = {"preprocessor": Preprocessor, "postprocessor": Postprocessor}

BUILTINS: dict[str, dict[str, type[Processor]]] = {
    "preprocessor": {c.name: c for c in (TensorPreprocessor, ImagePreprocessor, TextPreprocessor, TabularPreprocessor)},
    "postprocessor": {c.name: c for c in (TensorPostprocessor, ClassificationPostprocessor, RegressionPostprocessor)},
}
"""Built-in processor names -> classes, per kind: the plug-ins that ship with maas_ray."""
PREPROCESSORS: dict[str, type[Processor]] = BUILTINS["preprocessor"]
POSTPROCESSORS: dict[str, type[Processor]] = BUILTINS["postprocessor"]

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_IMPORT_PATH = re.compile(rf"^({_IDENT}(?:\.{_IDENT})*):({_IDENT}(?:\.{_IDENT})*)$")


def resolve_processor(kind: str, name: str) -> type[Processor]:
    """The class a processor name stands for: a built-in name (``image``) or an import path
    (``package.module:Class``) to a subclass of the kind's base class (Preprocessor or
    Postprocessor, from :mod:`maas_ray.serving.plugins`). Imports the module (in this process).

    Raises ConfigError naming the value: unknown name, malformed path, module not importable
    (or raising at import), no such attribute, not a class, wrong base class.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    builtins = BUILTINS[kind]
    base = _BASES[kind]
    if type(name) is not str:
        raise ConfigError(f"{kind} name must be a string, got {type(name).__name__}")
    if ":" not in name:
        if name in builtins:
            return builtins[name]
        raise ConfigError(
            f"unknown {kind} {name!r}; built-ins: {sorted(builtins)}, or a plug-in as 'package.module:Class'"
        )
    match = _IMPORT_PATH.match(name)
    if match is None:
        raise ConfigError(f"{kind} {name!r}: not an import path of the form 'package.module:Class'")
    module_name, qualname = match.groups()
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or anything the module raises at import
        raise ConfigError(
            f"{kind} {name!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    where = module_name
    for attr in qualname.split("."):
        if not hasattr(obj, attr):
            raise ConfigError(f"{kind} {name!r}: {where!r} has no attribute {attr!r}")
        obj = getattr(obj, attr)
        where = f"{where}:{attr}" if where == module_name else f"{where}.{attr}"
    if not isinstance(obj, type):
        raise ConfigError(f"{kind} {name!r}: not a class but {type(obj).__name__}")
    if not issubclass(obj, base):
        raise ConfigError(
            f"{kind} {name!r}: {obj.__qualname__} does not subclass {base.__module__}.{base.__qualname__}"
        )
    if obj.__call__ is base.__call__:
        raise ConfigError(f"{kind} {name!r}: {obj.__qualname__} does not define __call__")
    return obj


def _check_declarations(kind: str, name: str, proc: Processor) -> None:
    """A processor's declared inputs/outputs are what validation, metadata and the codecs
    use: check their form once, at load, so a plug-in's mistake names the plug-in."""
    attr = "request_inputs" if kind == "preprocessor" else "response_outputs"
    item_type = RequestInput if kind == "preprocessor" else TensorSpec
    defined = attr in getattr(proc, "__dict__", {}) or any(attr in vars(k) for k in type(proc).__mro__)
    try:
        declared = getattr(proc, attr) if defined else None
    except Exception as exc:  # noqa: BLE001 - a plug-in's property may raise anything
        raise ConfigError(f"{kind} {name!r}: {attr} raised {type(exc).__name__}: {exc}") from exc
    if declared is None:
        raise ConfigError(f"{kind} {name!r}: declares no {attr}")
    if isinstance(declared, (str, bytes)) or not hasattr(declared, "__iter__"):
        raise ConfigError(f"{kind} {name!r}: {attr} must be a list of {item_type.__name__}, got {declared!r}")
    declared = list(declared)
    if not declared:
        raise ConfigError(f"{kind} {name!r}: {attr} is empty")
    seen: set[str] = set()
    for item in declared:
        if not isinstance(item, item_type):
            raise ConfigError(
                f"{kind} {name!r}: {attr} must hold {item_type.__name__}s, got {type(item).__name__}: {item!r}"
            )
        if item.name in seen:
            raise ConfigError(f"{kind} {name!r}: {attr} names {item.name!r} twice")
        seen.add(item.name)
        datatypes = item.datatypes if isinstance(item, RequestInput) else (item.datatype,)
        unknown = [d for d in datatypes if d not in OIP_TO_NUMPY]
        if not datatypes or unknown:
            raise ConfigError(
                f"{kind} {name!r}: {attr} {item.name!r} has datatypes {list(datatypes)}; "
                f"each must be one of {sorted(OIP_TO_NUMPY)}"
            )
        shape = item.shape
        if not isinstance(shape, (list, tuple)) or any(type(d) is not int or d < -1 or d == 0 for d in shape):
            raise ConfigError(
                f"{kind} {name!r}: {attr} {item.name!r} has shape {shape!r}; want a list of sizes (-1 = any)"
            )


def make_processor(
    kind: str,
    manifest: Manifest,
    override: Optional[ProcessorSpec] = None,
    *,
    limits: Optional[Limits] = None,
    files: Optional[Mapping[str, bytes]] = None,
) -> Processor:
    """Resolve the version's processor of ``kind`` (``override`` from the app config, else the
    manifest's) and build it with the one constructor contract
    ``cls(manifest, params, *, limits, files)``; its declarations are checked before it is
    handed out. ``files``: the version's verified extra files (the text preprocessor reads its
    tokenizer.json from them)."""
    spec = override or getattr(manifest, kind)
    cls = resolve_processor(kind, spec.name)
    try:
        proc = cls(manifest, spec.params, limits=limits, files=files if files is not None else {})
    except MaasError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plug-in's constructor may raise anything
        raise ConfigError(
            f"{kind} {spec.name!r} for {manifest.model}:{manifest.version} failed to start: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    _check_declarations(kind, spec.name, proc)
    return proc


def make_preprocessor(
    manifest: Manifest,
    override: Optional[ProcessorSpec] = None,
    *,
    limits: Optional[Limits] = None,
    files: Optional[Mapping[str, bytes]] = None,
) -> Preprocessor:
    return cast(Preprocessor, make_processor("preprocessor", manifest, override, limits=limits, files=files))


def make_postprocessor(
    manifest: Manifest,
    override: Optional[ProcessorSpec] = None,
    *,
    limits: Optional[Limits] = None,
    files: Optional[Mapping[str, bytes]] = None,
) -> Postprocessor:
    return cast(Postprocessor, make_processor("postprocessor", manifest, override, limits=limits, files=files))


__all__ = [
    "BUILTINS",
    "ClassificationPostprocessor",
    "ImagePreprocessor",
    "POSTPROCESSORS",
    "PREPROCESSORS",
    "Postprocessor",
    "Preprocessor",
    "RequestInput",
    "TensorPostprocessor",
    "TensorPreprocessor",
    "Tensors",
    "TextPreprocessor",
    "check_tensor",
    "make_postprocessor",
    "make_preprocessor",
    "make_processor",
    "resolve_processor",
]
