"""Tabular models through real Ray Serve: a classifier and a regressor published with the
``tabular`` preprocessor answer rows by column name over OIP v2 HTTP (one tensor per column),
v1 ``instances`` objects and gRPC (tritonclient); hostile rows are 4xx JSON naming the column,
never a 5xx, and the server answers afterwards."""

from __future__ import annotations

import os

import httpx
import numpy as np
import orjson
import pytest

from maas_ray.registry import Registry
from maas_ray.serving.deploy import deploy
from maas_ray.serving.grpc import SERVICER_FUNCTION
from tests.helpers import HTTP_PORT, wait_until
from tests.helpers.tabular_models import CLASSES, expected, publish_tabular, random_rows

pytestmark = [pytest.mark.integration, pytest.mark.slow]
GRPC_PORT = int(os.environ.get("MAAS_TEST_GRPC_PORT", "9000"))
URL = f"http://127.0.0.1:{HTTP_PORT}"
DATATYPES = {"age": "FP32", "income": "FP64", "city": "BYTES", "member": "BOOL", "visits": "INT64"}
MODELS = {"churn": "classifier", "price": "regressor"}


@pytest.fixture(scope="module")
def served(ray_cluster, registry_root):
    from ray import serve

    reg = Registry(registry_root)
    for name, kind in MODELS.items():
        publish_tabular(reg, name, kind)
    common = {"versions": [{"version": "latest"}], "placement": "ingress", "intra_op_threads": 1}
    deploy({
        "http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
        "grpc_options": {"port": GRPC_PORT, "grpc_servicer_functions": [SERVICER_FUNCTION]},
        "applications": [{"name": "tabular", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app",
                          "args": {"registry_root": registry_root,
                                   "models": [{"name": n, **common} for n in MODELS]}}],
    })
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(f"127.0.0.1:{GRPC_PORT}")
    wait_until(lambda: all(client.is_model_ready(m) for m in MODELS), timeout_s=90)
    with httpx.Client(base_url=URL, timeout=60) as http:
        yield http, client
    client.close()
    serve.shutdown()


def v2_body(rows: dict) -> dict:
    return {"inputs": [{"name": n, "datatype": DATATYPES[n], "shape": [len(v)], "data": v} for n, v in rows.items()]}


def output(body: dict, name: str) -> np.ndarray:
    out = next(o for o in body["outputs"] if o["name"] == name)
    return np.asarray(out["data"]).reshape(out["shape"])


def check(kind: str, rows: dict, got: dict) -> None:
    want = expected(kind, rows)
    if kind == "classifier":
        np.testing.assert_allclose(got["probabilities"], want, rtol=1e-5, atol=1e-6)
        assert list(got["label"]) == [CLASSES[i] for i in want.argmax(axis=1)]
    else:
        np.testing.assert_allclose(got["value"], want, rtol=1e-5, atol=1e-5)


def test_metadata_lists_one_input_per_column(served):
    http, client = served
    meta = http.get("/v2/models/churn").json()
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("age", "FP32", [-1]), ("income", "FP32", [-1]), ("city", "BYTES", [-1]), ("member", "BOOL", [-1]),
        ("visits", "INT64", [-1])]
    assert [o["name"] for o in http.get("/v2/models/price").json()["outputs"]] == ["value"]
    assert [t.name for t in client.get_model_metadata("price").inputs] == list(DATATYPES)
    # OpenAPI names the served models (the per-model columns are in the metadata above).
    assert "churn" in http.get("/openapi.json").text


@pytest.mark.parametrize("model", list(MODELS))
def test_v2_and_v1_rows_get_the_models_answers(served, model):
    http, _ = served
    kind = MODELS[model]
    rows = random_rows(64, seed=5, missing_ages=False)  # JSON carries no NaN; a missing city is ""
    r = http.post(f"/v2/models/{model}/infer", json=v2_body(rows))
    assert r.status_code == 200, r.text
    names = ["label", "probabilities"] if kind == "classifier" else ["value"]
    check(kind, rows, {n: output(r.json(), n) for n in names})
    sub = rows
    instances = [{k: sub[k][i] for k in sub} for i in range(64)]  # v1: one JSON object per row
    r = http.post(f"/v1/models/{model}:predict", json={"instances": instances})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    if kind == "classifier":
        check(kind, sub, {"label": [p["label"] for p in preds], "probabilities": [p["probabilities"] for p in preds]})
    else:
        check(kind, sub, {"value": preds})


