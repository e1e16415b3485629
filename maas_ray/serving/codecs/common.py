"""What every codec shares: the field checks, tensor building and the version reference.

Each check raises only :class:`~maas_ray.errors.InvalidInputError` (400) or
:class:`~maas_ray.errors.PayloadTooLargeError` (413), with a message that names the field and
what was expected (``inputs[0].shape[1]: expected a non-negative integer, got true``).
Third-party errors (orjson, numpy, base64) are re-raised as those with ``from exc``.

JSON depth: orjson refuses documents nested deeper than 1024 levels (a 400 here). Below
that, nothing is ever recursed into: every container is checked against what the protocol
allows at its level, and ``data`` is flattened level by level only as deep as its declared
shape, whose nesting is checked against ``max_json_depth``. Error messages show containers
as "a list"/"an object", never their repr.
"""

from __future__ import annotations

import math
import struct
from itertools import chain, islice
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import orjson

from maas_ray.errors import InvalidInputError, PayloadTooLargeError
from maas_ray.registry.manifest import OIP_TO_NUMPY, check_name
from maas_ray.serving.types import RequestSchema, Scalar

if TYPE_CHECKING:
    from maas_ray.serving.config import Limits

# OIP binary tensor extension (what tritonclient sends by default): a JSON header of
# this many bytes, followed by the raw tensor bytes named by parameters.binary_data_size.
BINARY_HEADER = "inference-header-content-length"
MAX_ID_CHARS = 256
MAX_HEADER_DIGITS = 12  # a header length of 10**12 bytes is far past any body limit
MAX_VERSION_DIGITS = 18  # fits an int64

OUTPUT_KEYS = frozenset({"name", "parameters"})
_SCALARS = frozenset({str, int, float, bool})
_UNSUPPORTED_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "classification")

NUMBERS = frozenset({int, float})
INTS = frozenset({int})
NONE = type(None)
FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64"})
# The JSON types each datatype's values may have (bool is not an int here).
_JSON_TYPES: dict[str, frozenset] = {
    **{dt: INTS for dt in OIP_TO_NUMPY if dt.startswith(("INT", "UINT"))},
    **{dt: NUMBERS for dt in ("FP16", "FP32", "FP64")},
    "BOOL": frozenset({bool}),
    "BYTES": frozenset({str}),
}
_TYPE_WORDS = {"BOOL": "a boolean", "BYTES": "a string"}
NUMERIC_DATATYPES = frozenset(dt for dt in OIP_TO_NUMPY if dt not in ("BOOL", "BYTES"))


