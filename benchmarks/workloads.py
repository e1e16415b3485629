"""Benchmark workloads: what every system serves, and the one request item it gets.

Two kinds with one interface (``publish``, ``example``, ``request_body``, ``grpc_request``,
``sample``):

- :class:`Workload`: a torch module exported to ONNX; requests carry model-ready tensors.
  Adding one is a ``Workload(...)`` entry in ``WORKLOADS``.
- :class:`RawWorkload`: a built-in training family as its ``deployments/train/*.yaml``
  configures it, published as the training pipeline publishes it (ONNX export, the
  manifest's pre/postprocessor specs, the tokenizer); requests carry raw inputs (a PNG, a
  sentence), so every system decodes, runs and labels them.
"""

from __future__ import annotations

import base64
import io
import json
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
INPUT_NAME, OUTPUT_NAME = "input", "logits"
MODEL_PATH = "/v2/models/{model}/infer"  # the one URL path every system answers
_OIP = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


@dataclass(frozen=True)
class Published:
    """One workload's artifact, as the systems get it."""

    model_path: str  # the ONNX file the baselines load (the bytes maas-ray serves)
    registry: str  # maas_ray registry root holding <workload> v1
    # Raw workloads: a JSON file holding the manifest's pre/postprocessor specs, its model
    # input and the processors' extra files (paths): what the baselines do around the model
    # (benchmarks/servers/raw.py) and what an older maas_ray tree republishes (run.py).
    raw: Optional[str] = None


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

    def publish(self, root: Path) -> Published:
        """Write ``<root>/<name>.onnx`` and publish it, tensors in and out, to ``<root>/registry``."""
        from maas_ray.registry import Registry

        model_bytes = self.onnx_bytes()
        path = root / f"{self.name}.onnx"
        path.write_bytes(model_bytes)
        Registry(str(root / "registry")).publish(self.name, model_bytes)
        return Published(str(path), str(root / "registry"))

    def request_body(self, batch: int = 1, seed: int = 0) -> bytes:
        """One OIP v2 infer request holding ``batch`` items."""
        x = self.example(batch, np.random.default_rng(seed))
        item = {"name": INPUT_NAME, "datatype": _OIP[x.dtype], "shape": list(x.shape), "data": x.reshape(-1).tolist()}
        return json.dumps({"inputs": [item]}).encode()

    def grpc_request(self) -> bytes:
        from benchmarks.grpc_loadgen import infer_request

        x = self.example(1, np.random.default_rng(0))
        return infer_request(self.name, INPUT_NAME, x, _OIP[x.dtype])

    def sample(self, reply: dict) -> dict:
        """What run.py records of a system's answer to :meth:`request_body`."""
        return {"sample_output_shape": reply["outputs"][0]["shape"]}


