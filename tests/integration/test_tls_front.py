"""``maas tls-front`` (the real CLI and the HAProxy that ships with ray[serve]) in front of a real
Serve app: gRPC and HTTP over mutual TLS with the stock tritonclient clients and the stock
``openai`` client (a streamed completion from a generative version), and what is refused.

The app has the listeners of deployments/*.yaml (HTTP, and the OIP v2 gRPC servicer). The front
asks for client certificates signed by a throwaway CA (tests/helpers/tls.py). No maas route
echoes request headers, so the header rules (X-Forwarded-*, X-Client-Cert-Subject) are checked
against a tiny echo backend behind a second front: HAProxy is what sets and strips them, whatever
the backend is.
"""

from __future__ import annotations

import os
import ssl

import httpx
import numpy as np
import pytest

from maas_ray.registry import Registry
from maas_ray.serving.deploy import deploy
from maas_ray.serving.grpc import SERVICER_FUNCTION
from tests.helpers import HTTP_PORT, linear_onnx, wait_until
from tests.helpers.lm import publish_tiny_lm
from tests.helpers.tls import make_tls_files
from tests.helpers.tls_front import free_port, header_echo, tls_front


def _haproxy_missing() -> str:
    from maas_ray.cli.tls_front import haproxy_binary
    from maas_ray.errors import DependencyError

    try:
        haproxy_binary()
    except DependencyError as exc:
        return str(exc)
    return ""


pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(bool(_haproxy_missing()), reason=_haproxy_missing() or "-")]
GRPC_PORT = int(os.environ.get("MAAS_TEST_GRPC_PORT", "9000"))
SEED = 31


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("front-tls"))


@pytest.fixture(scope="module")
def front(ray_cluster, registry_root, files):
    """The app on Serve's plain ports, and the front on free ports with client certificates required."""
    from ray import serve

    Registry(registry_root).publish("front-lin", linear_onnx(4, 3, seed=SEED))
    publish_tiny_lm(Registry(registry_root), "front-lm", seed=SEED)
    deploy({
        "http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
        "grpc_options": {"port": GRPC_PORT, "grpc_servicer_functions": [SERVICER_FUNCTION]},
        "applications": [{
            "name": "frontapp", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app",
            "logging_config": {"enable_access_log": False},
            "args": {"registry_root": registry_root,
                     "models": [{"name": "front-lin", "placement": "ingress", "intra_op_threads": 1,
                                 "versions": [{"version": "latest"}]},
                                {"name": "front-lm", "placement": "ingress", "intra_op_threads": 1,
                                 "versions": [{"version": "latest"}]}],
                     "ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}},
        }],
    })
    wait_until(lambda: httpx.get(f"http://127.0.0.1:{HTTP_PORT}/v2/health/ready", timeout=5).status_code == 200,
               timeout_s=60)
    https, grpcs = free_port(), free_port()
    try:
        with tls_front("--cert", files.server_cert, "--key", files.server_key, "--client-ca", files.ca,
                       "--listen-host", "127.0.0.1", "--https-port", str(https), "--grpc-port", str(grpcs),
                       "--http-backend", f"127.0.0.1:{HTTP_PORT}", "--grpc-backend", f"127.0.0.1:{GRPC_PORT}",
                       ports=(https, grpcs)):
            yield https, grpcs
    finally:
        serve.shutdown()


def _x() -> np.ndarray:
    return np.arange(8, dtype=np.float32).reshape(2, 4) / 8


def _expected() -> np.ndarray:
    rng = np.random.default_rng(SEED)  # linear_onnx's weights
    w = rng.normal(size=(4, 3)).astype(np.float32)
    b = rng.normal(size=(3,)).astype(np.float32)
    return _x() @ w + b


def _grpc_infer(port: int, files, *, ssl_on: bool = True, client_cert: bool = True) -> np.ndarray:
    import tritonclient.grpc as tg

    kwargs = {}
    if ssl_on:
        kwargs = {"ssl": True, "root_certificates": files.ca}
        if client_cert:
            kwargs.update(private_key=files.client_key, certificate_chain=files.client_cert)
    client = tg.InferenceServerClient(f"127.0.0.1:{port}", **kwargs)
    try:
        inp = tg.InferInput("input", [2, 4], "FP32")
        inp.set_data_from_numpy(_x())
        return client.infer("front-lin", [inp], client_timeout=20).as_numpy("logits")
    finally:
        client.close()


def _http_infer(port: int, files, *, client_cert: bool = True) -> np.ndarray:
    import tritonclient.http as th

    options = {"ca_certs": files.ca}
    if client_cert:
        options.update(certfile=files.client_cert, keyfile=files.client_key)
    client = th.InferenceServerClient(f"127.0.0.1:{port}", ssl=True, ssl_options=options, network_timeout=20)
    try:
        inp = th.InferInput("input", [2, 4], "FP32")
        inp.set_data_from_numpy(_x())
        return client.infer("front-lin", [inp]).as_numpy("logits")
    finally:
        client.close()


def test_grpc_over_mutual_tls_answers(front, files):
    _, grpcs = front
    np.testing.assert_allclose(_grpc_infer(grpcs, files), _expected(), rtol=1e-5, atol=1e-5)


def test_grpc_without_a_client_certificate_is_refused(front, files):
    from tritonclient.utils import InferenceServerException

    _, grpcs = front
    # Refused in the handshake (alert: certificate required): the channel never connects.
    with pytest.raises(InferenceServerException, match="failed to connect to all addresses"):
        _grpc_infer(grpcs, files, client_cert=False)


def test_plain_text_grpc_on_the_tls_port_is_refused(front, files):
    from tritonclient.utils import InferenceServerException

    _, grpcs = front
    with pytest.raises(InferenceServerException, match="failed to connect to all addresses"):
        _grpc_infer(grpcs, files, ssl_on=False)


def test_http_over_mutual_tls_answers(front, files):
    https, _ = front
    np.testing.assert_allclose(_http_infer(https, files), _expected(), rtol=1e-5, atol=1e-5)


def test_http_without_a_client_certificate_is_refused(front, files):
    https, _ = front
    with pytest.raises(OSError) as refused:  # the TLS 1.3 alert, or the reset if it lands first
        _http_infer(https, files, client_cert=False)
    assert isinstance(refused.value, ConnectionResetError) or "CERTIFICATE_REQUIRED" in str(refused.value)
    no_cert = ssl.create_default_context(cafile=files.ca)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"https://127.0.0.1:{https}/v2/health/live", verify=no_cert, timeout=10)


