"""ServingMetrics' aggregation and flush with ray.util.metrics faked, plus the monitoring files.

The fakes record what Ray would receive (counter increments, gauge values per tag set);
the real export through Ray's metrics agent is tests/integration/test_metrics_endpoint.py.
"""

import json
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from maas_ray.serving import metrics as m
from maas_ray.serving.metric_names import (
    BATCH_SIZE,
    ERRORS,
    IN_FLIGHT,
    PAYLOAD_LOG_DROPPED,
    REQUEST_LATENCY,
    REQUESTS,
    SHADOW_AGREEMENT,
    SHADOW_DIFF,
    SHADOW_DROPPED,
    STAGE_LATENCY,
    VERSION_STATE,
)
from maas_ray.serving.metrics import LATENCY_BUCKETS, STAGES, ServingMetrics
from maas_ray.serving import metric_names as _names

# The generative versions' series (created with the others at the first flush).
GENERATIVE_METRICS = {
    _names.PROMPT_TOKENS, _names.COMPLETION_TOKENS, _names.GENERATIONS,
    _names.ENGINE_RUNNING, _names.ENGINE_WAITING, _names.ENGINE_KV_USAGE,
    _names.TIME_TO_FIRST_TOKEN, _names.INTER_TOKEN_LATENCY,  # native histograms
}

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deployments" / "monitoring"


class FakeMetric:
    registry: dict = {}

    def __init__(self, name, description="", tag_keys=None):
        self.name, self.tag_keys, self.values = name, tag_keys, {}
        self.calls = 0
        FakeMetric.registry[name] = self

    def _key(self, tags):
        assert set(tags) == set(self.tag_keys), (self.name, tags)
        assert all(isinstance(v, str) for v in tags.values())
        return tuple(sorted(tags.items()))


class FakeCounter(FakeMetric):
    def inc(self, value=1.0, tags=None):
        assert value > 0  # Ray's Counter.inc rejects 0
        self.calls += 1
        key = self._key(tags)
        self.values[key] = self.values.get(key, 0) + value


class FakeGauge(FakeMetric):
    def set(self, value, tags=None):
        self.calls += 1
        self.values[self._key(tags)] = value


class FakeHistogram(FakeMetric):
    def __init__(self, name, description="", boundaries=None, tag_keys=None):
        super().__init__(name, description, tag_keys)
        self.boundaries = boundaries

    def observe(self, value, tags=None):
        self.calls += 1
        self.values.setdefault(self._key(tags), []).append(value)


@pytest.fixture
def fake():
    FakeMetric.registry = {}
    return SimpleNamespace(Counter=FakeCounter, Gauge=FakeGauge, Histogram=FakeHistogram)


def value(name, **tags):
    return FakeMetric.registry[name].values.get(tuple(sorted(tags.items())))


def test_no_ray_objects_before_first_use(fake):
    sm = ServingMetrics("app", metrics_module=fake)
    sm.request_started("digits")
    assert FakeMetric.registry == {}  # constructing and counting in process touch no Ray object
    sm.request_finished("digits", 1, "http_v2", 200, None, 0.001)
    assert FakeMetric.registry == {}  # latencies too wait for the flush thread
    sm.flush()
    assert set(FakeMetric.registry) == {
        REQUESTS, ERRORS, IN_FLIGHT, VERSION_STATE,
        REQUEST_LATENCY, SHADOW_AGREEMENT, SHADOW_DROPPED, PAYLOAD_LOG_DROPPED,
        STAGE_LATENCY, BATCH_SIZE, SHADOW_DIFF,
        *GENERATIVE_METRICS,
    }
    assert all(isinstance(FakeMetric.registry[h], FakeHistogram) for h in (STAGE_LATENCY, BATCH_SIZE, SHADOW_DIFF))
    assert FakeMetric.registry[REQUESTS].calls == 1


