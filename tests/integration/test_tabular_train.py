"""Tabular training end to end on a real Ray: the two reference models (XGBoost on 2 Ray Train
workers, a scikit-learn random forest in one Ray task) and LightGBM on 2 workers over a directory
of parquet files, each published to a temporary registry; the manifest's column schema, metrics
and native-model file, and onnxruntime on the registry's model reproducing the native model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from maas_ray.registry import Registry
from maas_ray.serving.replicas import SKIP_ROLES
from maas_ray.train import tabular
from maas_ray.train.tabular import TabularColumn, TabularTrainConfig, encode_features, train_tabular

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    return Registry(str(tmp_path_factory.mktemp("tabular-registry")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tabular-runs"))


def _load(reg, name):
    """The registry's ONNX bytes (as serving loads them: native file skipped), and the native file."""
    loaded = reg.load(name, skip_roles=SKIP_ROLES)
    m = loaded.manifest
    (native_name,) = [n for n, e in m.files.items() if e.role == tabular.NATIVE_ROLE]
    assert native_name not in loaded.files  # serving never reads it
    return m, loaded.model_bytes, native_name, reg.read_file(name, m.version, native_name)  # sha256-checked


def _columns(m):
    assert m.preprocessor.name == "tabular"
    return [TabularColumn(**c) for c in m.preprocessor.params["columns"]]


def test_xgboost_regression_on_two_workers(ray_cluster, reg, runs):
    import xgboost

    cfg = TabularTrainConfig.load("deployments/train/tabular-regression.yaml", storage_path=runs)
    assert (cfg.family, cfg.num_workers) == ("xgboost", 2)
    report = train_tabular(cfg, reg)
    m, onnx_bytes, native_name, native = _load(reg, "diabetes-xgb")
    assert m.version == report.manifest.version == 1
    # the schema: one FP32 input in column order, a value output, the regression postprocessor
    columns = _columns(m)
    assert [c.name for c in columns] == m.model_spec["features"] and len(columns) == 10 and "progression" not in m.model_spec["features"]
    band = next(c for c in columns if c.name == "age_band")
    assert (band.dtype, band.categories, band.nullable) == ("BYTES", ["adult", "middle-aged", "senior", "young"], True)
    assert next(c for c in columns if c.name == "bp").nullable and not next(c for c in columns if c.name == "s1").nullable
    assert [(i.name, i.datatype, i.shape) for i in m.inputs] == [("input", "FP32", [-1, 10])]
    assert [(o.name, o.datatype, o.shape) for o in m.outputs] == [("value", "FP32", [-1, 1])]
    assert (m.postprocessor.name, m.postprocessor.params) == ("regression", {})
    # metrics: RMSE on the test split (the target spans 25..346; a constant guess scores ~77)
    assert set(m.metrics) >= {"test_rmse", "test_mae", "test_r2", "parity_max_abs_diff"}
    assert 30 < m.metrics["test_rmse"] < 70 and m.metrics["test_r2"] > 0.3
    assert m.dataset["rows"]["train"] + m.dataset["rows"]["validation"] + m.dataset["rows"]["test"] == 442
    assert len(m.dataset["content_hash"]) == 16
    # the native model: xgboost JSON, checksummed, loadable; onnxruntime on the registry's graph agrees
    assert native_name == "model.xgboost.json" and json.loads(native)["learner"]
    booster = xgboost.Booster()
    booster.load_model(bytearray(native))
    x = encode_features(tabular.diabetes_frame(), columns)
    assert np.isnan(x).any()
    expected = booster.predict(xgboost.DMatrix(x, missing=np.nan))
    got = tabular.onnx_predict(onnx_bytes, x)["value"][:, 0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)


def test_random_forest_classifier_in_one_task(ray_cluster, reg, runs):
    import skops.io

    cfg = TabularTrainConfig.load("deployments/train/tabular-classifier.yaml", storage_path=runs)
    train_tabular(cfg, reg)
    m, onnx_bytes, native_name, native = _load(reg, "breast-cancer-rf")
    columns = _columns(m)
    assert len(columns) == 30 and all(c.dtype == "FP32" and c.categories is None for c in columns)
    assert [c.name for c in columns if c.nullable] == ["mean_texture"]
    assert [(o.name, o.datatype, o.shape) for o in m.outputs] == [
        ("probabilities", "FP32", [-1, 2]), ("label", "INT64", [-1])]
    assert m.postprocessor.name == "classification"
    assert m.postprocessor.params == {"labels": ["benign", "malignant"], "apply_softmax": False, "top_k": 2}
    assert m.metrics["test_accuracy"] > 0.9 and m.metrics["test_auc"] > 0.95
    assert m.metrics["parity_label_agreement"] == 1.0
    # skops, not pickle: loads with the types it declares trusted
    assert native_name == "model.skops"
    model = skops.io.loads(native, trusted=skops.io.get_untrusted_types(data=native))
    x = encode_features(tabular.breast_cancer_frame(), columns)
    got = tabular.onnx_predict(onnx_bytes, x)
    np.testing.assert_allclose(got["probabilities"], model.predict_proba(x), atol=1e-5)
    assert (got["label"] == model.predict(x)).mean() >= 0.999


def test_lightgbm_on_two_workers_from_a_parquet_directory(ray_cluster, reg, runs, tmp_path):
    import lightgbm

    frame = tabular.breast_cancer_frame()
    for i, part in enumerate(np.array_split(np.arange(len(frame)), 3)):
        frame.iloc[part].to_parquet(tmp_path / f"part-{i}.parquet")
    cfg = TabularTrainConfig(
        kind="tabular", model_name="breast-cancer-lgb", family="lightgbm", task="classification",
        data=str(tmp_path), label="diagnosis", params={"num_leaves": 15}, num_boost_round=50,
        num_workers=2, storage_path=runs,
    )
    train_tabular(cfg, reg)
    m, onnx_bytes, native_name, native = _load(reg, "breast-cancer-lgb")
    assert m.dataset["file_count"] == 3 and m.dataset["format"] == "parquet"
    assert m.dataset["size_bytes"] > 0 and all(f.endswith(".parquet") for f in m.dataset["files"])
    assert m.metrics["test_accuracy"] > 0.9
    booster = lightgbm.Booster(model_str=native.decode())
    x = encode_features(frame, _columns(m))
    got = tabular.onnx_predict(onnx_bytes, x)["probabilities"][:, 1]
    np.testing.assert_allclose(got, booster.predict(x), atol=1e-4)
