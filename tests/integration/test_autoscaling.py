"""Serve autoscaling of an inference deployment under real HTTP load (short delays via env + config)."""

import time

import httpx
import numpy as np
import pytest

from maas_ray.registry import Registry
from maas_ray.serving.deploy import deploy
from tests.helpers import HTTP_PORT, background, linear_onnx

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PORT = HTTP_PORT
URL = f"http://127.0.0.1:{PORT}"


def _running(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def test_inference_scales_up_under_load_and_back_down_when_idle(ray_cluster, registry_root, serve_cleanup):
    Registry(registry_root).publish("scaler", linear_onnx(4, 3))
    args = {
        "registry_root": registry_root,
        "models": [{
            "name": "scaler",
            "placement": "fused",
            "versions": [{"version": 1}],
            # a long batch wait keeps requests in flight, so load shows up as ongoing requests
            # (forced on: a model this small skips the batch queue, and with it the wait)
            "batching": {"max_batch_size": 64, "batch_wait_timeout_s": 0.05, "enabled": True},
            "inference": {
                "ray_actor_options": {"num_cpus": 0.25},
                "autoscaling_config": {
                    "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2,
                    "upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_period_s": 2,
                    "metrics_interval_s": 0.5,  # deprecated knob, but its default (10) must stay < look_back
                },
            },
        }],
        "ingress": {"ray_actor_options": {"num_cpus": 0.25}},
    }
    deploy({
        "http_options": {"host": "127.0.0.1", "port": PORT},
        "applications": [{"name": "scale", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app", "args": args}],
    })
    assert _running("scale", "scaler-v1") == 1

    failures = []
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": np.ones(4).tolist()}]}

    def load(stop):
        with httpx.Client(base_url=URL, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v2/models/scaler/infer", json=body)
                if r.status_code != 200:
                    failures.append(r.text)

    peak, deadline = 1, time.monotonic() + 60
    with background(*[load] * 12):
        while time.monotonic() < deadline and peak < 2:
            peak = max(peak, _running("scale", "scaler-v1"))
            time.sleep(0.5)
    assert peak >= 2, "inference deployment did not scale up under load"
    assert not failures, failures[:3]

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _running("scale", "scaler-v1") > 1:
        time.sleep(0.5)
    assert _running("scale", "scaler-v1") == 1, "inference deployment did not scale back down when idle"