@pytest.mark.parametrize("model", list(MODELS))
def test_grpc_one_tensor_per_column(served, model):
    import tritonclient.grpc as tg

    _, client = served
    kind = MODELS[model]
    rows = random_rows(32, seed=9, missing_ages=False)  # the codecs refuse NaN from any client
    arrays = {"age": np.asarray(rows["age"], np.float32), "income": np.asarray(rows["income"], np.float64),
              "city": np.asarray(rows["city"], dtype=object), "member": np.asarray(rows["member"], bool),
              "visits": np.asarray(rows["visits"], np.int64)}
    inputs = []
    for name, arr in arrays.items():
        x = tg.InferInput(name, list(arr.shape), DATATYPES[name])
        x.set_data_from_numpy(arr)
        inputs.append(x)
    result = client.infer(model, inputs)
    if kind == "classifier":
        labels = [v.decode() for v in result.as_numpy("label")]
        check(kind, rows, {"label": labels, "probabilities": result.as_numpy("probabilities")})
    else:
        check(kind, rows, {"value": result.as_numpy("value")})


def _hostile() -> list[tuple[str, str, bytes, str]]:
    """(case, route, body, the column its error must name)."""
    rows = {"age": [41.0], "income": [10.0], "city": ["lyon"], "member": [True], "visits": [3]}
    row = {k: v[0] for k, v in rows.items()}

    def v2(**over):
        body = v2_body({**rows, **{k: v for k, v in over.items() if v is not None}})
        body["inputs"] = [i for i in body["inputs"] if over.get(i["name"], 0) is not None]
        return orjson.dumps(body)

    def with_input(name, datatype, data):
        body = v2_body(rows)
        body["inputs"].append({"name": name, "datatype": datatype, "shape": [len(data)], "data": data})
        return orjson.dumps(body)

    def retyped(name, datatype, data):
        body = v2_body({k: v for k, v in rows.items() if k != name})
        body["inputs"].append({"name": name, "datatype": datatype, "shape": [len(data)], "data": data})
        return orjson.dumps(body)

    def v1(**over):
        r = {**row, **over}
        return orjson.dumps({"instances": [{k: v for k, v in r.items() if v != "<drop>"}]})

    nan = b"\x00\x00\xc0\x7f"  # FP32 NaN, little-endian
    inf = b"\x00\x00\x80\x7f"  # FP32 +inf
    binary = []
    for case, col, raw in (("nan_where_not_nullable", "income", nan * 2), ("inf", "age", inf * 2)):
        header = orjson.dumps({"inputs": [
            *[i for i in v2_body({k: v * 2 for k, v in rows.items()})["inputs"] if i["name"] != col],
            {"name": col, "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]})
        # The codec refuses non-finite binary floats for every model, naming the input by position.
        binary.append((case, "v2bin", header + raw, "inputs[4]", len(header)))
    million_v1 = b'{"instances": [{' + b",".join(b'"c%d": 1' % i for i in range(1_000_000)) + b"}]}"
    million_v2 = b'{"inputs": [' + b",".join(
        b'{"name": "c%d", "datatype": "FP32", "shape": [1], "data": [1]}' % i for i in range(1_000_000)) + b"]}"
    cases = [
        ("missing_column", "v2", v2(income=None), "income"),
        ("unknown_column", "v2", with_input("zip", "FP32", [1.0]), "zip"),
        ("duplicate_column", "v2", with_input("age", "FP32", [1.0]), "age"),
        ("wrong_type", "v2", retyped("income", "BYTES", ["a lot"]), "income"),
        ("number_for_category", "v2", retyped("city", "INT64", [1]), "city"),
        ("unseen_category", "v2", v2(city=["berlin"]), "city"),
        ("rows_of_different_lengths", "v2", v2(visits=[1, 2]), "visits"),
        ("v1_missing_column", "v1", v1(income="<drop>"), "income"),
        ("v1_unknown_column", "v1", v1(zip=1), "zip"),
        ("v1_wrong_type", "v1", v1(visits="three"), "visits"),
        ("v1_unseen_category", "v1", v1(city="berlin"), "city"),
        ("v1_null", "v1", v1(income=None), "income"),
        ("v1_million_columns", "v1", million_v1, "c0"),
        ("v2_million_columns", "v2", million_v2, ""),
    ]
    return [(c, r, b, col, None) for c, r, b, col in cases] + binary


HOSTILE = _hostile()


@pytest.mark.parametrize(("case", "route", "body", "column", "header"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_rows_are_4xx_json_naming_the_column(served, case, route, body, column, header):
    http, _ = served
    url = "/v1/models/churn:predict" if route == "v1" else "/v2/models/churn/infer"
    headers = {"content-type": "application/json"}
    if header is not None:
        headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(header)}
    r = http.post(url, content=body, headers=headers)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert "error" in r.json()
    assert column in r.json()["error"], r.json()["error"]
    # ...and the server still answers.
    ok = http.post("/v2/models/churn/infer", json=v2_body(random_rows(2, seed=1, missing_ages=False)))
    assert ok.status_code == 200, ok.text
