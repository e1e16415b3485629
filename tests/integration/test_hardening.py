"""The served app as an attacker and an operator see it: hostile inputs, limits, keys, readiness,
a replica killed under load, the OpenAPI document fuzzed by schemathesis, no torch in replicas.

One Serve instance holds two apps: ``secure`` (API keys on, a fused model with one corrupt
version) at ``/`` and ``limited`` (a tight per-client rate limit, a small body limit, no keys)
at ``/limited``.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from urllib.parse import quote

import httpx
import numpy as np
import orjson
import pytest

from maas_ray.registry import Registry
from maas_ray.serving.deploy import deploy
from maas_ray.serving.metric_names import (
    RAY_ERRORS_TOTAL,
    RAY_REQUESTS_TOTAL,
    RAY_STAGE_LATENCY_COUNT,
    RAY_STAGE_LATENCY_SUM,
    RAY_VERSION_STATE,
)
from tests.helpers import HTTP_PORT, background, create_key, linear_onnx, replica_pids, scrape, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
URL = f"http://127.0.0.1:{HTTP_PORT}"


@pytest.fixture(scope="module")
def hardened(trained, registry_root, tmp_path_factory):
    from ray import serve

    reg = Registry(registry_root)
    reg.publish("guarded", linear_onnx(4, 3, seed=3))
    broken = reg.publish("guarded", linear_onnx(4, 3, seed=4)).version
    # Corrupt the published artifact: its checksum no longer matches the manifest.
    onnx_path = os.path.join(registry_root, "guarded", str(broken), "model.onnx")
    with open(onnx_path, "r+b") as f:
        f.seek(40)
        f.write(b"\x00corrupt\x00")
    reg.publish("tiny", linear_onnx(4, 3, seed=5))
    reg.publish("slowpoke", linear_onnx(4, 3, seed=6))

    keys_file = str(tmp_path_factory.mktemp("keys") / "keys.json")
    keys = {
        "admin": create_key(keys_file, "--name", "ops", "--all-models", "--admin"),
        "digits": create_key(keys_file, "--name", "app", "--models", "digits"),
        "revoked": create_key(keys_file, "--name", "gone", "--all-models"),
    }
    secure = {
        "registry_root": registry_root,
        "auth": {"enabled": True, "keys_file": keys_file, "reload_interval_s": 0.5},
        "models": [
            {"name": "digits", "placement": "ingress", "intra_op_threads": 1,
             "versions": [{"version": 1, "weight": 1}, {"version": 2, "weight": 1}]},
            {"name": "guarded", "placement": "fused",
             "versions": [{"version": 1, "weight": 50}, {"version": broken, "weight": 50}],
             "inference": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}}},
            # every request waits out a 2 s batch window, so 16 at once overflow 2 running + 2 queued
            {"name": "slowpoke", "placement": "fused", "versions": [{"version": 1}],
             "batching": {"max_batch_size": 64, "batch_wait_timeout_s": 2.0, "enabled": True},
             "inference": {"max_ongoing_requests": 2, "max_queued_requests": 2,
                           "ray_actor_options": {"num_cpus": 0.1}}},
        ],
        "ingress": {"ray_actor_options": {"num_cpus": 0.5}},
    }
    limited = {
        "registry_root": registry_root,
        "limits": {"rate_limit_rps": 2, "rate_limit_burst": 4, "max_body_bytes": 4096},
        "models": [
            {"name": "tiny", "versions": [{"version": 1}]},
        ],
        "ingress": {"ray_actor_options": {"num_cpus": 0.25}},
    }
    deploy({
        "http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
        "applications": [
            {"name": "secure", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app", "args": secure},
            {"name": "limited", "route_prefix": "/limited", "import_path": "maas_ray.serving.app:build_app",
             "args": limited},
        ],
    })
    with httpx.Client(base_url=URL, timeout=60) as client:
        client.headers["authorization"] = f"Bearer {keys['admin']}"
        wait_until(lambda: client.get("/v2/models/guarded/versions/1/ready").status_code == 200)
        yield client, keys, keys_file, broken
    serve.shutdown()


def _raw_post(path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """POST over a plain socket: hostile header values (leading spaces, latin-1 bytes) that
    HTTP client libraries refuse to send go on the wire as they are."""
    head = [f"POST {path} HTTP/1.1", f"host: 127.0.0.1:{HTTP_PORT}", "connection: close",
            f"content-length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection(("127.0.0.1", HTTP_PORT), timeout=30) as sock:
        sock.sendall("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    header, _, payload = raw.partition(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1])
    length = next((int(line.split(b":", 1)[1]) for line in header.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), len(payload))
    return status, payload[:length]


def v2(x, name="input", datatype="FP32"):
    x = np.asarray(x)
    return {"inputs": [{"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}


def test_keys_401_403_and_revocation(hardened):
    from maas_ray.cli import main

    client, keys, keys_file, _ = hardened
    body = v2(np.zeros((1, 64)))
    anonymous = httpx.post(f"{URL}/v2/models/digits/infer", json=body)
    assert anonymous.status_code == 401 and set(anonymous.json()) == {"error"}
    wrong = httpx.post(f"{URL}/v2/models/digits/infer", json=body, headers={"authorization": "Bearer mk_nope_nope"})
    assert wrong.status_code == 401
    scoped = {"x-api-key": keys["digits"]}
    assert httpx.post(f"{URL}/v2/models/digits/infer", json=body, headers=scoped).status_code == 200
    denied = httpx.post(f"{URL}/v2/models/guarded/infer", json=v2(np.zeros((1, 4))), headers=scoped)
    assert denied.status_code == 403 and "guarded" in denied.json()["error"]
    assert httpx.post(f"{URL}/v2/repository/index", headers=scoped).status_code == 403
    assert client.post("/v2/repository/index").status_code == 200
    for secret in keys.values():  # no key material in any error message
        assert secret not in wrong.text + denied.text

    revoked = {"authorization": f"Bearer {keys['revoked']}"}
    assert httpx.post(f"{URL}/v2/models/digits/infer", json=body, headers=revoked).status_code == 200
    key_id = keys["revoked"].split("_")[1]
    with redirect_stdout(io.StringIO()):
        assert main(["keys", "revoke", key_id, "--file", keys_file]) == 0
    wait_until(lambda: httpx.post(f"{URL}/v2/models/digits/infer", json=body, headers=revoked).status_code == 401)
    # health probes need no key
    assert httpx.get(f"{URL}/v2/health/live").status_code == 200


def test_corrupt_version_is_not_ready_gets_no_traffic_and_says_why(hardened):
    client, _, _, broken = hardened
    assert client.get("/v2/health/ready").json() == {"ready": True}  # every model has a ready version
    state = client.get(f"/v2/models/guarded/versions/{broken}/ready")
    assert state.status_code == 503 and state.json()["ready"] is False
    assert "IntegrityError" in state.json()["reason"]
    meta = client.get(f"/v2/models/guarded/versions/{broken}").json()
    assert meta["parameters"]["state"] == "failed" and "sha256" in meta["parameters"]["reason"]
    # 50/50 configured, but every unpinned request reaches the ready version
    versions = {client.post("/v2/models/guarded/infer", json=v2(np.ones((1, 4)))).headers["x-model-version"]
                for _ in range(30)}
    assert versions == {"1"}
    pinned = client.post(f"/v2/models/guarded/versions/{broken}/infer", json=v2(np.ones((1, 4))))
    assert pinned.status_code == 503 and "retry-after" in pinned.headers and "sha256" in pinned.json()["error"]
    index = {(e["name"], e["version"]): e["state"] for e in client.post("/v2/repository/index").json()}
    assert index[("guarded", str(broken))] == "FAILED" and index[("guarded", "1")] == "READY"


def test_metadata_describes_what_the_infer_route_returns(hardened):
    import tritonclient.http as httpclient

    client, keys, _, _ = hardened
    meta = client.get("/v2/models/digits").json()
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities", "top_k_labels", "top_k_scores"]
    assert meta["outputs"][1] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
    assert meta["inputs"][0]["name"] == "input"
    # a stock client asks for an output by the name the metadata gives
    triton = httpclient.InferenceServerClient(f"127.0.0.1:{HTTP_PORT}")
    headers = {"authorization": f"Bearer {keys['admin']}"}
    inp = httpclient.InferInput("input", [2, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((2, 64), np.float32))
    for binary in (False, True):
        out = httpclient.InferRequestedOutput("label", binary_data=binary)
        result = triton.infer("digits", [inp], outputs=[out], headers=headers)
        assert result.as_numpy("label").shape == (2,)
        assert [o["name"] for o in result.get_response()["outputs"]] == ["label"]


def test_hostile_corpus_answers_4xx_json_and_never_disturbs_valid_requests(hardened):
    from tests.hostile import CASES

    client, _, _, _ = hardened
    valid = v2(np.zeros((1, 64)))
    wrong = []
    for i, case in enumerate(CASES):
        pin = "" if case.version is None else f"/versions/{quote(case.version, safe='')}"
        path = f"/v2/models/digits{pin}/infer" if case.route == "v2" else f"/v1/models/digits{pin}:predict"
        headers = {"content-type": "application/json", "authorization": client.headers["authorization"],
                   **case.headers}
        status, body = _raw_post(path, case.body, headers)
        if status != case.expect or set(orjson.loads(body)) != {"error"}:
            wrong.append((case.name, status, body[:200]))
        if i % 10 == 9:
            assert client.post("/v2/models/digits/infer", json=valid).status_code == 200
    assert not wrong, wrong
    assert len(CASES) >= 80


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v2/models/digits/infer", 405),
        ("POST", "/v2/health/ready", 405),
        ("GET", "/nowhere", 404),
        ("POST", "/v2/models/digits/infer/", 404),
        ("POST", "/v2/models/digits/versions/a%2Fb/infer", 404),
        ("POST", "/v1/models/digits:explode", 404),
        ("POST", "/v2/models/digits/versions/%C2%B2/infer", 400),
        ("POST", f"/v2/models/digits/versions/{'9' * 5000}/infer", 400),
        ("GET", "/v2/models/nope", 404),
    ],
)
def test_every_route_answers_json_errors(hardened, method, path, status):
    client, _, _, _ = hardened
    r = client.request(method, path, content=b"{}")
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}, r.text


def test_body_limit_413_before_and_while_reading(hardened):
    big = b'{"inputs": [' + b" " * 10_000 + b"]}"
    r = httpx.post(f"{URL}/limited/v2/models/tiny/infer", content=big)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]

    def chunked():
        for _ in range(10):
            yield b" " * 1000

    r = httpx.post(f"{URL}/limited/v2/models/tiny/infer", content=chunked())
    assert r.status_code == 413


def test_rate_limit_429_with_retry_after(hardened):
    body = v2(np.zeros((1, 4)))
    time.sleep(2.5)  # let earlier tests' tokens refill: a full bucket holds the burst of 4
    with httpx.Client(base_url=f"{URL}/limited", timeout=30) as c:
        start = time.monotonic()
        codes = [c.post("/v2/models/tiny/infer", json=body) for _ in range(12)]
        elapsed = time.monotonic() - start
    ok = [r for r in codes if r.status_code == 200]
    limited = [r for r in codes if r.status_code == 429]
    assert len(ok) + len(limited) == 12 and codes[0].status_code == 200
    assert 4 <= len(ok) <= 4 + 2 * elapsed + 1, (len(ok), elapsed)  # burst + rate x time
    assert limited and int(limited[0].headers["retry-after"]) >= 1 and set(limited[0].json()) == {"error"}


def test_full_queue_is_503_json_with_retry_after(hardened):
    client, _, _, _ = hardened
    body = v2(np.zeros((1, 4)))
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda _: httpx.post(f"{URL}/v2/models/slowpoke/infer", json=body, timeout=30,
                                                       headers=dict(client.headers)), range(16)))
    codes = sorted(r.status_code for r in responses)
    overloaded = [r for r in responses if r.status_code == 503]
    assert codes.count(200) >= 1 and overloaded, codes
    assert all(set(r.json()) == {"error"} and int(r.headers["retry-after"]) >= 1 for r in overloaded)
    assert set(codes) <= {200, 503}, codes


def test_request_ids_are_returned_and_echoed(hardened):
    client, _, _, _ = hardened
    r = client.post("/v2/models/digits/infer", json={**v2(np.zeros((1, 64))), "id": "abc"},
                    headers={"x-request-id": "trace-42"})
    assert r.json()["id"] == "abc" and r.headers["x-request-id"] == "trace-42"  # one header, the caller's id
    assert client.post("/v2/models/digits/infer", json=v2(np.zeros((1, 64)))).headers.get("x-request-id")


def test_serving_replicas_never_import_torch(hardened):
    from ray import serve

    info = serve.get_app_handle("secure").replicas.remote().result()
    assert info["torch_imported"] is False


def test_killing_an_inference_replica_under_load_fails_no_request(hardened):
    """SIGKILL one of the two fused inference replicas while 4 clients keep sending."""
    client, _, _, _ = hardened

    body = v2(np.ones((1, 4)))
    results: list = []

    def load(stop):
        with httpx.Client(base_url=URL, timeout=60, headers=dict(client.headers)) as c:
            while not stop.is_set():
                try:
                    results.append((time.monotonic(), c.post("/v2/models/guarded/versions/1/infer", json=body).status_code))
                except httpx.HTTPError as exc:
                    results.append((time.monotonic(), repr(exc)))

    with background(*[load] * 4):
        time.sleep(2)
        before = replica_pids("secure", "guarded-v1")
        assert len(before) == 2, before
        victim = next(iter(before))
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # capacity is back when two live replicas answer again, one of them new
        while time.monotonic() < killed_at + 60:
            now = replica_pids("secure", "guarded-v1")
            if len(now) == 2 and victim not in now:
                break
            time.sleep(0.5)
        recovered_s = time.monotonic() - killed_at
        time.sleep(1)
    failed = [r for r in results if r[1] != 200]
    print(f"replica kill: {len(failed)} failed of {len(results)}; capacity back in {recovered_s:.1f} s")
    assert len(results) > 100
    assert len(failed) <= len(results) * 0.001, failed[:5]
    assert recovered_s < 30


def test_schemathesis_fuzzes_the_openapi_surface_without_5xx(hardened):
    """Every operation of /openapi.json, with generated valid and invalid requests: no 5xx but the
    documented 503 (a pinned failed version, a not-ready probe), every error a JSON {"error"},
    statuses and content types as documented; a valid request still answered afterwards."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

    def errors_are_json(ctx, response, case):
        status = response.status_code
        assert status < 500 or status == 503, f"{status}: {response.text[:300]}"
        if status >= 400:
            body = response.json()
            # 503 readiness answers are {"ready": false, ...}; every other error is {"error": ...}
            assert set(body) == {"error"} or (status == 503 and "ready" in body), body

    client, _, _, _ = hardened
    schema = schemathesis.openapi.from_url(f"{URL}/openapi.json")
    failures, calls = [], []
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def run(case):
            response = case.call(base_url=URL, headers=dict(client.headers), timeout=30)
            calls.append(response.status_code)
            try:
                case.validate_response(
                    response, checks=[errors_are_json, status_code_conformance, content_type_conformance])
            except Exception as exc:  # collect, report all at the end
                failures.append((op.path, op.method, response.status_code, str(exc)[:300]))

        run()
    assert not failures, failures[:5]
    assert len(calls) > 100 and any(code == 200 for code in calls) and any(code == 400 for code in calls)
    assert client.post("/v2/models/digits/infer", json=v2(np.zeros((1, 64)))).status_code == 200


