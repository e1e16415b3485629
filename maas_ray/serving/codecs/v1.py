"""The v1 ``:predict`` form (TF Serving / KServe v1): ``{"instances": [...]}`` rows or
``{"inputs": ...}`` columns in, ``{"predictions": [...]}`` out.

JSON nesting is checked as in v2 (``2 + ndim`` levels against ``max_json_depth``).
``{"b64": ...}`` items become object arrays of ``bytes``.
"""

from __future__ import annotations

import binascii
import math
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from maas_ray.errors import InvalidInputError, PayloadTooLargeError
from maas_ray.serving.codecs.common import (
    INTS,
    NONE,
    NUMBERS,
    NUMERIC_DATATYPES,
    as_list,
    check_keys,
    invalid,
    nested_leaves,
    parse_json,
    short_key,
    to_array,
)
from maas_ray.serving.types import RequestSchema, Tensors

if TYPE_CHECKING:
    from maas_ray.serving.config import Limits

_V1_KEYS = frozenset({"instances", "inputs", "signature_name"})


def decode_v1(body: bytes, schema: RequestSchema, limits: "Limits") -> Tensors:
    """Validate and decode ``{"instances": [...]}`` (rows) or ``{"inputs": ...}`` (columns).

    One-input models take a list of per-item values; several inputs take a list of
    ``{name: value}`` rows (or, columnar, ``{"inputs": {name: [values]}}``). ``{"b64": "..."}``
    items are binary (TF Serving's form). An input's values are all numbers of one nesting,
    all strings, or all ``{"b64"}`` objects; null only for a nullable input (a missing value:
    NaN among numbers, "" among strings). Numbers decode to int64 (all integers) or float64;
    the preprocessor casts them to the schema dtype if lossless.
    """
    req = parse_json(body)
    if type(req) is not dict:
        raise invalid("request", 'an object with "instances" (or "inputs")', req)
    check_keys(req, _V1_KEYS, "request")
    sig = req.get("signature_name", "serving_default")
    if sig != "serving_default":
        raise invalid("signature_name", '"serving_default" (the only signature)', sig)
    if ("instances" in req) == ("inputs" in req):
        raise InvalidInputError('request: expected exactly one of "instances" (rows) or "inputs" (columns)')
    names = list(schema.inputs)
    columns: dict[str, Any] = {}
    if "instances" in req:
        rows = req["instances"]
        if type(rows) is not list or not rows:
            raise invalid("instances", "a non-empty list", rows)
        first = rows[0]
        if len(names) == 1 and not (type(first) is dict and first.keys() != {"b64"}):
            columns[names[0]] = rows
        else:
            wanted = set(names)
            for r, row in enumerate(rows):
                if type(row) is not dict or row.keys() != wanted:
                    if type(row) is not dict:
                        raise invalid(f"instances[{r}]", f"an object keyed by the model's inputs {names}", row)
                    raise InvalidInputError(
                        f"instances[{r}]: expected the keys {names}, got {sorted(short_key(k) for k in row)[:10]}"
                    )
            for n in names:
                columns[n] = [row[n] for row in rows]
        where = "instances"
    else:
        cols = req["inputs"]
        if type(cols) is dict:
            if cols.keys() != set(names):
                got = sorted(short_key(k) for k in cols)[:10]
                raise InvalidInputError(f"inputs: expected the keys {names}, got {got}")
            columns = cols
        elif len(names) == 1:
            columns[names[0]] = cols
        else:
            raise invalid("inputs", f"an object keyed by the model's inputs {names}", cols)
        where = "inputs"
    tensors: Tensors = {}
    total = 0
    for n in names:
        w = f"{where}.{n}" if len(names) > 1 else where
        arr = _v1_column(w, n, columns[n], schema.inputs[n], limits, n in schema.nullable)
        total += arr.size
        tensors[n] = arr
    if total > limits.max_tensor_elements:  # each column was checked before conversion too
        raise PayloadTooLargeError(
            f"{where}: {total} elements in all, over the limit of {limits.max_tensor_elements} (max_tensor_elements)"
        )
    return tensors


