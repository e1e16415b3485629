"""OIP v2 and v1 codecs at the request boundary: schema, limits, binary extension, tritonclient."""

import base64
import io
import json

import numpy as np
import pytest

from maas_ray.errors import InvalidInputError, PayloadTooLargeError
from maas_ray.registry.manifest import Manifest, ProcessorSpec, TensorSpec
from maas_ray.serving.codecs.common import parse_version_ref
from maas_ray.serving.codecs.v1 import decode_v1
from maas_ray.serving.codecs.v2 import decode_v2, encode_v2
from maas_ray.serving.config import Limits
from maas_ray.serving.processors import (
    RequestInput,
    check_tensor,
    make_postprocessor,
    make_preprocessor,
)
from maas_ray.serving.types import InferRequest, RequestSchema

pytestmark = pytest.mark.unit

LIMITS = Limits()


def manifest(inputs=(("input", "FP32", [-1, 4]),), pre="tensor", pre_params=None, post="tensor", post_params=None,
             out_shape=(-1, 3)):
    return Manifest(
        model="m", version=1, sha256="0" * 64, size_bytes=1,
        inputs=[TensorSpec(name=n, datatype=d, shape=list(s)) for n, d, s in inputs],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=list(out_shape))],
        preprocessor=ProcessorSpec(name=pre, params=pre_params or {}),
        postprocessor=ProcessorSpec(name=post, params=post_params or {}),
    )


IMAGE = {"height": 2, "width": 2, "channels": 1, "pixel_max": 16.0}


def test_request_schema_of_tensor_image_and_classification():
    m = manifest(inputs=(("a", "FP32", [-1, 4]), ("b", "INT64", [-1])))
    pre, post = make_preprocessor(m), make_postprocessor(m)
    assert pre.request_inputs == [RequestInput("a", ("FP32",), [-1, 4]), RequestInput("b", ("INT64",), [-1])]
    assert RequestSchema.of(pre, post) == RequestSchema(
        {"a": frozenset({"FP32"}), "b": frozenset({"INT64"})}, ("logits",)
    )
    img = make_preprocessor(manifest(pre="image", pre_params=IMAGE))
    (ri,) = img.request_inputs
    assert ri.name == "input" and ri.datatypes[0] == "BYTES" and "FP32" in ri.datatypes and "BOOL" not in ri.datatypes
    cls = make_postprocessor(manifest(post="classification", post_params={"top_k": 5}, out_shape=(-1, 10)))
    assert [(t.name, t.datatype, t.shape) for t in cls.response_outputs] == [
        ("label", "BYTES", [-1]), ("probabilities", "FP32", [-1, 10]),
        ("top_k_labels", "BYTES", [-1, 5]), ("top_k_scores", "FP32", [-1, 5]),
    ]
    dynamic = make_postprocessor(manifest(post="classification", out_shape=(-1, -1)))
    assert dynamic.response_outputs[1].shape == [-1, -1] and dynamic.response_outputs[2].shape == [-1, 3]


SCHEMA = RequestSchema({"x": frozenset({"FP32"}), "s": frozenset({"BYTES"})}, ("y", "z"))


def body(*inputs, **top):
    return json.dumps({"inputs": list(inputs), **top}).encode()


def x(data=(1.0, 2.0), shape=(2,), datatype="FP32", name="x", **kw):
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": list(data), **kw}


S = {"name": "s", "datatype": "BYTES", "shape": [1], "data": ["hi"]}


def decode(raw, header=None, schema=SCHEMA, limits=LIMITS):
    return decode_v2(raw, header, schema, limits)


def test_decode_v2_nested_flat_and_zero_sized_shapes():
    r = decode(body(x([[1, 2.5], [3, 4]], (2, 2)), S))
    assert r.tensors["x"].tolist() == [[1, 2.5], [3, 4]] and r.tensors["s"].tolist() == ["hi"]
    r = decode(body(x([1, 2, 3, 4, 5, 6], (1, 2, 3)), S))
    assert r.tensors["x"].shape == (1, 2, 3)
    assert decode(body(x([], (2, 0, 3)), S)).tensors["x"].shape == (2, 0, 3)
    assert decode(body(x([[], []], (2, 0)), S)).tensors["x"].shape == (2, 0)
    with pytest.raises(InvalidInputError, match=r"needs 3 values at depth 3, got a list of 2"):
        decode(body(x([[[1, 2, 3], [1, 2]]], (1, 2, 3)), S))


