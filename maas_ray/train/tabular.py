"""Tabular models: gradient-boosted trees and scikit-learn estimators over named columns,
trained on Ray, exported to ONNX, checked for parity and published.

    maas train --config deployments/train/tabular-regression.yaml   # a YAML with `kind: tabular`

- ``xgboost`` / ``lightgbm``: Ray Train's ``XGBoostTrainer`` / ``LightGBMTrainer``, data-parallel
  over ``num_workers`` workers, each reading its shard of the training split from Ray Data;
- ``random-forest``, ``linear-regression``, ``logistic-regression`` or ``package.module:factory``
  (an unfitted estimator or ``Pipeline``): scikit-learn, fitted in one Ray task.

Data: a ``.parquet`` / ``.csv`` file, a directory or ``s3://`` prefix of parquet files (read and
split by Ray Data, never collected whole on the driver except by a scikit-learn fit), or a
``package.module:loader`` returning a pandas DataFrame.

The contract with serving (the ``tabular`` preprocessor): the ONNX graph has ONE input ``input``,
FP32 ``[-1, n_features]``, its columns in the order of the manifest's
``preprocessor.params["columns"]``; a numeric column is its value as a float (missing: NaN), a
categorical one the float index of the value in that column's ``categories`` (missing or unseen:
NaN). The graph handles NaN itself: the trees natively, scikit-learn pipelines through a
``SimpleImputer`` (and, for linear models, a ``OneHotEncoder(handle_unknown="ignore")`` over the
category codes) converted with the estimator. Outputs: classification ``probabilities``
(FP32 ``[-1, C]``, first, for the ``classification`` postprocessor) and ``label`` (INT64
``[-1]``, the class index); regression ``value`` (FP32 ``[-1, 1]``).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from maas_ray.errors import (
    ConfigError,
    DependencyError,
    ParityError,
    TrainingError,
)
from maas_ray.registry.manifest import Manifest, ModelName, ProcessorSpec
from maas_ray.train.config import load_config

logger = logging.getLogger(__name__)

__all__ = [
    "TabularColumn",
    "TabularReport",
    "TabularTrainConfig",
    "encode_features",
    "is_tabular_config",
    "parity",
    "train_tabular",
]

TABULAR_INSTALL_HINT = "pip install 'maas-ray[tabular]'"
GBDT_FAMILIES = ("xgboost", "lightgbm")
SKLEARN_FAMILIES = ("random-forest", "linear-regression", "logistic-regression")
FAMILIES = GBDT_FAMILIES + SKLEARN_FAMILIES
NATIVE_ROLE = "weights"  # serving never loads it (replicas.SKIP_ROLES); for audit and re-use
NATIVE_FILES = {"xgboost": "model.xgboost.json", "lightgbm": "model.lightgbm.txt", "sklearn": "model.skops"}
INPUT_NAME = "input"
SKL2ONNX_OPSET = 17
ONNXMLTOOLS_OPSET = 15  # the highest onnxmltools' xgboost / lightgbm converters support
LABEL_AGREEMENT = 0.999  # parity: share of rows whose ONNX label equals the native one
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_TABULAR_SUFFIXES = (".parquet", ".csv")


def is_tabular_config(path: Optional[str]) -> bool:
    """Whether a training YAML is a tabular one (``kind: tabular``); False for unreadable files
    (TrainConfig.load reports those)."""
    if not path:
        return False
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and raw.get("kind") == "tabular"


class TabularTrainConfig(BaseModel):
    """One tabular training run: data, columns, model family, export and publish."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    kind: Literal["tabular"] = Field(description="Marks a tabular training config; `maas train` dispatches on it.")
    model_name: ModelName = Field(description="Registry name to publish under.")
    family: str = Field(
        description=f"One of {list(FAMILIES)}, or 'package.module:factory' returning an unfitted "
        "scikit-learn estimator or Pipeline (a Pipeline must handle NaN itself)."
    )
    task: Literal["classification", "regression"] = Field(description="What the label is.")
    data: str = Field(
        description="A .parquet or .csv file, a directory or s3:// prefix of .parquet files, or "
        "'package.module:loader' returning a pandas DataFrame."
    )
    label: str = Field(description="The label column.")
    features: Optional[list[str]] = Field(
        default=None, description="Feature columns in model input order; default: every column but the label."
    )
    categorical: list[str] = Field(
        default_factory=list, description="Feature columns holding categories (sent as strings, BYTES)."
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to the estimator: xgboost/lightgbm training params, or the scikit-learn "
        "estimator's (or factory's) keyword arguments.",
    )
    num_boost_round: int = Field(default=100, ge=1, description="xgboost / lightgbm: boosting rounds.")
    num_workers: int = Field(default=2, ge=1, description="xgboost / lightgbm: Ray Train workers.")
    cpus_per_worker: float = Field(default=1.0, gt=0.0, description="CPUs each worker (or the scikit-learn task) reserves.")
    val_fraction: float = Field(default=0.15, gt=0.0, lt=1.0, description="Share of rows for validation.")
    test_fraction: float = Field(default=0.15, gt=0.0, lt=1.0, description="Share of rows for the test metrics and parity.")
    seed: int = Field(default=0, description="Seeds the split and the estimator.")
    parity_tolerance: float = Field(
        default=1e-4, gt=0.0,
        description="Max abs diff between native and ONNX probabilities (regression: values, relative to "
        "max(1, |value|)) on the test split.",
    )
    storage_path: str = Field(default="~/.maas_ray/runs", description="Ray Train storage (local dir or s3://).")
    run_name: Optional[str] = Field(default=None, description="Ray Train run name; default: model name + time.")
    description: str = Field(default="", description="Free text for the manifest.")

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        if v not in FAMILIES and not _IMPORT_PATH.match(v):
            raise ValueError(f"family must be one of {list(FAMILIES)} or 'package.module:factory', got {v!r}")
        return v

    @field_validator("data")
    @classmethod
    def _data(cls, v: str) -> str:
        if "://" in v or (_IMPORT_PATH.match(v) and not os.path.exists(v)):
            return v
        path = os.path.abspath(os.path.expanduser(v))
        if not (os.path.isdir(path) or v.endswith(_TABULAR_SUFFIXES)):
            raise ValueError(
                f"data must be a .parquet or .csv file, a directory or s3:// prefix of .parquet files, "
                f"or 'package.module:loader', got {v!r}"
            )
        return path

    @model_validator(mode="after")
    def _columns(self) -> "TabularTrainConfig":
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction must leave >= 10 % for training, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )
        if self.family == "linear-regression" and self.task != "regression":
            raise ValueError(f"family 'linear-regression' needs task 'regression', got {self.task!r}")
        if self.family == "logistic-regression" and self.task != "classification":
            raise ValueError(f"family 'logistic-regression' needs task 'classification', got {self.task!r}")
        for what, cols in (("features", self.features or []), ("categorical", self.categorical)):
            dup = sorted({c for c in cols if cols.count(c) > 1})
            if dup:
                raise ValueError(f"{what} lists {dup} more than once")
            if self.label in cols:
                raise ValueError(f"{what} must not include the label column {self.label!r}")
        if self.features is not None:
            if not self.features:
                raise ValueError("features must name at least one column (or be left out: all but the label)")
            stray = [c for c in self.categorical if c not in self.features]
            if stray:
                raise ValueError(f"categorical columns {stray} are not in features {self.features}")
        if "://" not in self.storage_path:
            self.storage_path = os.path.abspath(os.path.expanduser(self.storage_path))
        return self

    @property
    def sklearn(self) -> bool:
        return self.family not in GBDT_FAMILIES

    @classmethod
    def load(cls, path: Optional[str] = None, **overrides: Any) -> "TabularTrainConfig":
        """Read a YAML file (optional), apply non-None overrides, validate."""
        return load_config(cls, path, overrides, "tabular training config")


