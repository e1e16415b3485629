"""Do scrapes of Ray's metrics endpoint see a replica's flush part-way? (the rollout's evidence)

Ray exports and ingests metric series one at a time, so a scrape can see part of a flush.
The rollout controller divides series (p99 of a candidate against its baseline's, agreed
over compared items), and a torn read there looks like a bad candidate. Two checks, each
an A/B in one run, in one actor beside a busy thread (GIL contention, as in a loaded replica):

- ``latency``: two versions get identical request latencies (49 at 2 ms, 1 at 20 ms,
  repeating) at 200 requests/s each, recorded as gauge-backed histograms (the classic
  layout ``maas_ray.serving.metrics`` uses for dashboard-only histograms), as native Ray
  ``Histogram`` objects observed inline, and through the real ``ServingMetrics`` (native,
  each request's latency observed by its flush thread: what replicas run). The driver takes
  back-to-back windows and counts those where the two versions' p99 differ by more than 5 %,
  and by more than the default guard (1.3x).
- ``agreement``: 70 mirrored items a second, all agreeing, through the real
  ``ServingMetrics`` (one native histogram), and the same counts as the pair of counters
  agreement used to be; the driver reads both at ~3 Hz and counts scrapes where agreement
  reads below 1.

    python -m benchmarks.torn_reads latency --seconds 420 --window 3
    python -m benchmarks.torn_reads agreement --seconds 300

2026-12-03, 2-core AMD EPYC VM, Ray 2.60:
latency, 134 windows of 3 s: gauge-backed p99 ratio off by > 5 % in 3, over 1.3x in 2 (8.0x,
9.1x); native off in 2, by 12 % and 10 % (a window boundary fell between the two versions'
observations of the same 20 ms request), over 1.3x in 0.
agreement, 894 scrapes (an earlier form of this script): the pair of counters torn in 4, the
histogram in 0 (9 caught a flush part-way, at the flush's own rate).
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import math
import threading
import time
from collections import defaultdict

import httpx
import ray
from prometheus_client.parser import text_string_to_metric_families

from maas_ray.rollout.evidence import Snapshot, metrics_urls, quantile
from maas_ray.serving.metric_names import RAY_REQUEST_LATENCY_BUCKET

ITEMS = 70
COUNTERS = ("ray_maas_shadow_compared_items_total", "ray_maas_shadow_agreed_items_total")
LATENCIES = [0.002] * 49 + [0.02]
SERVED = RAY_REQUEST_LATENCY_BUCKET


def _busy() -> None:
    while True:
        pass


class CountedHistogram:
    """A histogram counted in process: cumulative buckets, sum and count."""

    def __init__(self, bounds: tuple) -> None:
        self.bounds, self.counts, self.sum, self.count = bounds, [0] * (len(bounds) + 1), 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> tuple:
        return list(itertools.accumulate(self.counts)), self.sum, self.count


class GaugeHistogram:
    """The gauge-backed layout ServingMetrics used for dashboard histograms before: three gauges
    (``_bucket{le}``, ``_sum``, ``_count``) set at each flush. Kept here to compare with native."""

    def __init__(self, metrics, name: str, tag_keys: tuple, bounds: tuple) -> None:
        self.les = [repr(float(b)) for b in bounds] + ["+Inf"]
        self.bucket = metrics.Gauge(f"{name}_bucket", tag_keys=(*tag_keys, "le"))
        self.sum = metrics.Gauge(f"{name}_sum", tag_keys=tag_keys)
        self.count = metrics.Gauge(f"{name}_count", tag_keys=tag_keys)

    def set(self, tags: dict, snapshot: tuple) -> None:
        cumulative, total, count = snapshot
        for le, value in zip(self.les, cumulative):
            self.bucket.set(value, {**tags, "le": le})
        self.sum.set(total, tags)
        self.count.set(count, tags)


@ray.remote(num_cpus=0)
class Emitter:
    def __init__(self, check: str) -> None:
        from ray.util import metrics

        from maas_ray.serving import metrics as m

        threading.Thread(target=_busy, daemon=True).start()
        if check == "agreement":
            self.sm = m.ServingMetrics("app", models=["digits"])
            self.sm.start()
            tags = ("app", "model", "version")
            self.pair = [metrics.Counter(name[4:-6], tag_keys=tags) for name in COUNTERS]
            threading.Thread(target=self._mirror, daemon=True).start()
        else:
            self.sm = m.ServingMetrics("app", models=["digits"])  # what replicas run: observed at its flush
            self.sm.start()
            self.native = metrics.Histogram("torn_native", boundaries=list(m.LATENCY_BUCKETS), tag_keys=("version",))
            self.gauges = GaugeHistogram(metrics, "torn_gauges", ("version",), m.LATENCY_BUCKETS)
            self.hists = {v: CountedHistogram(m.LATENCY_BUCKETS) for v in ("1", "2")}
            self.lock = threading.Lock()
            threading.Thread(target=self._requests, daemon=True).start()
            threading.Thread(target=self._flush, daemon=True).start()

    def _mirror(self) -> None:
        tags = {"app": "app", "model": "digits", "version": "2"}
        while True:
            time.sleep(1.0)
            self.sm.shadow("digits", 2, compared=ITEMS, agreed=ITEMS, max_abs_diff=None)
            for counter in self.pair:
                counter.inc(ITEMS, tags)

    def _requests(self) -> None:
        for latency in itertools.cycle(LATENCIES):
            time.sleep(0.005)
            for version in ("1", "2"):
                with self.lock:
                    self.hists[version].observe(latency)
                self.native.observe(latency, {"version": version})
                self.sm.request_finished("digits", int(version), "http_v2", 200, None, latency)

    def _flush(self) -> None:  # as ServingMetrics flushed its gauge-backed histograms before
        while True:
            time.sleep(1.0)
            with self.lock:
                snapshots = {v: h.snapshot() for v, h in self.hists.items()}
            for version, snapshot in snapshots.items():
                self.gauges.set({"version": version}, snapshot)

    def ready(self) -> bool:
        return True


def _buckets(text: str) -> dict[tuple, float]:
    values: dict[tuple, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("ray_torn_native_bucket", "ray_torn_gauges_bucket", SERVED):
                values[(s.name, s.labels["version"], s.labels["le"])] += s.value
    return values


def _p99(window: dict[tuple, float], name: str, version: str):
    cumulative = sorted((math.inf if le == "+Inf" else float(le), count)
                        for (n, v, le), count in window.items() if n == name and v == version)
    return quantile(cumulative, 0.99)


def latency(urls: list[str], seconds: float, window_s: float) -> str:
    lines = []
    with httpx.Client(timeout=10) as client:
        previous, ratios = _buckets(client.get(urls[0]).text), defaultdict(list)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(window_s)
            current = _buckets(client.get(urls[0]).text)
            window = {k: v - previous.get(k, 0.0) for k, v in current.items()}
            previous = current
            for name in ("ray_torn_gauges_bucket", "ray_torn_native_bucket", SERVED):
                p1, p2 = _p99(window, name, "1"), _p99(window, name, "2")
                if p1 and p2:
                    ratios[name].append(p2 / p1)
    for name, kind in (("ray_torn_gauges_bucket", "gauge-backed"), ("ray_torn_native_bucket", "native, observed inline"),
                       (SERVED, "ServingMetrics (native, observed at its flush)")):
        r = ratios[name]
        off = sorted(round(x, 2) for x in r if abs(x - 1) > 0.05)
        lines.append(f"{kind}: {len(r)} windows of {window_s:g} s; p99 ratio off by > 5 % in {len(off)}, "
                     f"over 1.3x in {sum(x > 1.3 for x in r)} {off}")
    return "\n".join(lines)


def agreement(urls: list[str], seconds: float) -> str:
    scrapes = torn_histogram = torn_counters = part_way = 0
    end = time.monotonic() + seconds
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < end:
            compared, agreed = Snapshot.scrape("app", "digits", urls).agreement(2)
            pair = {s.name: s.value for f in text_string_to_metric_families(client.get(urls[0]).text)
                    for s in f.samples if s.name in COUNTERS}
            if compared and len(pair) == 2:
                scrapes += 1
                torn_histogram += agreed != compared
                part_way += compared % ITEMS != 0
                torn_counters += pair[COUNTERS[0]] != pair[COUNTERS[1]]
            time.sleep(0.03)
    return (f"{scrapes} scrapes: agreement torn in {torn_histogram} (histogram), {torn_counters} (pair of "
            f"counters); {part_way} caught a flush part-way")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=["latency", "agreement"])
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--window", type=float, default=3.0, help="latency: seconds per window")
    args = p.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             _system_config={"metrics_report_interval_ms": 1000})
    try:
        emitter = Emitter.remote(args.check)
        ray.get(emitter.ready.remote())
        urls = metrics_urls()
        time.sleep(4)  # the first flush and export
        print(latency(urls, args.seconds, args.window) if args.check == "latency" else agreement(urls, args.seconds))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
