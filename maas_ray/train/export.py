"""Export a trained torch model to ONNX and prove the two agree."""

from __future__ import annotations

import io
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from maas_ray.errors import ConfigError, ParityError
from maas_ray.runtime import create_session
from maas_ray.train.data import DataSpec
from maas_ray.train.model import example_input

logger = logging.getLogger(__name__)
INPUT_NAME, OUTPUT_NAME = "input", "logits"
EXTERNAL_DATA_FILE = "model.onnx.data"  # the name model.onnx refers to; kept beside it


@dataclass
class Exported:
    model_bytes: bytes  # model.onnx
    external_data: Optional[bytes] = None  # model.onnx.data, when the weights went outside


def weights_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def export_onnx(model: nn.Module, data: DataSpec, *, external_data_threshold_bytes: int = 2 * 1024**3) -> Exported:
    """ONNX with a dynamic batch axis (and a dynamic sequence axis for token ids):
    input (B, *input_shape) -> logits (B, C). Weights above the threshold go to an
    external data file (protobuf cannot hold a graph over 2 GB)."""
    model = model.cpu().float().eval()
    axes = {0: "batch", 1: "sequence"} if data.kind == "text" else {0: "batch"}
    external = weights_bytes(model) > external_data_threshold_bytes
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript; for these models both give the same graph, so we skip that dependency.
        warnings.simplefilter("ignore")
        target: object = os.path.join(tmp, "model.onnx") if external else io.BytesIO()
        try:
            torch.onnx.export(
                model,
                (example_input(data),),
                target,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        except Exception as exc:  # torch raises many types for unsupported ops
            raise ConfigError(f"cannot export the model to ONNX: {type(exc).__name__}: {exc}") from exc
        if not external:
            return Exported(target.getvalue())  # type: ignore[union-attr]
        import onnx

        proto = onnx.load(target, load_external_data=True)
        onnx.save_model(
            proto, target, save_as_external_data=True, all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_FILE, size_threshold=0,
        )
        with open(target, "rb") as f, open(os.path.join(tmp, EXTERNAL_DATA_FILE), "rb") as g:
            logger.info("weights %d bytes > %d: exported as ONNX external data", weights_bytes(model), external_data_threshold_bytes)
            return Exported(f.read(), g.read())


def onnx_session(exported: Exported, tmp_dir: Optional[str] = None):
    """A CPU onnxruntime session; external data is read from files written beside the graph."""
    if exported.external_data is None:
        return create_session(exported.model_bytes, device="cpu")
    assert tmp_dir is not None, "external data needs a directory to materialise the files in"
    with open(os.path.join(tmp_dir, "model.onnx"), "wb") as f:
        f.write(exported.model_bytes)
    with open(os.path.join(tmp_dir, EXTERNAL_DATA_FILE), "wb") as f:
        f.write(exported.external_data)
    import onnxruntime as ort

    return ort.InferenceSession(os.path.join(tmp_dir, "model.onnx"), providers=["CPUExecutionProvider"])


def parity_check(model: nn.Module, exported: Exported, x: np.ndarray, tolerance: float) -> float:
    """Run the same inputs through torch and onnxruntime (CPU); return the max abs diff.

    Both run in fp32 (the export casts to fp32), so ``tolerance`` is an fp32 one; for a
    model whose own parameters are half precision, at least 1e-2 is allowed.
    """
    param_dtype = next(model.parameters()).dtype
    if param_dtype in (torch.float16, torch.bfloat16):
        tolerance = max(tolerance, 1e-2)
    model = model.cpu().float().eval()
    with torch.no_grad():
        expected = torch.cat([model(torch.from_numpy(x[i : i + 512])) for i in range(0, len(x), 512)]).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        got = onnx_session(exported, tmp).run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    diff = float(np.max(np.abs(expected - got)))
    logger.info("parity torch vs onnxruntime on %d inputs: max abs diff %.3g", len(x), diff)
    if not diff <= tolerance:
        raise ParityError(f"parity check failed: max abs diff {diff:.3g} > tolerance {tolerance:.3g}")
    return diff
