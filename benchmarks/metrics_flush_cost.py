"""What a metrics flush costs with native stage histograms, against the gauge layout they replaced.

In one Ray actor (the real ``ray.util.metrics`` objects a replica uses), for each request rate:
record that many requests with four stages into ``ServingMetrics``, then time one ``flush()``;
the same with no stages gives the request-latency part, so the difference is what the stage
histograms cost. The gauge layout (18 buckets + sum + count per series, set every flush) is timed
on the same series with ``benchmarks.torn_reads.GaugeHistogram``. CPU time of the flushing
thread (``time.thread_time``), not wall time.

    python -m benchmarks.metrics_flush_cost --out benchmarks/results/issue25/metrics_flush_cost.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray

RATES = (10, 100, 1000, 5000)
STAGES = {"decode": 0.0002, "queue": 0.00001, "inference": 0.003, "encode": 0.0001}
ROUNDS = 5


@ray.remote(num_cpus=0)
class Bench:
    def run(self, rate: int, stages: bool) -> float:
        """Median thread CPU seconds of one flush after ``rate`` requests (one model, one version)."""
        from maas_ray.serving.metrics import ServingMetrics

        sm = ServingMetrics(f"flushcost-{rate}-{int(stages)}", models=["m"])
        sm.flush()  # creates the Ray objects
        times = []
        for _ in range(ROUNDS):
            for _ in range(rate):
                sm.request_finished("m", 1, "http_v2", 200, None, 0.003, STAGES if stages else None)
            start = time.thread_time()
            sm.flush()
            times.append(time.thread_time() - start)
        return statistics.median(times)

    def gauges(self) -> float:
        """Median thread CPU seconds to set the four stage series in the old gauge layout."""
        from ray.util import metrics

        from benchmarks.torn_reads import CountedHistogram, GaugeHistogram
        from maas_ray.serving.metrics import LATENCY_BUCKETS

        layout = GaugeHistogram(metrics, "flushcost_gauges", ("app", "model", "version", "stage"), LATENCY_BUCKETS)
        hist = CountedHistogram(LATENCY_BUCKETS)
        hist.observe(0.003)
        times = []
        for _ in range(ROUNDS):
            start = time.thread_time()
            for stage in STAGES:
                layout.set({"app": "a", "model": "m", "version": "1", "stage": stage}, hist.snapshot())
            times.append(time.thread_time() - start)
        return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="Write the table here (markdown) as well.")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        bench = Bench.remote()
        gauge_ms = ray.get(bench.gauges.remote()) * 1e3
        lines = ["| requests per flush | flush, latency only (ms) | flush, + 4 native stage series (ms) | "
                 "stage cost per request (us) | gauge layout, 4 stage series (ms) |", "|---|---|---|---|---|"]
        for rate in RATES:
            base = ray.get(bench.run.remote(rate, False)) * 1e3
            full = ray.get(bench.run.remote(rate, True)) * 1e3
            lines.append(f"| {rate} | {base:.2f} | {full:.2f} | {(full - base) * 1e3 / rate:.1f} | {gauge_ms:.2f} |")
    finally:
        ray.shutdown()
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"`python -m benchmarks.metrics_flush_cost` (thread CPU time, median of {ROUNDS} flushes)\n\n"
                    f"{table}\n")


if __name__ == "__main__":
    main()
