"""The floor of the hop in fused placement: one Ray Serve handle call between two deployments.

    python -m benchmarks.hop                       # 1, 2 and 4 calls in flight; 1 and 10 items a call
    python -m benchmarks.hop --seconds 10 --in-flight 1,4 --items 10

A caller deployment keeps N handle calls in flight to a callee that returns its argument at
once. Each call carries what the fused ingress sends: a list of (tensors, strict) items, one
784-float row each (the wide MLP). Reports calls/s, the round trip's p50/p90, and the CPU
each of the two replica processes spent per call, under the shipped throughput profile's
Serve flags (gRPC between processes, no separate user-code thread). The served stack's own
hop, with HTTP load around it, is the ``mean hop ms`` column of ``benchmarks.run
--batch-sizes`` for the fused systems.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from benchmarks.systems import THROUGHPUT_PROFILE

# Handle calls only: no HTTP proxy to configure.
FLAGS = {k: v for k, v in THROUGHPUT_PROFILE.items() if "HAPROXY" not in k and "HA_PROXY" not in k}


def _deployments():
    import numpy as np
    from ray import serve

    @serve.deployment(max_ongoing_requests=64)
    class Callee:
        async def echo(self, items):
            return [({"output": np.zeros((1, 10), np.float32)}, {"inference": 0.0}) for _ in items]

        def pid(self) -> int:
            return os.getpid()

    @serve.deployment(max_ongoing_requests=64)
    class Caller:
        def __init__(self, callee) -> None:
            self.callee = callee

        def pid(self) -> int:
            return os.getpid()

        async def run(self, seconds: float, in_flight: int, items: int) -> list[float]:
            payload = [({"input": np.zeros((1, 784), np.float32)}, False) for _ in range(items)]
            rtts: list[float] = []
            end = time.perf_counter() + seconds

            async def loop() -> None:
                while time.perf_counter() < end:
                    start = time.perf_counter()
                    await self.callee.echo.remote(payload)
                    rtts.append(time.perf_counter() - start)

            await asyncio.gather(*(loop() for _ in range(in_flight)))
            return rtts

    return Caller.bind(Callee.bind())


def _cpu(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def _points(caller, callee, a: argparse.Namespace) -> list[str]:
    import numpy as np

    pids = await caller.pid.remote(), await callee.pid.remote()
    await caller.run.remote(2.0, 4, 10)  # warm-up
    lines = [f"{'in flight':>9} {'items':>5} {'calls/s':>8} {'p50 ms':>7} {'p90 ms':>7} "
             f"{'caller us/call':>14} {'callee us/call':>14}"]
    for in_flight in a.in_flight:
        for items in a.items:
            before = [_cpu(p) for p in pids]
            start = time.perf_counter()
            rtts = np.array(await caller.run.remote(a.seconds, in_flight, items))
            wall = time.perf_counter() - start
            cpu = [(_cpu(p) - b) * 1e6 / len(rtts) for p, b in zip(pids, before, strict=True)]
            lines.append(f"{in_flight:>9} {items:>5} {len(rtts) / wall:>8,.0f} {1e3 * np.median(rtts):>7.2f} "
                         f"{1e3 * np.percentile(rtts, 90):>7.2f} {cpu[0]:>14,.0f} {cpu[1]:>14,.0f}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="per point")
    p.add_argument("--in-flight", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument("--items", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10])
    p.add_argument("--num-cpus", type=float, default=2)
    a = p.parse_args(argv)
    os.environ.update(FLAGS)  # Serve reads them when a process imports it: before this one does
    import ray
    from ray import serve

    ray.init(num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        caller = serve.run(_deployments(), name="hop", route_prefix=None)
        # Under the profile, handles route on the event loop they are used on. Stopping Ray
        # stops Serve with it: serve.shutdown() would reach for that loop after it closed.
        lines = asyncio.run(_points(caller, serve.get_deployment_handle("Callee", "hop"), a))
    finally:
        ray.shutdown()
    print(f"Serve handle call between two replicas ({', '.join(f'{k}={v}' for k, v in FLAGS.items())})")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
