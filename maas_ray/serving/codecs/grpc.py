"""Open Inference Protocol v2 over gRPC: ``inference.ModelInferRequest`` in (typed contents or
``raw_input_contents``), raw output contents out, as Triton answers.

The same checks as :mod:`maas_ray.serving.codecs.v2`, with the same messages where the
fields match. The messages are tritonclient's generated classes; this module only reads and
fills them (the transport, :mod:`maas_ray.serving.grpc`, builds them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from maas_ray.errors import InvalidInputError
from maas_ray.serving.codecs.common import (
    MAX_ID_CHARS,
    NONE,
    as_binary,
    check_all_inputs,
    check_parameters,
    check_finite,
    check_shape,
    from_binary,
    invalid,
    requested_outputs,
    short_key,
    show,
    to_array,
)
from maas_ray.serving.types import InferRequest, RequestSchema, Scalar, Tensors, datatype_of

if TYPE_CHECKING:
    from maas_ray.serving.config import Limits

GRPC_CONTENTS = {
    "BOOL": "bool_contents", "BYTES": "bytes_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
}


def grpc_parameters(params: Any, where: str) -> dict[str, Scalar]:
    """A ``map<string, InferParameter>`` -> plain scalars, checked like JSON parameters."""
    out: dict[str, Scalar] = {}
    for k, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if which is None:
            raise invalid(f"{where}.{short_key(k)}", "a string, number or boolean", None)
        out[k] = getattr(p, which)
    return check_parameters(out, where)


def decode_grpc(req: Any, schema: RequestSchema, limits: "Limits") -> InferRequest:
    """Validate and decode an ``inference.ModelInferRequest`` (typed contents or raw_input_contents).

    The same checks as :func:`decode_v2`, with the same messages where the fields match:
    names, datatypes, shapes and element limits before any tensor is built; contents
    lengths against the shape; raw sizes against ``prod(shape) * itemsize``; BYTES length
    prefixes bounds-checked; requested outputs known. Outputs always go back raw.
    """
    request_id = req.id or None
    if request_id is not None and len(request_id) > MAX_ID_CHARS:
        raise invalid("id", f"a string of at most {MAX_ID_CHARS} characters", request_id)
    params = grpc_parameters(req.parameters, "parameters") if req.parameters else {}
    inputs: Sequence[Any] = req.inputs
    if not inputs:
        raise invalid("inputs", "a non-empty list of input objects", [])
    raw: Sequence[bytes] = req.raw_input_contents
    if raw and len(raw) != len(inputs):
        raise InvalidInputError(
            f"raw_input_contents: expected one entry per input ({len(inputs)}), got {len(raw)}"
        )
    headers: list[tuple[str, str, str, list[int], int]] = []
    seen: set[str] = set()
    total = 0
    for i, item in enumerate(inputs):
        where = f"inputs[{i}]"
        name = item.name
        accepted = schema.inputs.get(name)
        if accepted is None:
            raise InvalidInputError(
                f"{where}.name: unknown input {show(name)}; this model takes {list(schema.inputs)}"
            )
        if name in seen:
            raise InvalidInputError(f"{where}.name: input {name!r} given more than once")
        seen.add(name)
        datatype = item.datatype
        if datatype not in accepted:
            raise invalid(f"{where}.datatype", f"one of {sorted(accepted)} for input {name!r}", datatype)
        shape, size = check_shape(list(item.shape), f"{where}.shape", limits)
        total += size
        if item.parameters:
            grpc_parameters(item.parameters, f"{where}.parameters")
        filled = [f.name for f, _ in item.contents.ListFields()]
        if raw and filled:
            raise InvalidInputError(f"{where}: give either contents or raw_input_contents, not both")
        if not raw:
            wanted = GRPC_CONTENTS.get(datatype)
            if wanted is None:
                raise InvalidInputError(f"{where}: {datatype} travels in raw_input_contents only")
            if filled and filled != [wanted]:
                raise InvalidInputError(f"{where}.contents: expected {wanted} for {datatype}, got {filled}")
        headers.append((where, name, datatype, shape, size))
    check_all_inputs(total, seen, schema, limits)
    wanted_outputs = [
        {"name": o.name, **({"parameters": grpc_parameters(o.parameters, f"outputs[{j}].parameters")}
                            if o.parameters else {})}
        for j, o in enumerate(req.outputs)
    ]
    outputs, _ = requested_outputs(wanted_outputs, schema, False)

    tensors: Tensors = {}
    for i, (item, (where, name, datatype, shape, size)) in enumerate(zip(inputs, headers)):
        if raw:
            tensors[name] = from_binary(
                where, datatype, memoryview(raw[i]), shape, size, size_field=f" (raw_input_contents[{i}])",
                nullable=name in schema.nullable,
            )
            continue
        values = getattr(item.contents, GRPC_CONTENTS[datatype])
        if len(values) != size:
            raise InvalidInputError(f"{where}.contents: shape {shape} needs {size} values, got {len(values)}")
        if datatype == "BYTES":
            arr = np.empty(size, dtype=object)
            arr[:] = list(values)
            tensors[name] = arr.reshape(shape)
            continue
        # Protobuf floats can be NaN/inf (JSON's cannot): check finiteness for every float type.
        nullable = name in schema.nullable
        arr = to_array(f"{where}.contents", datatype, list(values), shape, {float, NONE} if nullable else {float})
        check_finite(f"{where}.contents", datatype, arr, nullable)
        tensors[name] = arr
    return InferRequest(tensors, request_id, outputs, frozenset(), params)


def encode_grpc_outputs(outputs: Tensors, request: Optional[InferRequest]) -> list[tuple[str, str, list[int], bytes]]:
    """(name, datatype, shape, raw little-endian bytes) per output, the requested ones only,
    in request order: gRPC responses carry raw_output_contents, as Triton's do."""
    if request is not None and request.outputs is not None:
        outputs = {n: outputs[n] for n in request.outputs if n in outputs}
    result = []
    for name, arr in outputs.items():
        datatype = datatype_of(arr)
        result.append((name, datatype, list(arr.shape), as_binary(arr, datatype)))
    return result
