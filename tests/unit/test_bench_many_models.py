"""benchmarks/many_models.py without Ray: the Zipf sampler, the summary math (percentiles,
Prometheus-style histogram quantiles, counter deltas, memory per replica), the models it
publishes and its arguments."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from benchmarks.many_models import (
    Req,
    ZipfSampler,
    bucket_delta,
    histogram_quantile,
    linear_onnx,
    model_specs,
    parse_args,
    percentile,
    summarize_counters,
    summarize_memory,
    summarize_requests,
    weights,
    zipf_weights,
)

pytestmark = pytest.mark.unit


def test_zipf_weights_are_normalized_and_fall_as_a_power_of_rank():
    w = zipf_weights(220, 1.2)
    assert sum(w) == pytest.approx(1.0)
    assert w[0] / w[1] == pytest.approx(2 ** 1.2)
    assert w[0] / w[9] == pytest.approx(10 ** 1.2)
    assert all(a > b for a, b in zip(w, w[1:]))
    with pytest.raises(ValueError, match="at least 1"):
        zipf_weights(0, 1.0)


def test_zipf_sampler_is_seeded_and_keeps_one_popularity_order_for_every_skew():
    names = [f"n{i}" for i in range(50)]
    a, b = ZipfSampler(names, 1.0, seed=3), ZipfSampler(names, 1.0, seed=3)
    assert a.sequence(500) == b.sequence(500)
    assert ZipfSampler(names, 1.2, seed=3).ranked == a.ranked  # same hot models at any s
    assert ZipfSampler(names, 1.0, seed=4).ranked != a.ranked
    assert sorted(a.ranked) == sorted(names)


def test_zipf_sampler_frequencies_follow_the_weights():
    names = [f"n{i}" for i in range(20)]
    z = ZipfSampler(names, 1.0, seed=0)
    counts = Counter(z.sequence(40_000))
    for rank in (0, 1, 4):
        assert counts[z.ranked[rank]] / 40_000 == pytest.approx(z.probs[rank], abs=0.01)
    assert set(counts) <= set(names)


def test_percentile_interpolates_like_numpy():
    vals = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0]
    for q in (0, 50, 90, 99, 100):
        assert percentile(vals, q) == pytest.approx(float(np.percentile(vals, q)))
    assert percentile([], 50) is None


def test_histogram_quantile_as_prometheus_computes_it():
    # 10 observations <= 0.01, 80 more <= 0.1, 10 more <= 1.0; none above.
    b = {0.01: 10.0, 0.1: 90.0, 1.0: 100.0, math.inf: 100.0}
    assert histogram_quantile(b, 0.05) == pytest.approx(0.005)  # first bucket: from 0
    assert histogram_quantile(b, 0.5) == pytest.approx(0.01 + 0.09 * 40 / 80)
    assert histogram_quantile(b, 0.99) == pytest.approx(0.1 + 0.9 * 9 / 10)
    # a rank in +Inf answers the highest finite bound
    assert histogram_quantile({0.5: 1.0, math.inf: 10.0}, 0.99) == 0.5
    assert histogram_quantile({0.5: 0.0, math.inf: 0.0}, 0.5) is None
    assert histogram_quantile({0.5: 1.0}, 0.5) is None  # no +Inf bucket


def test_bucket_delta_takes_what_a_phase_added():
    before = {0.1: 5.0, math.inf: 6.0}
    after = {0.1: 15.0, 1.0: 3.0, math.inf: 26.0}
    assert bucket_delta(after, before) == {0.1: 10.0, 1.0: 3.0, math.inf: 20.0}


def test_summarize_requests_counts_throughput_percentiles_and_errors():
    reqs = [Req("s000", "small", 0.0, 0.010 * (i + 1), 200) for i in range(10)]
    reqs += [Req("m00", "medium", 0.0, 0.5, 200, wrong=True), Req("m01", "medium", 0.0, 2.0, 503, error="loading")]
    s = summarize_requests(reqs, wall_s=2.0)
    assert (s["requests"], s["ok"], s["errors"], s["wrong"]) == (12, 11, 1, 1)
    assert s["rps"] == 5.5
    assert s["small_p50_ms"] == pytest.approx(55.0)
    assert s["medium_p50_ms"] == pytest.approx(500.0)
    assert s["p99_ms"] == pytest.approx(float(np.percentile([10 * (i + 1) for i in range(10)] + [500], 99)), abs=0.01)
    assert s["distinct_models"] == 3 and s["error_examples"] == ["503 loading"]


def test_summarize_counters_sums_replica_deltas_and_counts_a_new_replica_from_zero():
    before = {"a": {"hits": 10, "misses": 5, "loads": 5, "load_failures": 0, "evictions": 1}}
    after = {"a": {"hits": 40, "misses": 10, "loads": 10, "load_failures": 0, "evictions": 3},
             "b": {"hits": 15, "misses": 5, "loads": 5, "load_failures": 1, "evictions": 0}}
    c = summarize_counters(before, after)
    assert (c["hits"], c["misses"], c["loads"], c["load_failures"], c["evictions"]) == (45, 10, 10, 1, 2)
    assert c["hit_rate"] == pytest.approx(45 / 55, abs=1e-4)
    assert summarize_counters({}, {})["hit_rate"] is None


def test_summarize_memory_per_replica_against_the_budget():
    samples = [{"replica": "a", "held_bytes": h, "rss_bytes": r, "count": n}
               for h, r, n in ((100, 1000, 1), (300, 1500, 3), (200, 1200, 2))]
    samples.append({"replica": "b", "held_bytes": 500, "rss_bytes": None, "count": 4})
    m = summarize_memory(samples, budget=400)
    assert m["a"]["peak_held_bytes"] == 300 and m["a"]["mean_held_bytes"] == 200
    assert m["a"]["peak_of_budget"] == 0.75 and m["a"]["over_budget_samples"] == 0
    assert (m["a"]["rss_min_bytes"], m["a"]["rss_max_bytes"], m["a"]["max_count"]) == (1000, 1500, 3)
    assert m["b"]["over_budget_samples"] == 1 and m["b"]["rss_min_bytes"] is None


def test_models_are_linear_onnx_with_the_weights_the_benchmark_checks_against():
    import onnx
    from onnx import numpy_helper

    specs = model_specs(3, 2, (8, 4), (16, 32))
    assert [s.name for s in specs] == ["s000", "s001", "s002", "m00", "m01"]
    assert [s.kind for s in specs] == ["small"] * 3 + ["medium"] * 2
    assert len({s.seed for s in specs}) == 5
    w, b = weights(specs[3])
    model = onnx.load_from_string(linear_onnx(w, b))
    onnx.checker.check_model(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(inits["W"], w)
    assert w.shape == (16, 32) and specs[3].weight_bytes == 4 * (16 * 32 + 32)


def test_arguments_defaults_and_bad_values():
    a = parse_args([])
    assert (a.small, a.medium, a.small_dims, a.medium_dims) == (200, 20, (256, 1024), (2048, 2560))
    assert a.zipf == [1.0, 1.2] and a.concurrency == 8 and a.pool_replicas == 2
    assert a.budget_share == pytest.approx(1 / 3) and a.budget_mb is None and a.port != 8000
    b = parse_args(["--zipf", "0.8,1.1", "--small-dims", "64x16", "--budget-mb", "300", "--budget-share", "0.5"])
    assert b.zipf == [0.8, 1.1] and b.small_dims == (64, 16) and b.budget_mb == 300.0 and b.budget_share == 0.5
    for bad in (["--zipf", "a,b"], ["--zipf", "0"], ["--small-dims", "64"], ["--small-dims", "0x4"],
                ["--budget-share", "1.5"], ["--concurrency", "0"], ["--small", "0", "--medium", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
