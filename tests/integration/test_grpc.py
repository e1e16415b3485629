"""OIP v2 over gRPC through Serve's real gRPC proxy, spoken by the stock ``tritonclient.grpc``.

One app (API keys on, two ingress replicas) with ``tiny`` at versions 1 and 2 (a 50/50 split)
and ``other``; the same requests over HTTP give the messages gRPC must repeat. The last test
kills an ingress replica under gRPC and HTTP load.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import numpy as np
import pytest

from maas_ray.registry import Registry
from maas_ray.serving.deploy import deploy
from maas_ray.serving.grpc import SERVICER_FUNCTION
from maas_ray.serving.metric_names import RAY_REQUESTS_TOTAL
from tests.helpers import HTTP_PORT, background, create_key, linear_onnx, replica_pids, scrape, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
GRPC_PORT = int(os.environ.get("MAAS_TEST_GRPC_PORT", "9000"))
URL = f"http://127.0.0.1:{HTTP_PORT}"
STICKY = "x-session"


@pytest.fixture(scope="module")
def served(ray_cluster, registry_root, tmp_path_factory):
    from ray import serve

    reg = Registry(registry_root)
    weights = {}
    for seed in (11, 12):
        weights[reg.publish("tiny", linear_onnx(4, 3, seed=seed)).version] = seed
    reg.publish("other", linear_onnx(4, 3, seed=13))
    keys_file = str(tmp_path_factory.mktemp("grpc-keys") / "keys.json")
    keys = {
        "all": create_key(keys_file, "--name", "ops", "--all-models"),
        "other": create_key(keys_file, "--name", "app", "--models", "other"),
    }
    versions = sorted(weights)
    args = {
        "registry_root": registry_root,
        "request_key_header": STICKY,
        "auth": {"enabled": True, "keys_file": keys_file},
        "models": [
            {"name": "tiny", "placement": "ingress", "intra_op_threads": 1,
             "versions": [{"version": v, "weight": 1} for v in versions]},
            {"name": "other", "placement": "ingress", "intra_op_threads": 1, "versions": [{"version": "latest"}]},
        ],
        "ingress": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}},  # one is killed last
    }
    deploy({
        "http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
        "grpc_options": {"port": GRPC_PORT, "grpc_servicer_functions": [SERVICER_FUNCTION]},
        "applications": [
            {"name": "grpcapp", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app", "args": args},
        ],
    })
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(f"127.0.0.1:{GRPC_PORT}")
    headers = {"authorization": f"Bearer {keys['all']}"}
    wait_until(lambda: client.is_model_ready("tiny", headers=headers), timeout_s=60)
    yield client, headers, keys, versions
    client.close()
    serve.shutdown()


def _http_error(path: str, body: dict, key: str) -> tuple[int, str]:
    r = httpx.post(URL + path, json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)
    return r.status_code, r.json()["error"]


def _input(x: np.ndarray, name: str = "input"):
    import tritonclient.grpc as tg

    inp = tg.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # raw_input_contents
    return inp


def _linear(seed: int, x: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    b = rng.normal(size=(3,)).astype(np.float32)
    return x @ w + b


def test_server_and_model_metadata(served):
    client, headers, _, versions = served
    assert client.is_server_live(headers=headers)
    assert client.is_server_ready(headers=headers)
    meta = client.get_server_metadata(headers=headers)
    assert meta.name == "maas-ray" and "binary_tensor_data" in meta.extensions
    model = client.get_model_metadata("tiny", headers=headers)
    assert model.name == "tiny" and list(model.versions) == [str(v) for v in versions]
    assert [(t.name, t.datatype) for t in model.inputs] == [("input", "FP32")]
    assert [t.name for t in model.outputs] == ["logits"]
    assert client.is_model_ready("tiny", str(versions[1]), headers=headers)


def test_infer_raw_contents_with_pins(served):
    client, headers, _, versions = served
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
    for v, seed in zip(versions, (11, 12)):
        res = client.infer("tiny", [_input(x)], model_version=str(v), request_id="r-1", headers=headers)
        assert res.get_response().model_version == str(v) and res.get_response().id == "r-1"
        np.testing.assert_allclose(res.as_numpy("logits"), _linear(seed, x), rtol=1e-5, atol=1e-5)


def test_infer_typed_contents_and_requested_outputs(served):
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    _, headers, _, versions = served
    x = np.ones((1, 4), dtype=np.float32)
    req = service_pb2.ModelInferRequest(model_name="tiny", model_version=str(versions[0]), id="typed")
    tensor = req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    req.outputs.add(name="logits")
    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        res = stub.ModelInfer(req, metadata=list(headers.items()))
    assert [o.name for o in res.outputs] == ["logits"] and list(res.outputs[0].shape) == [1, 3]
    got = np.frombuffer(res.raw_output_contents[0], dtype="<f4").reshape(1, 3)
    np.testing.assert_allclose(got, _linear(11, x), rtol=1e-5, atol=1e-5)


def test_sticky_key_metadata_and_parameter(served):
    client, headers, _, versions = served
    x = np.zeros((1, 4), dtype=np.float32)
    by_meta = {client.infer("tiny", [_input(x)], headers={**headers, STICKY: "user-7"}).get_response().model_version
               for _ in range(6)}
    by_param = {client.infer("tiny", [_input(x)], headers=headers, parameters={STICKY: "user-7"})
                .get_response().model_version for _ in range(6)}
    assert len(by_meta) == 1 and by_meta == by_param  # the same key reaches the same version
    spread = {client.infer("tiny", [_input(x)], headers={**headers, STICKY: f"u{i}"}).get_response().model_version
              for i in range(24)}
    assert spread == {str(v) for v in versions}


def test_errors_map_to_status_codes_with_http_messages(served):
    import grpc
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    client, headers, keys, versions = served
    v = str(versions[0])  # the shared registry may hold versions other modules published

    def status_of(call):
        with pytest.raises(InferenceServerException) as info:
            call()
        return info.value.status(), info.value.message()

    bad_shape = np.zeros((1, 5), dtype=np.float32)
    code, message = status_of(lambda: client.infer("tiny", [_input(bad_shape)], model_version=v, headers=headers))
    http = _http_error(f"/v2/models/tiny/versions/{v}/infer", {"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 5], "data": [0.0] * 5}]}, keys["all"])
    assert code == str(grpc.StatusCode.INVALID_ARGUMENT) and http[0] == 400
    assert http[1] in message  # tritonclient prefixes nothing else but may add context

    unknown = np.zeros((1, 4), dtype=np.float32)
    code, message = status_of(lambda: client.infer("tiny", [_input(unknown, "nope")], headers=headers))
    http = _http_error("/v2/models/tiny/infer", {"inputs": [
        {"name": "nope", "datatype": "FP32", "shape": [1, 4], "data": [0.0] * 4}]}, keys["all"])
    assert code == str(grpc.StatusCode.INVALID_ARGUMENT) and http[1] in message

    x = tg.InferInput("input", [1, 4], "FP32")
    x.set_data_from_numpy(unknown)
    assert status_of(lambda: client.infer("missing", [x], headers=headers))[0] == str(grpc.StatusCode.NOT_FOUND)
    assert status_of(lambda: client.infer("tiny", [x], model_version="99", headers=headers))[0] == str(
        grpc.StatusCode.NOT_FOUND)
    assert status_of(lambda: client.get_model_metadata("tiny", "99", headers=headers))[0] == str(
        grpc.StatusCode.NOT_FOUND)
    assert status_of(lambda: client.infer("tiny", [x]))[0] == str(grpc.StatusCode.UNAUTHENTICATED)
    code, message = status_of(lambda: client.infer("tiny", [x], headers={"x-api-key": keys["other"]}))
    assert code == str(grpc.StatusCode.PERMISSION_DENIED)
    assert client.infer("other", [x], headers={"x-api-key": keys["other"]}).as_numpy("logits").shape == (1, 3)


def test_unparsable_messages_are_invalid_argument_after_keys(served):
    """Bytes that are not the RPC's message get INVALID_ARGUMENT with a message, not grpc's
    UNKNOWN ("Unexpected DecodeError"); keys are still checked first, and the service goes on."""
    import grpc

    client, headers, _, _ = served
    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        for method in ("ModelInfer", "ModelMetadata"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            for blob in (b"\xff" * 40, b"\x0a\x05ti"):  # garbage; a field cut short
                with pytest.raises(grpc.RpcError) as info:
                    call(blob, metadata=list(headers.items()), timeout=30)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
                assert info.value.details().startswith(f"request: not a valid inference.{method}Request message")
            with pytest.raises(grpc.RpcError) as info:
                call(b"\xff" * 40, timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    x = np.zeros((1, 4), dtype=np.float32)
    assert client.infer("tiny", [_input(x)], headers=headers).as_numpy("logits").shape == (1, 3)


def test_metrics_count_grpc_requests(served):
    """Counted with protocol "grpc" and the HTTP-equivalent status, so dashboards agree.
    Only this test sends bad requests to ``other``: its 400 count starts here."""
    from tritonclient.utils import InferenceServerException

    client, headers, _, _ = served
    bad = {"app": "grpcapp", "model": "other", "protocol": "grpc", "status": "400"}
    ok = {**bad, "status": "200"}
    before = (scrape(RAY_REQUESTS_TOTAL, **bad), scrape(RAY_REQUESTS_TOTAL, **ok))
    x = np.zeros((1, 4), dtype=np.float32)
    for _ in range(5):
        client.infer("other", [_input(x)], headers=headers)
    for _ in range(3):
        with pytest.raises(InferenceServerException):
            client.infer("other", [_input(x, "nope")], headers=headers)
    deadline = time.monotonic() + 30  # replicas flush every second, Ray exports every second here
    while True:
        now = (scrape(RAY_REQUESTS_TOTAL, **bad), scrape(RAY_REQUESTS_TOTAL, **ok))
        if (now[0] == before[0] + 3 and now[1] >= before[1] + 5) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert now[0] == before[0] + 3 and now[1] >= before[1] + 5


def test_killing_an_ingress_replica_under_load_fails_at_most_the_requests_in_flight(served):
    """SIGKILL one of the two ingress replicas (where the gRPC methods run) while 2 gRPC and 2 HTTP
    clients keep sending: Serve's proxy routes everything after the kill to the other one. A
    request already in flight on the killed replica may fail (Serve's proxy answers it 500; the
    throughput profile's HAProxy replays it instead): at most one per client. Last in the module:
    the killed replica's metrics leave the scrape with it."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    _, headers, _, _ = served
    req = service_pb2.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(np.zeros((1, 4), dtype=np.float32).tobytes())
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [0.0] * 4}]}
    results: list = []

    def grpc_load(stop):
        with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                try:
                    stub.ModelInfer(req, metadata=list(headers.items()), timeout=60)
                    results.append(("grpc", "OK"))
                except grpc.RpcError as exc:
                    results.append(("grpc", f"{exc.code().name}: {exc.details()}"))

    def http_load(stop):
        with httpx.Client(base_url=URL, timeout=60, headers=headers) as c:
            while not stop.is_set():
                try:
                    results.append(("http", c.post("/v2/models/tiny/infer", json=body).status_code))
                except httpx.HTTPError as exc:
                    results.append(("http", repr(exc)))

    pids = replica_pids("grpcapp", "Ingress")
    assert len(pids) == 2, pids
    victim = next(iter(pids))
    with background(grpc_load, grpc_load, http_load, http_load):
        time.sleep(2)
        os.kill(victim, signal.SIGKILL)
        time.sleep(8)
    for protocol, ok in (("grpc", "OK"), ("http", 200)):
        sent = [r for p, r in results if p == protocol]
        failed = [r for r in sent if r != ok]
        print(f"ingress kill, {protocol}: {len(failed)} failed of {len(sent)}")
        assert len(sent) > 50
        assert len(failed) <= 2, failed[:5]  # the two clients' requests in flight at the kill, at most
