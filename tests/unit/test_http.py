"""The ingress's ASGI app without Ray: route matching, limits, timeouts, JSON errors everywhere.

A fake :class:`~maas_ray.serving.core.InferenceService` stands in for the ingress core (this
module's only collaborator); the real
app over real Serve HTTP is covered in tests/integration/test_serving.py and test_hardening.py.
"""

import asyncio
from types import SimpleNamespace

import httpx
import numpy as np
import orjson
import pytest

from maas_ray.errors import ModelNotFoundError, RateLimitedError, UnauthenticatedError
from maas_ray.serving.config import Limits
from maas_ray.serving.http import HttpApp, build_api
from maas_ray.serving.limits import RequestDeadlines
from maas_ray.serving.types import RequestSchema

pytestmark = pytest.mark.unit
SCHEMA = RequestSchema({"input": frozenset({"FP32"})}, ("y",))
V2 = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]})


class FakeMetrics:
    def __init__(self):
        self.finished = []

    def request_started(self, model):
        pass

    def request_finished(self, model, version, protocol, status, error, total_s, stages=None):
        self.finished.append((model, version, protocol, status, error))


class FakeIngress:
    """An InferenceService: pick records (model, version, key), run adds strict."""

    key_header = "x-request-key"
    model_names = ["m", "slow"]

    def __init__(self, limits=None):
        self.limits = limits or Limits(max_body_bytes=2048, request_timeout_s=0.5)
        self.metrics = FakeMetrics()
        self.deadlines = RequestDeadlines(self.limits.request_timeout_s, check_interval_s=0.05)
        self.calls = []

    def admit(self, api_key, client, model, *, admin=False):
        if api_key == "bad":
            raise UnauthenticatedError("unknown API key")
        if api_key == "greedy":
            raise RateLimitedError("over the rate limit", 2.5)

    async def pick(self, model, version, key):
        self.calls.append((model, version, key, None))
        if model == "missing":
            raise ModelNotFoundError(f"model {model!r} is not served here")
        if model == "bug":
            raise RuntimeError("boom")
        return SimpleNamespace(number=3, schema=SCHEMA)

    async def run(self, model, slot, tensors, strict, decode_s=0.0, *, request_id=None, protocol=None):
        self.calls[-1] = self.calls[-1][:3] + (strict,)
        if model == "hang":
            await asyncio.sleep(5)
        if model == "slow":
            watchdog = asyncio.get_running_loop().create_task(self.deadlines.watch_forever())
            try:
                await asyncio.sleep(5)
            finally:
                watchdog.cancel()
        y = tensors["input"].sum(axis=1)
        return SimpleNamespace(version=slot.number, outputs={"y": y}, stages={"inference": 0.001},
                               after_response=None)

    async def metadata(self, model, version):
        if model == "missing":
            raise ModelNotFoundError(f"model {model!r} is not served here")
        return {"name": model, "version": version}

    async def model_ready(self, model, version):
        return {"name": model, "ready": model != "cold"}

    async def server_ready(self):
        return True

    def server_metadata(self):
        return {"name": "maas-ray", "version": "0", "extensions": []}

    async def index(self, ready=False):
        return [{"name": "m", "version": "1", "state": "READY", "reason": ""}]


def request(app, method, path, root_path="", **kw):
    async def go():
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, root_path + path, **kw)

    return asyncio.run(go())


