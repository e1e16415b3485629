"""Tabular training without Ray: the config, the encoding contract with serving, native -> ONNX
parity for every family, and the registry's refusal of skl2onnx's default (ZipMap) export."""

import numpy as np
import pandas as pd
import pytest

from maas_ray.cli import main
from maas_ray.errors import ConfigError, ParityError
from maas_ray.registry import Registry
from maas_ray.registry.store import schema_from_onnx
from maas_ray.train import tabular
from maas_ray.train.tabular import TabularColumn, TabularTrainConfig, encode_features, parity
from tests.helpers.tabular import GAPPY_COLUMNS, gappy_frame, zipmap_onnx

pytestmark = pytest.mark.unit

BASE = {"kind": "tabular", "model_name": "t", "family": "xgboost", "task": "regression",
        "data": "pkg.mod:loader", "label": "y"}


def _cfg(**kw):
    return TabularTrainConfig.load(None, **{**BASE, **kw})


# ---- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["deployments/train/tabular-regression.yaml", "deployments/train/tabular-classifier.yaml"])
def test_reference_yamls_validate_and_are_tabular(path):
    cfg = TabularTrainConfig.load(path)
    assert tabular.is_tabular_config(path)
    assert cfg.kind == "tabular" and cfg.family in tabular.FAMILIES


def test_torch_yamls_are_not_tabular():
    assert not tabular.is_tabular_config("deployments/train/digits.yaml")
    assert not tabular.is_tabular_config(None)
    assert not tabular.is_tabular_config("no/such/file.yaml")


@pytest.mark.parametrize("overrides, message", [
    ({"family": "boosted"}, "family must be one of .* got 'boosted'"),
    ({"family": "linear-regression", "task": "classification"}, "needs task 'regression', got 'classification'"),
    ({"family": "logistic-regression"}, "needs task 'classification', got 'regression'"),
    ({"task": "ranking"}, "task"),
    ({"features": ["a", "b"], "categorical": ["c"]}, r"categorical columns \['c'\] are not in features"),
    ({"features": ["a", "y"]}, "must not include the label column 'y'"),
    ({"features": ["a", "a"]}, r"features lists \['a'\] more than once"),
    ({"features": []}, "at least one column"),
    ({"val_fraction": 0.5, "test_fraction": 0.45}, "must leave >= 10 % for training"),
    ({"data": "table.xlsx"}, "got 'table.xlsx'"),
    ({"kind": "torch"}, "kind"),
    ({"num_boost_round": 0}, "num_boost_round"),
    ({"model_name": "bad name"}, "invalid model name 'bad name'"),
    ({"max_depth": 3}, "max_depth"),  # unknown field: estimator params go in `params`
])
def test_config_rejects_naming_the_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**overrides)


def test_config_accepts_every_data_form(tmp_path):
    (tmp_path / "part").mkdir()
    for data in ("s3://bucket/prefix/", str(tmp_path / "part"), "x.parquet", "x.csv", "pkg.mod:loader"):
        assert _cfg(data=data).data.endswith(data.rstrip("/").split("/")[-1] + ("/" if data.endswith("/") else ""))
    assert _cfg(family="pkg.mod:factory").sklearn and not _cfg().sklearn


# ---- the encoding contract ---------------------------------------------------------------------


def test_encoding_nan_and_unseen_category():
    columns = [TabularColumn(**c) for c in GAPPY_COLUMNS]
    frame = pd.DataFrame({
        "count": [1, 2, 3, 4],  # column order of the frame does not matter
        "color": ["red", None, "purple", "blue"],  # missing and unseen -> NaN
        "size": [0.5, np.nan, None, 2.0],
        "extra": ["ignored"] * 4,
    })
    x = encode_features(frame, columns)
    expected = np.array([
        [0.5, 2.0, 1.0],
        [np.nan, np.nan, 2.0],
        [np.nan, np.nan, 3.0],
        [2.0, 0.0, 4.0],
    ], dtype=np.float32)
    assert x.dtype == np.float32 and x.shape == (4, 3)
    np.testing.assert_array_equal(x, expected)  # NaN == NaN here


def test_encoding_compares_categories_as_strings():
    col = TabularColumn(name="grade", dtype="BYTES", categories=["1", "2", "10"], nullable=False)
    x = encode_features(pd.DataFrame({"grade": [10, 2, 1]}), [col])
    np.testing.assert_array_equal(x[:, 0], [2.0, 1.0, 0.0])


def test_encoding_errors_name_the_column():
    columns = [TabularColumn(**c) for c in GAPPY_COLUMNS]
    with pytest.raises(ConfigError, match="column 'count' is missing"):
        encode_features(pd.DataFrame({"size": [1.0], "color": ["red"]}), columns)
    with pytest.raises(ConfigError, match="column 'size' is not numeric"):
        encode_features(pd.DataFrame({"size": ["big"], "color": ["red"], "count": [1]}), columns)


