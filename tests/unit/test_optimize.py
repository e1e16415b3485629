"""maas optimize against real onnxruntime, on a digits version built without Ray or torch:
a 64-64-10 MLP fitted with numpy on the same split `maas train` uses, published with the
training config and dataset identity `maas train` records."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from maas_ray.errors import ConfigError, VersionNotFoundError
from maas_ray.optimize import OptimizeConfig, optimize_and_publish
from maas_ray.registry import ExtraFile, ProcessorSpec, Registry
from maas_ray.train.data import load_splits

TC = {"data": "digits", "val_fraction": 0.1, "test_fraction": 0.2, "seed": 0}
FAST = {"batch_sizes": [1, 32], "timing_seconds": 0.05}


def _mlp_onnx(splits) -> bytes:
    rng = np.random.default_rng(0)
    x, y = splits.x_train / 16.0, splits.y_train
    w1 = rng.normal(0, 0.1, (64, 64)).astype(np.float32)
    b1 = np.zeros(64, np.float32)
    w2 = rng.normal(0, 0.1, (64, 10)).astype(np.float32)
    b2 = np.zeros(10, np.float32)
    onehot = np.eye(10, dtype=np.float32)[y]
    for _ in range(600):  # full-batch gradient descent: ~0.95 test accuracy in ~1 s
        h = np.maximum(x @ w1 + b1, 0)
        z = h @ w2 + b2
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(x)
        gh = (g @ w2.T) * (h > 0)
        w2 -= 1.0 * h.T @ g
        b2 -= 1.0 * g.sum(0)
        w1 -= 1.0 * x.T @ gh
        b1 -= 1.0 * gh.sum(0)
    w1 = w1 / 16.0  # fold the input scaling into the first layer: the graph takes raw pixels
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]), helper.make_node("MatMul", ["r1", "w2"], ["m2"]),
        helper.make_node("Add", ["m2", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.fixture(scope="module")
def parent_registry(tmp_path_factory):
    splits = load_splits("digits", val_fraction=0.1, test_fraction=0.2, seed=0)
    reg = Registry(str(tmp_path_factory.mktemp("registry")))
    reg.publish(
        "digits", _mlp_onnx(splits),
        postprocessor=ProcessorSpec(name="classification", params={"labels": splits.class_labels, "top_k": 3}),
        training_config=TC, dataset=splits.identity,
        files={"model_spec.json": ExtraFile(b"{}", role="model_spec"), "weights.safetensors": ExtraFile(b"w", role="weights")},
    )
    return reg


@pytest.mark.parametrize("settings", [
    {"method": "int8"}, {"method": "int8", "static": True}, {"method": "fp16"}, {"method": "graph"},
])
def test_optimized_version_is_published_with_its_measurements(parent_registry, settings):
    reg = parent_registry
    report = optimize_and_publish("digits", 1, OptimizeConfig(**settings, **FAST), reg)
    m = report.manifest
    assert m.parent is not None and (m.parent.model, m.parent.version) == ("digits", 1)
    assert m.training_config["optimization"]["method"] == settings["method"]
    assert m.training_config["optimization"]["static"] == settings.get("static", False)
    assert m.metrics["parent_test_accuracy"] > 0.9
    assert abs(m.metrics["accuracy_delta"]) <= 0.01
    assert m.metrics["accuracy_delta"] == pytest.approx(m.metrics["test_accuracy"] - m.metrics["parent_test_accuracy"])
    assert m.metrics["parent_size_bytes"] == reg.describe("digits", 1).size_bytes
    assert set(m.files) == {"model_spec.json"}  # weights dropped: they are not the child's graph
    # same boundary as the parent: fp16 keeps FP32 I/O
    parent = reg.describe("digits", 1)
    assert m.inputs == parent.inputs and m.outputs == parent.outputs
    assert m.postprocessor == parent.postprocessor
    loaded = reg.load("digits", m.version)  # checksums verified
    onnx_model = onnx.load_from_string(loaded.model_bytes)
    ops = {n.op_type for n in onnx_model.graph.node}
    if settings["method"] == "int8":
        assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "QLinearMatMul"}
    if settings["method"] == "fp16":
        assert "Cast" in ops
    if settings["method"] == "int8" and not settings.get("static"):
        assert report.size_ratio < 0.5


def test_accuracy_drop_over_threshold_publishes_nothing(parent_registry):
    reg = parent_registry
    before = reg.list_versions("digits")
    with pytest.raises(ConfigError, match=r"not published: fp16 drops test accuracy of digits:1 .* > max_accuracy_drop -0\.5"):
        optimize_and_publish("digits", 1, OptimizeConfig(method="fp16", max_accuracy_drop=-0.5, **FAST), reg)
    assert reg.list_versions("digits") == before


def test_bad_config_and_refs_fail_in_one_line(parent_registry):
    with pytest.raises(ValueError, match="static applies to int8 only, not to method 'fp16'"):
        OptimizeConfig(method="fp16", static=True)
    with pytest.raises(ValueError, match=r"max_accuracy_drop .* got 5"):
        OptimizeConfig(method="int8", max_accuracy_drop=5)
    with pytest.raises(VersionNotFoundError, match="no version 99"):
        optimize_and_publish("digits", 99, OptimizeConfig(method="int8"), parent_registry)


def test_version_without_training_data_is_refused(tmp_path):
    reg = Registry(str(tmp_path))
    splits = load_splits("digits", val_fraction=0.1, test_fraction=0.2, seed=0)
    reg.publish("bare", _mlp_onnx(splits))
    with pytest.raises(ConfigError, match="records no training data"):
        optimize_and_publish("bare", 1, OptimizeConfig(method="graph", **FAST), reg)
    assert reg.list_versions("bare") == [1]


def test_cli_prints_one_summary_line(parent_registry, capsys):
    from maas_ray.cli import main

    assert main(["optimize", "digits:1", "--graph", "--registry", parent_registry.root]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    v = parent_registry.list_versions("digits")[-1]
    assert len(out) == 1 and out[0].startswith(f"published digits:{v} (graph of digits:1)  accuracy ")
    assert "speedup b1 " in out[0] and "size " in out[0]


@pytest.mark.parametrize("argv, message", [
    (["optimize", "digits", "--int8"], "error: expected MODEL:VERSION (e.g. digits:1 or digits:production), got 'digits'"),
    (["optimize", "digits:1"], "error: pick exactly one of --int8, --fp16, --graph (got none)"),
    (["optimize", "digits:1", "--int8", "--fp16"], "error: pick exactly one of --int8, --fp16, --graph (got ['int8', 'fp16'])"),
    (["optimize", "digits:1", "--fp16", "--static"], "error: optimize: <root>: Value error, static applies to int8 only"),
    (["optimize", "nope:1", "--int8"], "error: model 'nope' does not exist"),
])
def test_cli_bad_refs_and_flags_fail_in_one_line(parent_registry, capsys, argv, message):
    from maas_ray.cli import main

    before = parent_registry.list_versions("digits")
    assert main([*argv, "--registry", parent_registry.root]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1
    assert parent_registry.list_versions("digits") == before