def test_requests_errors_and_in_flight(fake):
    sm = ServingMetrics("app", metrics_module=fake)
    for _ in range(3):
        sm.request_started("digits")
    sm.request_finished("digits", 1, "http_v2", 200, None, 0.001)
    sm.request_finished("digits", None, "http_v1", 404, "ModelNotFoundError", 0.0002)
    sm.flush()
    req = {"app": "app", "model": "digits"}
    assert value(REQUESTS, **req, version="1", protocol="http_v2", status="200") == 1
    assert value(REQUESTS, **req, version="none", protocol="http_v1", status="404") == 1
    assert value(ERRORS, **req, version="none", error="ModelNotFoundError") == 1
    assert len(FakeMetric.registry[ERRORS].values) == 1  # the 200 is no error
    assert value(IN_FLIGHT, **req) == 1

    # Counters get deltas: only what happened since the last flush, and nothing when idle.
    sm.request_finished("digits", 1, "http_v2", 200, None, 0.001)
    sm.request_finished("digits", 1, "http_v2", 503, None, 0.001)
    sm.flush()
    calls = FakeMetric.registry[REQUESTS].calls
    sm.flush()
    assert FakeMetric.registry[REQUESTS].calls == calls
    assert value(REQUESTS, **req, version="1", protocol="http_v2", status="200") == 2
    assert value(ERRORS, **req, version="1", error="unknown") == 1
    assert value(IN_FLIGHT, **req) == -1  # started 3, finished 4


def test_unknown_model_names_share_one_label(fake):
    """Model names come from the URL: unserved ones must not create series without bound."""
    sm = ServingMetrics("app", models=["digits"], metrics_module=fake)
    for name in ("x1", "x2", "digits"):
        sm.request_started(name)
        sm.request_finished(name, None, "http_v2", 404, "ModelNotFoundError", 0.001)
    sm.flush()
    errors = FakeMetric.registry[ERRORS].values
    assert {dict(k)["model"]: v for k, v in errors.items()} == {m.UNKNOWN_MODEL: 2, "digits": 1}
    assert value(IN_FLIGHT, app="app", model=m.UNKNOWN_MODEL) == 0


def test_request_latency_is_one_native_observation_per_request(fake):
    sm = ServingMetrics("app", models=["digits"], metrics_module=fake)
    observations = [0.00005, 0.0001, 0.0003, 0.004, 1.0, 45.0]
    for s in observations:
        sm.request_finished("digits", 2, "http_v2", 200, None, s)
    sm.request_finished("other", None, "http_v1", 404, "ModelNotFoundError", 0.0002)
    assert FakeMetric.registry == {}  # nothing Ray-side on the request path
    sm.flush()
    tags = {"app": "app", "model": "digits", "version": "2", "protocol": "http_v2", "status": "200"}
    assert value(REQUEST_LATENCY, **tags) == observations
    assert value(REQUEST_LATENCY, app="app", model=m.UNKNOWN_MODEL, version="none",
                 protocol="http_v1", status="404") == [0.0002]
    assert FakeMetric.registry[REQUEST_LATENCY].boundaries == list(LATENCY_BUCKETS)
    sm.flush()
    assert FakeMetric.registry[REQUEST_LATENCY].calls == 7  # a flush re-records nothing


def test_request_latencies_are_interleaved_across_series_in_a_flush(fake):
    """An export that catches a flush part-way must see the 2xx and the 5xx series (the error
    rate guard's numerator and denominator) up to about the same request."""
    order = []

    class Recording(FakeHistogram):
        def observe(self, value, tags=None):
            order.append(tags["status"])
            super().observe(value, tags)

    sm = ServingMetrics("app", metrics_module=SimpleNamespace(Counter=FakeCounter, Gauge=FakeGauge, Histogram=Recording))
    for _ in range(4):
        sm.request_finished("digits", 1, "http_v2", 200, None, 0.001)
    sm.request_finished("digits", 1, "http_v2", 503, "ServiceUnavailableError", 0.001)
    sm.request_finished("digits", 1, "http_v2", 503, "ServiceUnavailableError", 0.001)
    sm.flush()
    assert order == ["200", "503", "200", "503", "200", "200"]


