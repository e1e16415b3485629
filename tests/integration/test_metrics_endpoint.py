"""ServingMetrics in a real Ray actor, scraped from the node's real Prometheus endpoint.

Ray exports every ``RAY_metrics_report_interval_ms`` (10 s by default, floored at 1 s), so
the test polls with a deadline of a few intervals; the suite's TEST_ENV sets it to 1 s.
The app label is unique per run: counters in the shared Ray instance are cumulative.
"""

import bisect
import time
import urllib.request
import uuid

import pytest

from maas_ray.serving.metric_names import (
    RAY_BATCH_SIZE_BUCKET,
    RAY_BATCH_SIZE_COUNT,
    RAY_BATCH_SIZE_SUM,
    RAY_ERRORS_TOTAL,
    RAY_IN_FLIGHT,
    RAY_REQUEST_LATENCY_BUCKET,
    RAY_REQUEST_LATENCY_COUNT,
    RAY_REQUESTS_TOTAL,
    RAY_STAGE_LATENCY_BUCKET,
    RAY_STAGE_LATENCY_SUM,
    RAY_VERSION_STATE,
)
from maas_ray.serving.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, bucket_midpoints

pytestmark = pytest.mark.integration

OK, NOT_FOUND, BAD_INPUT = 25, 3, 2
STAGES = {"decode": 0.0002, "queue": 0.00001, "inference": 0.003, "encode": 0.0001}
BATCHES = (1, 4, 4, 32)


def _recorder_class():
    import ray

    @ray.remote(num_cpus=0)
    class Recorder:
        def __init__(self, app: str) -> None:
            from maas_ray.serving.metrics import ServingMetrics

            self.metrics = ServingMetrics(app, flush_interval_s=0.2)
            self.metrics.start()

        def record_many_models(self, n: int) -> None:
            """One request with four stages for each of ``n`` models (a many-models app)."""
            for i in range(n):
                self.metrics.request_finished(f"model-{i}", 1, "http_v2", 200, None, 0.003, STAGES)
            self.metrics.flush()

        def record(self) -> None:
            m = self.metrics
            for _ in range(OK + NOT_FOUND + BAD_INPUT + 2):
                m.request_started("digits")
            for _ in range(OK):
                m.request_finished("digits", 1, "http_v2", 200, None, 0.003, STAGES)
            for _ in range(NOT_FOUND):
                m.request_finished("digits", None, "http_v1", 404, "ModelNotFoundError", 0.0002)
            for _ in range(BAD_INPUT):
                m.request_finished("digits", 1, "http_v2", 400, "InvalidInputError", 0.0004)
            for size in BATCHES:
                m.batch("digits", 1, size)
            m.version_state("digits", 1, "ready")
            m.version_state("digits", 2, "failed")
            m.flush()

    return Recorder


def metrics_url() -> str:
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def scrape(url: str, app: str) -> dict:
    """{(name, frozenset(labels without Ray's own)): value} for one app's ray_maas_* samples."""
    from prometheus_client.parser import text_string_to_metric_families

    ray_labels = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId"}
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_maas_") and s.labels.get("app") == app:
                labels = frozenset((k, v) for k, v in s.labels.items()
                                   if k not in ray_labels and not k.startswith("otel_"))
                key = (s.name, labels)
                samples[key] = samples.get(key, 0.0) + s.value  # summed over processes
    return samples


def midpoint(value: float, bounds: tuple) -> float:
    """What Ray's agent adds to a native histogram's _sum for ``value``: its bucket's midpoint."""
    return bucket_midpoints(bounds)[bisect.bisect_left(bounds, value)]


