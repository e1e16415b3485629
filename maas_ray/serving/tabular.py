"""Tabular models: rows by column name in, one FP32 feature matrix to the graph; and the
``regression`` postprocessor.

The ``tabular`` preprocessor reads its schema from the manifest's preprocessor params
(``{"columns": [{"name", "dtype", "categories", "nullable"}, ...]}``, in feature order) and
declares one request input per column, shape ``[-1]`` (one value per row): OIP v2 sends one
tensor per column, v1 ``instances`` one JSON object per row (``{"age": 41, "city": "lyon"}``,
as KServe's sklearn and xgboost servers take them). The graph takes one FP32 input
``[-1, n_features]``: numeric columns as floats, categorical columns (those with
``categories``) as the float index of the category, a missing value as NaN.

Missing values: a numeric column's NaN (JSON ``null`` in v2 ``data`` and v1 rows; NaN in
binary FP32/FP64 tensors: the v2 binary extension, gRPC, the handle API, ``maas batch``) and a
categorical column's empty string (any protocol; v1 ``null`` too) are missing; both are
refused unless the column is ``nullable``, and the codecs refuse ``null`` and NaN for every
input that is not.

Every refusal is a 400 naming the column: missing, unknown, wrong type, more than one value
per row, columns of different lengths, an unseen category, a missing value where the column
is not nullable, an infinite value anywhere.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from maas_ray.errors import ConfigError, InvalidInputError
from maas_ray.registry.manifest import Manifest, TensorSpec
from maas_ray.serving.config import Limits
from maas_ray.serving.plugins import Postprocessor, Preprocessor, datatype_of
from maas_ray.serving.types import RequestInput, Tensors

NUMERIC_DATATYPES = ("FP32", "FP64", "FP16", "INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8")
_SHOWN = 10  # most names listed in one error message
_F32_MAX = float(np.finfo(np.float32).max)


class TabularColumn(BaseModel):
    """One feature column, as the model was trained on it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256, description="The column name requests use.")
    dtype: Literal["FP32", "INT64", "BYTES", "BOOL"] = Field(
        description="The column's type in the training data (the graph gets every column as FP32)."
    )
    categories: Optional[list[str]] = Field(
        default=None,
        description="Categorical columns: the known categories, in the order whose index the graph gets.",
    )
    nullable: bool = Field(default=False, description="Whether the value may be missing (NaN to the graph).")

    @field_validator("categories")
    @classmethod
    def _unique(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        if v is not None:
            dup = sorted({c for c in v if v.count(c) > 1})
            if dup:
                raise ValueError(f"categories listed twice: {dup[:_SHOWN]}")
            if "" in v:
                raise ValueError("'' cannot be a category: an empty string is a missing value")
        return v

    @model_validator(mode="after")
    def _categorical_is_bytes(self) -> "TabularColumn":
        if self.dtype == "BYTES" and self.categories is None:
            raise ValueError(f"column {self.name!r}: a BYTES column needs its categories")
        if self.dtype != "BYTES" and self.categories is not None:
            raise ValueError(f"column {self.name!r}: categories are for BYTES columns, this one is {self.dtype}")
        return self


class TabularParams(BaseModel):
    """The ``tabular`` preprocessor's params: the feature columns, in the graph's order."""

    model_config = ConfigDict(extra="forbid")

    columns: list[TabularColumn] = Field(min_length=1, description="Feature columns in feature order.")

    @field_validator("columns")
    @classmethod
    def _distinct(cls, v: list[TabularColumn]) -> list[TabularColumn]:
        names = [c.name for c in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"column names listed twice: {dup[:_SHOWN]}")
        return v


def _names(names: list[str]) -> str:
    shown = names[:_SHOWN]
    return str(shown) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


class TabularPreprocessor(Preprocessor):
    """Columns by name -> the graph's one FP32 input ``[-1, n_features]`` (see the module doc)."""

    name = "tabular"

    def __init__(
        self,
        manifest: Manifest,
        params: Mapping[str, Any],
        *,
        limits: Optional[Limits] = None,
        files: Optional[Mapping[str, bytes]] = None,
    ) -> None:
        super().__init__(manifest, params, limits=limits, files=files)
        raw = dict(params)
        if isinstance(raw.get("columns"), list):  # column models (the trainer's) as plain dicts
            raw["columns"] = [c.model_dump() if isinstance(c, BaseModel) else c for c in raw["columns"]]
        try:
            self.schema = TabularParams.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "params"
            raise ConfigError(f"tabular preprocessor params: {where}: {first['msg']}") from exc
        if len(self.inputs) != 1:
            raise ConfigError(f"tabular preprocessor needs a one-input model, {manifest.model} has {len(self.inputs)}")
        self.spec = self.inputs[0]
        width = self.spec.shape[-1] if len(self.spec.shape) == 2 else None
        if self.spec.datatype != "FP32" or width is None or width not in (-1, len(self.schema.columns)):
            raise ConfigError(
                f"tabular preprocessor: the graph input {self.spec.name!r} must be FP32 [-1, "
                f"{len(self.schema.columns)}] (one per column), got {self.spec.datatype} {self.spec.shape}"
            )
        self.columns = self.schema.columns
        self._index = {c.name: i for i, c in enumerate(self.columns)}
        self._lookup = {c.name: {k: float(i) for i, k in enumerate(c.categories)} for c in self.columns if c.categories}

    @property
    def request_inputs(self) -> list[RequestInput]:
        out = []
        for c in self.columns:
            if c.categories is not None:
                datatypes: tuple[str, ...] = ("BYTES",)
            elif c.dtype == "BOOL":
                datatypes = ("BOOL", *NUMERIC_DATATYPES)
            else:
                datatypes = (c.dtype, *(d for d in NUMERIC_DATATYPES if d != c.dtype))
            out.append(RequestInput(c.name, datatypes, [-1], nullable=c.nullable))
        return out

    def __call__(self, tensors: Tensors, *, strict_dtypes: bool) -> Tensors:
        unknown = [n for n in tensors if n not in self._index]
        if unknown:
            raise InvalidInputError(
                f"unknown column(s) {_names(unknown)}; the model takes {_names(list(self._index))}"
            )
        missing = [c.name for c in self.columns if c.name not in tensors]
        if missing:
            raise InvalidInputError(f"missing column(s) {_names(missing)}; the model takes {_names(list(self._index))}")
        rows: Optional[int] = None
        first = ""
        x: Optional[np.ndarray] = None
        for j, col in enumerate(self.columns):
            arr = tensors[col.name]
            if arr.ndim == 2 and arr.shape[1] == 1:
                arr = arr[:, 0]
            if arr.ndim != 1:
                raise InvalidInputError(
                    f"column {col.name!r}: expected one value per row (shape [-1]), got shape {list(arr.shape)}"
                )
            if arr.shape[0] == 0:
                raise InvalidInputError(f"column {col.name!r}: no rows")
            if rows is None:
                rows, first = arr.shape[0], col.name
                x = np.empty((rows, len(self.columns)), dtype=np.float32)
            elif arr.shape[0] != rows:
                raise InvalidInputError(
                    f"columns have different lengths: {first!r} has {rows} rows, {col.name!r} has {arr.shape[0]}"
                )
            assert x is not None
            x[:, j] = self._categorical(col, arr) if col.categories is not None else self._numeric(col, arr)
        assert x is not None
        return {self.spec.name: x}

    def _numeric(self, col: TabularColumn, arr: np.ndarray) -> np.ndarray:
        if arr.dtype.kind not in "iufb":
            got = "strings" if arr.dtype == object or arr.dtype.kind in "SU" else datatype_of(arr)
            raise InvalidInputError(f"column {col.name!r}: expected numbers ({col.dtype}), got {got}")
        if arr.dtype.kind == "b" and col.dtype != "BOOL":
            raise InvalidInputError(f"column {col.name!r}: expected numbers ({col.dtype}), got booleans")
        v = arr.astype(np.float64, copy=False)
        if v.dtype.kind == "f":
            bad = np.isinf(v) | (np.abs(np.nan_to_num(v)) > _F32_MAX)
            if bad.any():
                i = int(np.argmax(bad))
                raise InvalidInputError(f"column {col.name!r}: row {i}: {v[i]} is infinite or beyond FP32")
            if not col.nullable:
                nan = np.isnan(v)
                if nan.any():
                    raise InvalidInputError(
                        f"column {col.name!r}: row {int(np.argmax(nan))}: missing value (NaN), "
                        "and the column is not nullable"
                    )
        if col.dtype == "BOOL" and arr.dtype.kind != "b":
            ok = np.isnan(v) | (v == 0) | (v == 1)
            if not ok.all():
                i = int(np.argmax(~ok))
                raise InvalidInputError(f"column {col.name!r}: row {i}: expected a boolean (0 or 1), got {v[i]}")
        return v

    def _categorical(self, col: TabularColumn, arr: np.ndarray) -> np.ndarray:
        if arr.dtype.kind == "U":
            arr = arr.astype(object)
        if arr.dtype != object:
            raise InvalidInputError(f"column {col.name!r}: expected strings (a category), got {datatype_of(arr)}")
        lookup = self._lookup[col.name]
        out = np.empty(arr.shape[0], dtype=np.float32)
        seen: dict[Any, float] = {}
        for i, item in enumerate(arr):
            try:
                out[i] = seen[item]
                continue
            except (KeyError, TypeError):
                pass
            value = item
            if isinstance(value, (bytes, bytearray, memoryview)):
                try:
                    value = bytes(value).decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise InvalidInputError(f"column {col.name!r}: row {i}: not UTF-8 text") from exc
            if not isinstance(value, str):
                raise InvalidInputError(
                    f"column {col.name!r}: row {i}: expected a string (a category), got {type(value).__name__}"
                )
            if value == "":
                if not col.nullable:
                    raise InvalidInputError(
                        f"column {col.name!r}: row {i}: missing value (empty string), and the column is not nullable"
                    )
                code = float("nan")
            else:
                found = lookup.get(value)
                if found is None:
                    shown = value if len(value) <= 40 else value[:37] + "..."
                    raise InvalidInputError(
                        f"column {col.name!r}: row {i}: unseen category {shown!r}; known: {_names(list(lookup))}"
                    )
                code = found
            out[i] = code
            if isinstance(item, (str, bytes)):
                seen[item] = code
        return out


class RegressionPostprocessor(Postprocessor):
    """The graph's ``value`` ([-1] or [-1, 1]; else its first output) -> ``value`` FP32 [-1];
    ``lower`` and ``upper`` likewise where the graph outputs an interval under those names."""

    name = "regression"

    def __init__(
        self,
        manifest: Manifest,
        params: Mapping[str, Any],
        *,
        limits: Optional[Limits] = None,
        files: Optional[Mapping[str, bytes]] = None,
    ) -> None:
        super().__init__(manifest, params, limits=limits, files=files)
        by_name = {o.name: o for o in self.outputs}
        self.value = by_name.get("value", self.outputs[0]).name
        self.interval = "lower" in by_name and "upper" in by_name
        for name in [self.value] + (["lower", "upper"] if self.interval else []):
            shape = by_name[name].shape
            if not (len(shape) == 1 or len(shape) == 2 and shape[1] in (1, -1)):
                raise ConfigError(
                    f"regression postprocessor: output {name!r} must be one value per row ([-1] or [-1, 1]), "
                    f"got {shape}"
                )

    @property
    def response_outputs(self) -> list[TensorSpec]:
        names = ["value"] + (["lower", "upper"] if self.interval else [])
        return [TensorSpec(name=n, datatype="FP32", shape=[-1]) for n in names]

    def __call__(self, outputs: Tensors) -> Tensors:
        out = {"value": self._column(outputs[self.value])}
        if self.interval:
            out["lower"] = self._column(outputs["lower"])
            out["upper"] = self._column(outputs["upper"])
        return out

    @staticmethod
    def _column(arr: np.ndarray) -> np.ndarray:
        arr = np.asarray(arr)
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise ValueError(f"regression output of shape {list(arr.shape)}: expected one value per row")
        return arr.astype(np.float32, copy=False)


__all__ = ["RegressionPostprocessor", "TabularColumn", "TabularParams", "TabularPreprocessor"]