# ---- checks shared by every codec ----------------------------------------------------------------------------
def show(value: Any) -> str:
    """A JSON value for an error message: containers by kind, scalars as JSON, short."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    try:
        text = orjson.dumps(value).decode()
    except (TypeError, ValueError):  # e.g. an int past 64 bits built in Python
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def short_key(key: str) -> str:
    return key if len(key) <= 40 else key[:37] + "..."


def invalid(where: str, expected: str, got: Any) -> InvalidInputError:
    return InvalidInputError(f"{where}: expected {expected}, got {show(got)}")


# orjson, not json: on a tiny model, parsing and writing JSON with the standard library
# took ~28 us of a ~370 us request; orjson does the same in ~2.5 us.
def parse_json(raw: Union[bytes, memoryview]) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:  # bad UTF-8, NaN/Infinity, 1e400, depth > 1024, ...
        raise InvalidInputError(f"request body is not valid JSON: {exc}") from exc


def dumps(body: Any) -> bytes:
    """A response body as JSON bytes."""
    return orjson.dumps(body)


def check_object(value: Any, where: str) -> dict:
    if type(value) is not dict:
        raise invalid(where, "an object", value)
    return value


def check_keys(obj: dict, allowed: frozenset, where: str) -> None:
    if not obj.keys() <= allowed:
        unknown = sorted(short_key(k) for k in islice(obj.keys() - allowed, 5))
        raise InvalidInputError(f"{where}: unknown field(s) {unknown}; expected only {sorted(allowed)}")


def check_parameters(value: Any, where: str) -> dict[str, Scalar]:
    params = check_object(value, where)
    if not set(map(type, params.values())) <= _SCALARS:
        for k, v in params.items():
            if type(v) not in _SCALARS:
                raise invalid(f"{where}.{short_key(k)}", "a string, number or boolean", v)
    for k in _UNSUPPORTED_PARAMETERS:
        if k in params:
            raise InvalidInputError(f"{where}.{k}: not supported by this server")
    return params


def check_flag(params: dict, key: str, where: str) -> bool:
    value = params.get(key, False)
    if type(value) is not bool:
        raise invalid(f"{where}.{key}", "a boolean", value)
    return value


def check_shape(value: Any, where: str, limits: "Limits") -> tuple[list[int], int]:
    """Validated dims and their product; dims are ints (not bools), >= 0, within the limits."""
    if type(value) is not list:
        raise invalid(where, "a list of non-negative integers", value)
    if len(value) > limits.max_tensor_dims:
        raise InvalidInputError(
            f"{where}: expected at most {limits.max_tensor_dims} dimensions (max_tensor_dims), got {len(value)}"
        )
    most = limits.max_tensor_elements
    for d, dim in enumerate(value):  # <= 16 dims: a plain loop beats set(map(type)) here
        if type(dim) is not int or dim < 0:  # type(True) is bool, not int
            raise invalid(f"{where}[{d}]", "a non-negative integer", dim)
        if dim > most:  # even with a 0 elsewhere (no numpy shape past int64): 413
            raise PayloadTooLargeError(f"{where}[{d}]: {show(dim)} exceeds max_tensor_elements ({most})")
    return value, math.prod(value)


def check_depth(levels: int, where: str, limits: "Limits") -> None:
    if levels > limits.max_json_depth:
        raise InvalidInputError(
            f"{where}: nested {levels} levels deep in the request; "
            f"the limit (max_json_depth) is {limits.max_json_depth}"
        )


def nested_leaves(data: list, shape: list[int], where: str, depth0: int, limits: "Limits") -> tuple[Any, bool]:
    """Check ``data`` is flat (prod(shape) values) or nested exactly as ``shape``.

    Returns (the innermost lists, or the flat list; nested?). Nesting is checked level by
    level with C-speed set(map(...)) calls and chain.from_iterable, never per element in
    Python, and never deeper than the shape says.
    """
    ndim = len(shape)
    if ndim < 2 or not data or type(data[0]) is not list:
        size = math.prod(shape)
        if len(data) != size:
            raise InvalidInputError(f"{where}: shape {shape} needs {size} values, got {len(data)}")
        return data, False
    check_depth(depth0 + ndim, where, limits)
    if len(data) != shape[0]:
        raise InvalidInputError(
            f"{where}: shape {shape} needs {shape[0]} rows (or {math.prod(shape)} flat values), got {len(data)} items"
        )
    level = data
    for k in range(1, ndim):
        if k > 1:
            level = list(chain.from_iterable(level))
        if not level:  # a 0 dim: nothing below
            break
        if set(map(type, level)) != {list}:
            bad = next(v for v in level if type(v) is not list)
            raise invalid(f"{where}", f"lists nested {ndim} deep as shape {shape} (or a flat list)", bad)
        lens = set(map(len, level))
        if lens != {shape[k]}:
            got = sorted(lens - {shape[k]})[0]
            raise InvalidInputError(
                f"{where}: shape {shape} needs {shape[k]} values at depth {k + 1}, got a list of {got}"
            )
    return level, True


def check_types(where: str, datatype: str, leaves: Any, nested: bool, nullable: bool = False) -> set:
    """Every value has the datatype's JSON type; returns the set of types seen.

    One C-speed pass, set(map(type, values)): 1.3 us for 64 values, ~450 us for 784x32
    (as much as numpy's conversion after it; a per-element Python loop is ~5x slower).
    Also timed and passed over: operator.countOf(map(type, v), float) (~30% faster on
    uniform data, 70% slower on JSON that writes whole floats as ints, as JavaScript does);
    array.array conversion (rejects str/None/containers while converting, but takes bools,
    and finding bools costs as much as this pass). Binary tensors skip this pass.
    """
    allowed = _JSON_TYPES[datatype]
    if nullable and datatype in FLOAT_DATATYPES:  # a missing value: null -> NaN
        allowed = allowed | {NONE}
    values = chain.from_iterable(leaves) if nested else leaves
    types = set(map(type, values))
    if types <= allowed:
        return types
    flat = list(chain.from_iterable(leaves)) if nested else leaves
    j, bad = next((j, v) for j, v in enumerate(flat) if type(v) not in allowed)
    word = _TYPE_WORDS.get(datatype, "an integer" if allowed is INTS else "a number")
    at = f"{where} (value {j} in row-major order)" if nested else f"{where}[{j}]"
    raise invalid(at, f"{word} for {datatype}", bad)


def to_array(where: str, datatype: str, values: Any, shape: list[int], types: set) -> np.ndarray:
    """Typed JSON values (flat, or nested as the shape) -> an array of ``shape``; 400 if out of range.

    ``None`` (only where :func:`check_types` let it through: a nullable float input) becomes NaN.
    """
    dtype = OIP_TO_NUMPY[datatype]
    try:
        arr = np.array(values, dtype=dtype)
    except (OverflowError, ValueError, TypeError, RuntimeWarning) as exc:
        # OverflowError: an int out of the dtype's range (or past float). RuntimeWarning:
        # a float past FP16/FP32's range raises only where warnings are errors (the tests);
        # elsewhere numpy warns once and makes inf, which the isfinite check below rejects.
        raise InvalidInputError(f"{where}: a value does not fit {datatype}: {exc}") from exc
    # JSON numbers are finite (orjson refuses NaN, Infinity, 1e400) and ints are < 2**64:
    # only floats cast to FP32, or anything cast to FP16, can overflow (isfinite: 1.3 us).
    if NONE in types:  # nullable: NaN stands for the missing values, infinities are still refused
        if np.isinf(arr).any():
            raise InvalidInputError(f"{where}: values overflow {datatype} (they must be finite)")
    elif (datatype == "FP16" or datatype == "FP32" and float in types) and not np.isfinite(arr).all():
        raise InvalidInputError(f"{where}: values overflow {datatype} (they must be finite)")
    return arr.reshape(shape)


def check_finite(where: str, datatype: str, arr: np.ndarray, nullable: bool) -> None:
    """Float values from binary data or protobuf may be NaN or infinite (JSON's cannot): refuse
    both, or (``nullable``) only infinities, NaN marking a missing value."""
    if arr.dtype.kind != "f":
        return
    if nullable:
        if np.isinf(arr).any():
            raise InvalidInputError(f"{where}: {datatype} values must be finite or NaN (missing)")
    elif not np.isfinite(arr).all():
        raise InvalidInputError(f"{where}: {datatype} values must be finite")


def from_binary(
    where: str, datatype: str, raw: memoryview, shape: list[int], size: int,
    size_field: str = ".parameters.binary_data_size", nullable: bool = False,
) -> np.ndarray:
    """Raw little-endian tensor bytes (binary extension, gRPC raw contents) -> an array.

    ``size_field`` names where the byte count came from, for the error message.
    """
    if datatype == "BYTES":  # repeated: 4-byte little-endian length, then that many bytes
        items, pos, end = [], 0, len(raw)
        unpack = struct.Struct("<I").unpack_from
        while pos < end:
            if pos + 4 > end:
                raise InvalidInputError(f"{where}: BYTES element {len(items)} has a truncated length prefix")
            (n,) = unpack(raw, pos)
            pos += 4
            if pos + n > end:
                raise InvalidInputError(
                    f"{where}: BYTES element {len(items)} declares {n} bytes, only {end - pos} remain"
                )
            items.append(bytes(raw[pos : pos + n]))
            pos += n
            if len(items) > size:
                break
        if len(items) != size:
            held = f"more than {size}" if len(items) > size else str(len(items))
            raise InvalidInputError(f"{where}: shape {shape} needs {size} BYTES elements, the binary data holds {held}")
        arr = np.empty(size, dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    dtype = OIP_TO_NUMPY[datatype]
    if len(raw) != size * dtype.itemsize:
        raise InvalidInputError(
            f"{where}{size_field}: shape {shape} of {datatype} needs "
            f"{size * dtype.itemsize} bytes, got {len(raw)}"
        )
    arr = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))  # the extension is little-endian
    check_finite(where, f"binary {datatype}", arr, nullable)
    if dtype.kind == "b" and size and np.frombuffer(raw, dtype=np.uint8).max() > 1:
        raise InvalidInputError(f"{where}: binary BOOL values must be 0 or 1")
    return arr.reshape(shape)



def check_all_inputs(total: int, seen: Any, schema: RequestSchema, limits: "Limits") -> None:
    """Across a request's inputs (every protocol): the element limit, and no input missing."""
    if total > limits.max_tensor_elements:
        raise PayloadTooLargeError(
            f"inputs: {total} elements in all, over the limit of {limits.max_tensor_elements} (max_tensor_elements)"
        )
    if len(seen) != len(schema.inputs):
        missing = [n for n in schema.inputs if n not in seen and n not in schema.optional]
        if missing:
            raise InvalidInputError(f"inputs: missing input(s) {missing}; this model takes {list(schema.inputs)}")



def requested_outputs(
    value: Any, schema: RequestSchema, all_binary: bool
) -> tuple[Optional[list[str]], frozenset[str]]:
    if value is None:
        return None, frozenset(schema.outputs) if all_binary else frozenset()
    if type(value) is not list:
        raise invalid("outputs", "a list of output objects", value)
    if not value:
        return None, frozenset(schema.outputs) if all_binary else frozenset()
    names: list[str] = []
    binary: set[str] = set()
    for i, item in enumerate(value):
        where = f"outputs[{i}]"
        if type(item) is not dict:
            raise invalid(where, "an object with a name", item)
        check_keys(item, OUTPUT_KEYS, where)
        name = item.get("name")
        if type(name) is not str:
            raise invalid(f"{where}.name", "a string", name)
        if name not in schema.outputs:
            raise InvalidInputError(
                f"{where}.name: unknown output {show(name)}; this model returns {list(schema.outputs)}"
            )
        if name in names:
            raise InvalidInputError(f"{where}.name: output {name!r} requested twice")
        names.append(name)
        is_binary = all_binary
        if "parameters" in item:
            p = check_parameters(item["parameters"], f"{where}.parameters")
            if "binary_data" in p:
                is_binary = check_flag(p, "binary_data", f"{where}.parameters")
        if is_binary:
            binary.add(name)
    return names, frozenset(binary)




def as_list(arr: np.ndarray) -> list:
    if arr.dtype == object or arr.dtype.kind in "SU":
        return [v.decode() if isinstance(v, bytes) else str(v) for v in arr.reshape(-1)]
    return arr.reshape(-1).tolist()


def as_binary(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":  # Triton's serialized form: 4-byte little-endian length, bytes
        items = [v if isinstance(v, bytes) else str(v).encode() for v in arr.reshape(-1)]
        pack = struct.Struct("<I").pack
        return b"".join(chain.from_iterable((pack(len(b)), b) for b in items))
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()



def parse_version_ref(ref: str) -> Union[int, str]:
    """A version reference from the URL: ASCII digits -> int; an alias name -> str; else 400."""
    if ref.isascii() and ref.isdigit():
        if len(ref) > MAX_VERSION_DIGITS:
            raise InvalidInputError(f"version: expected at most {MAX_VERSION_DIGITS} digits, got {len(ref)}")
        return int(ref)
    try:
        return check_name("version alias", ref)
    except ValueError as exc:
        raise InvalidInputError(f"version: expected a version number or an alias name, got {show(ref)}") from exc