def expected(app: str) -> dict:
    def key(name, **labels):
        return name, frozenset({"app": app, "model": "digits", **labels}.items())

    ok = {"version": "1", "protocol": "http_v2", "status": "200"}
    want = {
        key(RAY_REQUESTS_TOTAL, **ok): OK,
        key(RAY_REQUESTS_TOTAL, version="none", protocol="http_v1", status="404"): NOT_FOUND,
        key(RAY_REQUESTS_TOTAL, version="1", protocol="http_v2", status="400"): BAD_INPUT,
        key(RAY_ERRORS_TOTAL, version="none", error="ModelNotFoundError"): NOT_FOUND,
        key(RAY_ERRORS_TOTAL, version="1", error="InvalidInputError"): BAD_INPUT,
        key(RAY_IN_FLIGHT): 2,
        key(RAY_REQUEST_LATENCY_BUCKET, **ok, le="0.0025"): 0,
        key(RAY_REQUEST_LATENCY_BUCKET, **ok, le="0.005"): OK,
        key(RAY_REQUEST_LATENCY_BUCKET, **ok, le="+Inf"): OK,
        key(RAY_REQUEST_LATENCY_COUNT, **ok): OK,
        key(RAY_REQUEST_LATENCY_BUCKET, version="none", protocol="http_v1", status="404",
            le="0.00025"): NOT_FOUND,
        key(RAY_STAGE_LATENCY_BUCKET, version="1", stage="inference", le="0.0025"): 0,
        key(RAY_STAGE_LATENCY_BUCKET, version="1", stage="inference", le="0.005"): OK,
        key(RAY_STAGE_LATENCY_BUCKET, version="1", stage="queue", le="0.0001"): OK,
        key(RAY_BATCH_SIZE_BUCKET, version="1", le="1.0"): 1,
        key(RAY_BATCH_SIZE_BUCKET, version="1", le="4.0"): 3,
        key(RAY_BATCH_SIZE_BUCKET, version="1", le="16.0"): 3,
        key(RAY_BATCH_SIZE_BUCKET, version="1", le="32.0"): 4,
        key(RAY_BATCH_SIZE_COUNT, version="1"): len(BATCHES),
        key(RAY_BATCH_SIZE_SUM, version="1"): sum(midpoint(b, BATCH_BUCKETS) for b in BATCHES),
        key(RAY_VERSION_STATE, version="1", state="ready"): 1,
        key(RAY_VERSION_STATE, version="1", state="failed"): 0,
        key(RAY_VERSION_STATE, version="2", state="failed"): 1,
        key(RAY_VERSION_STATE, version="2", state="ready"): 0,
    }
    return want


def run_scenario() -> None:
    import ray

    app = f"metrics-test-{uuid.uuid4().hex[:8]}"
    recorder = _recorder_class().remote(app)
    try:
        ray.get(recorder.record.remote())
        url, want = metrics_url(), expected(app)
        interval_s = max(ray._config.metrics_report_interval_ms(), 1000) / 1000
        deadline = time.monotonic() + 3 * interval_s + 10
        got: dict = {}
        while time.monotonic() < deadline:
            got = scrape(url, app)
            if all(k in got for k in want):
                break
            time.sleep(0.25)
        missing = [k for k in want if k not in got]
        assert not missing, f"not exported from {url} within the deadline: {missing}"
        assert {k: got[k] for k in want} == pytest.approx(want)
        sums = {k[1]: v for k, v in got.items() if k[0] == RAY_STAGE_LATENCY_SUM}
        assert sums[frozenset({"app": app, "model": "digits", "version": "1", "stage": "inference"}.items())] \
            == pytest.approx(OK * midpoint(STAGES["inference"], LATENCY_BUCKETS))  # Ray keeps bucket midpoints
    finally:
        ray.kill(recorder)


def test_metrics_reach_rays_prometheus_endpoint(ray_cluster):
    run_scenario()


def test_many_models_leave_room_for_new_series(ray_cluster):
    """Ray's agent keeps 2,000 label sets per metric name for its lifetime (OpenTelemetry's
    cardinality limit) and folds later ones into one overflow series. 40 models x 4 stages
    were 2,880 label sets of the stage-latency bucket gauge when each bucket was a gauge, and
    a new app's series were then never exported; as native histograms they are 160."""
    import ray

    crowd_app = f"metrics-crowd-{uuid.uuid4().hex[:8]}"
    crowd = _recorder_class().remote(crowd_app)
    try:
        ray.get(crowd.record_many_models.remote(40))
        url, last = metrics_url(), (RAY_STAGE_LATENCY_SUM, frozenset(
            {"app": crowd_app, "model": "model-39", "version": "1", "stage": "encode"}.items()))
        deadline = time.monotonic() + 30
        while last not in scrape(url, crowd_app) and time.monotonic() < deadline:
            time.sleep(0.25)  # the crowd's label sets reach the agent before the new app's
        assert last in scrape(url, crowd_app)
        run_scenario()
    finally:
        ray.kill(crowd)
