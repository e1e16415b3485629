"""Tabular data and models for the tests (training and serving sides).

- :func:`gappy_frame`: a small mixed frame with numeric and categorical columns and missing values;
- :data:`GAPPY_COLUMNS`: its schema as the manifest records it (``preprocessor.params["columns"]``);
- :func:`zipmap_onnx`: a LogisticRegression exported with skl2onnx's defaults (a ZipMap output),
  which ``Registry.publish`` refuses.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

GAPPY_COLUMNS = [
    {"name": "size", "dtype": "FP32", "categories": None, "nullable": True},
    {"name": "color", "dtype": "BYTES", "categories": ["blue", "green", "red"], "nullable": True},
    {"name": "count", "dtype": "INT64", "categories": None, "nullable": False},
]


def gappy_frame(rows: int = 200, seed: int = 0) -> pd.DataFrame:
    """``size`` (float, ~10 % NaN), ``color`` (blue/green/red, ~10 % missing), ``count`` (int),
    and two labels: ``kind`` ("a"/"b", depends on size and color) and ``score`` (a float)."""
    rng = np.random.default_rng(seed)
    size = rng.normal(size=rows)
    color = rng.choice(["blue", "green", "red"], size=rows).astype(object)
    count = rng.integers(0, 10, size=rows)
    kind = np.where(size + (color == "red") * 1.5 + 0.1 * count > 0.8, "b", "a")
    score = 2.0 * size + (color == "green") * 3.0 + 0.5 * count + rng.normal(scale=0.1, size=rows)
    size[rng.random(rows) < 0.1] = np.nan
    color[rng.random(rows) < 0.1] = None
    return pd.DataFrame({"size": size, "color": color, "count": count, "kind": kind, "score": score})


def zipmap_onnx() -> bytes:
    """A 4-feature LogisticRegression exported with skl2onnx's defaults: its probabilities are a
    ZipMap output (``output_probability``, a sequence of maps), not a tensor."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    model = LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))
    return convert_sklearn(model, initial_types=[("input", FloatTensorType([None, 4]))]).SerializeToString()