class TabularColumn(BaseModel):
    """One feature column as the manifest records it (``preprocessor.params["columns"]``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Column name, as requests send it.")
    dtype: Literal["FP32", "INT64", "BYTES", "BOOL"] = Field(description="How requests send the column.")
    categories: Optional[list[str]] = Field(
        default=None, description="Categorical columns: the known values; the model sees a value's index."
    )
    nullable: bool = Field(description="Whether missing values occurred in training.")


# ---- the encoding contract (pure, no Ray) --------------------------------------------------


def encode_features(frame: Any, columns: list[TabularColumn]) -> np.ndarray:
    """A pandas DataFrame -> the model input, float32 ``(N, F)`` in ``columns`` order.

    Numeric columns as floats (missing: NaN); categorical ones as the index of the value
    (compared as a string) in the column's categories (missing or unseen: NaN).
    """
    import pandas as pd

    out = np.empty((len(frame), len(columns)), dtype=np.float32)  # (N, F)
    for j, col in enumerate(columns):
        if col.name not in frame.columns:
            raise ConfigError(f"column {col.name!r} is missing; the data has {list(frame.columns)[:20]}")
        s = frame[col.name]
        if col.categories is not None:
            present = s.notna()
            codes = pd.Categorical(s[present].astype(str), categories=col.categories).codes
            values = np.full(len(s), np.nan, dtype=np.float32)
            values[present.to_numpy()] = np.where(codes < 0, np.nan, codes)  # -1: unseen category
            out[:, j] = values
        else:
            try:
                out[:, j] = pd.to_numeric(s, errors="raise").astype("float64").to_numpy(na_value=np.nan)
            except (TypeError, ValueError) as exc:
                raise ConfigError(
                    f"column {col.name!r} is not numeric ({exc}); list it in `categorical`"
                ) from exc
    return out


def _request_dtype(arrow_type: Any) -> str:
    """How requests send a column, from its Arrow type (or a numpy dtype / ``object``, which
    Ray Data reports for pandas blocks)."""
    import pyarrow as pa

    if not isinstance(arrow_type, pa.DataType):
        kind = np.dtype(arrow_type).kind
        return {"b": "BOOL", "i": "INT64", "u": "INT64", "f": "FP32"}.get(kind, "BYTES")
    if pa.types.is_boolean(arrow_type):
        return "BOOL"
    if pa.types.is_integer(arrow_type):
        return "INT64"
    if pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type) or pa.types.is_null(arrow_type):
        return "FP32"
    return "BYTES"


# ---- parity ------------------------------------------------------------------------------


def parity(
    task: str, native: np.ndarray, exported: np.ndarray, tolerance: float,
    native_labels: Optional[np.ndarray] = None, exported_labels: Optional[np.ndarray] = None,
) -> tuple[float, float]:
    """Compare native and ONNX predictions on the same rows; return (max abs diff, label agreement).

    Classification: probabilities ``(N, C)`` within ``tolerance`` and identical labels for at
    least 99.9 % of rows. Regression: values ``(N,)`` within ``tolerance * max(1, |value|)``.
    Raises ParityError otherwise.
    """
    native = np.asarray(native, dtype=np.float64)
    exported = np.asarray(exported, dtype=np.float64).reshape(native.shape)
    diff = np.abs(native - exported)
    max_diff = float(diff.max()) if diff.size else 0.0
    if task == "regression":
        worst = float((diff / np.maximum(1.0, np.abs(native))).max()) if diff.size else 0.0
        if not worst <= tolerance:
            raise ParityError(
                f"parity check failed: ONNX values differ from the native model's by up to {max_diff:.3g} "
                f"(relative {worst:.3g} > tolerance {tolerance:.3g})"
            )
        return max_diff, 1.0
    if native_labels is None:
        native_labels = native.argmax(axis=1)
    agreement = float(np.mean(np.asarray(exported_labels).reshape(-1) == np.asarray(native_labels).reshape(-1))) if len(native) else 1.0
    if not max_diff <= tolerance:
        raise ParityError(
            f"parity check failed: ONNX probabilities differ from the native model's by up to {max_diff:.3g} "
            f"> tolerance {tolerance:.3g}"
        )
    if agreement < LABEL_AGREEMENT:
        raise ParityError(
            f"parity check failed: ONNX labels equal the native model's for {agreement:.2%} of rows, "
            f"below {LABEL_AGREEMENT:.1%}"
        )
    return max_diff, agreement


# ---- data: schema pass, split, encode (Ray Data) -------------------------------------------


@dataclass
class TabularData:
    """The dataset as three encoded Ray Datasets of rows {"x": float32 (F,), "y": label}."""

    datasets: dict[str, Any]
    columns: list[TabularColumn]
    classes: Optional[list[str]]  # classification: class names, index = label id
    identity: dict[str, Any] = field(default_factory=dict)


def _import(path: str, what: str) -> Any:
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {what} {path!r}: {exc}") from exc


def _read(cfg: TabularTrainConfig) -> tuple[Any, dict[str, Any]]:
    """The raw Ray Dataset and the identity of its source."""
    import ray.data

    from maas_ray.train.data import dataset_files

    if _IMPORT_PATH.match(cfg.data) and "://" not in cfg.data and not os.path.exists(cfg.data):
        import pandas as pd

        frame = _import(cfg.data, "data loader")()
        if not isinstance(frame, pd.DataFrame):
            raise ConfigError(f"data loader {cfg.data!r} must return a pandas DataFrame, got {type(frame).__name__}")
        return ray.data.from_pandas(frame), {"source": cfg.data, "format": "loader"}
    fmt = "csv" if cfg.data.endswith(".csv") else "parquet"
    files, size = dataset_files(cfg.data, f".{fmt}")
    identity = {
        "source": cfg.data, "format": fmt, "size_bytes": size,
        "files": files if len(files) <= 100 else files[:100] + [f"... {len(files) - 100} more"],
        "file_count": len(files),
    }
    try:
        ds = ray.data.read_csv(cfg.data) if fmt == "csv" else ray.data.read_parquet(cfg.data)
    except Exception as exc:  # pyarrow / fsspec raise many types
        raise ConfigError(f"cannot read dataset {cfg.data!r}: {exc}") from exc
    return ds, identity


def _stats(batch: Any, *, features: list[str], categorical: list[str], label: str, task: str) -> Any:
    """One row per batch: null counts, category values, classes, rows, an order-independent hash."""
    import pandas as pd

    h = pd.util.hash_pandas_object(batch[[*features, label]], index=False).to_numpy()
    row = {
        "rows": [len(batch)],
        "hash": [str(int(h.sum(dtype=np.uint64)))],  # a string: uint64 does not survive every Arrow hop
        "label_nulls": [int(batch[label].isna().sum())],
        "nulls": [json.dumps({c: int(batch[c].isna().sum()) for c in features})],
        "cats": [json.dumps({c: sorted({str(v) for v in batch[c].dropna()}) for c in categorical})],
        "classes": [json.dumps(sorted({str(v) for v in batch[label].dropna()}) if task == "classification" else [])],
    }
    return pd.DataFrame(row)


def _natural_order(values: set[str]) -> list[str]:
    """Sort numbers as numbers ("2" before "10"), everything else as text."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def _split_of(batch: Any, seed: int) -> np.ndarray:
    """Each row's place in [0, 1): a seeded hash of its content, so the split is deterministic
    without a shuffle (identical rows share a split)."""
    import pandas as pd

    h = pd.util.hash_pandas_object(batch, index=False).to_numpy() ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    return (h % np.uint64(1_000_003)).astype(np.float64) / 1_000_003