def test_a_flush_releases_the_gil_between_chunks_of_observations(fake, monkeypatch):
    """A flush observes one value per request while the event loop waits for the GIL: it
    sleeps after every FLUSH_YIELD_EVERY observations, every value still observed in order."""
    events = []

    class Recording(FakeHistogram):
        def observe(self, value, tags=None):
            events.append(("observe", tags["status"]))
            super().observe(value, tags)

    monkeypatch.setattr(m, "FLUSH_YIELD_EVERY", 2)
    monkeypatch.setattr(m.time, "sleep", lambda s: events.append(("sleep", s)))
    sm = ServingMetrics("app", metrics_module=SimpleNamespace(Counter=FakeCounter, Gauge=FakeGauge, Histogram=Recording))
    for status in (200, 200, 503, 200, 503):
        sm.request_finished("digits", 1, "http_v2", status, "x" if status >= 400 else None, 0.001)
    sm.flush()
    assert events == [("observe", "200"), ("observe", "503"), ("sleep", m.FLUSH_YIELD_S),
                      ("observe", "200"), ("observe", "503"), ("sleep", m.FLUSH_YIELD_S), ("observe", "200")]
    events.clear()
    monkeypatch.setattr(m, "FLUSH_YIELD_EVERY", 0)  # off: one burst
    for _ in range(5):
        sm.request_finished("digits", 1, "http_v2", 200, None, 0.001)
    sm.flush()
    assert events == [("observe", "200")] * 5


def test_latencies_beyond_the_buffer_are_dropped_and_logged(fake, caplog, monkeypatch):
    monkeypatch.setattr(m, "MAX_PENDING_LATENCIES", 3)
    sm = ServingMetrics("app", metrics_module=fake)
    for _ in range(5):
        sm.request_finished("digits", 1, "http_v2", 200, None, 0.001)
    sm.flush()
    tags = {"app": "app", "model": "digits", "version": "1", "protocol": "http_v2", "status": "200"}
    assert len(value(REQUEST_LATENCY, **tags)) == 3
    assert value(REQUESTS, **tags) == 5  # the counter still counts every request
    assert "2 request latencies over 3" in caplog.text
    sm.request_finished("digits", 1, "http_v2", 200, None, 0.001)  # the buffer empties at each flush
    sm.flush()
    assert len(value(REQUEST_LATENCY, **tags)) == 4


def test_a_failing_latency_observation_never_reaches_the_request_or_the_flush(fake, caplog):
    class Broken(FakeHistogram):
        def observe(self, value, tags=None):
            raise RuntimeError("metrics agent gone")

    sm = ServingMetrics("app", metrics_module=SimpleNamespace(Counter=FakeCounter, Gauge=FakeGauge, Histogram=Broken))
    sm.request_started("digits")
    sm.request_finished("digits", 1, "http_v2", 200, None, 0.001)
    sm.request_finished("digits", 1, "http_v2", 200, None, 0.001)
    sm.flush()  # does not raise, and the counters still go out
    sm.request_finished("digits", 1, "http_v2", 200, None, 0.001)
    sm.flush()
    assert value(REQUESTS, app="app", model="digits", version="1", protocol="http_v2", status="200") == 3
    assert caplog.text.count("recording request latencies failed") == 1  # at most once a minute


def buckets_of(values, bounds):
    """Per-bucket counts (+Inf last) of ``values`` as Prometheus counts them (``le`` inclusive)."""
    counts = [0] * (len(bounds) + 1)
    for v in values:
        counts[next((i for i, b in enumerate(bounds) if v <= b), len(bounds))] += 1
    return counts


def test_stage_histograms_send_each_value_once_at_its_buckets_midpoint(fake):
    """One native observation per counted value, in the value's bucket (le inclusive), at the
    midpoint Ray's agent records for that bucket."""
    sm = ServingMetrics("app", metrics_module=fake)
    observations = [0.00005, 0.0001, 0.0003, 0.004, 0.004, 1.0, 45.0]  # 0.0001 and 1.0 sit on a bound
    for s in observations:
        sm.request_finished("digits", 2, "http_v2", 200, None, s, {"inference": s})
    sm.flush()
    tags = {"app": "app", "model": "digits", "version": "2", "stage": "inference"}
    sent = value(STAGE_LATENCY, **tags)
    assert buckets_of(sent, LATENCY_BUCKETS) == buckets_of(observations, LATENCY_BUCKETS)
    assert set(sent) <= set(m.bucket_midpoints(LATENCY_BUCKETS))
    assert FakeMetric.registry[STAGE_LATENCY].boundaries == list(LATENCY_BUCKETS)
    sm.flush()
    assert len(value(STAGE_LATENCY, **tags)) == 7  # an idle series sends nothing more
    sm.request_finished("digits", 2, "http_v2", 200, None, 0.02, {"inference": 0.02})
    sm.flush()
    assert value(STAGE_LATENCY, **tags)[7:] == [pytest.approx((0.01 + 0.025) / 2)]


