"""The ``text`` preprocessor: raw UTF-8 strings -> token ids with the version's own tokenizer.

Requests carry strings (OIP v2: a BYTES tensor of UTF-8 strings; v1: ``{"instances":
["...", ...]}``). The tokenizer is the ``tokenizer.json`` (Hugging Face ``tokenizers``
format) published in the version's artifact, checksummed like model.onnx, so serving
tokenizes exactly as training did. Ids are padded/truncated to ``max_seq_len`` so that
requests batched together share one shape (the graph itself accepts any length).

No torch here: ``tokenizers`` is a Rust library with a thin Python binding.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Optional

import numpy as np

from maas_ray.errors import ConfigError, InvalidInputError
from maas_ray.registry.manifest import Manifest
from maas_ray.serving.config import Limits
from maas_ray.serving.plugins import Preprocessor
from maas_ray.serving.types import RequestInput, Tensors


class TextPreprocessor(Preprocessor):
    """Params: tokenizer_file (an extra file of the version, default ``tokenizer.json``),
    max_seq_len (pad/truncate to this many tokens; default the tokenizer's own padding),
    input_name (what requests call the texts; default ``text``)."""

    name: ClassVar[str] = "text"

    def __init__(
        self,
        manifest: Manifest,
        params: Mapping[str, Any],
        *,
        limits: Optional[Limits] = None,
        files: Optional[Mapping[str, bytes]] = None,
    ) -> None:
        super().__init__(manifest, params, limits=limits, files=files)
        from tokenizers import Tokenizer  # only text models need it

        self.input_name = str(params.get("input_name", "text"))
        if len(self.inputs) != 1 or self.inputs[0].datatype not in ("INT64", "INT32"):
            raise ConfigError(
                f"text preprocessor needs one integer token-id input, {manifest.model} has "
                f"{[(s.name, s.datatype) for s in self.inputs]}"
            )
        self.spec = self.inputs[0]
        name = params.get("tokenizer_file", "tokenizer.json")
        if name not in self.files:
            raise ConfigError(
                f"text preprocessor: {manifest.model}:{manifest.version} has no extra file {name!r} "
                f"(files: {sorted(self.files)})"
            )
        try:
            self.tokenizer = Tokenizer.from_str(self.files[name].decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ConfigError(f"text preprocessor: cannot read {name!r}: {exc}") from exc
        max_len = params.get("max_seq_len")
        if max_len is not None:
            if int(max_len) < 1:
                raise ConfigError(f"text preprocessor max_seq_len must be >= 1, got {max_len}")
            pad_id = self.tokenizer.token_to_id("[PAD]") or 0
            self.tokenizer.enable_padding(pad_id=pad_id, pad_token="[PAD]", length=int(max_len))
            self.tokenizer.enable_truncation(max_length=int(max_len))

    @property
    def request_inputs(self) -> list[RequestInput]:
        return [RequestInput(self.input_name, ("BYTES",), [-1])]  # one UTF-8 string per item

    def __call__(self, tensors: Tensors, *, strict_dtypes: bool) -> Tensors:
        if len(tensors) != 1:
            raise InvalidInputError(f"expected one input (texts), got {sorted(tensors)}")
        arr = next(iter(tensors.values()))
        if arr.ndim == 0 or arr.size == 0:
            raise InvalidInputError("expected a non-empty batch of texts")
        texts = []
        for i, item in enumerate(arr.reshape(-1)):
            if isinstance(item, bytes):
                try:
                    item = item.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise InvalidInputError(f"text {i}: not valid UTF-8: {exc}") from exc
            if not isinstance(item, str):
                raise InvalidInputError(f"text {i}: expected a string, got {type(item).__name__}")
            texts.append(item)
        ids = np.asarray([e.ids for e in self.tokenizer.encode_batch(texts)], dtype=self.spec.numpy_dtype)
        return {self.spec.name: ids}  # (N, max_seq_len)
