"""Datasets: scikit-learn's digits (offline reference task) and user .npz/.parquet files."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maas_ray.errors import ConfigError


@dataclass
class Dataset:
    x_train: np.ndarray  # (N, F) float32
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    class_labels: list[str]
    is_digits: bool

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]


def _read(data: str) -> tuple[np.ndarray, np.ndarray]:
    if data == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        return x / 16.0, y  # pixels are 0..16; the served preprocessor applies the same scale
    try:
        if data.endswith(".npz"):
            with np.load(data) as f:
                return f["x"], f["y"]
        import pyarrow.parquet as pq

        table = pq.read_table(data).to_pandas()
        return table.drop(columns=["label"]).to_numpy(), table["label"].to_numpy()
    except (OSError, KeyError) as exc:
        raise ConfigError(
            f"cannot read dataset {data!r}: {exc} (an .npz needs arrays 'x' and 'y', "
            "a .parquet needs a 'label' column)"
        ) from exc


def load_dataset(data: str, *, test_fraction: float, seed: int) -> Dataset:
    """Load features and labels and split them deterministically by ``seed``."""
    x, y = _read(data)
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)  # (N, F)
    if len(x) != len(y) or len(x) < 2:
        raise ConfigError(f"dataset {data!r}: {len(x)} feature rows vs {len(y)} labels")
    classes, y_idx = np.unique(np.asarray(y), return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    return Dataset(
        x_train=x[train],
        y_train=y_idx[train].astype(np.int64),
        x_test=x[test],
        y_test=y_idx[test].astype(np.int64),
        class_labels=[str(c) for c in classes],
        is_digits=data == "digits",
    )