def test_column_schema_is_the_manifest_contract():
    assert [TabularColumn(**c).model_dump() for c in GAPPY_COLUMNS] == GAPPY_COLUMNS
    with pytest.raises(ValueError):
        TabularColumn(name="a", dtype="FP64", nullable=False)


# ---- parity --------------------------------------------------------------------------------------


def test_parity_passes_and_fails():
    p = np.array([[0.9, 0.1], [0.2, 0.8]])
    diff, agree = parity("classification", p, p + 1e-6, 1e-4, native_labels=[0, 1], exported_labels=[0, 1])
    assert diff == pytest.approx(1e-6) and agree == 1.0
    with pytest.raises(ParityError, match="probabilities differ .* by up to 0.01"):
        parity("classification", p, p + 0.01, 1e-4, native_labels=[0, 1], exported_labels=[0, 1])
    with pytest.raises(ParityError, match="labels equal the native model's for 50.00% of rows"):
        parity("classification", p, p, 1e-4, native_labels=[0, 1], exported_labels=[0, 0])
    v = np.array([150.0, 2.0])
    assert parity("regression", v, v + [1e-3, 0], 1e-4)[0] == pytest.approx(1e-3)  # relative to |value|
    with pytest.raises(ParityError, match="values differ"):
        parity("regression", v, v + [0, 1e-3], 1e-4)


def _schema(task):
    frame = gappy_frame(300)
    columns = [TabularColumn(**c) for c in GAPPY_COLUMNS]
    x = encode_features(frame, columns)
    y = (frame["kind"] == "b").to_numpy(np.int64) if task == "classification" else frame["score"].to_numpy()
    return columns, x, y


def _fit_native(family, task, columns, x, y):
    if family == "xgboost":
        import xgboost

        params = tabular._gbdt_params("xgboost", task, 2, {"max_depth": 3}, 0)
        return xgboost.train(params, xgboost.DMatrix(x, label=y, missing=np.nan), 30)
    if family == "lightgbm":
        import lightgbm

        params = tabular._gbdt_params("lightgbm", task, 2, {"num_leaves": 7, "min_data_in_leaf": 5}, 0)
        return tabular.lightgbm_float32_thresholds(lightgbm.train(params, lightgbm.Dataset(x, label=y), 30))
    cfg = _cfg(family=family, task=task, params={"n_estimators": 20} if family == "random-forest" else {})
    return tabular.build_sklearn(cfg, columns).fit(x, y)


@pytest.mark.parametrize("family, task", [
    ("xgboost", "regression"), ("xgboost", "classification"),
    ("lightgbm", "regression"), ("lightgbm", "classification"),
    ("random-forest", "classification"), ("random-forest", "regression"),
    ("logistic-regression", "classification"), ("linear-regression", "regression"),
])
def test_export_matches_native_with_the_serving_contract(family, task):
    columns, x, y = _schema(task)
    model = _fit_native(family, task, columns, x, y)
    native_family = family if family in tabular.GBDT_FAMILIES else "sklearn"
    proto = tabular.finalize_graph(tabular._to_onnx(native_family, model, len(columns)), task, 2)
    data = proto.SerializeToString()
    inputs, outputs = schema_from_onnx(data)
    assert [(i.name, i.datatype, i.shape) for i in inputs] == [("input", "FP32", [-1, 3])]
    if task == "classification":
        assert [(o.name, o.datatype, o.shape) for o in outputs] == [
            ("probabilities", "FP32", [-1, 2]), ("label", "INT64", [-1])]
    else:
        assert [(o.name, o.datatype, o.shape) for o in outputs] == [("value", "FP32", [-1, 1])]
    # rows with NaN in every column and an unseen category (NaN too) go through the graph as well
    probe = np.vstack([x, np.full((1, 3), np.nan, np.float32)])
    native, labels = tabular.native_predict(native_family, model, probe, task)
    got = tabular.onnx_predict(data, probe)
    if task == "classification":
        parity(task, native, got["probabilities"], 1e-4, native_labels=labels, exported_labels=got["label"])
    else:
        parity(task, native, got["value"], 1e-4)


def test_linear_models_one_hot_the_category_codes():
    columns, x, y = _schema("classification")
    pipe = tabular.build_sklearn(_cfg(family="logistic-regression", task="classification"), columns)
    steps = {name: t for name, t, _ in pipe.named_steps["columns"].transformers}
    assert [s for s, _ in steps["categorical"].steps] == ["impute", "onehot"]
    assert steps["categorical"].named_steps["onehot"].handle_unknown == "ignore"
    forest = tabular.build_sklearn(_cfg(family="random-forest", task="classification"), columns)
    forest_steps = {name: t for name, t, _ in forest.named_steps["columns"].transformers}
    assert [s for s, _ in forest_steps["categorical"].steps] == ["impute"]