def test_limits_elements_dims_and_depth():
    small = Limits(max_tensor_elements=10, max_tensor_dims=3, max_json_depth=5)
    with pytest.raises(PayloadTooLargeError, match=r"inputs: 11 elements in all, over the limit of 10"):
        decode(body(x([0] * 10, (10,)), S), limits=small)  # 10 + 1 BYTES element
    with pytest.raises(InvalidInputError, match=r"expected at most 3 dimensions"):
        decode(body(x([1], (1, 1, 1, 1)), S), limits=small)
    with pytest.raises(InvalidInputError, match=r"nested 6 levels deep in the request; the limit \(max_json_depth\) is 5"):
        decode(body(x([[[1]]], (1, 1, 1)), S), limits=small)
    assert decode(body(x([1], (1, 1, 1)), S), limits=small).tensors["x"].shape == (1, 1, 1)  # flat is fine


def test_outputs_and_binary_output_flags():
    r = decode(body(x(), S, outputs=[{"name": "z", "parameters": {"binary_data": True}}, {"name": "y"}]))
    assert r.outputs == ["z", "y"] and r.binary_outputs == {"z"}
    r = decode(body(x(), S, parameters={"binary_data_output": True}))
    assert r.outputs is None and r.binary_outputs == {"y", "z"}
    r = decode(body(x(), S, parameters={"binary_data_output": True},
                    outputs=[{"name": "y", "parameters": {"binary_data": False}}]))
    assert r.binary_outputs == frozenset()


def test_missing_input_and_bytes_on_a_numeric_input():
    with pytest.raises(InvalidInputError, match=r"inputs: missing input\(s\) \['s'\]"):
        decode(body(x()))
    with pytest.raises(InvalidInputError, match=r"inputs\[0\]\.datatype: expected one of \['FP32'\] for input 'x'"):
        decode(body(x(["a", "b"], datatype="BYTES"), S))


def test_binary_inputs_bytes_and_numbers():
    raw = np.array([1.5, -2], np.float32).tobytes()
    elems = b"".join(len(b).to_bytes(4, "little") + b for b in (b"ab", b""))
    header = json.dumps({"inputs": [
        {"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(elems)}},
        {"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": len(raw)}},
    ]}).encode()
    r = decode(header + elems + raw, str(len(header)))
    assert r.tensors["s"].tolist() == [b"ab", b""] and r.tensors["x"].tolist() == [1.5, -2]


def test_encode_v2_binary_outputs_read_by_tritonclient():
    httpclient = pytest.importorskip("tritonclient.http")
    outputs = {
        "label": np.array(["3", "7"], dtype=object),
        "probabilities": np.array([[0.25, 0.75], [1.0, 0.0]], np.float32),
        "ids": np.array([[1, 2, 3]], np.int64),
    }
    req = InferRequest({}, "r9", ["probabilities", "label", "ids"], frozenset({"label", "probabilities"}), {})
    payload, length = encode_v2("digits", 2, outputs, req)
    assert length is not None and json.loads(payload[:length])["outputs"][0]["parameters"] == {"binary_data_size": 16}
    result = httpclient.InferResult.from_response_body(payload, header_length=length)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), outputs["probabilities"])
    assert result.as_numpy("label").tolist() == [b"3", b"7"]
    np.testing.assert_array_equal(result.as_numpy("ids"), outputs["ids"])  # inline JSON
    assert result.get_response()["id"] == "r9" and result.get_response()["model_version"] == "2"
    # only what was asked for
    payload, length = encode_v2("digits", 2, outputs, InferRequest({}, None, ["ids"], frozenset(), {}))
    assert length is None and [o["name"] for o in json.loads(payload)["outputs"]] == ["ids"]


