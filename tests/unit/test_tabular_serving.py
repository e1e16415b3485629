"""The tabular preprocessor and the regression postprocessor: the codecs' per-column tensors ->
the graph's matrix, every hostile row a 400 naming the column; exact answers through
onnxruntime against numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from maas_ray.errors import ConfigError, InvalidInputError, PayloadTooLargeError
from maas_ray.registry.manifest import Manifest, ProcessorSpec, TensorSpec
from maas_ray.serving.codecs.v1 import decode_v1
from maas_ray.serving.codecs.v2 import decode_v2
from maas_ray.serving.config import Limits
from maas_ray.serving.processors import make_postprocessor, make_preprocessor
from maas_ray.serving.runner import OnnxRunner
from maas_ray.serving.types import RequestSchema
from tests.helpers.tabular_models import COLUMNS, expected, random_rows, tabular_onnx

pytestmark = pytest.mark.unit
LIMITS = Limits()


def manifest(columns=COLUMNS, width=None, outputs=None, post="tensor", dtype="FP32"):
    return Manifest(
        model="t", version=1, sha256="0" * 64, size_bytes=1,
        inputs=[TensorSpec(name="input", datatype=dtype, shape=[-1, width or len(columns)])],
        outputs=outputs or [TensorSpec(name="value", datatype="FP32", shape=[-1, 1])],
        preprocessor=ProcessorSpec(name="tabular", params={"columns": columns}),
        postprocessor=ProcessorSpec(name=post, params={}),
    )


@pytest.fixture(scope="module")
def pre():
    return make_preprocessor(manifest())


@pytest.fixture(scope="module")
def schema(pre):
    return RequestSchema.of(pre, make_postprocessor(manifest()))


def _v2(rows: dict, drop=(), extra=None) -> bytes:
    dts = {"age": "FP32", "income": "FP64", "city": "BYTES", "member": "BOOL", "visits": "INT64"}
    inputs = [{"name": n, "datatype": dts[n], "shape": [len(v)], "data": v} for n, v in rows.items() if n not in drop]
    return json.dumps({"inputs": inputs + (extra or [])}).encode()


def _rows(**over):
    rows = {"age": [41.0, 30.5], "income": [10.0, 20.0], "city": ["lyon", "paris"], "member": [True, False],
            "visits": [3, 4]}
    rows.update(over)
    return rows


def test_request_inputs_are_one_per_column_in_order(pre):
    got = [(r.name, r.datatypes[0], r.shape) for r in pre.request_inputs]
    assert got == [("age", "FP32", [-1]), ("income", "FP32", [-1]), ("city", "BYTES", [-1]),
                   ("member", "BOOL", [-1]), ("visits", "INT64", [-1])]
    assert "FP64" in pre.request_inputs[0].datatypes and pre.request_inputs[2].datatypes == ("BYTES",)


def test_v2_v1_rows_and_nan_give_the_graph_the_contract_matrix(pre, schema):
    feeds = pre(decode_v2(_v2(_rows()), None, schema, LIMITS).tensors, strict_dtypes=True)
    x = feeds["input"]
    assert x.dtype == np.float32 and x.tolist() == [[41.0, 10.0, 1.0, 1.0, 3.0], [30.5, 20.0, 0.0, 0.0, 4.0]]
    v1 = json.dumps({"instances": [{"age": 41, "income": 10, "city": "lyon", "member": True, "visits": 3},
                                   {"age": 30.5, "income": 20.0, "city": "", "member": False, "visits": 4}]})
    x1 = pre(decode_v1(v1.encode(), schema, LIMITS), strict_dtypes=False)["input"]
    assert x1[0].tolist() == [41.0, 10.0, 1.0, 1.0, 3.0] and np.isnan(x1[1, 2])  # '' = missing (nullable)
    tensors = {**{k: np.asarray(v) for k, v in _rows().items()}, "age": np.array([np.nan, 1.0], np.float32)}
    tensors["city"] = tensors["city"].astype(object)
    assert np.isnan(pre(tensors, strict_dtypes=True)["input"][0, 0])  # binary NaN: nullable column


def test_onnxruntime_answers_equal_numpy(pre):
    rows = random_rows(500, seed=3)
    tensors = {k: np.asarray(v, dtype=object if k == "city" else None) for k, v in rows.items()}
    for kind, out in (("classifier", "probabilities"), ("regressor", "value")):
        spec = [TensorSpec(name=out, datatype="FP32", shape=[-1, 3 if kind == "classifier" else 1])]
        runner = OnnxRunner(manifest(outputs=spec), tabular_onnx(kind), device="cpu", intra_op_threads=1)
        got = runner.run(pre(tensors, strict_dtypes=True))[out]
        want = expected(kind, rows)
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5)


HOSTILE = [
    ("missing column", lambda: _v2(_rows(), drop=("income",)), "income"),
    ("unknown column", lambda: _v2(_rows(), extra=[{"name": "zip", "datatype": "FP32", "shape": [2],
                                                    "data": [1, 2]}]), "zip"),
    ("duplicate column", lambda: _v2(_rows(), extra=[{"name": "age", "datatype": "FP32", "shape": [2],
                                                      "data": [1, 2]}]), "age"),
    ("strings for a number column", lambda: _v2(_rows(), drop=("income",), extra=[
        {"name": "income", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}]), "income"),
    ("numbers for a category column", lambda: _v2(_rows(), drop=("city",), extra=[
        {"name": "city", "datatype": "FP32", "shape": [2], "data": [1, 2]}]), "city"),
    ("unseen category", lambda: _v2(_rows(city=["lyon", "berlin"])), "city"),
    ("rows of different lengths", lambda: _v2(_rows(visits=[1, 2, 3])), "visits"),
    ("two values per row", lambda: json.dumps({"inputs": [
        {"name": "age", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}]}).encode(), "age"),
]


@pytest.mark.parametrize(("case", "body", "column"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_v2_rows_are_400s_naming_the_column(pre, schema, case, body, column):
    with pytest.raises(InvalidInputError, match=column):
        pre(decode_v2(body(), None, schema, LIMITS).tensors, strict_dtypes=True)


@pytest.mark.parametrize(("column", "value", "message"), [
    ("income", np.nan, "not nullable"),
    ("age", np.inf, "infinite"),
    ("income", -np.inf, "infinite"),
    ("age", 1e300, "beyond FP32"),
    ("member", 2.0, "boolean"),
])
def test_binary_nan_and_inf_are_400s_naming_the_column(pre, column, value, message):
    tensors = {k: np.asarray(v, dtype=object if k == "city" else None) for k, v in _rows().items()}
    tensors[column] = np.array([1.0, value], np.float64)
    with pytest.raises(InvalidInputError, match=rf"column '{column}': row 1: .*{message}"):
        pre(tensors, strict_dtypes=True)


def test_v1_rows_missing_unknown_null_and_category_errors(pre, schema):
    good = {"age": 41, "income": 10, "city": "lyon", "member": True, "visits": 3}

    def v1(*rows):
        return pre(decode_v1(json.dumps({"instances": list(rows)}).encode(), schema, LIMITS), strict_dtypes=False)

    with pytest.raises(InvalidInputError, match="income"):
        v1({k: v for k, v in good.items() if k != "income"})
    with pytest.raises(InvalidInputError, match="zip"):
        v1({**good, "zip": 1})
    with pytest.raises(InvalidInputError, match="income"):  # null where the column is not nullable
        v1(good, {**good, "income": None})
    with pytest.raises(InvalidInputError, match="visits"):
        v1(good, {**good, "visits": None})
    with pytest.raises(InvalidInputError, match="city"):
        v1({**good, "city": "berlin"})
    with pytest.raises(InvalidInputError, match="visits"):
        v1({**good, "visits": "3"})
    with pytest.raises(InvalidInputError, match="'member'"):
        v1({**good, "member": 7})
    with pytest.raises(InvalidInputError, match="'income'.*empty|'income'.*strings|income"):
        v1({**good, "income": ""})


def test_null_is_a_missing_value_only_in_nullable_columns(pre, schema):
    """v1 rows and v2 JSON carry a missing value as null; the graph sees NaN (numeric) or the
    missing category (categorical); binary and gRPC carry NaN."""
    good = {"age": 41, "income": 10, "city": "lyon", "member": True, "visits": 3}
    body = json.dumps({"instances": [good, {**good, "age": None, "city": None}]}).encode()
    x = pre(decode_v1(body, schema, LIMITS), strict_dtypes=False)["input"]
    assert x[0, 0] == 41 and np.isnan(x[1, 0]) and np.isnan(x[1, 2]) and x[0, 2] == 1.0
    v2 = pre(decode_v2(_v2(_rows(age=[None, 30.5])), None, schema, LIMITS).tensors, strict_dtypes=True)["input"]
    assert np.isnan(v2[0, 0]) and v2[1, 0] == 30.5
    with pytest.raises(InvalidInputError, match="inputs"):  # not nullable: the codec refuses null
        decode_v2(_v2(_rows(income=[None, 1.0])), None, schema, LIMITS)
    with pytest.raises(InvalidInputError, match="infinite|finite|overflow"):
        decode_v2(_v2(_rows(age=[None, 1e300])), None, schema, LIMITS)


def test_a_one_column_model_takes_v1_objects():
    cols = [{"name": "age", "dtype": "FP32", "categories": None, "nullable": False}]
    p = make_preprocessor(manifest(cols))
    s = RequestSchema.of(p, make_postprocessor(manifest(cols)))
    x = p(decode_v1(b'{"instances": [{"age": 1}, {"age": 2.5}]}', s, LIMITS), strict_dtypes=False)["input"]
    assert x.tolist() == [[1.0], [2.5]]
    with pytest.raises(InvalidInputError, match="age"):
        p(decode_v1(b'{"instances": [{"agee": 1}]}', s, LIMITS), strict_dtypes=False)


def test_a_million_columns_is_a_4xx(schema):
    names = [f"c{i}" for i in range(1_000_000)]
    v1 = b'{"instances": [{' + b",".join(b'"%s": 1' % n.encode() for n in names) + b"}]}"
    with pytest.raises(InvalidInputError):
        decode_v1(v1, schema, LIMITS)
    # v2 with 10**6 inputs is ~68 MB, a 413 from max_body_bytes before parsing (the integration
    # test sends it); below the body limit, the first unknown name is the 400.
    v2 = json.dumps({"inputs": [{"name": n, "datatype": "FP32", "shape": [1], "data": [1]} for n in names[:50_000]]})
    with pytest.raises((InvalidInputError, PayloadTooLargeError), match='unknown input "c0"') as err:
        decode_v2(v2.encode(), None, schema, LIMITS)
    assert 400 <= err.value.status_code < 500


@pytest.mark.parametrize(("params", "message"), [
    ({"columns": []}, "columns"),
    ({"columns": [{"name": "a", "dtype": "FP32"}, {"name": "a", "dtype": "FP32"}]}, "twice"),
    ({"columns": [{"name": "a", "dtype": "BYTES"}]}, "categories"),
    ({"columns": [{"name": "a", "dtype": "FP32", "categories": ["x"]}]}, "categories"),
    ({"columns": [{"name": "a", "dtype": "BYTES", "categories": ["x", "x"]}]}, "twice"),
    ({"columns": [{"name": "a", "dtype": "STRING"}]}, "dtype"),
    ({"columns": [{"name": "a", "dtype": "FP32", "colour": 1}]}, "colour"),
])
def test_bad_params_fail_the_replica_with_the_reason(params, message):
    m = manifest().model_copy(update={"preprocessor": ProcessorSpec(name="tabular", params=params)})
    with pytest.raises(ConfigError, match=message):
        make_preprocessor(m)


def test_a_graph_of_another_width_is_refused():
    with pytest.raises(ConfigError, match=r"FP32 \[-1, 5\]"):
        make_preprocessor(manifest(width=7))
    with pytest.raises(ConfigError, match="FP32"):
        make_preprocessor(manifest(dtype="INT64"))


def test_regression_postprocessor_flattens_value_and_interval():
    post = make_postprocessor(manifest(post="regression"))
    assert [(o.name, o.datatype, o.shape) for o in post.response_outputs] == [("value", "FP32", [-1])]
    out = post({"value": np.array([[1.5], [2.0]], np.float64)})
    assert out["value"].dtype == np.float32 and out["value"].tolist() == [1.5, 2.0]
    spec = [TensorSpec(name=n, datatype="FP32", shape=[-1, 1]) for n in ("value", "lower", "upper")]
    post = make_postprocessor(manifest(outputs=spec, post="regression"))
    assert [o.name for o in post.response_outputs] == ["value", "lower", "upper"]
    out = post({"value": np.ones((2, 1)), "lower": np.zeros((2, 1)), "upper": np.full((2, 1), 2.0)})
    assert out["lower"].tolist() == [0, 0] and out["upper"].tolist() == [2, 2]
    wide = [TensorSpec(name="value", datatype="FP32", shape=[-1, 3])]
    with pytest.raises(ConfigError, match="one value per row"):
        make_postprocessor(manifest(outputs=wide, post="regression"))



def test_an_empty_category_is_refused_where_the_column_is_not_nullable():
    cols = [{"name": "colour", "dtype": "BYTES", "categories": ["red", "blue"], "nullable": False}]
    p = make_preprocessor(manifest(cols))
    assert p({"colour": np.array(["blue", b"red"], dtype=object)}, strict_dtypes=True)["input"].tolist() == [[1], [0]]
    with pytest.raises(InvalidInputError, match="column 'colour': row 1: missing value"):
        p({"colour": np.array(["red", ""], dtype=object)}, strict_dtypes=True)
    with pytest.raises(InvalidInputError, match="column 'colour': row 0: not UTF-8"):
        p({"colour": np.array([b"\xff"], dtype=object)}, strict_dtypes=True)
