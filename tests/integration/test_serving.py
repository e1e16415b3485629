"""The real served stack: Ray Serve + HTTP proxy + onnxruntime, deployed from a Serve config."""

import subprocess
import sys
import textwrap
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from maas_ray.registry import Registry
from maas_ray.serving.deploy import deploy
from tests.helpers import HTTP_PORT, background, digit_png, linear_onnx

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PORT = HTTP_PORT
URL = f"http://127.0.0.1:{PORT}"


def serve_config(registry_root, traffic):
    args = {
        "registry_root": registry_root,
        "models": [
            {
                "name": "digits",
                "placement": "fused",
                "versions": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}],
                "batching": {"max_batch_size": 64, "batch_wait_timeout_s": 0.002, "enabled": True},
                "inference": {"ray_actor_options": {"num_cpus": 0.5}},
            },
            {
                "name": "lin",
                "placement": "split",
                "versions": [{"version": 1}],
                "intra_op_threads": 2,  # a two-thread session runs in a worker thread (digits: on the loop)
                "batching": {"max_batch_size": 32, "batch_wait_timeout_s": 0.02, "enabled": True},
                "inference": {"ray_actor_options": {"num_cpus": 0.25}},
                "preprocess": {"ray_actor_options": {"num_cpus": 0.1}},
                "postprocess": {"ray_actor_options": {"num_cpus": 0.1}},
            },
            {"name": "lin-local", "placement": "ingress", "versions": [{"version": "production"}]},
        ],
        "ingress": {"ray_actor_options": {"num_cpus": 0.5}},
    }
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": PORT},
        "applications": [
            {
                "name": "maas",
                "route_prefix": "/",
                "import_path": "maas_ray.serving.app:build_app",
                "args": args,
                "deployments": [{"name": "Ingress", "user_config": {"traffic": traffic}}],
            }
        ],
    }


@pytest.fixture(scope="module")
def app(trained, registry_root):
    from ray import serve

    reg = Registry(registry_root)
    reg.publish("lin", linear_onnx(4, 3, seed=7))
    reg.publish("lin-local", linear_onnx(4, 3, seed=7))
    reg.set_alias("lin-local", "production", 1)
    deploy(serve_config(registry_root, {"digits": {"1": 90, "2": 10}}))
    with httpx.Client(base_url=URL, timeout=60) as client:
        yield client
    serve.shutdown()


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


