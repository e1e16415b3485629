"""Wire formats: Open Inference Protocol v2 (KServe/Triton REST) and the v1 ``:predict`` form.

Requests decode to ``dict[name, np.ndarray]`` (BYTES become object arrays of
``bytes``/``str``); responses encode from the same. Every malformed body raises
InvalidInputError naming the field, so the ingress answers 400, never 500.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import orjson

from maas_ray.errors import InvalidInputError
from maas_ray.registry.manifest import NUMPY_TO_OIP, OIP_TO_NUMPY

Tensors = dict[str, np.ndarray]

# OIP binary tensor extension (what tritonclient sends by default): a JSON header of
# this many bytes, followed by the raw tensor bytes named by parameters.binary_data_size.
BINARY_HEADER = "inference-header-content-length"


# orjson, not json: on a tiny model, parsing and writing JSON with the standard library
# took ~28 us of a ~370 us request; orjson does the same in ~2.5 us.
def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"request body is not valid JSON: {exc}") from exc


def dumps(body: Any) -> bytes:
    """A response body as JSON bytes."""
    return orjson.dumps(body)


def _flatten(data: Any) -> list:
    if not isinstance(data, list):
        return [data]
    if data and isinstance(data[0], list):
        out: list = []
        for row in data:
            out.extend(_flatten(row))
        return out
    return data


def _from_binary(name: str, datatype: str, raw: bytes) -> np.ndarray:
    if datatype == "BYTES":  # 4-byte little-endian length, then the bytes, repeated
        items, pos = [], 0
        while pos < len(raw):
            (n,) = np.frombuffer(raw[pos : pos + 4], dtype="<u4")
            items.append(raw[pos + 4 : pos + 4 + int(n)])
            pos += 4 + int(n)
        return np.array(items, dtype=object)
    dtype = OIP_TO_NUMPY[datatype]
    if len(raw) % dtype.itemsize:
        raise InvalidInputError(f"input {name!r}: {len(raw)} binary bytes is not a whole number of {datatype}")
    return np.frombuffer(raw, dtype=dtype)


def decode_v2(body: bytes, header_length: Optional[int] = None) -> tuple[Tensors, dict[str, Any]]:
    """Parse an OIP v2 infer request; returns (tensors, {"id":..., "outputs": [...]})."""
    binary = b""
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise InvalidInputError(f"{BINARY_HEADER} {header_length} is outside the body of {len(body)} bytes")
        body, binary = body[:header_length], body[header_length:]
    req = _json(body)
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise InvalidInputError("request must be a JSON object with a non-empty 'inputs' list")
    tensors: Tensors = {}
    offset = 0
    for i, item in enumerate(req["inputs"]):
        if not isinstance(item, dict):
            raise InvalidInputError(f"inputs[{i}] must be an object with name, datatype, shape, data")
        name = item.get("name")
        where = f"input {name!r}" if isinstance(name, str) else f"inputs[{i}]"
        if not isinstance(name, str):
            raise InvalidInputError(f"inputs[{i}].name must be a string")
        datatype, shape = item.get("datatype"), item.get("shape")
        if datatype not in OIP_TO_NUMPY:
            raise InvalidInputError(f"{where}: unknown datatype {datatype!r}; expected one of {sorted(OIP_TO_NUMPY)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidInputError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        size = math.prod(shape)
        bin_size = (item.get("parameters") or {}).get("binary_data_size")
        if bin_size is not None:
            flat = _from_binary(name, datatype, binary[offset : offset + int(bin_size)])
            offset += int(bin_size)
        else:
            if "data" not in item:
                raise InvalidInputError(f"{where}: missing 'data'")
            flat = _flatten(item["data"])
        if len(flat) != size:
            raise InvalidInputError(f"{where}: shape {shape} needs {size} values, got {len(flat)}")
        if isinstance(flat, np.ndarray):
            arr = flat
        elif datatype == "BYTES":
            arr = np.array(flat, dtype=object)
        else:
            try:
                arr = np.asarray(flat, dtype=OIP_TO_NUMPY[datatype])
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidInputError(f"{where}: data is not {datatype}: {exc}") from exc
            if datatype != "BOOL" and any(isinstance(v, (str, bool, dict, list)) for v in flat[:64]):
                raise InvalidInputError(f"{where}: data must be numbers for datatype {datatype}")
        if name in tensors:
            raise InvalidInputError(f"{where}: given twice")
        tensors[name] = arr.reshape(shape)
    meta = {"id": req.get("id"), "outputs": [o.get("name") for o in req.get("outputs") or [] if isinstance(o, dict)]}
    return tensors, meta


def decode_v1(body: bytes, input_names: list[str]) -> Tensors:
    """Parse ``{"instances": [...]}`` (or ``{"inputs": ...}``) into batched tensors.

    One-input models take a list of per-item values; several inputs take a list of
    ``{name: value}`` objects. ``{"b64": "..."}`` items are binary (TF Serving's form).
    """
    req = _json(body)
    if not isinstance(req, dict) or "instances" not in req and "inputs" not in req:
        raise InvalidInputError("request must be a JSON object with an 'instances' list")
    instances = req.get("instances", req.get("inputs"))
    if not isinstance(instances, list) or not instances:
        raise InvalidInputError("'instances' must be a non-empty list")

    def value(v: Any) -> Any:
        if isinstance(v, dict) and set(v) == {"b64"}:
            import base64

            try:
                return base64.b64decode(v["b64"], validate=True)
            except (ValueError, TypeError) as exc:
                raise InvalidInputError(f"instance has invalid base64: {exc}") from exc
        return v

    def column(values: list, name: str) -> np.ndarray:
        values = [value(v) for v in values]
        if any(isinstance(v, (bytes, str)) for v in values):
            return np.array(values, dtype=object)
        try:
            return np.asarray(values)
        except ValueError as exc:  # ragged nested lists
            raise InvalidInputError(f"instances of input {name!r} have different shapes: {exc}") from exc

    if len(input_names) == 1 and not (isinstance(instances[0], dict) and set(instances[0]) != {"b64"}):
        return {input_names[0]: column(instances, input_names[0])}
    if not all(isinstance(i, dict) for i in instances):
        raise InvalidInputError(f"this model has inputs {input_names}: each instance must be an object keyed by them")
    missing = [n for n in input_names if n not in instances[0]]
    if missing:
        raise InvalidInputError(f"instances[0] is missing input(s) {missing}; model expects {input_names}")
    return {n: column([i.get(n) for i in instances], n) for n in input_names}


def datatype_of(arr: np.ndarray) -> str:
    return "BYTES" if arr.dtype == object or arr.dtype.kind in "SU" else NUMPY_TO_OIP[arr.dtype]


def _as_list(arr: np.ndarray) -> list:
    if arr.dtype == object or arr.dtype.kind in "SU":
        return [v.decode() if isinstance(v, bytes) else str(v) for v in arr.reshape(-1)]
    return arr.reshape(-1).tolist()


def encode_v2(model: str, version: int, outputs: Tensors, request_id: Optional[str] = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model_name": model,
        "model_version": str(version),
        "outputs": [
            {"name": n, "datatype": datatype_of(a), "shape": list(a.shape), "data": _as_list(a)}
            for n, a in outputs.items()
        ],
    }
    if request_id is not None:
        out["id"] = request_id
    return out


def encode_v1(outputs: Tensors) -> dict[str, Any]:
    """One prediction per item: the row itself for one output, else {name: row}."""
    cols = {n: np.asarray(_as_list(a), dtype=object).reshape(a.shape).tolist() for n, a in outputs.items()}
    if len(cols) == 1:
        return {"predictions": next(iter(cols.values()))}
    n_items = len(next(iter(cols.values())))
    return {"predictions": [{n: c[i] for n, c in cols.items()} for i in range(n_items)]}