def test_prometheus_endpoint_counts_real_requests(hardened):
    client, _, _, _ = hardened
    ok = {"app": "secure", "model": "digits", "protocol": "http_v2", "status": "200"}
    bad = {"app": "secure", "model": "digits", "error": "InvalidInputError"}
    stage = {"app": "secure", "model": "digits", "stage": "inference"}
    # fused: the ingress times what a request spent beyond the inference replica's own stages
    hop = {"app": "secure", "model": "guarded", "version": "1", "stage": "hop"}

    def counts() -> tuple:
        return (scrape(RAY_REQUESTS_TOTAL, **ok), scrape(RAY_ERRORS_TOTAL, **bad),
                scrape(RAY_STAGE_LATENCY_COUNT, **stage),
                scrape(RAY_STAGE_LATENCY_COUNT, **hop))

    # earlier tests' last requests may still be on their way (1 s flush + 1 s export): settle first
    before, previous = counts(), None
    while before != previous:
        time.sleep(2.5)
        previous, before = before, counts()
    for _ in range(7):
        assert client.post("/v2/models/digits/versions/1/infer", json=v2(np.zeros((1, 64)))).status_code == 200
    for _ in range(3):
        assert client.post("/v2/models/digits/versions/1/infer", content=b"{").status_code == 400
    for _ in range(4):
        assert client.post("/v2/models/guarded/versions/1/infer", json=v2(np.ones((1, 4)))).status_code == 200
    expected = (before[0] + 7, before[1] + 3, before[2] + 7, before[3] + 4)
    deadline = time.monotonic() + 30  # replicas flush every second, Ray exports every second here
    while True:
        now = counts()
        if now == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert now == expected
    assert scrape(RAY_STAGE_LATENCY_SUM, **hop) > 0
    assert scrape(RAY_VERSION_STATE, app="secure", model="guarded", version="2", state="failed") >= 1
