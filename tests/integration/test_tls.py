"""HTTPS on Serve's ingress with a throwaway CA, spoken by stock clients; and the payload log of
the same app (API keys on) written to JSONL files with redaction, no key in them.

The listener settings come from deployments/digits-cpu.yaml (its commented ``ssl_*`` lines
turned on with the test's files), so the test exercises what the YAMLs ship.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from maas_ray.registry import Registry
from maas_ray.serving.deploy import deploy
from tests.helpers import HTTP_PORT, create_key, linear_onnx, wait_until
from tests.helpers.tls import make_tls_files

pytestmark = [pytest.mark.integration]
HTTPS = f"https://127.0.0.1:{HTTP_PORT}"
YAML = Path(__file__).resolve().parents[2] / "deployments" / "digits-cpu.yaml"


@pytest.fixture(scope="module")
def tls_app(ray_cluster, registry_root, tmp_path_factory):
    from ray import serve

    files = make_tls_files(tmp_path_factory.mktemp("tls"))
    logs = tmp_path_factory.mktemp("payloads")
    reg = Registry(registry_root)
    reg.publish("tls-lin", linear_onnx(4, 3, seed=21))
    keys_file = str(tmp_path_factory.mktemp("tls-keys") / "keys.json")
    key = create_key(keys_file, "--name", "tls", "--all-models")

    config = yaml.safe_load(YAML.read_text().replace("  # ssl_", "  ssl_"))
    config["http_options"].update(port=HTTP_PORT, ssl_certfile=files.server_cert, ssl_keyfile=files.server_key)
    config.pop("grpc_options")  # plain text in Serve 2.60 (docs/security.md, "TLS"); test_grpc covers it
    app = config["applications"][0]
    app["name"] = "tlsapp"
    app["args"] = {
        "registry_root": registry_root,
        "auth": {"enabled": True, "keys_file": keys_file},
        "models": [{"name": "tls-lin", "placement": "ingress", "intra_op_threads": 1,
                    "versions": [{"version": "latest"}],
                    "payload_log": {"sink": f"file://{logs}", "redact": {"mask": ["logits"]}}}],
        "ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
    }
    deploy(config)
    client = httpx.Client(base_url=HTTPS, verify=ssl.create_default_context(cafile=files.ca), timeout=30,
                          headers={"authorization": f"Bearer {key}"})
    wait_until(lambda: client.get("/v2/health/ready").status_code == 200, timeout_s=60)
    yield files, client, key, logs
    client.close()
    serve.shutdown()


def _body(rows: int = 2) -> dict:
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) / 8
    return {"id": "tls-1", "inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 4],
                                       "data": x.ravel().tolist()}]}


def test_tritonclient_http_over_tls_with_the_ca(tls_app):
    import tritonclient.http as th

    files, _, key, _ = tls_app
    client = th.InferenceServerClient(f"127.0.0.1:{HTTP_PORT}", ssl=True, ssl_options={"ca_certs": files.ca})
    try:
        headers = {"authorization": f"Bearer {key}"}
        assert client.is_server_ready(headers=headers)
        inp = th.InferInput("input", [2, 4], "FP32")
        inp.set_data_from_numpy(np.ones((2, 4), np.float32))
        result = client.infer("tls-lin", [inp], headers=headers)
        assert result.as_numpy("logits").shape == (2, 3)
    finally:
        client.close()


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_app):
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{HTTPS}/v2/health/live", timeout=10)  # the system CAs only


def test_plain_http_on_the_tls_port_gets_no_answer(tls_app):
    with pytest.raises(httpx.HTTPError):
        r = httpx.get(f"http://127.0.0.1:{HTTP_PORT}/v2/health/live", timeout=10)
        # uvicorn may answer a plain request on a TLS socket with a bare 400; never with the route
        assert r.status_code != 200
        raise httpx.HTTPError(f"plain HTTP answered {r.status_code}")


def test_serve_does_not_ask_for_client_certificates(tls_app):
    """Serve 2.60 passes ssl_ca_certs to uvicorn but not ssl_cert_reqs, so uvicorn never asks
    for a client certificate: mTLS is not available from Serve (docs/security.md, "TLS"). When
    this test fails, Ray has added it: update the docs and the YAMLs."""
    files, client, _, _ = tls_app
    assert client.get("/v2/health/live").status_code == 200  # no client certificate sent
    with_cert = ssl.create_default_context(cafile=files.ca)
    with_cert.load_cert_chain(files.client_cert, files.client_key)
    assert httpx.get(f"{HTTPS}/v2/health/live", verify=with_cert, timeout=10).status_code == 200


def test_payload_log_has_the_tensors_and_never_the_key(tls_app):
    _, client, key, logs = tls_app
    r = client.post("/v2/models/tls-lin/infer", json=_body(), headers={"x-request-id": "payload-1"})
    assert r.status_code == 200, r.text
    r = client.post("/v1/models/tls-lin:predict", json={"instances": [[1, 2, 3, 4]]},
                    headers={"x-request-id": "payload-2"})
    assert r.status_code == 200, r.text

    def events() -> list[dict]:
        return [json.loads(line) for p in logs.glob("*.jsonl") for line in p.read_text().splitlines()]

    wait_until(lambda: len([e for e in events() if e["id"].startswith("payload-")]) >= 4, timeout_s=30)
    mine = {(e["id"], e["type"].rsplit(".", 1)[1]): e for e in events() if e["id"].startswith("payload-")}
    request = mine[("payload-1", "request")]["data"]
    assert request["inputs"][0]["shape"] == [2, 4] and request["parameters"] == {"protocol": "http_v2", "status": 200}
    response = mine[("payload-1", "response")]["data"]
    assert response["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [2, 3], "data": "***"}]
    assert mine[("payload-2", "request")]["data"]["parameters"]["protocol"] == "http_v1"
    raw = "".join(p.read_text() for p in logs.glob("*.jsonl"))
    assert key not in raw and key[:12] not in raw and "authorization" not in raw.lower()