@dataclass(frozen=True)
class RawWorkload:
    """A built-in family as ``train_config`` configures it, served from raw inputs.

    The artifact is what ``maas_ray.train.pipeline.train_and_publish`` publishes, made with
    the training package's own helpers: its data loading and splits (``load_splits``, which
    trains the tokenizer with ``train_tokenizer`` on the training split), model builder,
    ``export_onnx``, pre/postprocessor specs (``pipeline._processors``) and extra files.
    Only the weights differ: seeded, not trained (throughput does not depend on their
    values), so publishing takes a second instead of a Ray Train run.
    """

    name: str
    description: str
    train_config: str  # relative to the repository root
    max_batch_size: int = 32  # as the shipped app configs (deployments/{cnn,text}-cpu.yaml)

    @cached_property
    def _trained(self):
        """(TrainConfig, Splits, (preprocessor, postprocessor) specs), as train_and_publish makes them."""
        from maas_ray.train.config import TrainConfig
        from maas_ray.train.data import load_splits
        from maas_ray.train.pipeline import _processors

        cfg = TrainConfig.load(str(ROOT / self.train_config))
        splits = load_splits(cfg.data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed,
                             vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len)
        return cfg, splits, _processors(splits, cfg.class_labels or splits.class_labels)

    @property
    def labels(self) -> list[str]:
        return self._trained[2][1].params["labels"]

    def example(self, batch: int, rng: np.random.Generator) -> np.ndarray:
        """Model-ready feeds (what the preprocessor makes of raw inputs): rows of the training split."""
        x = self._trained[1].x_train
        return x[rng.integers(0, len(x), size=batch)]

    @cached_property
    def item(self) -> Union[str, bytes]:
        """The raw input of every request: a sentence of the dataset, or a digit as PNG bytes."""
        _, splits, (pre, _) = self._trained
        if pre.name == "text":
            from maas_ray.train.data import text_order_dataset

            return text_order_dataset()[0][-1]
        from maas_ray.cli.quickstart import digit_png

        # A test digit as `maas quickstart` sends them: a 32x32 PNG, dark ink on white, which
        # the preprocessor decodes, inverts and resizes to the model's 8x8.
        return base64.b64decode(digit_png(splits.x_test[-1] * 16))

    @property
    def request_input(self) -> str:
        """The input name requests use: the text preprocessor's ``input_name``, else the graph's."""
        pre = self._trained[2][0]
        return str(pre.params.get("input_name", "text")) if pre.name == "text" else INPUT_NAME

    def json_item(self) -> str:
        """The item as a JSON BYTES element: UTF-8 text, or base64 for binary data."""
        return self.item if isinstance(self.item, str) else base64.b64encode(self.item).decode()

    def publish(self, root: Path) -> Published:
        import torch

        from maas_ray.registry import ExtraFile, Registry
        from maas_ray.train.export import export_onnx
        from maas_ray.train.model import build_model
        from maas_ray.train.pipeline import SPEC_FILE, TOKENIZER_FILE, WEIGHTS_FILE, state_to_bytes

        cfg, splits, (pre, post) = self._trained
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, cfg.model_args, splits.spec)
        exported = export_onnx(model, splits.spec, external_data_threshold_bytes=cfg.external_data_threshold_bytes)
        spec_doc = {"model": cfg.model, "model_args": cfg.model_args, "data": splits.spec.as_dict(),
                    "class_labels": self.labels}
        files = {  # the extra files train_and_publish writes
            WEIGHTS_FILE: ExtraFile(state_to_bytes(model.state_dict()), role="weights"),
            SPEC_FILE: ExtraFile(json.dumps(spec_doc, indent=2).encode(), role="model_spec"),
        }
        if splits.tokenizer_json is not None:
            files[TOKENIZER_FILE] = ExtraFile(splits.tokenizer_json.encode(), role="tokenizer")
        registry = Registry(str(root / "registry"))
        manifest = registry.publish(
            self.name, exported.model_bytes, preprocessor=pre, postprocessor=post, files=files,
            model_spec={"model": cfg.model, "model_args": cfg.model_args}, dataset=splits.identity,
            description=f"{cfg.model} {cfg.model_args} as {self.train_config} configures it; seeded, untrained weights")
        model_path = root / f"{self.name}.onnx"
        model_path.write_bytes(exported.model_bytes)
        # The files the processors read, as served: from the registry, checksum verified.
        extra = {}
        for name, entry in manifest.files.items():
            if entry.role == "tokenizer":
                extra[name] = str(root / f"{self.name}.{name}")
                Path(extra[name]).write_bytes(registry.read_file(self.name, manifest.version, name))
        raw = root / f"{self.name}.raw.json"
        raw.write_text(json.dumps({
            "preprocessor": manifest.preprocessor.model_dump(), "postprocessor": manifest.postprocessor.model_dump(),
            "model_input": manifest.inputs[0].model_dump(), "files": extra,
        }, indent=1))
        return Published(str(model_path), str(root / "registry"), str(raw))

    def request_body(self) -> bytes:
        item = {"name": self.request_input, "datatype": "BYTES", "shape": [1], "data": [self.json_item()]}
        return json.dumps({"inputs": [item]}).encode()

    def grpc_request(self) -> bytes:
        from benchmarks.grpc_loadgen import infer_request

        raw = self.item.encode() if isinstance(self.item, str) else self.item
        return infer_request(self.name, self.request_input, np.array([raw], dtype=object), "BYTES")

    def sample(self, reply: dict) -> dict:
        """The answer's label; ValueError unless it is one label of this model's classes (a
        system that skipped the pre/postprocessing cannot answer one)."""
        out = next((o for o in reply.get("outputs", []) if o.get("name") == "label"), None)
        if out is None or out.get("datatype") != "BYTES" or len(out.get("data", [])) != 1 \
                or out["data"][0] not in self.labels:
            raise ValueError(f"expected one label of {self.labels} in output 'label', got {json.dumps(reply)[:300]}")
        return {"sample_label": out["data"][0]}


AnyWorkload = Union[Workload, RawWorkload]


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


WORKLOADS: dict[str, AnyWorkload] = {
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
        RawWorkload("cnn-png", "the built-in cnn as deployments/train/cnn.yaml configures it (digits 1x8x8, "
                    "channels 32/64), one 32x32 PNG digit per request: base64 + PNG decode, grey, resize, scale, "
                    "invert -> CNN -> label", "deployments/train/cnn.yaml"),
        RawWorkload("text-raw", "the built-in text-transformer as deployments/train/text.yaml configures it "
                    "(dim 64, 2 layers, 16 tokens, word-level tokenizer trained on text-order), one raw sentence "
                    "per request: tokenize, pad -> transformer -> label", "deployments/train/text.yaml"),
    )
}
