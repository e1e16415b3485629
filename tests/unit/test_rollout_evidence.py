"""Rollout guards on synthetic windows (no Ray): quantiles, error rate, p99 ratio, agreement."""

import math

import pytest
from pydantic import ValidationError

from maas_ray.cli.rollout import parse_duration
from maas_ray.rollout.controller import RolloutConfig
from maas_ray.rollout.evidence import DISAGREED_LE, Snapshot, judge, quantile
from maas_ray.serving.metric_names import (
    RAY_REQUEST_LATENCY_BUCKET,
    RAY_REQUEST_LATENCY_COUNT,
    RAY_REQUESTS_TOTAL,
    RAY_SHADOW_AGREEMENT_BUCKET,
    RAY_SHADOW_AGREEMENT_COUNT,
)

pytestmark = pytest.mark.unit


def test_quantile_interpolates_like_prometheus():
    buckets = [(0.001, 50.0), (0.01, 90.0), (0.1, 100.0), (math.inf, 100.0)]
    assert quantile(buckets, 0.5) == pytest.approx(0.001)
    assert quantile(buckets, 0.99) == pytest.approx(0.01 + 0.09 * 0.9)
    assert quantile([(0.1, 0.0), (math.inf, 0.0)], 0.99) is None
    assert quantile([(0.1, 0.0), (math.inf, 5.0)], 0.99) == 0.1  # all in +Inf: the last finite bound


def _window(version_requests):
    """{version: (protocol, status, count, latency_le_or_None)} -> a Snapshot delta."""
    values = {}
    for version, rows in version_requests.items():
        for protocol, status, count, le in rows:
            key = (RAY_REQUEST_LATENCY_COUNT, str(version), protocol, str(status), None)
            values[key] = values.get(key, 0) + count
            for bound in (0.001, 0.01, 0.1, math.inf):
                bkey = (RAY_REQUEST_LATENCY_BUCKET, str(version), protocol, str(status),
                        "+Inf" if math.isinf(bound) else repr(bound))
                values[bkey] = values.get(bkey, 0) + (count if bound >= le else 0)
    return Snapshot(values)


def test_judge_names_each_failed_guard_with_numbers():
    window = _window({
        1: [("http_v2", 200, 100, 0.001)],
        2: [("http_v2", 200, 18, 0.1), ("shadow", 500, 2, 0.1)],
    })
    window.values[(RAY_SHADOW_AGREEMENT_COUNT, "2", None, None, None)] = 10
    window.values[(RAY_SHADOW_AGREEMENT_BUCKET, "2", None, None, "1e-06")] = 1  # disagreed
    window.values[(RAY_SHADOW_AGREEMENT_BUCKET, "2", None, None, "0.5")] = 1  # cumulative
    window.values[(RAY_SHADOW_AGREEMENT_BUCKET, "2", None, None, "+Inf")] = 10
    ev = judge(window, 2, 1, max_error_rate=0.05, max_p99_ratio=1.3, min_agreement=0.95, min_requests=5)
    assert ev.candidate_requests == 20 and ev.error_rate == pytest.approx(0.1) and ev.agreement == pytest.approx(0.9)
    assert [f.split()[0] for f in ev.failed] == ["error", "p99", "agreement"]
    assert "2 of 20 requests" in ev.failed[0] and ev.enough


def test_judge_passes_a_healthy_window_and_flags_too_little_evidence():
    window = _window({1: [("http_v2", 200, 100, 0.01)], 2: [("http_v1", 200, 3, 0.01)]})
    ev = judge(window, 2, 1, max_error_rate=0.01, max_p99_ratio=1.3, min_agreement=0.98, min_requests=5)
    assert ev.failed == [] and ev.agreement is None and not ev.enough
    # at 100 % the baseline has no live requests: the last window's p99 stands in
    ev = judge(_window({2: [("http_v2", 200, 50, 0.01)]}), 2, 1, max_error_rate=0.01, max_p99_ratio=1.3,
               min_agreement=None, min_requests=5, baseline_p99_fallback=0.001)
    assert ev.failed and ev.failed[0].startswith("p99 ratio")


def test_rollout_config_and_durations_validate():
    assert RolloutConfig(app="a", model="m", candidate=2).steps == [5, 25, 50, 100]
    with pytest.raises(ValidationError, match=r"end at 100, got \[5.0, 50.0\]"):
        RolloutConfig(app="a", model="m", candidate=2, steps=[5, 50])
    assert parse_duration("10m") == 600 and parse_duration("500ms") == 0.5 and parse_duration("90") == 90
    with pytest.raises(Exception, match="expected a duration"):
        parse_duration("ten minutes")


def test_agreement_reads_the_disagreement_bucket_however_le_is_written():
    from maas_ray.serving.metrics import AGREEMENT_BOUNDS

    assert DISAGREED_LE == AGREEMENT_BOUNDS[0]  # evidence.py writes the bound out (no serving import)
    for le in ("1e-06", "1e-6", "0.000001"):
        window = Snapshot({(RAY_SHADOW_AGREEMENT_COUNT, "3", None, None, None): 40,
                           (RAY_SHADOW_AGREEMENT_BUCKET, "3", None, None, le): 4,
                           (RAY_SHADOW_AGREEMENT_BUCKET, "3", None, None, "0.5"): 4,
                           (RAY_SHADOW_AGREEMENT_BUCKET, "3", None, None, "+Inf"): 40,
                           (RAY_SHADOW_AGREEMENT_COUNT, "2", None, None, None): 7})
        assert window.agreement(3) == (40, 36)


def test_requests_come_from_the_latency_histogram_not_the_flushed_counter():
    """The counter is flushed series by series; a window must not mix it with the histogram."""
    window = Snapshot({(RAY_REQUESTS_TOTAL, "2", "http_v2", "500", None): 50,
                       (RAY_REQUEST_LATENCY_COUNT, "2", "http_v2", "200", None): 10})
    assert window.requests(2, ("http_v2",)) == (10, 0)