def load_tabular(cfg: TabularTrainConfig) -> TabularData:
    """Read the data with Ray Data, learn the column schema in one pass, split and encode.
    Needs Ray (started by the caller)."""
    ds, identity = _read(cfg)
    names = list(ds.schema().names)
    types = dict(zip(names, ds.schema().types))
    if cfg.label not in names:
        raise ConfigError(f"dataset {cfg.data!r} has no label column {cfg.label!r}; columns: {names[:20]}")
    features = cfg.features or [c for c in names if c != cfg.label]
    missing = [c for c in [*features, *cfg.categorical] if c not in names]
    if missing:
        raise ConfigError(f"dataset {cfg.data!r} has no columns {missing}; columns: {names[:20]}")
    dtypes = {c: _request_dtype(types[c]) for c in features}
    strings = [c for c in features if dtypes[c] == "BYTES" and c not in cfg.categorical]
    if strings:
        raise ConfigError(f"columns {strings} hold text: list them in `categorical` (or leave them out of `features`)")

    stats = ds.map_batches(
        _stats, batch_format="pandas",
        fn_kwargs={"features": features, "categorical": cfg.categorical, "label": cfg.label, "task": cfg.task},
    ).to_pandas()  # one small row per block
    rows = int(stats["rows"].sum())
    if int(stats["label_nulls"].sum()):
        raise ConfigError(f"label column {cfg.label!r} has {int(stats['label_nulls'].sum())} missing values")
    nulls = {c: sum(json.loads(s)[c] for s in stats["nulls"]) for c in features}
    cats: dict[str, set[str]] = {c: set() for c in cfg.categorical}
    for s in stats["cats"]:
        for c, values in json.loads(s).items():
            cats[c].update(values)
    columns = [
        TabularColumn(
            name=c,
            dtype="BYTES" if c in cats else dtypes[c],
            categories=_natural_order(cats[c]) if c in cats else None,
            nullable=nulls[c] > 0,
        )
        for c in features
    ]
    classes = None
    if cfg.task == "classification":
        classes = _natural_order({v for s in stats["classes"] for v in json.loads(s)})
        if len(classes) < 2:
            raise ConfigError(f"classification needs >= 2 classes in {cfg.label!r}, found {classes}")
    content_hash = sum(int(v) for v in stats["hash"]) % 2**64

    label, task, seed = cfg.label, cfg.task, cfg.seed
    index = {c: i for i, c in enumerate(classes or [])}

    def prepare(batch: Any) -> dict[str, np.ndarray]:
        y = batch[label]
        return {
            "x": encode_features(batch, columns),  # (N, F) float32
            "y": y.astype(str).map(index).to_numpy(dtype=np.int64) if task == "classification"
            else y.to_numpy(dtype=np.float32),
            "u": _split_of(batch[[*features, label]], seed),
        }

    prepared = ds.map_batches(prepare, batch_format="pandas")
    cuts = (1.0 - cfg.val_fraction - cfg.test_fraction, 1.0 - cfg.test_fraction)
    bounds = {"train": (0.0, cuts[0]), "validation": (cuts[0], cuts[1]), "test": (cuts[1], 1.01)}
    datasets = {
        name: prepared.filter(expr=f"u >= {lo} and u < {hi}").drop_columns(["u"])
        for name, (lo, hi) in bounds.items()
    }
    split_rows = {name: int(d.count()) for name, d in datasets.items()}
    if min(split_rows.values()) < 1:
        raise ConfigError(f"dataset {cfg.data!r}: a split is empty ({split_rows}); more rows or larger fractions needed")
    identity.update({
        "rows": split_rows, "total_rows": rows, "split_seed": cfg.seed, "loading": "ray_data",
        "content_hash": f"{content_hash:016x}",
        "content_hash_method": "sum mod 2**64 of pandas row hashes over the feature and label columns (order-independent)",
    })
    logger.info("dataset %s: %d rows, %d features (%d categorical), splits %s",
                cfg.data, rows, len(columns), len(cfg.categorical), split_rows)
    return TabularData(datasets, columns, classes, identity)


