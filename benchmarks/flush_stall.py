"""How long the metrics flush thread keeps a replica's event loop from the GIL.

A saturated replica's event loop runs requests back to back; once a second ``ServingMetrics``'
flush thread makes one native Ray observation per request of the last second (~3.7 us each,
holding the GIL). A loop that wants the GIL back waits for the switch interval (5 ms) each time
the flush thread has it. This measures that in one Ray actor, on the real ``ServingMetrics``:
the loop runs "requests" of ``--work-us`` of pure-Python CPU back to back, each recorded with
``request_finished``, and times every loop turn (the work plus the loop's poll, wall clock). A
turn that took far longer than its work waited for the GIL. Both modes alternate within one run, a few seconds each:
``yielding`` (what ships: the flush sleeps 50 us after every 64 observations) and ``burst``
(``FLUSH_YIELD_EVERY = 0``, the flush observes everything in one go).

    python -m benchmarks.flush_stall --seconds 60

Both modes see the same request rate; only the flush's GIL pattern differs. The request rate
comes out of the work size (~150 us: ~5,000 requests/s, about what one tiny-model ingress
replica serves at saturation on this box).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
import ray


@ray.remote(num_cpus=0)
class Loop:
    def __init__(self) -> None:
        from maas_ray.serving.metrics import ServingMetrics

        self.metrics = ServingMetrics("flushstall", models=["m"])
        self.metrics.start()

    async def run(self, seconds: float, work_us: float, yield_every: int) -> dict:
        from maas_ray.serving import metrics as module

        module.FLUSH_YIELD_EVERY = yield_every
        loop_end = time.perf_counter() + seconds
        walls = []
        spin = work_us * 1e-6
        last = time.perf_counter()
        while last < loop_end:
            start = time.perf_counter()
            self.metrics.request_started("m")
            x = 0
            while time.perf_counter() - start < spin:  # pure Python: holds the GIL like request code
                x += 1
            self.metrics.request_finished("m", 1, "http_v2", 200, None, time.perf_counter() - start)
            # One request per loop iteration, as a served loop interleaves; the loop's poll
            # releases the GIL, and taking it back is where a flush burst makes it wait.
            await asyncio.sleep(0)
            now = time.perf_counter()
            walls.append(now - last)  # this request's work plus the loop's turn after it
            last = now
        w = np.array(walls) * 1e3
        over = w - work_us / 1e3
        return {"requests": len(w), "rate": len(w) / seconds, "p50_ms": float(np.percentile(w, 50)),
                "p99_ms": float(np.percentile(w, 99)), "p999_ms": float(np.percentile(w, 99.9)),
                "max_ms": float(w.max()), "over_1ms": int((over > 1).sum()), "over_3ms": int((over > 3).sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="total, split between the modes")
    p.add_argument("--slice", type=float, default=5.0, help="seconds per alternating slice")
    p.add_argument("--work-us", type=float, default=150.0)
    a = p.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        actor = Loop.remote()
        ray.get(actor.run.remote(2.0, a.work_us, 64))  # warm-up: metric objects, first flush
        modes = {"yielding": 64, "burst": 0}
        results: dict[str, list[dict]] = {m: [] for m in modes}
        for i in range(max(2, int(a.seconds / a.slice))):
            mode = list(modes)[i % 2]
            results[mode].append(ray.get(actor.run.remote(a.slice, a.work_us, modes[mode])))
        print(f"{'mode':<9} {'slices':>6} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} {'max ms':>7} "
              f"{'>1ms late':>9} {'>3ms late':>9}")
        for mode, rs in results.items():
            n = sum(r["requests"] for r in rs)
            print(f"{mode:<9} {len(rs):>6} {np.mean([r['rate'] for r in rs]):>7.0f} "
                  f"{np.median([r['p50_ms'] for r in rs]):>7.3f} {np.median([r['p99_ms'] for r in rs]):>7.3f} "
                  f"{np.median([r['p999_ms'] for r in rs]):>8.3f} {max(r['max_ms'] for r in rs):>7.2f} "
                  f"{sum(r['over_1ms'] for r in rs) / n:>9.2%} {sum(r['over_3ms'] for r in rs) / n:>9.2%}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
