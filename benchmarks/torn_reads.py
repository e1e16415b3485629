"""Do scrapes of Ray's metrics endpoint see a replica's flush half-way? (the rollout's agreement)

One actor mirrors 70 items a second, every one agreeing, through the real
``ServingMetrics``, beside a busy thread (GIL contention, as in a loaded replica). The same
flush also increments the pair of counters agreement used to be exported as. The driver
reads both from Ray's Prometheus endpoint in a loop, agreement through the rollout
controller's ``Snapshot``, and counts the scrapes where agreement reads below 1 (torn).

    python -m benchmarks.torn_reads --seconds 300

2026-12-03, 2-core AMD EPYC VM, Ray 2.60: 894 scrapes; the pair of counters torn in 4, the
histogram in 0 (9 caught a flush part-way, at the flush's own rate).
"""

from __future__ import annotations

import argparse
import threading
import time

import httpx
import ray
from prometheus_client.parser import text_string_to_metric_families

from maas_ray.rollout.evidence import Snapshot, metrics_urls

ITEMS = 70
COUNTERS = ("ray_maas_shadow_compared_items_total", "ray_maas_shadow_agreed_items_total")


@ray.remote(num_cpus=0)
class Mirror:
    def __init__(self) -> None:
        from ray.util import metrics

        from maas_ray.serving.metrics import ServingMetrics

        self.sm = ServingMetrics("app", models=["digits"])
        self.sm.start()
        tags = ("app", "model", "version")
        self.pair = [metrics.Counter(name[4:-6], tag_keys=tags) for name in COUNTERS]
        threading.Thread(target=self._busy, daemon=True).start()
        threading.Thread(target=self._mirror, daemon=True).start()

    def _busy(self) -> None:
        while True:
            pass

    def _mirror(self) -> None:
        tags = {"app": "app", "model": "digits", "version": "2"}
        while True:
            time.sleep(1.0)
            self.sm.shadow("digits", 2, compared=ITEMS, agreed=ITEMS, max_abs_diff=None)
            for counter in self.pair:
                counter.inc(ITEMS, tags)

    def ready(self) -> bool:
        return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300)
    args = p.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             _system_config={"metrics_report_interval_ms": 1000})
    try:
        mirror = Mirror.remote()
        ray.get(mirror.ready.remote())
        urls = metrics_urls()
        time.sleep(4)  # the first flush and export
        scrapes = torn_histogram = torn_counters = part_way = 0
        end = time.monotonic() + args.seconds
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
        print(f"{scrapes} scrapes: agreement torn in {torn_histogram} (histogram), "
              f"{torn_counters} (pair of counters); {part_way} caught a flush part-way")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
