"""Load the real digits app (deployments/digits-cpu.yaml) over HTTP and measure its split.

    python -m benchmarks.digits_app [--profile] [--registry ROOT]

Needs digits versions with the aliases production and candidate (``maas quickstart`` makes
them). Starts its own Ray (2 CPUs), deploys the YAML unchanged, runs wrk at several
concurrency levels with a raw-pixel OIP v2 request and with a PNG request, counts which
version answered 1,000 requests, and shuts everything down.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
URL = "http://127.0.0.1:8000/v2/models/digits/infer"


def bodies() -> dict[str, bytes]:
    from sklearn.datasets import load_digits

    from maas_ray.cli.quickstart import digit_png

    x, _ = load_digits(return_X_y=True)
    return {
        "pixels": json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                          "data": x[-1].tolist()}]}).encode(),
        "png": json.dumps({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                                       "data": [digit_png(x[-1])]}]}).encode(),
    }


def serve_and_measure(concurrency: list[int], duration_s: float) -> dict:
    import httpx
    import ray
    from ray import serve

    from benchmarks.loadgen import run_wrk
    from maas_ray.serving.deploy import deploy

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        deploy(ROOT / "deployments" / "digits-cpu.yaml")
        out: dict = {"points": []}
        for name, body in bodies().items():
            run_wrk(URL, body, 8, 3)  # warm-up, not reported
            for c in concurrency:
                p = run_wrk(URL, body, c, duration_s)
                out["points"].append({"request": name, **p.as_dict()})
                print(f"{name:7s} c={c:<4d} {p.rps:8.0f} req/s  p50 {p.p50_ms:7.1f} ms  p99 {p.p99_ms:7.1f} ms  "
                      f"errors {p.errors}", flush=True)
        pixels = bodies()["pixels"]
        with httpx.Client(timeout=30) as client, ThreadPoolExecutor(16) as pool:
            versions = list(pool.map(
                lambda _: client.post(URL, content=pixels, headers={"content-type": "application/json"})
                .headers["x-model-version"], range(1000)))
        out["split"] = dict(Counter(versions))
        print(f"split over 1000 requests: {out['split']}", flush=True)
        return out
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", action="store_true", help="start Ray with deployments/profiles/throughput.env")
    p.add_argument("--registry", default=None, help="registry root (default $MAAS_REGISTRY_ROOT)")
    p.add_argument("--concurrency", default="1,8,32,128")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:  # Serve reads its env when Ray starts: measure in a fresh process
        serve_and_measure([int(c) for c in a.concurrency.split(",")], a.duration)
        return
    env = dict(os.environ)
    if a.registry:
        env["MAAS_REGISTRY_ROOT"] = a.registry
    if a.profile:
        env.update({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"})
    cmd = [sys.executable, "-m", "benchmarks.digits_app", "--child", "--concurrency", a.concurrency,
           "--duration", str(a.duration)]
    raise SystemExit(subprocess.run(cmd, env=env, cwd=ROOT).returncode)


if __name__ == "__main__":
    main()