def test_bucket_midpoints_are_the_ones_rays_agent_records():
    """Ray's OpenTelemetryMetricRecorder rebuilds observations from these midpoints; each must
    fall in its own bucket."""
    assert m.bucket_midpoints((1.0, 2.0, 4.0)) == [0.5, 1.5, 3.0, 8.0]
    for bounds in (LATENCY_BUCKETS, m.BATCH_BUCKETS, m.DIFF_BUCKETS, m.TOKEN_BUCKETS):
        points = m.bucket_midpoints(bounds)
        assert [buckets_of([p], bounds).index(1) for p in points] == list(range(len(bounds) + 1))


@pytest.mark.parametrize("counts, limit", [([3, 0, 1], 10), ([600, 300, 100, 0], 100), ([999, 1], 10),
                                          ([1, 1, 1, 1, 1], 2), ([0, 0], 5)])
def test_spread_keeps_counts_or_their_shares_and_interleaves(counts, limit):
    picked = m.spread(counts, limit)
    total = sum(counts)
    assert len(picked) == min(total, limit)
    got = [picked.count(i) for i in range(len(counts))]
    if total <= limit:
        assert got == counts
    else:
        assert all(abs(g - c * limit / total) < 1 for g, c in zip(got, counts))  # largest remainder
    if counts == [600, 300, 100, 0]:  # evenly spread: every prefix holds about its share
        assert picked[:10].count(0) in (5, 6, 7) and 2 in picked[:20]


def test_a_series_sends_at_most_its_bound_per_flush_with_the_same_shares(fake, monkeypatch):
    monkeypatch.setattr(m, "DASHBOARD_MAX_PER_FLUSH", 50)
    sm = ServingMetrics("app", metrics_module=fake)
    for i in range(1000):
        s = 0.004 if i % 10 else 0.3  # 10 % slow
        sm.request_finished("digits", 1, "http_v2", 200, None, s, {"queue": s})
    sm.flush()
    sent = value(STAGE_LATENCY, app="app", model="digits", version="1", stage="queue")
    assert len(sent) == 50
    assert buckets_of(sent, LATENCY_BUCKETS) == buckets_of([0.004] * 45 + [0.3] * 5, LATENCY_BUCKETS)
    tags = {"app": "app", "model": "digits", "version": "1", "protocol": "http_v2", "status": "200"}
    assert len(value(REQUEST_LATENCY, **tags)) == 1000  # the rollout's latency stays exact


def test_stages_and_batches(fake):
    sm = ServingMetrics("app", metrics_module=fake)
    stages = {"decode": 0.0002, "queue": 0.00001, "inference": 0.003, "encode": 0.0001, "hop": 0.0007}
    assert tuple(stages) == STAGES
    sm.request_finished("digits", 1, "http_v2", 200, None, 0.004, stages)
    sm.request_finished("digits", 1, "handle", 200, None, 0.004, stages)
    sizes = (1, 3, 32, 2000)
    for size in sizes:
        sm.batch("digits", 1, size)
    sm.flush()
    base = {"app": "app", "model": "digits", "version": "1"}
    for stage, seconds in stages.items():
        assert buckets_of(value(STAGE_LATENCY, **base, stage=stage), LATENCY_BUCKETS) == \
            buckets_of([seconds, seconds], LATENCY_BUCKETS)
    assert buckets_of(value(BATCH_SIZE, **base), m.BATCH_BUCKETS) == buckets_of(sizes, m.BATCH_BUCKETS)


def test_histogram_series_are_interleaved_in_a_flush(fake):
    """As request latencies: a scrape part-way through a flush sees every series about alike
    (the generative rollout guards divide TTFT and inter-token series of two versions)."""
    order = []

    class Recording(FakeHistogram):
        def observe(self, value, tags=None):
            if self.name == _names.TIME_TO_FIRST_TOKEN:
                order.append(tags["version"])
            super().observe(value, tags)

    sm = ServingMetrics("app", metrics_module=SimpleNamespace(Counter=FakeCounter, Gauge=FakeGauge, Histogram=Recording))
    for version in (1, 2):
        for _ in range(3):
            sm.generation("lm", version, prompt_tokens=3, completion_tokens=4, finish_reason="stop", ttft_s=0.05)
    sm.flush()
    assert order == ["1", "2"] * 3