def _arrays(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """A (shard of a) Ray Dataset of {"x", "y"} rows -> x (N, F) float32, y (N,)."""
    xs, ys = [], []
    for b in ds.iter_batches(batch_format="numpy", batch_size=8192):
        xs.append(np.asarray(b["x"], dtype=np.float32))
        ys.append(np.asarray(b["y"]))
    if not xs:
        return np.empty((0, 0), np.float32), np.empty((0,))
    return np.concatenate(xs), np.concatenate(ys)


# ---- training ------------------------------------------------------------------------------


def _gbdt_params(family: str, task: str, n_classes: int, params: dict[str, Any], seed: int) -> dict[str, Any]:
    if family == "xgboost":
        objective = (
            "reg:squarederror" if task == "regression"
            else "binary:logistic" if n_classes == 2 else "multi:softprob"
        )
        base = {"objective": objective, "tree_method": "hist", "seed": seed, "nthread": 1}
        if task == "classification" and n_classes > 2:
            base["num_class"] = n_classes
    else:
        objective = "regression" if task == "regression" else "binary" if n_classes == 2 else "multiclass"
        base = {"objective": objective, "seed": seed, "verbose": -1, "num_threads": 1}
        if task == "classification" and n_classes > 2:
            base["num_class"] = n_classes
    return {**base, **params}


def _gbdt_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: this worker's shard of the training split -> one data-parallel booster."""
    import ray.train

    family, rounds, params = config["family"], config["num_boost_round"], config["params"]
    x, y = _arrays(ray.train.get_dataset_shard("train"))
    xv, yv = _arrays(ray.train.get_dataset_shard("validation"))
    if family == "xgboost":
        import xgboost
        from ray.train.xgboost import RayTrainReportCallback

        dtrain = xgboost.DMatrix(x, label=y, missing=np.nan)
        evals = [(xgboost.DMatrix(xv, label=yv, missing=np.nan), "validation")] if len(xv) else []
        xgboost.train(
            params, dtrain, num_boost_round=rounds, evals=evals, verbose_eval=False,
            callbacks=[_report_at_end(RayTrainReportCallback)(filename=config["checkpoint_file"])],
        )
    else:
        import lightgbm
        from ray.train.lightgbm import RayTrainReportCallback, get_network_params

        params = {**params, "tree_learner": "data_parallel", "pre_partition": True, **get_network_params()}
        train_set = lightgbm.Dataset(x, label=y, params={"verbose": -1})
        valid = [lightgbm.Dataset(xv, label=yv, reference=train_set)] if len(xv) else []
        lightgbm.train(
            params, train_set, num_boost_round=rounds, valid_sets=valid, valid_names=["validation"][: len(valid)],
            callbacks=[_report_at_end(RayTrainReportCallback)(filename=config["checkpoint_file"])],
        )


def _report_at_end(callback: type) -> type:
    """Ray Train's report callback, reporting once, with the checkpoint, after the last round:
    a report per round cost ~2 s each on 2 workers (100 rounds: 234 s instead of ~10 s)."""

    class ReportAtEnd(callback):  # type: ignore[misc, valid-type]
        def _report_metrics(self, report_dict: dict) -> None:
            pass

    return ReportAtEnd


def _train_gbdt(cfg: TabularTrainConfig, data: TabularData) -> Any:
    """Ray Train's XGBoostTrainer / LightGBMTrainer over ``num_workers``; returns the booster."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig

    n_classes = len(data.classes or [])
    if cfg.family == "xgboost":
        from ray.train.xgboost import RayTrainReportCallback
        from ray.train.xgboost import XGBoostTrainer as Trainer
    else:
        from ray.train.lightgbm import LightGBMTrainer as Trainer
        from ray.train.lightgbm import RayTrainReportCallback
    checkpoint_file = NATIVE_FILES[cfg.family]
    trainer = Trainer(
        _gbdt_loop,
        train_loop_config={
            "family": cfg.family, "num_boost_round": cfg.num_boost_round, "checkpoint_file": checkpoint_file,
            "params": _gbdt_params(cfg.family, cfg.task, n_classes, cfg.params, cfg.seed),
        },
        datasets={"train": data.datasets["train"], "validation": data.datasets["validation"]},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.run_name or f"{cfg.model_name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=cfg.storage_path,
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    logger.info("training %s (%s): %d workers", cfg.model_name, cfg.family, cfg.num_workers)
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train raises its own TrainingFailedError
        raise TrainingError(f"{cfg.family} training failed: {exc}") from exc
    if result.checkpoint is None:
        raise TrainingError(f"{cfg.family} training produced no checkpoint")
    booster = RayTrainReportCallback.get_model(result.checkpoint, filename=checkpoint_file)
    return lightgbm_float32_thresholds(booster) if cfg.family == "lightgbm" else booster


def lightgbm_float32_thresholds(booster: Any) -> Any:
    """The same LightGBM model with every split threshold rounded DOWN to a float32.

    LightGBM compares ``x <= t`` in float64; the ONNX tree ensemble in float32, its thresholds
    rounded to the nearest float32 by the converter. When that rounds up past a float32 input the
    two disagree (seen: 3 of 569 breast-cancer rows, probabilities off by 5e-3). For float32
    inputs ``x <= t`` holds exactly when ``x <= round_down32(t)``, so the rounded-down model
    predicts the same on every float32 input and converts exactly; it is also the native file
    published."""
    import lightgbm

    def down(match: "re.Match[str]") -> str:
        values = []
        for v in match.group(1).split():
            t = float(v)
            f = np.float32(t)
            if float(f) > t:
                f = np.nextafter(f, np.float32(-np.inf))
            values.append(repr(float(f)))
        return "threshold=" + " ".join(values)

    text = re.sub(r"^threshold=(.*)$", down, booster.model_to_string(), flags=re.M)
    text = re.sub(r"^tree_sizes=.*\n", "", text, flags=re.M)  # byte offsets of the old text; optional
    return lightgbm.Booster(model_str=text)


def build_sklearn(cfg: TabularTrainConfig, columns: list[TabularColumn]) -> Any:
    """The unfitted scikit-learn model for ``cfg.family``: imputers (plus scaling and one-hot
    encoding of category codes for linear models) and the estimator in one Pipeline, so the
    whole of it converts to ONNX. An import path's Pipeline is used as it is."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    classify = cfg.task == "classification"
    if cfg.family == "random-forest":
        from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

        est = (RandomForestClassifier if classify else RandomForestRegressor)(**{"random_state": cfg.seed, **cfg.params})
    elif cfg.family == "linear-regression":
        from sklearn.linear_model import LinearRegression

        est = LinearRegression(**cfg.params)
    elif cfg.family == "logistic-regression":
        from sklearn.linear_model import LogisticRegression

        est = LogisticRegression(**{"max_iter": 1000, "random_state": cfg.seed, **cfg.params})
    else:
        try:
            est = _import(cfg.family, "model factory")(**cfg.params)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"model factory {cfg.family!r} failed: {exc}") from exc
        if not hasattr(est, "fit"):
            raise ConfigError(f"model factory {cfg.family!r} must return a scikit-learn estimator, got {type(est).__name__}")
        if isinstance(est, Pipeline):
            return est
    linear = type(est).__module__.startswith("sklearn.linear_model")  # needs scaling and one-hot codes
    num = [i for i, c in enumerate(columns) if c.categories is None]
    cat = [i for i, c in enumerate(columns) if c.categories is not None]
    parts = []
    if num:
        steps = [("impute", SimpleImputer(strategy="median", keep_empty_features=True))]
        parts.append(("numeric", Pipeline(steps + ([("scale", StandardScaler())] if linear else [])), num))
    if cat:
        steps = [("impute", SimpleImputer(strategy="most_frequent", keep_empty_features=True))]
        if linear:
            steps.append(("onehot", OneHotEncoder(handle_unknown="ignore")))
        parts.append(("categorical", Pipeline(steps), cat))
    return Pipeline([("columns", ColumnTransformer(parts)), ("model", est)])