@pytest.fixture
def app():
    ingress = FakeIngress()
    return HttpApp(ingress, build_api(ingress))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/models/m/infer", ("m", None, "k", True)),
        ("/v2/models/m/versions/7/infer", ("m", "7", "k", True)),
        ("/v2/models/m/versions/production/infer", ("m", "production", "k", True)),
    ],
)
def test_v2_routes_reach_the_ingress_with_version_and_sticky_key(app, path, expected):
    r = request(app, "POST", path, content=V2, headers={"x-request-key": "k", "x-request-id": "rid-1"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["x-model-version"] == "3"  # x-request-id: Serve's middleware adds it (integration)
    assert int(r.headers["content-length"]) == len(r.content)
    assert r.json()["outputs"][0]["data"] == [3.0]
    assert app.ingress.calls[-1] == expected
    assert app.ingress.metrics.finished[-1] == ("m", 3, "http_v2", 200, None)


def test_v1_route_decodes_non_strict(app):
    r = request(app, "POST", "/v1/models/m/versions/2:predict", content=b'{"instances": [[1, 2]]}')
    assert r.status_code == 200 and r.json()["predictions"] == [3.0]
    assert app.ingress.calls[-1] == ("m", "2", None, False)


def test_route_prefix_is_stripped_before_matching(app):
    r = request(app, "POST", "/v2/models/m/infer", root_path="/digits", content=V2)
    assert r.status_code == 200 and app.ingress.calls[-1][0] == "m"


def test_binary_outputs_set_the_header_length(app):
    body = orjson.dumps({**orjson.loads(V2), "outputs": [{"name": "y", "parameters": {"binary_data": True}}]})
    r = request(app, "POST", "/v2/models/m/infer", content=body)
    length = int(r.headers["inference-header-content-length"])
    header = orjson.loads(r.content[:length])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 4
    assert np.frombuffer(r.content[length:], "<f4").tolist() == [3.0]
    assert r.headers["content-type"] == "application/octet-stream"


def test_errors_are_json_with_their_status_and_counted(app):
    r = request(app, "POST", "/v2/models/missing/infer", content=V2)
    assert (r.status_code, r.json()) == (404, {"error": "model 'missing' is not served here"})
    r = request(app, "POST", "/v2/models/bug/infer", content=V2, headers={"x-request-id": "rid-9"})
    assert r.status_code == 500 and r.json() == {"error": "internal error (RuntimeError); request id rid-9"}
    assert "boom" not in r.text  # no internals leak
    r = request(app, "POST", "/v2/models/m/infer", content=b"{nope")
    assert r.status_code == 400 and set(r.json()) == {"error"}
    assert app.ingress.metrics.finished[-1][3:] == (400, "InvalidInputError")


def test_admission_runs_before_the_body_is_read(app):
    r = request(app, "POST", "/v2/models/m/infer", content=b"x" * 100_000, headers={"authorization": "Bearer bad"})
    assert (r.status_code, r.json()) == (401, {"error": "unknown API key"})
    r = request(app, "POST", "/v2/models/m/infer", content=V2, headers={"x-api-key": "greedy"})
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert app.ingress.calls == []


def test_body_limit_from_content_length_and_while_reading_chunks(app):
    r = request(app, "POST", "/v2/models/m/infer", content=b" " * 4096)
    assert r.status_code == 413 and "max_body_bytes=2048" in r.json()["error"]

    async def chunks():
        for _ in range(8):
            yield b" " * 512

    r = request(app, "POST", "/v2/models/m/infer", content=chunks())
    assert r.status_code == 413
    r = request(app, "POST", "/v2/models/m/infer", content=V2, headers={"content-length": "²".encode()})
    assert r.status_code == 400
    assert app.ingress.calls == []


def test_request_timeout_is_504(app):
    r = request(app, "POST", "/v2/models/slow/infer", content=V2)
    assert r.status_code == 504 and "request_timeout_s=0.5" in r.json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v2/models/m/infer", 405),
        ("POST", "/v2/health/live", 405),
        ("GET", "/nowhere", 404),
        ("POST", "/v2/models/m/infer/", 404),
        ("POST", "/v1/models/m:explain", 404),
        ("GET", "/v2/models/missing", 404),
    ],
)
def test_every_other_route_answers_json_errors(app, method, path, status):
    r = request(app, method, path)
    assert r.status_code == status and set(r.json()) == {"error"}, r.text
    assert app.ingress.calls == []


def test_cold_routes(app):
    assert request(app, "GET", "/v2/health/live").json() == {"live": True}
    assert request(app, "GET", "/v2/models/m/versions/4").json() == {"name": "m", "version": "4"}
    cold = request(app, "GET", "/v2/models/cold/ready")
    assert cold.status_code == 503 and cold.json()["ready"] is False
    assert request(app, "POST", "/v2/repository/index").json()[0]["state"] == "READY"


def test_openapi_documents_the_whole_surface_including_infer_routes(app):
    spec = request(app, "GET", "/openapi.json").json()
    for path in ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer",
                 "/v1/models/{model}:predict", "/v2/health/ready", "/v2/repository/index"):
        assert path in spec["paths"], path
    infer = spec["paths"]["/v2/models/{model}/infer"]["post"]
    assert {"400", "401", "413", "429", "503", "504"} <= set(infer["responses"])
    model = next(p for p in infer["parameters"] if p["name"] == "model")
    assert model["schema"]["enum"] == ["m", "slow"]  # the served models


def test_a_request_cancelled_mid_inference_is_counted_as_499(app):
    """The client went away: the in-flight gauge must come down, with the request as 499."""
    async def go():
        scope = {"type": "http", "method": "POST", "path": "/v2/models/hang/infer", "root_path": "",
                 "headers": [(b"content-type", b"application/json")], "query_string": b""}
        body = iter([{"type": "http.request", "body": V2, "more_body": False}])

        async def receive():
            return next(body, {"type": "http.disconnect"})

        async def send(message):
            pass

        task = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert app.ingress.metrics.finished == [("hang", None, "http_v2", 499, "ClientDisconnected")]


def test_a_grpc_infer_cancelled_or_timed_out_is_counted_like_http():
    """The same ingress behind gRPC: a cancelled RPC is 499, one past the timeout is 504."""
    from tritonclient.grpc import service_pb2

    from maas_ray.serving.grpc import GrpcService

    class Context:
        code = details = None

        def invocation_metadata(self):
            return ()

        def peer(self):
            return "ipv4:127.0.0.1:5000"

        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

    def rpc(model):
        req = service_pb2.ModelInferRequest(model_name=model)
        req.inputs.add(name="input", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([1, 2])
        return req

    core = FakeIngress()
    ingress = GrpcService(core)

    async def cancelled():
        task = asyncio.ensure_future(ingress.ModelInfer(rpc("hang"), Context()))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    context = Context()
    asyncio.run(ingress.ModelInfer(rpc("slow"), context))
    assert context.code.name == "DEADLINE_EXCEEDED" and "request_timeout_s=0.5" in context.details
    assert core.metrics.finished == [("hang", None, "grpc", 499, "ClientDisconnected"),
                                     ("slow", None, "grpc", 504, "RequestTimeoutError")]
