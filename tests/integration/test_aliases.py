"""An app configured with aliases follows alias moves in the registry without a rebuild."""

import time

import httpx
import numpy as np
import pytest

from maas_ray.registry import Registry
from maas_ray.serving.deploy import deploy
from tests.helpers import HTTP_PORT, background, linear_onnx

pytestmark = [pytest.mark.integration, pytest.mark.slow]
URL = f"http://127.0.0.1:{HTTP_PORT}"


def test_traffic_follows_an_alias_move_after_loading_the_new_version(ray_cluster, registry_root, serve_cleanup):
    from ray import serve

    reg = Registry(registry_root)
    numbers = [reg.publish("follow", linear_onnx(4, 3, seed=10 + i)).version for i in range(3)]
    reg.set_alias("follow", "production", numbers[0])
    deploy({
        "http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
        "applications": [{"name": "follow", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app",
                          "args": {"registry_root": registry_root, "alias_poll_interval_s": 0.5,
                                   "models": [{"name": "follow", "versions": [{"version": "production"}]}],
                                   "ingress": {"ray_actor_options": {"num_cpus": 0.25}}}}],
    })
    pid = serve.get_app_handle("follow").replicas.remote().result()["ingress_pid"]
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": np.ones(4).tolist()}]}
    seen = []

    def load(stop):
        with httpx.Client(base_url=URL, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/v2/models/follow/infer", json=body)
                seen.append((r.status_code, r.headers.get("x-model-version")))
                time.sleep(0.01)

    with background(load):
        while not seen:
            time.sleep(0.05)
        for target in numbers[1:]:
            reg.set_alias("follow", "production", target)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and seen[-1][1] != str(target):
                time.sleep(0.2)
            assert seen[-1][1] == str(target), f"traffic did not follow production -> {target}"
    assert {status for status, _ in seen} == {200}, "a request failed while the alias moved"
    assert [v for _, v in seen] == sorted(v for _, v in seen)  # never back to an older version
    assert serve.get_app_handle("follow").replicas.remote().result()["ingress_pid"] == pid  # no rebuild
    meta = httpx.get(f"{URL}/v2/models/follow").json()
    assert meta["parameters"]["version"] == str(numbers[2])
