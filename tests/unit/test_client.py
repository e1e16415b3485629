"""MaasClient's lifecycle, with a fake Serve handle (the calls themselves: test_serving.py)."""

import pytest

from maas_ray.serving.client import MaasClient

pytestmark = pytest.mark.unit


class FakeHandle:
    def __init__(self):
        self.shutdowns = 0

    def shutdown(self):
        self.shutdowns += 1


@pytest.fixture
def handle(monkeypatch):
    from ray import serve

    fake = FakeHandle()
    monkeypatch.setattr(serve, "get_app_handle", lambda app_name: fake)
    return fake


def test_close_stops_the_handles_router_once(handle):
    c = MaasClient("digits")
    c.close()
    c.close()
    assert handle.shutdowns == 1


def test_with_closes_and_a_closed_client_refuses_calls(handle):
    with MaasClient("digits") as c:
        pass
    assert handle.shutdowns == 1
    with pytest.raises(RuntimeError, match="closed"):
        c.infer("digits", {"input": [[0.0]]})