def test_plain_http_on_the_tls_port_is_refused(front):
    https, _ = front
    with pytest.raises(httpx.HTTPError):
        r = httpx.get(f"http://127.0.0.1:{https}/v2/health/live", timeout=10)
        raise AssertionError(f"plain HTTP answered {r.status_code}")


def test_the_openai_client_streams_over_mutual_tls(front, files):
    """The stock openai client, given an httpx client with the CA and a client certificate,
    streams a completion through the front; without the certificate it cannot connect."""
    import openai

    https, _ = front
    context = ssl.create_default_context(cafile=files.ca)
    context.load_cert_chain(files.client_cert, files.client_key)
    with httpx.Client(verify=context, timeout=30) as http:
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{https}/v1", api_key="unused", http_client=http,
                               max_retries=0)
        stream = client.completions.create(model="front-lm", prompt="the cat", max_tokens=8, temperature=0,
                                           stream=True)
        chunks = [c.choices[0] for c in stream]
        whole = client.completions.create(model="front-lm", prompt="the cat", max_tokens=8, temperature=0)
    assert chunks[-1].finish_reason in ("stop", "length")
    assert "".join(c.text for c in chunks) == whole.choices[0].text
    assert whole.usage.completion_tokens >= 1
    with httpx.Client(verify=ssl.create_default_context(cafile=files.ca), timeout=10) as no_cert:
        bare = openai.OpenAI(base_url=f"https://127.0.0.1:{https}/v1", api_key="unused", http_client=no_cert,
                             max_retries=0)
        with pytest.raises(openai.APIConnectionError):
            bare.completions.create(model="front-lm", prompt="the cat", max_tokens=4)


def test_the_front_sets_forwarding_and_certificate_headers_and_drops_the_clients(files):
    https = free_port()
    with header_echo() as echo, tls_front(
            "--cert", files.server_cert, "--key", files.server_key, "--client-ca", files.ca,
            "--listen-host", "127.0.0.1", "--https-port", str(https), "--no-grpc",
            "--http-backend", f"127.0.0.1:{echo}", ports=(https,)):
        context = ssl.create_default_context(cafile=files.ca)
        context.load_cert_chain(files.client_cert, files.client_key)
        forged = {"X-Client-Cert-Subject": "/CN=admin", "X-Forwarded-For": "10.6.6.6", "X-Forwarded-Proto": "http"}
        seen = httpx.get(f"https://127.0.0.1:{https}/anything", headers=forged, verify=context, timeout=10).json()
    assert seen["x-client-cert-subject"] == ["/CN=maas-test-client"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["https"]
