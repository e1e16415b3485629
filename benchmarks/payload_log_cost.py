"""What payload logging costs the request path: the ingress in process (``ingress`` placement, a
linear ONNX model, the ASGI app a replica serves, no Serve proxy), with the model's payload log
off, and on at sample_rate 1.0 (file sink, mode all), rounds alternated.

    python -m benchmarks.payload_log_cost [--requests 3000] [--rounds 3]

Reports, per request: the event loop thread's CPU inside the ASGI call (the request path), and
the whole process's CPU over the same window (adds the logger thread, which redacts, serialises
and writes the events).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(root: str, payload_log):
    from maas_ray.serving.config import AppArgs
    from maas_ray.serving.core import IngressCore
    from maas_ray.serving.http import HttpApp, build_api

    model = {"name": "lin", "placement": "ingress", "versions": [{"version": 1}]}
    if payload_log is not None:
        model["payload_log"] = payload_log
    core = IngressCore(AppArgs.model_validate({"registry_root": root, "models": [model]}), {"lin": {1: {}}},
                       {"lin": {"1": 1}})
    return core, HttpApp(core, build_api(core))


async def cpu_per_request(app, n: int) -> tuple[float, float]:
    import httpx

    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    spent = [0.0, 0.0]

    async def timed(scope, receive, send):
        t0, p0 = time.thread_time(), time.process_time()
        try:
            await app(scope, receive, send)
        finally:
            spent[0] += time.thread_time() - t0
            spent[1] += time.process_time() - p0

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=timed), base_url="http://x") as client:
        for _ in range(100):
            assert (await client.post("/v2/models/lin/infer", content=body)).status_code == 200
        spent[:] = [0.0, 0.0]
        for _ in range(n):
            await client.post("/v2/models/lin/infer", content=body)
    return spent[0] / n * 1e6, spent[1] / n * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)

    from maas_ray.registry import Registry
    from tests.helpers import linear_onnx

    with tempfile.TemporaryDirectory() as tmp:
        Registry(tmp + "/reg").publish("lin", linear_onnx(4, 3, seed=7))
        setups = {"off": None, "on (sample_rate 1.0, file)": {"sink": f"file://{tmp}/logs", "mode": "all"}}
        apps = {name: build(tmp + "/reg", cfg) for name, cfg in setups.items()}
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
        for _ in range(a.rounds):
            for name, (_, app) in apps.items():
                runs[name].append(asyncio.run(cpu_per_request(app, a.requests)))
        for name, (core, _) in apps.items():
            for plog in core.payload_logs.values():
                plog.close(30)
                print(f"{name}: {plog.written} events written, {plog.dropped} dropped")
        for name, values in runs.items():
            loop_us = statistics.median(v[0] for v in values)
            proc_us = statistics.median(v[1] for v in values)
            print(f"payload log {name}: request path (loop thread) {loop_us:.1f} us/request, "
                  f"process {proc_us:.1f} us/request; rounds {[tuple(round(x, 1) for x in v) for v in values]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