def v2_body(x, name="input", datatype="FP32"):
    x = np.asarray(x)
    return {"inputs": [{"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}


def output(body, name):
    out = next(o for o in body["outputs"] if o["name"] == name)
    return np.asarray(out["data"]).reshape(out["shape"])


def lin_reference(x):
    import onnx
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(linear_onnx(4, 3, seed=7)).graph.initializer}
    return x.astype(np.float32) @ inits["W"] + inits["b"]


def test_health_and_metadata(app):
    assert app.get("/v2/health/live").json() == {"live": True}
    assert app.get("/v2/health/ready").json() == {"ready": True}
    assert app.get("/v2").json()["name"] == "maas-ray"
    meta = app.get("/v2/models/digits").json()
    assert meta["versions"] == ["1", "2"] and meta["platform"] == "onnxruntime_onnx"
    # the image preprocessor advertises encoded images first (it also takes raw pixels)
    assert meta["inputs"] == [{"name": "input", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities", "top_k_labels", "top_k_scores"]
    assert app.get("/v2/models/digits/versions/1").json()["parameters"]["version"] == "1"
    # unpinned metadata names the version most requests reach (90 % of the split)
    assert app.get("/v2/models/digits").json()["parameters"]["version"] == "1"
    assert app.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}
    assert app.get("/v2/models/lin-local/versions/production/ready").json()["version"] == "1"


def test_v2_pixels_classify_held_out_digits(app, digits):
    x, y = digits
    r = app.post("/v2/models/digits/versions/1/infer", json=v2_body(x[-200:]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "digits" and body["model_version"] == "1" and r.headers["x-model-version"] == "1"
    labels = output(body, "label").astype(int)
    assert (labels == y[-200:]).mean() >= 0.95
    probs = output(body, "probabilities")
    assert probs.shape == (200, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert output(body, "top_k_labels").shape == (200, 3)


def test_v2_and_v1_accept_encoded_images(app, digits):
    x, y = digits
    sample = x[-10:]
    raw = output(app.post("/v2/models/digits/versions/1/infer", json=v2_body(sample)).json(), "label")
    images = [digit_png(s, size=8) for s in sample]
    body = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [10], "data": images}]}
    r = app.post("/v2/models/digits/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    assert output(r.json(), "label").tolist() == raw.tolist()

    big = [{"b64": digit_png(s, size=32)} for s in sample]  # resized back to 8x8 by the preprocessor
    r = app.post("/v1/models/digits/versions/1:predict", json={"instances": big})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 10 and sum(p["label"] == str(t) for p, t in zip(preds, y[-10:])) >= 8


def test_v1_predict_pixels(app, digits):
    x, y = digits
    r = app.post("/v1/models/digits:predict", json={"instances": x[:5].tolist()})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == [str(v) for v in y[:5]]
    assert len(preds[0]["probabilities"]) == 10 and len(preds[0]["top_k_scores"]) == 3


def test_v1_unpinned_follows_the_sticky_split_and_names_the_version_that_answered(app, digits):
    """Both versions are served (90/10): a sticky key reaches the same version through v1 as
    through v2, and x-model-version names the version whose answer came back."""
    x, _ = digits
    instances = {"instances": x[:5].tolist()}
    key_of = {}  # version -> a key the v2 route sends there
    for i in range(200):  # P(no key reaches the 10 % version) = 0.9**200
        key = f"v1-{i}"
        version = app.post("/v2/models/digits/infer", json=v2_body(x[:1]), headers={"x-request-key": key}).headers["x-model-version"]
        key_of.setdefault(version, key)
        if len(key_of) == 2:
            break
    assert set(key_of) == {"1", "2"}, key_of
    probabilities = {v: [p["probabilities"] for p in app.post(f"/v1/models/digits/versions/{v}:predict", json=instances).json()["predictions"]]
                     for v in ("1", "2")}
    assert not np.allclose(probabilities["1"], probabilities["2"])  # the answers tell the versions apart
    for version, key in key_of.items():
        for _ in range(5):  # a split that ignored the key sends the 10 % key's 5 requests to "2" at p = 1e-5
            r = app.post("/v1/models/digits:predict", json=instances, headers={"x-request-key": key})
            assert r.status_code == 200, r.text
            assert r.headers["x-model-version"] == version, (key, version)
            np.testing.assert_allclose([p["probabilities"] for p in r.json()["predictions"]], probabilities[version], atol=1e-6)


def test_split_and_ingress_placements_concatenate_and_split_batches(app):
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(int(rng.integers(1, 5)), 4)).astype(np.float32) for _ in range(40)]

    def call(args):
        i, x = args
        model = "lin" if i % 2 else "lin-local"
        if i == 17:  # one bad request inside the same batches
            return i, app.post(f"/v2/models/{model}/infer", json=v2_body(np.zeros((2, 5), np.float32)))
        return i, app.post(f"/v2/models/{model}/infer", json=v2_body(x))

    with ThreadPoolExecutor(16) as pool:
        results = dict(pool.map(call, enumerate(inputs)))
    for i, r in results.items():
        if i == 17:
            assert r.status_code == 400
            assert r.json() == {"error": "input 'input': expected shape [-1, 4] (-1 = any), got [2, 5]"}
        else:
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(output(r.json(), "logits"), lin_reference(inputs[i]), rtol=1e-5, atol=1e-5)


def test_a_bad_image_fails_alone_inside_a_coalesced_call(app, digits):
    """fused: the ingress sends concurrent requests to the inference replica together; a PNG that
    only the replica's preprocessor can reject is a 400 for its own request, the rest answer."""
    x, y = digits
    good = {i: digit_png(x[i], size=8) for i in range(24)}
    import base64

    # truncated: valid base64 and a PNG header, so only Pillow's decode in the replica rejects it
    broken = base64.b64encode(base64.b64decode(good[0])[:-40]).decode()

    def call(i):
        image = broken if i % 5 == 2 else good[i]
        body = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1], "data": [image]}]}
        return i, app.post("/v2/models/digits/versions/1/infer", json=body)

    with ThreadPoolExecutor(12) as pool:
        results = dict(pool.map(call, range(24)))
    for i, r in results.items():
        if i % 5 == 2:
            assert r.status_code == 400 and r.json()["error"].startswith("image 0: "), r.text
        else:
            assert r.status_code == 200, r.text
            assert output(r.json(), "label").tolist() == output(
                app.post("/v2/models/digits/versions/1/infer", json=v2_body(x[i:i + 1])).json(), "label").tolist()


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/v2/models/nope/infer", {"inputs": []}, 404, "model 'nope' is not served here; models: ['digits', 'lin', 'lin-local']"),
        ("/v2/models/digits/versions/9/infer", {}, 404, "model 'digits' has no served version '9'; served: [1, 2]"),
        ("/v1/models/nope:predict", {"instances": [1]}, 404, "model 'nope' is not served here; models: ['digits', 'lin', 'lin-local']"),
        ("/v2/models/lin/infer", b"{not json", 400, None),
        ("/v2/models/lin/infer", {"inputs": "x"}, 400, "inputs: expected a non-empty list of input objects, got \"x\""),
        ("/v2/models/lin/infer", v2_body(np.zeros((1, 3))), 400, "input 'input': expected shape [-1, 4] (-1 = any), got [1, 3]"),
        ("/v2/models/lin/infer", v2_body(np.zeros((1, 4), np.int64), datatype="INT64"), 400, "inputs[0].datatype: expected one of ['FP32'] for input 'input', got \"INT64\""),
        ("/v2/models/lin/infer", v2_body(np.zeros((1, 4)), name="x"), 400, "inputs[0].name: unknown input \"x\"; this model takes ['input']"),
        ("/v2/models/lin/infer", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2]}]}, 400,
         "inputs[0].data: shape [1, 4] needs 4 values, got 2"),
        ("/v2/models/lin/infer", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": ["a", "b", "c", "d"]}]}, 400, None),
        ("/v2/models/digits/infer", {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1], "data": ["bm90IGFuIGltYWdl"]}]}, 400, None),
        ("/v1/models/lin:predict", {"instances": [[1, 2], [1, 2, 3]]}, 400, None),
        ("/v1/models/lin:predict", {"wrong": 1}, 400, "request: unknown field(s) ['wrong']; expected only ['inputs', 'instances', 'signature_name']"),
    ],
)
def test_errors_are_json_with_the_right_status(app, path, body, status, error):
    r = app.post(path, content=body) if isinstance(body, bytes) else app.post(path, json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    if error is not None:
        assert r.json() == {"error": error}


def test_pin_and_sticky_key(app, digits):
    x, _ = digits
    body = v2_body(x[:1])
    for _ in range(10):
        assert app.post("/v2/models/digits/versions/2/infer", json=body).json()["model_version"] == "2"
    for key in ("user-a", "user-b", "user-c"):
        seen = {app.post("/v2/models/digits/infer", json=body, headers={"x-request-key": key}).json()["model_version"]
                for _ in range(15)}
        assert len(seen) == 1, (key, seen)
    keyed = Counter(
        app.post("/v2/models/digits/infer", json=body, headers={"x-request-key": f"k{i}"}).json()["model_version"]
        for i in range(200)
    )
    assert set(keyed) == {"1", "2"}  # different keys still follow the split


def test_split_ratio_over_1000_requests(app, digits):
    x, _ = digits
    body = v2_body(x[:1])
    with ThreadPoolExecutor(16) as pool:
        versions = list(pool.map(lambda _: app.post("/v2/models/digits/infer", json=body).headers["x-model-version"], range(1000)))
    share = versions.count("2") / len(versions)
    # 10 % expected; binomial sd over 1000 draws is 0.95 %: allow about 4 sd.
    assert abs(share - 0.10) <= 0.04, Counter(versions)


def test_python_handle_from_a_separate_driver(app, ray_cluster, digits):
    x, y = digits
    script = textwrap.dedent(f"""
        import json, numpy as np, ray
        from maas_ray.serving import MaasClient
        from maas_ray.errors import VersionNotFoundError
        ray.init(address="{ray_cluster}", logging_level="ERROR")
        x = np.asarray({x[:3].tolist()}, dtype=np.float32)
        with MaasClient(app_name="maas") as client:
            res = client.infer("digits", {{"input": x}}, version=2)
            try:
                client.infer("digits", {{"input": x}}, version=7)
                err = None
            except VersionNotFoundError as exc:
                err = str(exc)
        print("RESULT", json.dumps({{"version": res["model_version"], "labels": MaasClient.output(res, "label").tolist(), "err": err}}))
        ray.shutdown()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))[7:])
    assert result["version"] == "2" and result["labels"] == [str(v) for v in y[:3]]
    assert result["err"] == "model 'digits' has no served version '7'; served: [1, 2]"


def test_live_reweight_under_load_without_restarts_or_failures(app, registry_root, digits):
    from ray import serve

    x, _ = digits
    body = v2_body(x[:1])
    handle = serve.get_app_handle("maas")
    before = handle.replicas.remote().result()
    results: list = []

    def load(stop):
        with httpx.Client(base_url=URL, timeout=60) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v2/models/digits/infer", json=body)
                    results.append((time.monotonic(), r.status_code, r.headers.get("x-model-version")))
                except httpx.HTTPError as exc:
                    results.append((time.monotonic(), repr(exc), None))

    with background(*[load] * 4):
        time.sleep(2)
        switched_at = time.monotonic()
        deploy(serve_config(registry_root, {"digits": {"1": 0, "2": 100}}))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            recent = [v for ts, _, v in results[-20:] if ts > switched_at]
            if len(recent) == 20 and set(recent) == {"2"}:
                break
            time.sleep(0.2)
        time.sleep(1)

    failures = [r for r in results if r[1] != 200]
    assert not failures, failures[:5]
    assert len(results) > 50
    assert {v for _, _, v in results[-20:]} == {"2"}, "traffic did not move to version 2"
    assert handle.replicas.remote().result() == before, "replicas were restarted by a user_config change"
    # weight 0: no random traffic, still reachable by pin
    assert app.post("/v2/models/digits/versions/1/infer", json=body).json()["model_version"] == "1"
    deploy(serve_config(registry_root, {"digits": {"1": 90, "2": 10}}))


def test_stock_oip_v2_client_tritonclient(app, digits):
    """tritonclient's HTTP client, unchanged: binary tensor extension on input, JSON output."""
    import tritonclient.http as httpclient
    client = httpclient.InferenceServerClient(f"127.0.0.1:{PORT}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("lin") and client.is_model_ready("digits", model_version="2")
    assert client.get_model_metadata("lin")["inputs"][0]["shape"] == [-1, 4]

    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    for binary in (True, False):
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        result = client.infer("lin", [inp], model_version="1", request_id="req-7")
        np.testing.assert_allclose(result.as_numpy("logits"), lin_reference(x), rtol=1e-5, atol=1e-5)
        assert result.get_response()["id"] == "req-7"

    pixels, y = digits
    inp = httpclient.InferInput("input", [4, 64], "FP32")
    inp.set_data_from_numpy(pixels[:4].astype(np.float32))
    result = client.infer("digits", [inp], outputs=[httpclient.InferRequestedOutput("label", binary_data=False)])
    assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")] == [str(v) for v in y[:4]]
    client.close()
