"""ONNX -> ONNX transforms with onnxruntime's own tools: INT8 (dynamic/static), FP16, graph."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from typing import Optional

import numpy as np

from maas_ray.errors import ConfigError, InferenceError
from maas_ray.optimize.config import OptimizeConfig

logger = logging.getLogger(__name__)


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over one array (one row per call)."""

    def __init__(self, input_name: str, x: np.ndarray) -> None:
        self._rows = iter([{input_name: x[i : i + 1]} for i in range(len(x))])

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        return next(self._rows, None)


def _int8(src: str, dst: str, cfg: OptimizeConfig, calib: Optional[np.ndarray]) -> None:
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic, quantize_static

    pre = dst + ".pre.onnx"
    # Shape inference + folding first, as onnxruntime's quantization docs recommend.
    quant_pre_process(src, pre, skip_symbolic_shape=True)
    if cfg.static:
        import onnx

        name = onnx.load(pre).graph.input[0].name
        quantize_static(pre, dst, _Calibration(name, calib[: cfg.calibration_size]),
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    else:
        quantize_dynamic(pre, dst, weight_type=QuantType.QInt8)


def _fp16(src: str, dst: str) -> None:
    import onnx
    from onnxconverter_common import float16

    # keep_io_types: inputs/outputs stay float32, so schemas and clients do not change.
    # Cast stays float32: converting it relabels the exported transformer's Cast(to=FLOAT)
    # outputs as float16 and onnxruntime then refuses the graph (measured on text-order).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(
            onnx.load(src), keep_io_types=True, op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, "Cast"]
        )
    if caught:  # one warning per constant clamped to the float16 range: summarise, not spam
        logger.info("fp16: %d constants clamped to the float16 range", len(caught))
    onnx.save(converted, dst)


def _graph(src: str, dst: str) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # EXTENDED, not ALL: ALL adds layout-specific (NCHWc) ops that tie the file to this CPU.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = dst
    ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def transform(model_bytes: bytes, cfg: OptimizeConfig, calibration: Optional[np.ndarray] = None) -> bytes:
    """The optimized ONNX bytes of ``model_bytes``. ``calibration``: int8 static input rows."""
    if cfg.method == "int8" and cfg.static and (calibration is None or len(calibration) == 0):
        raise ConfigError("int8 static quantization needs calibration rows (the validation split is empty)")
    with tempfile.TemporaryDirectory(prefix="maas-opt-") as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
        with open(src, "wb") as f:
            f.write(model_bytes)
        try:
            if cfg.method == "int8":
                _int8(src, dst, cfg, calibration)
            elif cfg.method == "fp16":
                _fp16(src, dst)
            else:
                _graph(src, dst)
        except ConfigError:
            raise
        except Exception as exc:  # onnx / onnxruntime raise many unrelated types
            raise InferenceError(f"{cfg.method} optimization failed: {exc}") from exc
        with open(dst, "rb") as f:
            out = f.read()
    logger.info("%s: %d -> %d bytes", cfg.method, len(model_bytes), len(out))
    return out
