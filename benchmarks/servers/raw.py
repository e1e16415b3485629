"""What a baseline server does around the model for a raw workload (cnn-png, text-raw).

Written as a user serving the model without maas-ray would write it (Pillow, ``tokenizers``,
numpy; no maas_ray import, so the KServe venv runs it too), with the parameters of the
published manifest (``<workload>.raw.json``, written by benchmarks/workloads.py):

- ``image``: base64 -> PNG/JPEG decode -> grey/RGB -> BILINEAR resize -> /255 -> invert ->
  (x - mean) / std -> the model's input layout;
- ``text``: the version's tokenizer.json, padded/truncated to ``max_seq_len`` -> int64 ids;
- ``classification``: argmax -> the label string.

maas-ray's processors (maas_ray/serving/processors.py, text.py) do the same transforms and
also validate the input and answer probabilities and the top-k labels.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Iterable, Union

import numpy as np


class RawCodec:
    def __init__(self, spec: dict) -> None:
        pre = spec["preprocessor"]
        self.kind, params = pre["name"], pre["params"]
        self.labels = np.asarray(spec["postprocessor"]["params"]["labels"], dtype=object)
        self.model_shape = spec["model_input"]["shape"]  # e.g. [-1, 1, 8, 8] or [-1, -1]
        if self.kind == "image":
            self.h, self.w, self.c = int(params["height"]), int(params["width"]), int(params.get("channels", 1))
            self.invert = bool(params.get("invert_encoded", False))
            self.mean, self.std = float(params.get("mean", 0.0)), float(params.get("std", 1.0))
        elif self.kind == "text":
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(spec["files"][params.get("tokenizer_file", "tokenizer.json")])
            if params.get("max_seq_len") is not None:
                n = int(params["max_seq_len"])
                self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id("[PAD]") or 0, pad_token="[PAD]",
                                              length=n)
                self.tokenizer.enable_truncation(max_length=n)
        else:
            raise ValueError(f"no baseline code for the {self.kind!r} preprocessor")

    @classmethod
    def from_file(cls, path: str) -> "RawCodec":
        with open(path) as f:
            return cls(json.load(f))

    def _image(self, item: Union[str, bytes]) -> np.ndarray:
        from PIL import Image

        raw = base64.b64decode(item) if isinstance(item, str) else item  # JSON: base64; binary: bytes
        with Image.open(io.BytesIO(raw)) as img:
            small = img.convert("L" if self.c == 1 else "RGB").resize((self.w, self.h), Image.BILINEAR)
        x = np.asarray(small, dtype=np.float32) / 255.0
        return 1.0 - x if self.invert else x

    def preprocess(self, items: Iterable[Union[str, bytes]]) -> np.ndarray:
        """The BYTES tensor's elements (one per item) -> the model's feed, (N, ...)."""
        if self.kind == "text":
            texts = [t.decode() if isinstance(t, bytes) else t for t in items]
            return np.asarray([e.ids for e in self.tokenizer.encode_batch(texts)], dtype=np.int64)
        x = np.stack([self._image(i) for i in items]).reshape(-1, self.h, self.w, self.c)
        x = (x - self.mean) / self.std
        if len(self.model_shape) == 4 and self.model_shape[1] == self.c:
            x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        if -1 not in self.model_shape[1:]:
            x = x.reshape(len(x), *self.model_shape[1:])  # flat (N, H*W) models too
        return np.ascontiguousarray(x, dtype=np.float32)

    def postprocess(self, logits: np.ndarray) -> list[str]:
        return self.labels[logits.argmax(axis=1)].tolist()


def label_response(model: str, labels: list[str]) -> dict:
    """The OIP v2 answer of a raw workload: one label per item."""
    return {"model_name": model, "outputs": [{"name": "label", "datatype": "BYTES", "shape": [len(labels)],
                                              "data": labels}]}
