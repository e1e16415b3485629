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


def _linear_graph(nodes: list, inits: list, in_features: int, out_features: int, seed: int, x: str = "input"):
    """x @ W + b after the given nodes, W and b from ``seed`` (as linear_onnx's)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(in_features, out_features)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.normal(size=(out_features,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [*nodes, helper.make_node("MatMul", [x, "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"])],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", out_features])],
        initializer=[w, b, *inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def fails_on_batches_onnx(in_features: int = 4, out_features: int = 3, seed: int = 0) -> bytes:
    """linear_onnx's model, except that any request of more than one item fails in onnxruntime
    (a Reshape to a fixed [1, in] shape): a candidate that errors on some inputs."""
    from onnx import helper, numpy_helper

    shape = numpy_helper.from_array(np.array([1, in_features], np.int64), "one_row")
    return _linear_graph([helper.make_node("Reshape", ["input", "one_row"], ["row"])], [shape],
                         in_features, out_features, seed, x="row")


def slow_loop(x: str, n_features: int, width: int, steps: int, rng: np.random.Generator) -> tuple[list, list, str]:
    """Nodes and initializers that output ``x`` (B, n_features) unchanged, after a Loop of ``steps``
    (width x width) matmuls whose result is added times zero: the cost without changing the answer.
    Returns (nodes, initializers, the output's name)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(rng.normal(size=(n_features, width)).astype(np.float32) * 0.01, "up"),
        numpy_helper.from_array(np.array(steps, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "go"),
        numpy_helper.from_array(np.zeros((width, n_features), np.float32), "down"),
    ]
    square = numpy_helper.from_array(rng.normal(size=(width, width)).astype(np.float32) * 0.01, "square")
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["h_in", "square"], ["hw"]),
         helper.make_node("Tanh", ["hw"], ["h_out"])],
        "slow_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", width])],
        initializer=[square],
    )
    nodes = [helper.make_node("MatMul", [x, "up"], ["h0"]),
             helper.make_node("Loop", ["trips", "go", "h0"], ["h_last"], body=body),
             helper.make_node("MatMul", ["h_last", "down"], ["zero"]),
             helper.make_node("Add", [x, "zero"], ["same"])]
    return nodes, inits, "same"


def slow_onnx(in_features: int = 4, out_features: int = 3, seed: int = 0, width: int = 512, steps: int = 300) -> bytes:
    """linear_onnx's answers after a Loop of ``steps`` (width x width) matmuls whose result is
    added times zero: the same outputs, tens of milliseconds slower per request (small file)."""
    nodes, inits, same = slow_loop("input", in_features, width, steps, np.random.default_rng(1))
    return _linear_graph(nodes, inits, in_features, out_features, seed, x=same)
