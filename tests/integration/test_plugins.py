"""User plug-ins (pre- and postprocessors by import path) served by real Ray Serve, over HTTP
and gRPC: requests are validated against the plug-in's declared inputs, metadata and OpenAPI
list them, and responses carry the plug-in's outputs.

The plug-ins live in tests/plugins_example.py; Ray workers import ``tests.`` modules as the
driver does (Ray puts the driver's working directory, the repository root, on their path).
"""

from __future__ import annotations

import os

import httpx
import numpy as np
import pytest

from maas_ray.registry import Registry
from maas_ray.serving.deploy import deploy
from maas_ray.serving.grpc import SERVICER_FUNCTION
from tests.helpers import HTTP_PORT, linear_onnx, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
GRPC_PORT = int(os.environ.get("MAAS_TEST_GRPC_PORT", "9000"))
URL = f"http://127.0.0.1:{HTTP_PORT}"
SEED = 21
PRE = {"name": "tests.plugins_example:CelsiusToFahrenheit", "params": {"input_name": "celsius"}}
POST = {"name": "tests.plugins_example:Argmax", "params": {"output_name": "argmax"}}
# split: the plug-ins run in their own replicas (processes); ingress: inside the ingress
MODELS = ("temps", "temps-local")


def _expected(celsius: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)  # the weights linear_onnx draws
    w = rng.normal(size=(4, 3)).astype(np.float32)
    b = rng.normal(size=(3,)).astype(np.float32)
    logits = (celsius * np.float32(1.8) + np.float32(32)) @ w + b
    return logits, logits.argmax(axis=1)


@pytest.fixture(scope="module")
def served(ray_cluster, registry_root):
    from ray import serve

    reg = Registry(registry_root)
    for name in MODELS:
        reg.publish(name, linear_onnx(4, 3, seed=SEED))
    common = {"versions": [{"version": "latest"}], "preprocessor": PRE, "postprocessor": POST, "intra_op_threads": 1}
    small = {"ray_actor_options": {"num_cpus": 0.25}}
    args = {
        "registry_root": registry_root,
        "models": [
            {"name": "temps", "placement": "split", **common,
             "inference": small, "preprocess": small, "postprocess": small},
            {"name": "temps-local", "placement": "ingress", **common},
        ],
    }
    deploy({
        "http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
        "grpc_options": {"port": GRPC_PORT, "grpc_servicer_functions": [SERVICER_FUNCTION]},
        "applications": [
            {"name": "plugins", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app", "args": args},
        ],
    })
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(f"127.0.0.1:{GRPC_PORT}")
    wait_until(lambda: all(client.is_model_ready(m) for m in MODELS), timeout_s=90)
    with httpx.Client(base_url=URL, timeout=30) as http:
        yield http, client
    client.close()
    serve.shutdown()


def _body(x: np.ndarray, name: str = "celsius", datatype: str = "FP32") -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}


def _output(body: dict, name: str) -> np.ndarray:
    out = next(o for o in body["outputs"] if o["name"] == name)
    return np.asarray(out["data"]).reshape(out["shape"])


@pytest.mark.parametrize("model", MODELS)
def test_metadata_lists_the_plugins_inputs_and_outputs(served, model):
    http, client = served
    meta = http.get(f"/v2/models/{model}").json()
    assert meta["inputs"] == [{"name": "celsius", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
                               {"name": "argmax", "datatype": "INT64", "shape": [-1]}]
    grpc_meta = client.get_model_metadata(model)
    assert [(t.name, t.datatype, list(t.shape)) for t in grpc_meta.inputs] == [("celsius", "FP32", [-1, 4])]
    assert [(t.name, t.datatype) for t in grpc_meta.outputs] == [("logits", "FP32"), ("argmax", "INT64")]


@pytest.mark.parametrize("model", MODELS)
def test_http_v2_and_v1_infer_return_the_plugins_output(served, model):
    http, _ = served
    celsius = np.array([[-40, 0, 37, 100], [1.5, -2.5, 3, 20]], np.float32)
    logits, argmax = _expected(celsius)
    r = http.post(f"/v2/models/{model}/infer", json=_body(celsius))
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(_output(r.json(), "logits"), logits, rtol=1e-5, atol=1e-4)
    assert _output(r.json(), "argmax").tolist() == argmax.tolist()
    assert next(o for o in r.json()["outputs"] if o["name"] == "argmax")["datatype"] == "INT64"
    only = http.post(f"/v2/models/{model}/infer", json={**_body(celsius), "outputs": [{"name": "argmax"}]}).json()
    assert [o["name"] for o in only["outputs"]] == ["argmax"]
    v1 = http.post(f"/v1/models/{model}:predict", json={"instances": celsius.tolist()})  # float64 numbers
    assert v1.status_code == 200, v1.text
    assert [p["argmax"] for p in v1.json()["predictions"]] == argmax.tolist()


@pytest.mark.parametrize("model", MODELS)
def test_grpc_model_infer_returns_the_plugins_output(served, model):
    import tritonclient.grpc as tg

    _, client = served
    celsius = np.array([[10, 20, 30, 40]], np.float32)
    logits, argmax = _expected(celsius)
    x = tg.InferInput("celsius", [1, 4], "FP32")
    x.set_data_from_numpy(celsius)
    res = client.infer(model, [x])
    np.testing.assert_allclose(res.as_numpy("logits"), logits, rtol=1e-5, atol=1e-4)
    assert res.as_numpy("argmax").dtype == np.int64 and res.as_numpy("argmax").tolist() == argmax.tolist()


def test_requests_are_checked_against_the_plugins_declared_inputs(served):
    import grpc
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    http, client = served
    x = np.zeros((1, 4), np.float32)
    wrong_name = http.post("/v2/models/temps/infer", json=_body(x, name="input"))  # the graph's name: not taken
    assert wrong_name.status_code == 400
    assert wrong_name.json()["error"] == "inputs[0].name: unknown input \"input\"; this model takes ['celsius']"
    wrong_type = http.post("/v2/models/temps/infer", json=_body(x.astype(np.int64), datatype="INT64"))
    assert wrong_type.status_code == 400 and "'celsius'" in wrong_type.json()["error"]
    assert "FP32" in wrong_type.json()["error"] and "INT64" in wrong_type.json()["error"]
    wrong_shape = http.post("/v2/models/temps/infer", json=_body(np.zeros((1, 3), np.float32)))
    assert wrong_shape.status_code == 400  # checked by the plug-in itself (check_tensor)
    assert wrong_shape.json()["error"] == "input 'celsius': expected shape [-1, 4] (-1 = any), got [1, 3]"

    for name, datatype, arr in (("input", "FP32", x), ("celsius", "INT64", x.astype(np.int64))):
        inp = tg.InferInput(name, [1, 4], datatype)
        inp.set_data_from_numpy(arr)
        with pytest.raises(InferenceServerException) as info:
            client.infer("temps", [inp])
        assert info.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
        assert repr(name) in info.value.message() or f'"{name}"' in info.value.message()


def test_openapi_still_serves(served):
    http, _ = served
    r = http.get("/openapi.json")
    assert r.status_code == 200
    assert any("/v2/models/{model}/infer" in path for path in r.json()["paths"])
