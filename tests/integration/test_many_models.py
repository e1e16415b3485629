"""Many models on few replicas, on real Ray Serve (issue 25).

One dynamic app: every model of the registry (30 linear models of ~2 MB, a corrupt one, and
one published while the app runs) from a pool of 2 replicas whose memory budget holds about 5
of them. Stock ``tritonclient`` (HTTP and gRPC) drives Triton's repository extension.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from maas_ray.registry import Registry
from maas_ray.serving.deploy import deploy, update_ingress_user_config
from maas_ray.serving.grpc import SERVICER_FUNCTION
from maas_ray.serving.metric_names import RAY_CACHE_EVICTIONS_TOTAL, RAY_CACHE_LOADS_TOTAL, RAY_REQUESTS_TOTAL
from tests.helpers import HTTP_PORT, linear_onnx, replica_pids, scrape, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
GRPC_PORT = int(os.environ.get("MAAS_TEST_GRPC_PORT", "9000"))
URL = f"http://127.0.0.1:{HTTP_PORT}"
APP = "many"
N_MODELS = 30
IN, OUT = 512, 1024  # 2.1 MB of weights: a session holds ~5 MB (mallinfo2, serving/pool.py)
BUDGET = 24 << 20  # about 5 of them per replica


def _seed(name: str) -> int:
    return 100 + int(name[1:]) if name[1:].isdigit() else 7


def _expected(seed: int, x: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(IN, OUT)).astype(np.float32)
    b = rng.normal(size=(OUT,)).astype(np.float32)
    return x @ w + b


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    from ray import serve

    root = str(tmp_path_factory.mktemp("many-registry"))
    reg = Registry(root)
    for i in range(N_MODELS):
        reg.publish(f"m{i:02d}", linear_onnx(IN, OUT, seed=100 + i))
    broken = reg.publish("broken", linear_onnx(IN, OUT, seed=7)).version
    onnx_file = Path(root) / "broken" / str(broken) / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-10] ^= 0xFF  # same size, wrong checksum
    onnx_file.write_bytes(bytes(data))
    args = {
        "registry_root": root,
        "dynamic": {"models": ["*"], "memory_budget_bytes": BUDGET, "load_timeout_s": 60, "refresh_interval_s": 1,
                    "failure_ttl_s": 30,
                    "pool": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}}},
        "ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
    }
    deploy({
        "http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
        "grpc_options": {"port": GRPC_PORT, "grpc_servicer_functions": [SERVICER_FUNCTION]},
        "applications": [{"name": APP, "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app",
                          "args": args, "logging_config": {"enable_access_log": False}}],
    })
    yield root
    serve.delete(APP)


def _infer(client: httpx.Client, model: str, x: np.ndarray, retries: int = 0) -> httpx.Response:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    for attempt in range(retries + 1):
        r = client.post(f"{URL}/v2/models/{model}/infer", json=body, timeout=120)
        if r.status_code != 503 or attempt == retries:
            return r
        time.sleep(float(r.headers.get("retry-after", "1")))
    return r


def _logits(r: httpx.Response) -> np.ndarray:
    out = r.json()["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def _pool_stats(models: list[str]) -> dict[str, dict]:
    """Each pool replica's cache stats, read from the replica (a call routed by each model's ID
    reaches the replica holding it)."""
    from ray import serve

    pool = serve.get_deployment_handle("ModelPool", APP)
    seen = {}
    for m in models:
        stats = pool.options(multiplexed_model_id=f"{m}:1").stats.remote().result(timeout_s=30)
        seen[stats["replica"]] = stats
    return seen


def test_thirty_models_on_two_replicas_answer_correctly_within_budget(served):
    names = [f"m{i:02d}" for i in range(N_MODELS)]
    order = names * 3
    random.Random(0).shuffle(order)
    x = np.random.default_rng(0).normal(size=(2, IN)).astype(np.float32)

    def one(name: str) -> tuple[str, int, np.ndarray]:
        with httpx.Client() as client:
            r = _infer(client, name, x)
            return name, r.status_code, _logits(r) if r.status_code == 200 else r.text

    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, order))
    failed = [(n, s, body) for n, s, body in results if s != 200]
    assert failed == []
    for name, _, logits in results:
        np.testing.assert_allclose(logits, _expected(_seed(name), x), rtol=1e-4, atol=1e-3)

    replicas = _pool_stats(names)
    assert len(replicas) == 2  # both replicas serve some of them
    for stats in replicas.values():
        assert stats["budget_bytes"] == BUDGET
        assert 0 < stats["held_bytes"] <= BUDGET
        assert stats["count"] < N_MODELS // 2
    assert sum(s["evictions"] for s in replicas.values()) > 0
    assert sum(s["loads"] for s in replicas.values()) >= N_MODELS

    wait_until(lambda: scrape(RAY_CACHE_EVICTIONS_TOTAL, app=APP) > 0, timeout_s=30)
    assert scrape(RAY_CACHE_LOADS_TOTAL, app=APP, outcome="ok") >= N_MODELS


def test_concurrent_first_requests_for_a_new_version_cause_one_load(served):
    reg = Registry(served)
    reg.publish("late", linear_onnx(IN, OUT, seed=55))  # published after the app started
    x = np.ones((1, IN), np.float32)
    before = {r: s["loads"] for r, s in _pool_stats(["m00", "m01", "m02", "m03"]).items()}

    def one(_: int) -> httpx.Response:
        with httpx.Client() as client:
            return _infer(client, "late", x, retries=2)  # up to refresh_interval_s before the app sees it

    with cf.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    assert [r.status_code for r in answers] == [200] * 12
    for r in answers:
        np.testing.assert_allclose(_logits(r), _expected(55, x), rtol=1e-4, atol=1e-3)
    after = _pool_stats(["late", "m00", "m01", "m02", "m03"])
    assert sum(s["loads"] for s in after.values()) - sum(before.get(r, 0) for r in after) == 1


def test_a_corrupt_version_fails_its_load_with_the_reason_and_the_rest_keep_serving(served):
    x = np.ones((1, IN), np.float32)
    with httpx.Client() as client:
        r = _infer(client, "broken", x)
        assert r.status_code == 503 and r.headers.get("retry-after")
        assert "checksum" in r.json()["error"] or "sha256" in r.json()["error"], r.text
        ok = _infer(client, "m07", x)
        assert ok.status_code == 200
        index = client.post(f"{URL}/v2/repository/index", json={}).json()
    row = next(r for r in index if r["name"] == "broken")
    assert row["state"] == "UNAVAILABLE" and row["reason"]


def test_stock_tritonclient_repository_index_load_unload_over_http_and_grpc(served):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    x = np.random.default_rng(3).normal(size=(1, IN)).astype(np.float32)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{HTTP_PORT}")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{GRPC_PORT}")

    names = {m["name"] for m in http.get_model_repository_index()}
    assert {f"m{i:02d}" for i in range(N_MODELS)} <= names and "broken" in names
    grpc_index = grpc.get_model_repository_index(as_json=True)["models"]
    assert {m["name"] for m in grpc_index} == names

    for client, mod, name in ((http, httpclient, "m11"), (grpc, grpcclient, "m12")):
        client.unload_model(name)
        assert not client.is_model_ready(name)
        inp = mod.InferInput("input", [1, IN], "FP32")
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException, match="unloaded"):
            client.infer(name, [inp])
        rows = [r for r in http.get_model_repository_index() if r["name"] == name]
        assert rows and all(r["state"] == "UNAVAILABLE" and r["reason"] == "unloaded" for r in rows)

        client.load_model(name)
        assert client.is_model_ready(name)
        ready = {r["name"] for r in http.get_model_repository_index() if r.get("state") == "READY"}
        assert name in ready
        got = client.infer(name, [inp]).as_numpy("logits")
        np.testing.assert_allclose(got, _expected(_seed(name), x), rtol=1e-4, atol=1e-3)

    with pytest.raises(InferenceServerException):
        http.load_model("no-such-model")
    with pytest.raises(InferenceServerException):
        grpc.load_model("broken")


def test_traffic_split_shadow_and_rollout_states_work_for_a_dynamic_model(served):
    from ray import serve

    reg = Registry(served)
    for seed in (201, 202):
        reg.publish("split", linear_onnx(IN, OUT, seed=seed))
    reg.set_alias("split", "production", 1)
    x = np.ones((1, IN), np.float32)
    with httpx.Client() as client:
        first = _infer(client, "split", x, retries=3)  # the app sees it within refresh_interval_s
        assert first.status_code == 200 and first.json()["model_version"] == "1"  # the production alias

        current = serve.get_app_handle(APP).current_config.remote("split").result()
        assert current["states"]["split"] == {"1": "ready", "2": "ready"}  # what a rollout checks
        assert current["user_config"]["traffic"]["split"] == {"production": 1.0}

        update_ingress_user_config(APP, {"traffic": {"split": {"1": 1, "2": 1}},
                                         "shadow": {"split": {"version": "2", "share": 1.0}}})
        wait_until(lambda: serve.get_app_handle(APP).current_config.remote().result()["user_config"]["traffic"]
                   .get("split") == {"1": 1.0, "2": 1.0})
        seen = {}
        for _ in range(30):
            r = _infer(client, "split", x)
            assert r.status_code == 200
            version = r.json()["model_version"]
            np.testing.assert_allclose(_logits(r), _expected(200 + int(version), x), rtol=1e-4, atol=1e-3)
            seen[version] = seen.get(version, 0) + 1
        assert set(seen) == {"1", "2"}
    wait_until(lambda: scrape(RAY_REQUESTS_TOTAL, app=APP, model="split", version="2", protocol="shadow",
                              status="200") > 0, timeout_s=30)
    update_ingress_user_config(APP, {})


def test_a_pool_replica_killed_while_loading_loses_no_request_beyond_a_retry(served):
    x = np.ones((1, IN), np.float32)
    cold = [f"m{i:02d}" for i in range(20, 30)]
    victim = sorted(replica_pids(APP, "ModelPool"))[0]

    def one(name: str) -> tuple[str, int]:
        with httpx.Client() as client:
            r = _infer(client, name, x, retries=1)
            return name, r.status_code

    with cf.ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(one, n) for n in cold]
        time.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        results = [f.result() for f in futures]
    assert [s for _, s in results] == [200] * len(cold), results
    wait_until(lambda: len(replica_pids(APP, "ModelPool")) == 2 and victim not in replica_pids(APP, "ModelPool"),
               timeout_s=90)


def test_a_hot_version_is_held_by_more_replicas(served):
    """Its rate x pool time per request over the target utilization asks for 2 replicas: its
    calls rotate over two routing IDs, and the second lands on the other replica."""
    from ray import serve

    serve.delete(APP)
    args = {"registry_root": served, "ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
            "dynamic": {"models": ["m0*"], "memory_budget_bytes": BUDGET,
                        "hot": {"target_utilization": 0.01, "window_s": 2},
                        "pool": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}}}}
    deploy({"http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
            "applications": [{"name": APP, "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app",
                              "args": args, "logging_config": {"enable_access_log": False}}]})
    x = np.ones((1, IN), np.float32)

    def client_loop(_: int) -> list[int]:
        with httpx.Client() as client:
            return [_infer(client, "m03", x).status_code for _ in range(40)]

    with cf.ThreadPoolExecutor(6) as pool:
        codes = [c for batch in pool.map(client_loop, range(6)) for c in batch]
    assert set(codes) == {200}
    pool_handle = serve.get_deployment_handle("ModelPool", APP)
    holders = {}
    for routing in ("m03:1", "m03:1#1"):
        stats = pool_handle.options(multiplexed_model_id=routing).stats.remote().result(timeout_s=30)
        holders[stats["replica"]] = [e["key"] for e in stats["entries"]]
    assert len(holders) == 2, holders  # two replicas answered for the version's two routing IDs
    assert all("m03:1" in keys for keys in holders.values()), holders
