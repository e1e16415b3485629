"""Small real artifacts for tests: ONNX graphs built with onnx.helper (no torch)."""

from __future__ import annotations

import numpy as np


def linear_onnx(in_features: int = 4, out_features: int = 3, seed: int = 0) -> bytes:
    """input (B, in) FP32 -> logits (B, out): x @ W + b, with a dynamic batch dim."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(in_features, out_features)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.normal(size=(out_features,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"])],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", out_features])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