def test_gauges_are_refreshed_every_flush(fake):
    """Ray's agent expires gauge series nobody re-sets, so idle series are re-sent too."""
    sm = ServingMetrics("app", metrics_module=fake)
    sm.request_finished("digits", 1, "http_v2", 200, None, 0.001, {"inference": 0.001})
    sm.version_state("digits", 1, "ready")
    sm.flush()
    state = FakeMetric.registry[VERSION_STATE]
    before = state.calls
    sm.flush()
    assert state.calls == 2 * before


def test_dynamic_model_labels_are_bounded(fake, caplog):
    """Ray's agent keeps 2,000 label sets per metric name: a dynamic app labels at most
    max_models names; the others share OTHER_MODEL with version none."""
    sm = ServingMetrics("app", models=["configured"], max_models=2, metrics_module=fake)
    for name in ("a", "b", "c", "d"):
        sm.add_model(name)
    sm.add_model("d", always=True)  # named by a traffic split or shadow: always labelled
    for name in ("configured", "a", "b", "c", "d", "never-added"):
        sm.request_started(name)
        sm.request_finished(name, 3, "http_v2", 200, None, 0.001, {"inference": 0.001})
        sm.batch(name, 3, 4)
        sm.version_state(name, 3, "ready")
    sm.flush()
    labels = {(dict(k)["model"], dict(k)["version"]) for k in FakeMetric.registry[REQUESTS].values}
    assert labels == {("configured", "3"), ("a", "3"), ("b", "3"), ("d", "3"), (m.OTHER_MODEL, "none"),
                      (m.UNKNOWN_MODEL, "3")}
    assert {dict(k)["model"] for k in FakeMetric.registry[BATCH_SIZE].values} == \
        {"configured", "a", "b", "d", m.OTHER_MODEL, m.UNKNOWN_MODEL}
    assert {dict(k)["model"] for k in FakeMetric.registry[VERSION_STATE].values} == {"configured", "a", "b", "d"}
    assert caplog.text.count("'c' is labelled '_other'") == 1


def test_trusted_metrics_with_a_bound_label_the_first_names_seen(fake):
    sm = ServingMetrics("app", models=None, max_models=1, metrics_module=fake)  # the model pool's
    for name in ("a", "b", "a"):
        sm.batch(name, 1, 2)
    sm.flush()
    assert {(dict(k)["model"], dict(k)["version"]) for k in FakeMetric.registry[BATCH_SIZE].values} == \
        {("a", "1"), (m.OTHER_MODEL, "none")}
    with pytest.raises(ValueError, match="-1"):
        ServingMetrics("app", max_models=-1)


def test_version_state(fake):
    sm = ServingMetrics("app", metrics_module=fake)
    sm.version_state("digits", 1, "loading")
    sm.version_state("digits", 2, "failed")
    sm.version_state("digits", 1, "ready")
    sm.flush()
    base = {"app": "app", "model": "digits"}
    assert {s: value(VERSION_STATE, **base, version="1", state=s) for s in m.VERSION_STATES} == \
        {"ready": 1, "failed": 0, "loading": 0}
    assert value(VERSION_STATE, **base, version="2", state="failed") == 1
    with pytest.raises(ValueError, match="'gone'"):
        sm.version_state("digits", 1, "gone")


def test_flush_errors_never_reach_the_request_path(fake, caplog):
    class Broken(FakeGauge):
        def set(self, value, tags=None):
            raise RuntimeError("agent down")

    sm = ServingMetrics("app", flush_interval_s=0.01, metrics_module=SimpleNamespace(Counter=FakeCounter, Gauge=Broken, Histogram=FakeHistogram))
    sm.start()
    sm.start()  # idempotent
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        sm.request_started("digits")
        sm.request_finished("digits", 1, "http_v2", 200, None, 0.001)
        if "agent down" in caplog.text:
            break
        time.sleep(0.01)
    sm.stop()
    assert "flushing serving metrics failed" in caplog.text
    assert caplog.text.count("agent down") <= 2  # rate-limited