def _v1_column(
    where: str, name: str, values: Any, accepted: frozenset[str], limits: "Limits", nullable: bool = False
) -> np.ndarray:
    if type(values) is not list or not values:
        raise invalid(where, "a non-empty list", values)
    most = limits.max_tensor_elements
    if len(values) > most:
        raise PayloadTooLargeError(f"{where}: {len(values)} items, over max_tensor_elements ({most})")
    first = values[0]
    if nullable and NONE in set(map(type, values)):  # missing values in a flat column (tabular rows)
        return _nullable_column(where, name, values, accepted)
    if type(first) is dict:  # {"b64": "..."} items
        if set(map(type, values)) != {dict}:
            bad = next(v for v in values if type(v) is not dict)
            raise invalid(where, 'only {"b64": ...} objects (not mixed with other values)', bad)
        if "BYTES" not in accepted:
            raise InvalidInputError(f"{where}: input {name!r} takes numbers, not binary {{\"b64\"}} items")
        out = np.empty(len(values), dtype=object)
        for j, v in enumerate(values):
            if v.keys() != {"b64"} or type(v["b64"]) is not str:
                bad = v if v.keys() != {"b64"} else v["b64"]
                raise invalid(f"{where}[{j}]", 'an object {"b64": "<base64 string>"}', bad)
            try:
                out[j] = binascii.a2b_base64(v["b64"], strict_mode=True)
            except (binascii.Error, ValueError) as exc:
                raise InvalidInputError(f"{where}[{j}].b64: not valid base64: {exc}") from exc
        return out
    if type(first) is str:
        if set(map(type, values)) != {str}:
            bad = next(v for v in values if type(v) is not str)
            raise invalid(where, "only strings (not mixed with other values)", bad)
        if "BYTES" not in accepted:
            raise InvalidInputError(f"{where}: input {name!r} takes numbers ({sorted(accepted)}), got strings")
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    # Numbers: the nesting of the first item is the shape of every item.
    shape = [len(values)]
    probe = first
    while type(probe) is list and len(shape) <= limits.max_tensor_dims:
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    if len(shape) > limits.max_tensor_dims:
        raise InvalidInputError(f"{where}: nested more than {limits.max_tensor_dims} deep (max_tensor_dims)")
    size = math.prod(shape)
    if size > most:
        raise PayloadTooLargeError(f"{where}: {size} elements, over max_tensor_elements ({most})")
    leaves, nested = nested_leaves(values, shape, where, 2, limits)
    types = set(map(type, chain.from_iterable(leaves) if nested else leaves))
    if types == {bool}:
        datatype = "BOOL"
    elif types <= NUMBERS:
        datatype = "INT64" if types == INTS else "FP64"
    else:
        flat = list(chain.from_iterable(leaves)) if nested else leaves
        allowed = NUMBERS if type(flat[0]) is not bool else frozenset({bool})
        j, bad = next((j, v) for j, v in enumerate(flat) if type(v) not in allowed)
        what = "a number like the values before it" if allowed is NUMBERS else "a boolean like the values before it"
        raise invalid(f"{where} (value {j} in row-major order)", what, bad)
    if datatype == "BOOL" and "BOOL" not in accepted or datatype != "BOOL" and not accepted & NUMERIC_DATATYPES:
        got = "booleans" if datatype == "BOOL" else "numbers"
        raise InvalidInputError(f"{where}: input {name!r} takes {sorted(accepted)}, got {got}")
    return to_array(where, datatype, values, shape, types)


def _nullable_column(where: str, name: str, values: list, accepted: frozenset[str]) -> np.ndarray:
    """A flat column with nulls: numbers -> float64 with NaN, strings -> "" (a missing category)."""
    present = [v for v in values if v is not None]
    kind = frozenset({str}) if present and type(present[0]) is str else NUMBERS
    for j, v in enumerate(values):
        if v is not None and type(v) not in kind:
            what = "a string like the values before it" if kind is not NUMBERS else "a number like the values before it"
            raise invalid(f"{where}[{j}]", f"{what}, or null", v)
    if kind is not NUMBERS:
        if "BYTES" not in accepted:
            raise InvalidInputError(f"{where}: input {name!r} takes numbers ({sorted(accepted)}), got strings")
        out = np.empty(len(values), dtype=object)
        out[:] = ["" if v is None else v for v in values]
        return out
    if not accepted & NUMERIC_DATATYPES:
        raise InvalidInputError(f"{where}: input {name!r} takes {sorted(accepted)}, got numbers")
    return to_array(where, "FP64", values, [len(values)], set(map(type, values)))


def encode_v1(outputs: Tensors, version: int) -> bytes:
    """One prediction per item: the row itself for one output, else {name: row}."""
    cols = {n: np.asarray(as_list(a), dtype=object).reshape(a.shape).tolist() for n, a in outputs.items()}
    if len(cols) == 1:
        predictions: Any = next(iter(cols.values()))
    else:
        n_items = len(next(iter(cols.values())))
        predictions = [{n: c[i] for n, c in cols.items()} for i in range(n_items)]
    return orjson.dumps({"predictions": predictions, "model_version": str(version)})