def test_tritonclient_requests_decode():
    httpclient = pytest.importorskip("tritonclient.http")
    schema = RequestSchema({"x": frozenset({"FP32"}), "s": frozenset({"BYTES"})}, ("y", "z"))
    xs = np.arange(6, dtype=np.float32).reshape(2, 3)
    ss = np.array([b"png", b"\x00\xff"], dtype=object)
    for binary in (True, False):
        a = httpclient.InferInput("x", [2, 3], "FP32")
        a.set_data_from_numpy(xs, binary_data=binary)
        b = httpclient.InferInput("s", [2], "BYTES")
        b.set_data_from_numpy(ss if binary else np.array(["a", "b"], dtype=object), binary_data=binary)
        for outputs in (None, [httpclient.InferRequestedOutput("z", binary_data=True)]):
            raw, json_size = httpclient.InferenceServerClient.generate_request_body(
                [a, b], outputs=outputs, request_id="q1")
            r = decode_v2(raw, None if json_size is None else str(json_size), schema, LIMITS)
            np.testing.assert_array_equal(r.tensors["x"], xs)
            assert r.id == "q1"
            assert r.binary_outputs == ({"y", "z"} if outputs is None else {"z"})


def test_decode_v1_columnar_multi_input_and_limits():
    two = RequestSchema({"a": frozenset({"INT64"}), "b": frozenset({"BYTES"})}, ("y",))
    t = decode_v1(b'{"inputs": {"a": [1, 2], "b": ["p", "q"]}}', two, LIMITS)
    assert t["a"].tolist() == [1, 2] and t["b"].tolist() == ["p", "q"]
    with pytest.raises(InvalidInputError, match=r"instances\.b: input 'b' takes numbers|instances\.a: input 'a' takes"):
        decode_v1(b'{"instances": [{"a": "x", "b": "y"}]}', two, LIMITS)
    small = Limits(max_tensor_elements=4)
    one = RequestSchema({"a": frozenset({"FP32"})}, ("y",))
    with pytest.raises(PayloadTooLargeError, match="over max_tensor_elements"):
        decode_v1(b'{"instances": [[1, 2, 3], [4, 5, 6]]}', one, small)
    with pytest.raises(InvalidInputError, match="takes numbers"):
        decode_v1(b'{"instances": ["a"]}', one, LIMITS)


def test_parse_version_ref():
    assert parse_version_ref("12") == 12 and parse_version_ref("candidate") == "candidate"
    for bad in ("\u00b2", "1" * 40, "", "a/b", "-1", "x" * 200):
        with pytest.raises(InvalidInputError, match="^version: "):
            parse_version_ref(bad)


def test_check_tensor_casts_only_what_fits():
    spec = TensorSpec(name="i", datatype="INT8", shape=[-1])
    assert check_tensor(spec, np.array([1, -128])).dtype == np.int8
    with pytest.raises(InvalidInputError, match="values do not fit INT8"):
        check_tensor(spec, np.array([300]))
    f32 = TensorSpec(name="f", datatype="FP32", shape=[-1])
    with pytest.raises(InvalidInputError, match="values do not fit FP32"):
        check_tensor(f32, np.array([1e300]))
    assert check_tensor(f32, np.array([0.5])).dtype == np.float32


def test_image_pixel_limit_checked_before_decoding():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((30, 40), np.uint8), "L").save(buf, format="PNG")
    pre = make_preprocessor(manifest(pre="image", pre_params=IMAGE), limits=Limits(max_image_pixels=1000))
    with pytest.raises(PayloadTooLargeError, match=r"image 0: 40x30 = 1200 pixels, over the limit of 1000"):
        pre({"input": np.array([buf.getvalue()], dtype=object)}, strict_dtypes=True)
    ok = make_preprocessor(manifest(pre="image", pre_params=IMAGE), limits=Limits(max_image_pixels=1200))
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((30, 40), np.uint8), "L").save(jpeg, format="JPEG")
    b64 = base64.b64encode(jpeg.getvalue()).decode()
    out = ok({"input": np.array([buf.getvalue(), b64], dtype=object)}, strict_dtypes=True)["input"]
    assert out.shape == (2, 4)
