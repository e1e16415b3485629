"""maas optimize on a version trained by Ray Train (torch export), in a copy of the session
registry so the other tests keep seeing digits:1 and digits:2 only."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest

from maas_ray.errors import ConfigError
from maas_ray.optimize import OptimizeConfig, optimize_and_publish
from maas_ray.registry import Registry
from maas_ray.train.data import load_splits

FAST = {"batch_sizes": [1, 32], "timing_seconds": 0.05}


@pytest.fixture
def copy_registry(trained, registry_root, tmp_path):
    shutil.copytree(f"{registry_root}/digits", tmp_path / "digits")
    return Registry(str(tmp_path))


@pytest.mark.parametrize("settings", [{"method": "int8", "static": True}, {"method": "fp16"}])
def test_trained_version_optimizes_and_serves(copy_registry, settings):
    from maas_ray.serving.config import ModelConfig
    from maas_ray.serving.replicas import LocalPipeline

    reg = copy_registry
    parent = reg.describe("digits", 1)
    r = optimize_and_publish("digits", 1, OptimizeConfig(**settings, **FAST), reg)
    m = r.manifest
    assert (m.version, m.parent.version) == (3, 1)
    # the same held-out rows: the parent's own recorded test accuracy is reproduced through onnxruntime
    assert r.parent.accuracy == pytest.approx(parent.metrics["test_accuracy"], abs=0.003)  # torch vs onnxruntime: at most one near-tie row
    assert r.accuracy_delta >= -0.01
    assert set(m.files) == {"model_spec.json"} and m.dataset == parent.dataset
    assert m.inputs == parent.inputs and m.preprocessor == parent.preprocessor
    s = load_splits("digits", val_fraction=0.1, test_fraction=0.2, seed=0)

    def served(version: int) -> np.ndarray:
        pipeline = LocalPipeline(reg.root, ModelConfig.model_validate({"name": "digits", "versions": [{"version": version}]}), version)
        return asyncio.run(pipeline.infer({"input": pixels}, True))[0]["label"].astype(int)

    # Served through the parent's own preprocessor and postprocessor: the child answers like the parent.
    # The image preprocessor takes pixels in 0..16 (pixel_max) and scales them to the 0..1 features
    # the model was trained and calibrated on: feed it pixels. (Fed the 0..1 features themselves,
    # every input arrived 16x too dark: the parent itself read only 0.36 of these rows right, and
    # static INT8, calibrated on 0..1, agreed with it on 0.85 -- the gap once recorded here as an
    # open INT8 question. In pixel units both methods measured 1.00 agreement and 0.97 accuracy.)
    pixels = s.x_test[:100] * 16
    child, parent_labels = served(3), served(1)
    assert np.mean(parent_labels == s.y_test[:100]) >= 0.9  # the inputs are what the model expects
    agreement = np.mean(child == parent_labels)
    # fp16 only rounds weights; static INT8 also rounds activations, which can flip a near-tie row
    # or two: 0.95 still fails a mis-calibrated child (wrong-range activations) by a wide margin.
    assert agreement >= (0.97 if settings["method"] == "fp16" else 0.95), (settings, agreement)


def test_impossible_threshold_publishes_nothing(copy_registry):
    with pytest.raises(ConfigError, match="not published: int8 drops test accuracy of digits:1"):
        optimize_and_publish("digits", 1, OptimizeConfig(method="int8", max_accuracy_drop=-0.1, **FAST), copy_registry)
    assert copy_registry.list_versions("digits") == [1, 2]