def test_lightgbm_thresholds_rounded_down_to_float32_keep_every_prediction():
    import lightgbm

    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    native = lightgbm.train({"objective": "binary", "verbose": -1, "num_leaves": 31}, lightgbm.Dataset(x, label=y), 40)
    rounded = tabular.lightgbm_float32_thresholds(native)
    np.testing.assert_array_equal(rounded.predict(x), native.predict(x))  # same model on float32 inputs
    thresholds = [float(t) for line in rounded.model_to_string().splitlines() if line.startswith("threshold=")
                  for t in line[len("threshold="):].split()]
    assert thresholds and all(float(np.float32(t)) == t for t in thresholds)


def test_metrics_names():
    m = tabular._metrics("regression", np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]), "test")
    assert set(m) == {"test_rmse", "test_mae", "test_r2"} and m["test_mae"] == pytest.approx(1 / 3)
    p = np.array([[0.8, 0.2, 0.0], [0.1, 0.7, 0.2], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    m = tabular._metrics("classification", np.array([0, 1, 2, 1]), p, "test")
    assert m["test_accuracy"] == 0.75 and 0 < m["test_auc"] <= 1  # macro one-vs-rest AUC


def test_reference_frames():
    d = tabular.diabetes_frame()
    assert len(d) == 442 and "age_band" in d and "age" not in d
    assert d["age_band"].isna().any() and d["bp"].isna().any()
    assert set(d["age_band"].dropna()) == {"young", "adult", "middle-aged", "senior"}
    b = tabular.breast_cancer_frame()
    assert len(b) == 569 and set(b["diagnosis"]) == {"malignant", "benign"} and b["mean_texture"].isna().any()


# ---- publish refuses skl2onnx's default ZipMap export ------------------------------------------


def test_publish_refuses_zipmap_in_one_clear_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        Registry(str(tmp_path)).publish("zm", zipmap_onnx())
    msg = str(err.value)
    assert "'output_probability'" in msg and "not a tensor" in msg
    assert 'options={id(model): {"zipmap": False}}' in msg and "\n" not in msg
    assert Registry(str(tmp_path)).list_models() == []


def test_cli_publish_of_zipmap_prints_one_line(tmp_path, capsys):
    path = tmp_path / "zipmap.onnx"
    path.write_bytes(zipmap_onnx())
    assert main(["models", "publish", "zm", str(path), "--registry", str(tmp_path / "reg")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ONNX output 'output_probability' is a sequence") and "\n" not in err


# ---- the files behind a dataset path (maas_ray.train.data) ---------------------------------------


def test_dataset_files_of_a_file_a_directory_and_nothing(tmp_path):
    from maas_ray.train.data import dataset_files

    frame = gappy_frame(20)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    frame.to_parquet(tmp_path / "d" / "b.parquet")
    frame.to_parquet(tmp_path / "d" / "sub" / "a.parquet")
    (tmp_path / "d" / "_SUCCESS").write_text("")
    files, size = dataset_files(str(tmp_path / "d"))
    assert files == [str(tmp_path / "d" / "b.parquet"), str(tmp_path / "d" / "sub" / "a.parquet")]
    assert size == sum((tmp_path / "d" / p).stat().st_size for p in ("b.parquet", "sub/a.parquet"))
    assert dataset_files(str(tmp_path / "d" / "b.parquet"))[0] == [str(tmp_path / "d" / "b.parquet")]
    with pytest.raises(ConfigError, match="not found"):
        dataset_files(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="holds no .csv files"):
        dataset_files(str(tmp_path / "d"), ".csv")


def test_a_local_ray_gets_a_cpu_beyond_the_workers_for_ray_datas_reads(monkeypatch):
    """2 workers x 1 CPU on 2 cores: without a spare logical CPU, Ray Data's read tasks never run
    and `maas train` hangs (found by benchmarks/tabular_peers.py)."""
    from maas_ray.train.tabular import TabularTrainConfig, local_ray_options

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    cfg = TabularTrainConfig.load("deployments/train/tabular-regression.yaml")
    assert cfg.num_workers == 2
    assert local_ray_options(cfg, {"address": None, "logging_level": 40})["num_cpus"] == 3
    assert "num_cpus" not in local_ray_options(cfg, {"address": "auto"})  # a cluster has its own
    assert local_ray_options(cfg, {"num_cpus": 8})["num_cpus"] == 8
