"""The ingress's ASGI app without Ray: route matching, errors, and the FastAPI fallback.

A fake Ingress stands in for the deployment (this module's only collaborator); the
real app over real Serve HTTP is covered in tests/integration/test_serving.py.
"""

import asyncio

import httpx
import pytest

from maas_ray.errors import ModelNotFoundError
from maas_ray.serving.http import HttpApp, build_api

pytestmark = pytest.mark.unit


class Overloaded(Exception):
    """Stands in for Serve's BackPressureError, whose handler Serve registers on the app."""


class FakeIngress:
    def __init__(self):
        self.calls = []

    async def infer_v2(self, model, version, body, headers):
        self.calls.append(("v2", model, version, body, headers.get("x-request-key")))
        if model == "missing":
            raise ModelNotFoundError(f"model {model!r} is not served here")
        if model == "busy":
            raise Overloaded()
        if model == "bug":
            raise RuntimeError("boom")
        return b'{"ok": true}', 3

    async def infer_v1(self, model, version, body, headers):
        self.calls.append(("v1", model, version, body, None))
        return b'{"predictions": [1]}', 2

    def metadata(self, model, version):
        if model == "missing":
            raise ModelNotFoundError(f"model {model!r} is not served here")
        return {"name": model, "version": version}

    def model_ready(self, model, version):
        return {"name": model, "ready": True}


def request(app, method, path, root_path="", **kw):
    async def go():
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, root_path + path, **kw)

    return asyncio.run(go())


@pytest.fixture
def app():
    ingress = FakeIngress()
    app = HttpApp(ingress, build_api(ingress))
    app.add_exception_handler(Overloaded, lambda request, exc: httpx_response_503())
    return app


def httpx_response_503():
    from starlette.responses import Response

    return Response("overloaded", status_code=503)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/models/m/infer", ("v2", "m", None)),
        ("/v2/models/m/versions/7/infer", ("v2", "m", "7")),
        ("/v2/models/m/versions/production/infer", ("v2", "m", "production")),
        ("/v1/models/m:predict", ("v1", "m", None)),
        ("/v1/models/m/versions/2:predict", ("v1", "m", "2")),
    ],
)
def test_infer_routes_reach_the_ingress_with_body_headers_and_version_header(app, path, expected):
    r = request(app, "POST", path, content=b"payload", headers={"x-request-key": "k"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["x-model-version"] in {"3", "2"}
    assert int(r.headers["content-length"]) == len(r.content)
    call = app.ingress.calls[-1]
    assert call[:3] == expected and call[3] == b"payload"
    if expected[0] == "v2":
        assert call[4] == "k"


def test_route_prefix_is_stripped_before_matching(app):
    r = request(app, "POST", "/v2/models/m/infer", root_path="/digits", content=b"{}")
    assert r.status_code == 200 and app.ingress.calls[-1][1] == "m"


def test_errors_are_json_with_their_status(app):
    r = request(app, "POST", "/v2/models/missing/infer", content=b"{}")
    assert (r.status_code, r.json()) == (404, {"error": "model 'missing' is not served here"})
    r = request(app, "POST", "/v2/models/bug/infer", content=b"{}")
    assert (r.status_code, r.json()) == (500, {"error": "internal error: RuntimeError: boom"})


def test_serve_registered_handlers_apply_on_the_infer_path(app):
    r = request(app, "POST", "/v2/models/busy/infer", content=b"{}")
    assert (r.status_code, r.text) == (503, "overloaded")


def test_other_routes_and_methods_go_to_fastapi(app):
    assert request(app, "GET", "/v2/health/live").json() == {"live": True}
    assert request(app, "GET", "/v2/models/m/versions/4").json() == {"name": "m", "version": "4"}
    r = request(app, "GET", "/v2/models/missing")
    assert (r.status_code, r.json()) == (404, {"error": "model 'missing' is not served here"})
    assert request(app, "GET", "/v2/models/m/infer").status_code == 405  # infer is POST only
    assert request(app, "POST", "/v2/nothing/here").status_code == 404
    assert app.ingress.calls == []