def test_concurrent_recording_and_flushing(fake, monkeypatch):
    monkeypatch.setattr(m, "DASHBOARD_MAX_PER_FLUSH", 10**6)  # exact counts, whatever a flush finds
    sm = ServingMetrics("app", flush_interval_s=0.001, metrics_module=fake)
    sm.start()

    def work():
        for _ in range(2000):
            sm.request_started("digits")
            sm.request_finished("digits", 1, "http_v2", 200, None, 0.001, {"queue": 0.0001})

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sm.stop()
    tags = {"app": "app", "model": "digits", "version": "1"}
    assert value(REQUESTS, **tags, protocol="http_v2", status="200") == 8000
    assert len(value(STAGE_LATENCY, **tags, stage="queue")) == 8000
    assert value(IN_FLIGHT, app="app", model="digits") == 0


def test_flush_interval_must_be_positive():
    with pytest.raises(ValueError, match="flush_interval_s"):
        ServingMetrics("app", flush_interval_s=0)


# ---- deployments/monitoring ---------------------------------------------------------
def test_dashboard_queries_only_exported_metrics():
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    assert len(panels) >= 7
    used = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bray_maas_\w+", target["expr"]))
            assert names, f"{panel['title']}: {target['expr']}"
            assert names <= m.EXPORTED_NAMES, f"{panel['title']}: unknown {names - m.EXPORTED_NAMES}"
            used |= names
    # Every metric the module exports is on the dashboard somewhere.
    assert {n for n in m.EXPORTED_NAMES if not n.endswith(("_sum", "_count"))} <= used


def test_prometheus_config_uses_rays_service_discovery_file():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    ray_jobs = [j for j in config["scrape_configs"] if j["job_name"] == "ray"]
    assert ray_jobs[0]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_shadow_agreement_drops_and_differences(fake):
    sm = ServingMetrics("app", models=["digits"], metrics_module=fake)
    sm.shadow("digits", 2, compared=4, agreed=3, max_abs_diff=0.02)
    sm.shadow("digits", 2, compared=1, agreed=1, max_abs_diff=None)
    sm.shadow_dropped("digits", 2)
    sm.flush()
    tags = {"app": "app", "model": "digits", "version": "2"}
    assert sorted(value(SHADOW_AGREEMENT, **tags)) == [0.0, 1.0, 1.0, 1.0, 1.0]  # 4 of 5 agreed
    assert value(SHADOW_DROPPED, **tags) == 1
    assert buckets_of(value(SHADOW_DIFF, **tags), m.DIFF_BUCKETS) == buckets_of([0.02], m.DIFF_BUCKETS)


def test_agreement_is_observed_per_item_once_and_spread_evenly(fake):
    sm = ServingMetrics("app", models=["digits"], metrics_module=fake)
    sm.shadow("digits", 2, compared=10, agreed=5, max_abs_diff=None)
    sm.flush()
    sm.flush()  # nothing new: nothing observed again
    tags = {"app": "app", "model": "digits", "version": "2"}
    assert value(SHADOW_AGREEMENT, **tags) == [0.0, 1.0] * 5  # any prefix keeps the rate
    sm.shadow("digits", 2, compared=3, agreed=3, max_abs_diff=None)
    sm.flush()
    assert value(SHADOW_AGREEMENT, **tags)[10:] == [1.0, 1.0, 1.0]
    # The bounds put 0 in the first bucket and 1 in +Inf, with Ray's midpoints 5e-7 and 1.0.
    bounds = FakeMetric.registry[SHADOW_AGREEMENT].boundaries
    assert bounds[0] == m.AGREEMENT_BOUNDS[0] and 0.0 <= bounds[0] < 1.0 and bounds[-1] * 2 == 1.0


@pytest.mark.parametrize("compared,agreed", [(1, 0), (1, 1), (7, 3), (100, 97), (5000, 4999), (100_000, 12_345)])
def test_agreement_observations_keep_the_rate_within_one_item(compared, agreed):
    obs = m.agreement_observations(compared, agreed, limit=4096)
    assert len(obs) == min(compared, 4096) and set(obs) <= {0.0, 1.0}
    assert abs(sum(obs) - len(obs) * agreed / compared) <= 1
    half = obs[: len(obs) // 2]  # an export that caught the flush half-way
    if half:
        assert abs(sum(half) - len(half) * agreed / compared) <= 1
