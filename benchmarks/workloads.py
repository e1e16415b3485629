"""Benchmark workloads: a torch model exported to ONNX plus one request item.

A workload is a builder (torch module + example input) and a name. Adding a third
one is a ``Workload(...)`` entry in ``WORKLOADS``; every system serves the same
ONNX bytes through the same OIP v2 request body.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

INPUT_NAME, OUTPUT_NAME = "input", "logits"
MODEL_PATH = "/v2/models/{model}/infer"  # the one URL path every system answers
_OIP = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


@dataclass(frozen=True)
class Workload:
    name: str  # also the served model name
    description: str
    build: Callable[[], "object"]  # () -> torch.nn.Module in eval mode
    example: Callable[[int, np.random.Generator], np.ndarray]  # (batch, rng) -> input array
    max_batch_size: int = 64  # server-side dynamic batching cap (tuned Ray Serve, maas-ray)

    def onnx_bytes(self) -> bytes:
        """Export with a dynamic batch axis (the TorchScript exporter: no onnxscript needed)."""
        import torch

        model = self.build().eval()
        x = torch.from_numpy(self.example(1, np.random.default_rng(0)))
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DeprecationWarning of dynamo=False, tracer warnings
            torch.onnx.export(
                model, (x,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=17, dynamo=False,
            )
        return buf.getvalue()

    def request_body(self, batch: int = 1, seed: int = 0) -> bytes:
        """One OIP v2 infer request holding ``batch`` items."""
        x = self.example(batch, np.random.default_rng(seed))
        item = {"name": INPUT_NAME, "datatype": _OIP[x.dtype], "shape": list(x.shape), "data": x.reshape(-1).tolist()}
        return json.dumps({"inputs": [item]}).encode()


# ---- tiny MLP: overhead-bound ------------------------------------------------------------
def _mlp():
    from torch import nn

    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _mlp_input(batch: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((batch, 64), dtype=np.float32)  # (B, 64)


# ---- wide MLP: batching pays ------------------------------------------------------------
def _wide_mlp():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))


def _wide_input(batch: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((batch, 784), dtype=np.float32)  # (B, 784)


# ---- transformer text classifier: compute-bound ------------------------------------------
VOCAB, SEQ, D_MODEL, HEADS, LAYERS, CLASSES = 8000, 128, 256, 4, 4, 4


def _transformer():
    import torch
    from torch import nn

    class TextClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.tok = nn.Embedding(VOCAB, D_MODEL)
            self.pos = nn.Parameter(torch.randn(1, SEQ, D_MODEL) * 0.02)
            layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, dim_feedforward=4 * D_MODEL, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
            self.head = nn.Linear(D_MODEL, CLASSES)

        def forward(self, ids):  # ids: (B, T) int64
            h = self.encoder(self.tok(ids) + self.pos)  # (B, T, D)
            return self.head(h.mean(dim=1))  # (B, C)

    return TextClassifier()


def _token_ids(batch: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, VOCAB, size=(batch, SEQ), dtype=np.int64)  # (B, T)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("mlp", "tiny MLP 64->128->10, FP32 (overhead-bound)", _mlp, _mlp_input, max_batch_size=64),
        Workload("wide", "wide MLP 784->2048->2048->10, FP32 (~6 M weights: batching pays)", _wide_mlp,
                 _wide_input, max_batch_size=64),
        Workload(
            "transformer",
            f"text classifier: {LAYERS} encoder layers, d_model {D_MODEL}, {HEADS} heads, seq {SEQ}, "
            f"vocab {VOCAB}, {CLASSES} classes, INT64 ids (compute-bound)",
            _transformer, _token_ids, max_batch_size=32,
        ),
    )
}
