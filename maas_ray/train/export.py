"""Export a trained torch model to ONNX and prove the two agree."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import torch
from torch import nn

from maas_ray.errors import ConfigError, ParityError
from maas_ray.runtime import create_session

logger = logging.getLogger(__name__)
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(model: nn.Module, num_features: int) -> bytes:
    """ONNX bytes with a dynamic batch dimension: input (B, F) -> logits (B, C)."""
    model = model.cpu().eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript; for plain MLPs both give the same graph, so we skip that dependency.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, num_features),),
            buf,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return buf.getvalue()


def parity_check(model: nn.Module, onnx_bytes: bytes, x: np.ndarray, tolerance: float) -> float:
    """Run the same inputs through torch and onnxruntime (CPU); return the max abs diff."""
    model = model.cpu().eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    session = create_session(onnx_bytes, device="cpu")
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    diff = float(np.max(np.abs(expected - got)))
    logger.info("parity torch vs onnxruntime on %d inputs: max abs diff %.3g", len(x), diff)
    if not diff <= tolerance:
        raise ParityError(f"parity check failed: max abs diff {diff:.3g} > tolerance {tolerance:.3g}")
    return diff


def state_from_onnx(onnx_bytes: bytes, model: nn.Module) -> dict[str, np.ndarray]:
    """Recover torch weights from an ONNX graph exported by :func:`export_onnx`."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load_model_from_string(onnx_bytes).graph.initializer}
    state = {}
    for name, param in model.state_dict().items():
        if name not in inits or tuple(inits[name].shape) != tuple(param.shape):
            raise ConfigError(
                f"cannot fine-tune from this ONNX graph: weight {name!r} {tuple(param.shape)} "
                "not found; the parent must share the architecture (hidden_sizes)"
            )
        state[name] = inits[name]
    return state
