"""The integration tests' cluster settings, and probes of a live Ray / Serve."""

from __future__ import annotations

import io
import os
import time
from contextlib import redirect_stdout

from maas_ray.runtime import QUICK_TRAIN_REPORTS_ENV

# Serve's HTTP port in integration tests; set MAAS_TEST_HTTP_PORT to run two suites side by side.
HTTP_PORT = int(os.environ.get("MAAS_TEST_HTTP_PORT", "8000"))

# Shorten Ray's reaction times for tests (env vars are read when Ray starts; replicas and
# Train workers inherit them). Serve's autoscaler pushes metrics every 10 s by default.
TEST_ENV = {
    **QUICK_TRAIN_REPORTS_ENV,
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_DEDUP_LOGS": "1",
    # Ray exports metrics every 10 s by default (floored at 1 s); metrics tests poll for them.
    "RAY_metrics_report_interval_ms": "1000",
}


def wait_until(predicate, timeout_s: float = 30.0) -> None:
    """Poll ``predicate`` every 0.2 s; fail the test if it is not true within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def create_key(keys_file: str, *flags: str) -> str:
    """A new API key through the real CLI (`maas keys create`); returns the printed key."""
    from maas_ray.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["keys", "create", "--file", keys_file, *flags]) == 0
    return next(tok for tok in out.getvalue().split() if tok.startswith("mk_"))


def scrape(series: str, **labels: str) -> float:
    """Sum of one metric over every Ray process, from the node's real Prometheus endpoint."""
    import httpx
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = ray.nodes()[0]["MetricsExportPort"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == series and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def replica_pids(app: str, deployment: str) -> set:
    """The pids of a deployment's live replicas, from Ray's named actors (every replica, not the
    ones a handle's router happens to pick: 16 routed calls once all went to one of two)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    pids = set()
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(prefix):
            try:
                handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                pids.add(ray.get(handle.__ray_call__.remote(lambda _: os.getpid()), timeout=10))
            except Exception:  # the killed replica, until Serve removes it
                pass
    return pids
