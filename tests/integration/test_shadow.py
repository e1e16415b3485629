"""Shadow traffic on the real app: callers get only the primary's answer; the candidate's
calls, errors and agreement reach Ray's Prometheus endpoint; the share changes live."""

import time

import httpx
import pytest

from maas_ray.serving.deploy import deploy
from maas_ray.serving.metric_names import RAY_REQUESTS_TOTAL, RAY_SHADOW_AGREEMENT_BUCKET, RAY_SHADOW_AGREEMENT_COUNT
from tests.helpers import HTTP_PORT, scrape

pytestmark = [pytest.mark.integration, pytest.mark.slow]
URL = f"http://127.0.0.1:{HTTP_PORT}"


def _config(registry_root, share):
    args = {
        "registry_root": registry_root,
        "models": [{
            "name": "digits", "placement": "ingress", "intra_op_threads": 1,
            "versions": [{"version": 1, "weight": 1}, {"version": 2, "weight": 0}],
            "shadow": {"version": 2, "share": 1.0},
        }],
        "ingress": {"ray_actor_options": {"num_cpus": 0.5}},
    }
    return {
        "http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
        "applications": [{
            "name": "shadowed", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app", "args": args,
            "deployments": [{"name": "Ingress", "user_config": {
                "traffic": {"digits": {"1": 1, "2": 0}}, "shadow": {"digits": {"version": 2, "share": share}}}}],
        }],
    }


def _shadow_counts():
    tags = {"app": "shadowed", "model": "digits", "version": "2"}
    return (scrape(RAY_REQUESTS_TOTAL, **tags, protocol="shadow", status="200"),
            scrape(RAY_SHADOW_AGREEMENT_COUNT, **tags),
            scrape(RAY_SHADOW_AGREEMENT_COUNT, **tags)
            - scrape(RAY_SHADOW_AGREEMENT_BUCKET, **tags, le="1e-06"))  # compared minus disagreed


def _wait_for(predicate, timeout_s=30.0):
    """Poll the endpoint until predicate(counts) (replicas flush every 1 s, Ray exports every 1 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = _shadow_counts()
        if predicate(counts) or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


def test_shadow_mirrors_live_traffic_and_the_share_changes_live(trained, registry_root, fresh_metrics_agent,
                                                              serve_cleanup):
    from ray import serve
    from sklearn.datasets import load_digits

    x, _ = load_digits(return_X_y=True)
    deploy(_config(registry_root, 1.0))
    pids = serve.get_app_handle("shadowed").replicas.remote().result()["ingress_pid"]
    with httpx.Client(base_url=URL, timeout=30) as client:
        for i in range(20):
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64],
                                "data": x[2 * i:2 * i + 2].reshape(-1).tolist()}]}
            r = client.post("/v2/models/digits/infer", json=body)
            assert r.status_code == 200 and r.headers["x-model-version"] == "1"  # callers see the primary only
        mirrored = _wait_for(lambda c: c[0] >= 20 and c[1] >= 40)
        assert mirrored[0] == 20 and mirrored[1] == 40  # every request mirrored; 2 items each compared
        assert mirrored[2] >= 36  # the fine-tuned candidate agrees with its parent on most digits

        deploy(_config(registry_root, 0.0))  # user_config only: reconfigured in place
        assert serve.get_app_handle("shadowed").replicas.remote().result()["ingress_pid"] == pids
        for i in range(10):
            assert client.post("/v2/models/digits/infer", json={"inputs": [{
                "name": "input", "datatype": "FP32", "shape": [1, 64], "data": x[i].tolist()}]}).status_code == 200
        time.sleep(2.5)  # one flush + one export: anything mirrored would show by now
        assert _shadow_counts() == mirrored  # nothing more was mirrored
