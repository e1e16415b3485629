"""Pre- and postprocessors, chosen by name in the manifest (or overridden in the app config).

A preprocessor turns decoded request tensors into the model's feeds and validates
them against the model schema (shapes, dtypes, image contents), before batching; the
wire format was already checked by :mod:`maas_ray.serving.protocol` against what the
preprocessor says requests may send (:attr:`Preprocessor.request_inputs`). A
postprocessor turns model outputs into response tensors and says which
(:attr:`Postprocessor.response_outputs`). Both are plain classes, run inside whichever
replica the placement puts them in. Every error is an InvalidInputError (400) or
PayloadTooLargeError (413); Pillow's exceptions on client bytes are mapped to those.
"""

from __future__ import annotations

import binascii
import io
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np

from maas_ray.errors import ConfigError, InvalidInputError, MaasError, PayloadTooLargeError
from maas_ray.registry.manifest import Manifest, ProcessorSpec, TensorSpec
from maas_ray.serving.config import Limits
from maas_ray.serving.text import TextPreprocessor

logger = logging.getLogger(__name__)
Tensors = dict[str, np.ndarray]

# Datatypes the image preprocessor takes raw pixels in (after BYTES, for encoded images).
PIXEL_DATATYPES = (
    "FP32", "FP64", "FP16", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
)


@dataclass(frozen=True)
class RequestInput:
    """One input as requests name it; the first datatype is the one model metadata advertises."""

    name: str
    datatypes: tuple[str, ...]
    shape: list[int]


def check_tensor(spec: TensorSpec, arr: np.ndarray) -> np.ndarray:
    """Validate one batched input against its schema; returns it in the schema dtype."""
    if arr.ndim != len(spec.shape):
        raise InvalidInputError(
            f"input {spec.name!r}: expected shape {spec.shape} ({len(spec.shape)} dims, -1 = any), "
            f"got {list(arr.shape)}"
        )
    for got, want in zip(arr.shape, spec.shape):
        if want != -1 and got != want:
            raise InvalidInputError(f"input {spec.name!r}: expected shape {spec.shape} (-1 = any), got {list(arr.shape)}")
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


class Preprocessor:
    name: ClassVar[str]

    def __init__(self, manifest: Manifest, params: dict[str, Any], limits: Optional[Limits] = None) -> None:
        self.inputs = manifest.inputs
        self.params = params
        self.limits = limits or Limits()

    @property
    def request_inputs(self) -> list[RequestInput]:
        """The inputs requests send (names and accepted datatypes), which may differ from the graph's."""
        raise NotImplementedError

    def __call__(self, tensors: Tensors, *, strict_dtypes: bool) -> Tensors:
        raise NotImplementedError


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
                from maas_ray.serving.protocol import datatype_of

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

    def __init__(self, manifest: Manifest, params: dict[str, Any], limits: Optional[Limits] = None) -> None:
        super().__init__(manifest, params, limits)
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


class Postprocessor:
    name: ClassVar[str]

    def __init__(self, manifest: Manifest, params: dict[str, Any]) -> None:
        self.outputs = manifest.outputs
        self.params = params

    @property
    def response_outputs(self) -> list[TensorSpec]:
        """What the infer route returns (names, datatypes, shapes), after postprocessing."""
        raise NotImplementedError

    def __call__(self, outputs: Tensors) -> Tensors:
        raise NotImplementedError


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

    def __init__(self, manifest: Manifest, params: dict[str, Any]) -> None:
        super().__init__(manifest, params)
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


PREPROCESSORS: dict[str, type[Preprocessor]] = {c.name: c for c in (TensorPreprocessor, ImagePreprocessor, TextPreprocessor)}
POSTPROCESSORS: dict[str, type[Postprocessor]] = {c.name: c for c in (TensorPostprocessor, ClassificationPostprocessor)}


def make_preprocessor(
    manifest: Manifest,
    override: ProcessorSpec | None = None,
    *,
    limits: Optional[Limits] = None,
    files: dict[str, bytes] | None = None,
) -> Preprocessor:
    """``files``: the version's verified extra files, for preprocessors that declare
    ``needs_files`` (the text preprocessor reads its tokenizer.json from them)."""
    spec = override or manifest.preprocessor
    if spec.name not in PREPROCESSORS:
        raise ConfigError(f"unknown preprocessor {spec.name!r}; known: {sorted(PREPROCESSORS)}")
    cls = PREPROCESSORS[spec.name]
    if getattr(cls, "needs_files", False):
        return cls(manifest, spec.params, limits, files=files)
    return cls(manifest, spec.params, limits)


def make_postprocessor(manifest: Manifest, override: ProcessorSpec | None = None) -> Postprocessor:
    spec = override or manifest.postprocessor
    if spec.name not in POSTPROCESSORS:
        raise ConfigError(f"unknown postprocessor {spec.name!r}; known: {sorted(POSTPROCESSORS)}")
    return POSTPROCESSORS[spec.name](manifest, spec.params)
