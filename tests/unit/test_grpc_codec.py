"""decode_grpc / encode_grpc_outputs without Ray: round trips for every datatype (typed
contents and raw_input_contents), and hostile messages answered with exact 400/413s."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from maas_ray.errors import InvalidInputError, PayloadTooLargeError
from maas_ray.registry.manifest import OIP_TO_NUMPY
from maas_ray.serving.codecs.common import MAX_ID_CHARS
from maas_ray.serving.codecs.grpc import GRPC_CONTENTS, decode_grpc, encode_grpc_outputs
from maas_ray.serving.codecs.v2 import decode_v2
from maas_ray.serving.config import Limits
from maas_ray.serving.types import RequestSchema

pytestmark = pytest.mark.unit

LIMITS = Limits()
ALL = frozenset(OIP_TO_NUMPY)
SCHEMA = RequestSchema(inputs={"x": ALL}, outputs=("y", "z"))


def _sample(datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        arr = np.empty(6, dtype=object)
        arr[:] = [b"", b"a", b"\x00\xff", "é".encode(), b"xyz" * 10, b"q"]
        return arr.reshape(2, 3)
    dtype = OIP_TO_NUMPY[datatype]
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    info = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype)
    return np.array([[info.min, info.max, 0], [1, 2, 3]], dtype=dtype)


def _request(arr: np.ndarray, datatype: str, raw: bool) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="m", id="abc")
    tensor = req.inputs.add(name="x", datatype=datatype, shape=list(arr.shape))
    if raw:
        if datatype == "BYTES":
            req.raw_input_contents.append(serialize_byte_tensor(arr).item())
        else:
            req.raw_input_contents.append(np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes())
    else:
        field = GRPC_CONTENTS.get(datatype)  # FP16 has no typed contents field
        if field is not None:
            getattr(tensor.contents, field).extend(arr.reshape(-1).tolist())
    return req


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("datatype", sorted(OIP_TO_NUMPY))
def test_round_trip_every_datatype(datatype, raw):
    arr = _sample(datatype)
    if datatype == "FP16" and not raw:
        with pytest.raises(InvalidInputError, match="raw_input_contents only"):
            decode_grpc(_request(arr, "FP16", False), SCHEMA, LIMITS)
        return
    decoded = decode_grpc(_request(arr, datatype, raw), SCHEMA, LIMITS)
    assert decoded.id == "abc" and decoded.outputs is None
    got = decoded.tensors["x"]
    assert got.shape == arr.shape
    if datatype == "BYTES":
        assert got.reshape(-1).tolist() == arr.reshape(-1).tolist()
    else:
        assert got.dtype == arr.dtype
        np.testing.assert_array_equal(got, arr)
    # and back: the raw output bytes tritonclient's InferResult.as_numpy reads
    [(name, dt, shape, raw_out)] = encode_grpc_outputs({"y": got}, decoded)
    assert (name, dt, shape) == ("y", datatype, list(arr.shape))
    if datatype == "BYTES":
        back = deserialize_bytes_tensor(raw_out)
        assert back.tolist() == arr.reshape(-1).tolist()
    else:
        np.testing.assert_array_equal(np.frombuffer(raw_out, OIP_TO_NUMPY[datatype].newbyteorder("<")).reshape(shape), arr)


def test_requested_outputs_and_parameters():
    req = _request(np.zeros((1, 2), np.float32), "FP32", True)
    req.outputs.add(name="z")
    req.parameters["session"].string_param = "u1"
    decoded = decode_grpc(req, SCHEMA, LIMITS)
    assert decoded.outputs == ["z"] and decoded.parameters == {"session": "u1"}
    outs = encode_grpc_outputs({"y": np.zeros(1, np.float32), "z": np.ones(1, np.int64)}, decoded)
    assert [o[0] for o in outs] == ["z"]


def _fails(req, exc=InvalidInputError) -> str:
    with pytest.raises(exc) as info:
        decode_grpc(req, SCHEMA, LIMITS)
    return info.value.message


def test_same_messages_as_json_decoder():
    """Where the fields match, gRPC says exactly what HTTP says."""
    body = b'{"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1], "data": [1.0]}]}'
    with pytest.raises(InvalidInputError) as http:
        decode_v2(body, None, SCHEMA, LIMITS)
    req = _request(np.zeros(1, np.float32), "FP32", False)
    req.inputs[0].name = "nope"
    assert _fails(req) == http.value.message
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, -2], "data": [1.0]}]}'
    with pytest.raises(InvalidInputError) as http:
        decode_v2(body, None, SCHEMA, LIMITS)
    req = _request(np.zeros(1, np.float32), "FP32", False)
    req.inputs[0].shape[:] = [1, -2]
    assert _fails(req) == http.value.message


def test_hostile_messages():
    ok = _request(np.zeros((2, 3), np.float32), "FP32", True)
    short = service_pb2.ModelInferRequest()
    short.CopyFrom(ok)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-1]
    assert "needs 24 bytes, got 23" in _fails(short)
    extra = service_pb2.ModelInferRequest()
    extra.CopyFrom(ok)
    extra.raw_input_contents.append(b"\x00")
    assert "one entry per input (1), got 2" in _fails(extra)
    both = service_pb2.ModelInferRequest()
    both.CopyFrom(ok)
    both.inputs[0].contents.fp32_contents.append(1.0)
    assert "not both" in _fails(both)

    typed = _request(np.zeros((2, 3), np.float32), "FP32", False)
    del typed.inputs[0].contents.fp32_contents[-1]
    assert "shape [2, 3] needs 6 values, got 5" in _fails(typed)
    wrong = _request(np.zeros(3, np.int32), "INT32", False)
    wrong.inputs[0].datatype = "FP32"
    assert "expected fp32_contents for FP32" in _fails(wrong)
    nan = _request(np.array([np.nan], np.float64), "FP64", False)
    assert "must be finite" in _fails(nan)
    over = _request(np.array([1], np.int32), "INT8", False)
    over.inputs[0].contents.int_contents[0] = 300
    assert "does not fit INT8" in _fails(over)

    bytes_req = _request(_sample("BYTES"), "BYTES", True)
    bytes_req.raw_input_contents[0] = b"\x05\x00\x00\x00ab"  # declares 5 bytes, 2 remain
    assert "declares 5 bytes, only 2 remain" in _fails(bytes_req)
    bytes_req.raw_input_contents[0] = b"\x01\x00"  # a truncated prefix
    assert "truncated length prefix" in _fails(bytes_req)

    huge = _request(np.zeros(1, np.float32), "FP32", True)
    huge.inputs[0].shape[:] = [LIMITS.max_tensor_elements + 1]
    _fails(huge, PayloadTooLargeError)
    many = _request(np.zeros(1, np.float32), "FP32", True)
    many.inputs[0].shape[:] = [LIMITS.max_tensor_elements // 2 + 1, 2]
    assert "max_tensor_elements" in _fails(many, PayloadTooLargeError)

    twice = _request(np.zeros(1, np.float32), "FP32", False)
    twice.inputs.add().CopyFrom(twice.inputs[0])
    assert "given more than once" in _fails(twice)
    empty = service_pb2.ModelInferRequest(model_name="m")
    assert _fails(empty).startswith("inputs: expected a non-empty list")
    unknown_out = _request(np.zeros(1, np.float32), "FP32", True)
    unknown_out.outputs.add(name="nope")
    assert "unknown output" in _fails(unknown_out)
    shm = _request(np.zeros(1, np.float32), "FP32", True)
    shm.inputs[0].parameters["shared_memory_region"].string_param = "r"
    assert "not supported by this server" in _fails(shm)
    long_id = _request(np.zeros(1, np.float32), "FP32", True)
    long_id.id = "i" * (MAX_ID_CHARS + 1)
    assert _fails(long_id).startswith("id: expected a string of at most")


def test_unparsable_request_bytes_become_a_picklable_malformed_request():
    """add_inference_servicer registers deserializers that return MalformedRequest for bytes
    grpc would otherwise fail as UNKNOWN; good bytes still parse (a recording server, no grpc)."""
    import pickle

    from maas_ray.errors import InvalidInputError
    from maas_ray.serving.grpc import MalformedRequest, add_inference_servicer

    class Recording:
        def __init__(self):
            self.generic, self.registered = {}, {}

        def add_generic_rpc_handlers(self, handlers):
            for h in handlers:
                self.generic.update(h._method_handlers)

        def add_registered_method_handlers(self, service, handlers):
            self.registered.update(handlers)

    server = Recording()
    add_inference_servicer(mock.Mock(), server)  # the servicer is what Serve replaces
    infer = server.generic["/inference.GRPCInferenceService/ModelInfer"].request_deserializer
    good = service_pb2.ModelInferRequest(model_name="m").SerializeToString()
    assert infer(good).model_name == "m"
    bad = pickle.loads(pickle.dumps(infer(b"\xff" * 10)))
    assert isinstance(bad, MalformedRequest) and bad.message_type == "inference.ModelInferRequest"
    err = bad.error()
    assert isinstance(err, InvalidInputError) and err.status_code == 400
    assert str(err).startswith("request: not a valid inference.ModelInferRequest message (")
    if server.registered:  # grpcio >= 1.62 also registers the methods by name
        assert isinstance(server.registered["ModelMetadata"].request_deserializer(b"\xff"), MalformedRequest)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_nan_is_a_missing_value_only_for_nullable_inputs(datatype, raw):
    """NaN marks a missing value in a nullable input (tabular columns); infinities never pass."""
    nullable = RequestSchema(inputs={"x": ALL}, outputs=("y",), nullable=frozenset({"x"}))
    arr = np.array([1.5, np.nan], OIP_TO_NUMPY[datatype])
    got = decode_grpc(_request(arr, datatype, raw), nullable, LIMITS).tensors["x"]
    assert got[0] == 1.5 and np.isnan(got[1])
    with pytest.raises(InvalidInputError, match="finite"):
        decode_grpc(_request(arr, datatype, raw), SCHEMA, LIMITS)
    with pytest.raises(InvalidInputError, match="must be finite"):
        decode_grpc(_request(np.array([np.inf], OIP_TO_NUMPY[datatype]), datatype, raw), nullable, LIMITS)
    # The v2 binary extension: the same rule.
    import json as _json

    header = _json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [2],
                                      "parameters": {"binary_data_size": arr.nbytes}}]}).encode()
    body = header + arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    assert np.isnan(decode_v2(body, str(len(header)), nullable, LIMITS).tensors["x"][1])
    with pytest.raises(InvalidInputError, match="finite"):
        decode_v2(body, str(len(header)), SCHEMA, LIMITS)