def _fit_sklearn(model: Any, train: Any) -> Any:
    """The Ray task: fit on the whole training split (scikit-learn fits in one process)."""
    x, y = _arrays(train)
    return model.fit(x, y)


# ---- native predictions, export ------------------------------------------------------------


def native_predict(family: str, model: Any, x: np.ndarray, task: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(probabilities (N, C) or values (N,), labels (N,) or None) from the native model."""
    if family == "xgboost":
        import xgboost

        out = model.predict(xgboost.DMatrix(x, missing=np.nan))
    elif family == "lightgbm":
        out = model.predict(x)
    elif task == "classification":
        probs = model.predict_proba(x)
        return probs, np.asarray(model.predict(x))
    else:
        return np.asarray(model.predict(x), dtype=np.float64).reshape(-1), None
    out = np.asarray(out, dtype=np.float64)
    if task == "regression":
        return out.reshape(-1), None
    if out.ndim == 1:  # binary objectives: P(class 1)
        out = np.stack([1.0 - out, out], axis=1)
    return out, out.argmax(axis=1)


def _to_onnx(family: str, model: Any, n_features: int) -> Any:
    if family in GBDT_FAMILIES:
        from onnxmltools import convert_lightgbm, convert_xgboost
        from onnxmltools.convert.common.data_types import FloatTensorType

        types = [(INPUT_NAME, FloatTensorType([None, n_features]))]
        if family == "xgboost":
            return convert_xgboost(model, initial_types=types, target_opset=ONNXMLTOOLS_OPSET)
        return convert_lightgbm(model, initial_types=types, target_opset=ONNXMLTOOLS_OPSET, zipmap=False)
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    final = model.steps[-1][1] if hasattr(model, "steps") else model
    options = {id(final): {"zipmap": False}} if hasattr(final, "predict_proba") else None
    return convert_sklearn(
        model, initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        options=options, target_opset=SKL2ONNX_OPSET,
    )


def finalize_graph(proto: Any, task: str, n_classes: int) -> Any:
    """Name and shape the outputs as serving expects: classification ``probabilities``
    (FP32 [-1, C], first) and ``label`` (INT64 [-1]); regression ``value`` (FP32 [-1, 1])."""
    import onnx

    graph = proto.graph
    outs = list(graph.output)
    if task == "regression":
        if len(outs) != 1:
            raise ConfigError(f"a regression graph needs one output, got {[o.name for o in outs]}")
        renames, wanted = {outs[0].name: "value"}, [("value", [1])]
    else:
        by_type = {o.type.tensor_type.elem_type: o.name for o in outs if o.type.WhichOneof("value") == "tensor_type"}
        label, probs = by_type.get(onnx.TensorProto.INT64), by_type.get(onnx.TensorProto.FLOAT)
        if len(outs) != 2 or label is None or probs is None:
            raise ConfigError(
                f"a classifier graph needs an INT64 label and FP32 probabilities tensor, got {[o.name for o in outs]}"
            )
        renames, wanted = {probs: "probabilities", label: "label"}, [("probabilities", [n_classes]), ("label", [])]
    for node in graph.node:
        node.output[:] = [renames.get(n, n) for n in node.output]
        node.input[:] = [renames.get(n, n) for n in node.input]
    by_name = {renames.get(o.name, o.name): o for o in outs}
    del graph.output[:]
    for name, dims in wanted:
        out = by_name[name]
        out.name = name
        shape = out.type.tensor_type.shape
        del shape.dim[:]
        shape.dim.add().dim_param = "N"  # the batch
        for d in dims:
            shape.dim.add().dim_value = d
        graph.output.append(out)
    onnx.checker.check_model(proto)
    return proto


def onnx_predict(model_bytes: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {INPUT_NAME: x})))


def _native_bytes(family: str, model: Any) -> tuple[str, bytes]:
    if family == "xgboost":
        return NATIVE_FILES["xgboost"], bytes(model.save_raw(raw_format="json"))
    if family == "lightgbm":
        return NATIVE_FILES["lightgbm"], model.model_to_string().encode()
    import skops.io

    return NATIVE_FILES["sklearn"], skops.io.dumps(model)


def _metrics(task: str, y: np.ndarray, pred: np.ndarray, prefix: str) -> dict[str, float]:
    from sklearn import metrics as skm

    if task == "regression":
        return {
            f"{prefix}_rmse": float(np.sqrt(skm.mean_squared_error(y, pred))),
            f"{prefix}_mae": float(skm.mean_absolute_error(y, pred)),
            f"{prefix}_r2": float(skm.r2_score(y, pred)),
        }
    out = {f"{prefix}_accuracy": float(np.mean(pred.argmax(axis=1) == y))}
    try:
        if pred.shape[1] == 2:
            out[f"{prefix}_auc"] = float(skm.roc_auc_score(y, pred[:, 1]))
        else:
            out[f"{prefix}_auc"] = float(skm.roc_auc_score(y, pred, multi_class="ovr", average="macro",
                                                          labels=list(range(pred.shape[1]))))
    except ValueError as exc:  # a class missing from a small test split
        logger.warning("no AUC on the %s split: %s", prefix, exc)
    return out


# ---- the whole run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TabularReport:
    """What a tabular run produced."""

    manifest: Manifest
    metrics: dict[str, float]
    parity_max_abs_diff: float
    wall_seconds: float


def _frameworks(family: str) -> dict[str, str]:
    from importlib import metadata

    names = {"xgboost": ["xgboost", "onnxmltools"], "lightgbm": ["lightgbm", "onnxmltools"]}.get(
        family, ["scikit-learn", "skl2onnx", "skops"]
    )
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def _check_installed(cfg: TabularTrainConfig) -> None:
    needed = ([cfg.family, "onnxmltools"] if cfg.family in GBDT_FAMILIES else ["skl2onnx", "skops"])
    for module in needed:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise DependencyError(f"tabular training with {cfg.family} needs {module}: {TABULAR_INSTALL_HINT}") from exc


def local_ray_options(cfg: TabularTrainConfig, ray_init: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """``ray.init`` options; a Ray started here gets a CPU beyond what the Ray Train workers
    reserve. Ray Data reads each worker's shard with tasks that need a CPU of their own: with
    only the machine's cores (2 workers x 1 CPU on 2 cores), the workers wait for their data and
    the read waits for a CPU, forever. Logical CPUs only schedule: oversubscribing a little is
    what the workers' reads need, not more cores."""
    options = dict(ray_init or {})
    if options.get("address") is None and "num_cpus" not in options:
        needed = math.ceil(cfg.num_workers * cfg.cpus_per_worker) + 1
        options["num_cpus"] = max(os.cpu_count() or 1, needed)
    return options


def train_tabular(
    cfg: TabularTrainConfig,
    registry: Any = None,
    *,
    ray_init: Optional[dict[str, Any]] = None,
    on_progress: Optional[Callable[[str], None]] = None,
) -> TabularReport:
    """Train ``cfg`` on the connected Ray cluster (started if none), export, check parity, publish."""
    import ray

    from maas_ray.registry import ExtraFile, Registry

    say = on_progress or (lambda line: logger.info("%s", line))
    _check_installed(cfg)
    registry = registry or Registry()
    if not ray.is_initialized():
        ray.init(**local_ray_options(cfg, ray_init))
    t0 = time.perf_counter()
    data = load_tabular(cfg)
    say(f"data {cfg.data}: rows {data.identity['rows']}, {len(data.columns)} features")
    n_classes = len(data.classes or [])
    native_family = cfg.family if cfg.family in GBDT_FAMILIES else "sklearn"
    if cfg.sklearn:
        unfitted = build_sklearn(cfg, data.columns)
        train = data.datasets["train"].materialize()  # blocks in the object store, read by the task
        fit = ray.remote(num_cpus=cfg.cpus_per_worker)(_fit_sklearn)
        try:
            model = ray.get(fit.remote(unfitted, train))
        except ray.exceptions.RayTaskError as exc:
            raise TrainingError(f"{cfg.family} training failed: {exc}") from exc
    else:
        model = _train_gbdt(cfg, data)
    say(f"trained {cfg.family} in {time.perf_counter() - t0:.1f}s")

    x_test, y_test = _arrays(data.datasets["test"])
    x_val, y_val = _arrays(data.datasets["validation"])
    pred, labels = native_predict(native_family, model, x_test, cfg.task)
    metrics = _metrics(cfg.task, y_test, pred, "test")
    metrics.update(_metrics(cfg.task, y_val, native_predict(native_family, model, x_val, cfg.task)[0], "val"))
    try:
        proto = _to_onnx(native_family, model, len(data.columns))
    except Exception as exc:  # converters raise RuntimeError, NotImplementedError, ...
        raise ConfigError(f"cannot export {cfg.family} to ONNX: {exc}") from exc
    model_bytes = finalize_graph(proto, cfg.task, n_classes).SerializeToString()
    got = onnx_predict(model_bytes, x_test)
    diff, agreement = parity(
        cfg.task, pred, got["probabilities"] if cfg.task == "classification" else got["value"],
        cfg.parity_tolerance, native_labels=labels, exported_labels=got.get("label"),
    )
    metrics.update({"parity_max_abs_diff": diff, "parity_label_agreement": agreement})
    say(f"parity on {len(x_test)} test rows: max abs diff {diff:.2e}, labels agree {agreement:.2%}")

    native_name, native = _native_bytes(native_family, model)
    columns = [c.model_dump() for c in data.columns]
    if cfg.task == "classification":
        post = ProcessorSpec(
            name="classification", params={"labels": data.classes, "apply_softmax": False, "top_k": min(3, n_classes)}
        )
    else:
        post = ProcessorSpec(name="regression", params={})
    manifest = registry.publish(
        cfg.model_name,
        model_bytes,
        preprocessor=ProcessorSpec(name="tabular", params={"columns": columns}),
        postprocessor=post,
        metrics=metrics,
        training_config=cfg.model_dump(mode="json"),
        description=cfg.description or f"{cfg.family} {cfg.task} on {cfg.data}",
        files={native_name: ExtraFile(native, role=NATIVE_ROLE)},
        model_spec={
            "kind": "tabular", "family": cfg.family, "task": cfg.task, "label": cfg.label,
            "features": [c.name for c in data.columns], "class_labels": data.classes,
            "native_file": native_name, "frameworks": _frameworks(cfg.family),
        },
        dataset=data.identity,
    )
    return TabularReport(manifest, metrics, diff, time.perf_counter() - t0)


# ---- reference datasets (shipped by scikit-learn) ------------------------------------------


def diabetes_frame() -> Any:
    """scikit-learn's diabetes regression (442 rows, label ``progression``) with one categorical
    column, ``age_band`` (the standardized age binned into named bands, replacing it), and some
    values missing (``bp``, ``age_band``)."""
    import pandas as pd
    from sklearn.datasets import load_diabetes

    d = load_diabetes(as_frame=True)
    frame = d.frame.rename(columns={"target": "progression"})
    bands = pd.cut(frame["age"], bins=[-np.inf, -0.03, 0.0, 0.03, np.inf], labels=["young", "adult", "middle-aged", "senior"])
    frame.insert(0, "age_band", bands.astype(object))
    frame = frame.drop(columns=["age"])
    rng = np.random.default_rng(0)
    frame.loc[rng.random(len(frame)) < 0.05, "bp"] = np.nan
    frame.loc[rng.random(len(frame)) < 0.03, "age_band"] = None
    return frame


def breast_cancer_frame() -> Any:
    """scikit-learn's breast cancer classification (569 rows, 30 numeric features), the label as
    class names ("malignant", "benign"), and some values missing."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer(as_frame=True)
    frame = d.frame.copy()
    frame.columns = [c.replace(" ", "_") for c in frame.columns]
    frame["diagnosis"] = np.asarray(d.target_names)[d.target]
    frame = frame.drop(columns=["target"])
    rng = np.random.default_rng(0)
    frame.loc[rng.random(len(frame)) < 0.05, "mean_texture"] = np.nan
    return frame
