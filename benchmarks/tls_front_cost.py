"""What `maas tls-front` costs on the tiny MLP: plain HTTP to Serve vs HTTPS through the front.

    python -m benchmarks.tls_front_cost [--duration 10] [--concurrency 8,32] [--out results/tls_front_cost.json]

The app of benchmarks/tls_cost.py (tiny MLP 64->128->10, digits-cpu.yaml's shape, Serve's Python
proxy, its own Ray with 2 CPUs), deployed once; wrk hits it directly over HTTP, then over HTTPS
through `maas tls-front` (the real CLI and the HAProxy that ships with ray[serve]) forwarding to
the same port. wrk sends no client certificate, so the front runs without --client-ca; a client
certificate is checked once per connection, in the handshake, which keep-alive pays once. Besides
throughput (noisy on a shared box) it reports the CPU per request of Serve's proxy and of HAProxy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import run_wrk  # noqa: E402
from benchmarks.tls_cost import MODEL, PORT, config, proxy_cpu_s, tiny_mlp_onnx  # noqa: E402


def _cpu_s(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def measure(label: str, url: str, body: bytes, concurrency: list[int], duration_s: float,
            front_pids: list[int]) -> list[dict]:
    run_wrk(url, body, 8, 3)  # warm-up
    points = []
    for c in concurrency:
        run_wrk(url, body, c, 1)
        cpu0, front0 = proxy_cpu_s(), _cpu_s(front_pids)
        p = run_wrk(url, body, c, duration_s).as_dict()
        n = max(1, p["requests"])
        p["proxy_cpu_us_per_request"] = (proxy_cpu_s() - cpu0) / n * 1e6
        p["front_cpu_us_per_request"] = (_cpu_s(front_pids) - front0) / n * 1e6
        print(f"{label} c={c}: {p['rps']:.0f} req/s, p50 {p['p50_ms']:.2f} ms, p99 {p['p99_ms']:.2f} ms, "
              f"Serve proxy CPU {p['proxy_cpu_us_per_request']:.0f} us/request, HAProxy front CPU "
              f"{p['front_cpu_us_per_request']:.0f} us/request, errors {p['errors']}", flush=True)
        points.append({"path": label, **p})
    return points


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", default="8,32")
    ap.add_argument("--out", default=None, help="write the points as JSON here")
    a = ap.parse_args(argv)
    concurrency = [int(c) for c in a.concurrency.split(",")]

    import httpx
    import psutil
    import ray
    from ray import serve

    from maas_ray.registry import Registry
    from maas_ray.serving.deploy import deploy
    from tests.helpers.tls import make_tls_files
    from tests.helpers.tls_front import free_port, tls_front

    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                   "data": np.random.default_rng(1).normal(size=64).tolist()}]}).encode()
    path = f"/v2/models/{MODEL}/infer"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        registry = str(Path(tmp) / "registry")
        Registry(registry).publish(MODEL, tiny_mlp_onnx())
        tls = make_tls_files(Path(tmp) / "tls")
        ray.init(num_cpus=2, logging_level="WARNING")
        try:
            deploy(config(registry))
            deadline = time.monotonic() + 60
            while httpx.post(f"http://127.0.0.1:{PORT}{path}", content=body, timeout=10).status_code != 200:
                assert time.monotonic() < deadline, "app not ready"
                time.sleep(0.5)
            results += measure("http", f"http://127.0.0.1:{PORT}{path}", body, concurrency, a.duration, [])
            https = free_port()
            with tls_front("--cert", tls.server_cert, "--key", tls.server_key, "--listen-host", "127.0.0.1",
                           "--https-port", str(https), "--no-grpc", "--http-backend", f"127.0.0.1:{PORT}",
                           ports=(https,)) as front:
                pids = [p.pid for p in psutil.Process(front.pid).children(recursive=True)]
                assert httpx.post(f"https://127.0.0.1:{https}{path}", content=body, verify=tls.ca,
                                  timeout=10).status_code == 200
                results += measure("https-front", f"https://127.0.0.1:{https}{path}", body, concurrency,
                                   a.duration, pids)
        finally:
            serve.shutdown()
            ray.shutdown()
    by = {(p["path"], p["concurrency"]): p for p in results}
    for c in concurrency:
        plain, front = by[("http", c)], by[("https-front", c)]
        print(f"c={c}: front/direct throughput {front['rps'] / plain['rps']:.2f}, p50 {front['p50_ms']:.2f} vs "
              f"{plain['p50_ms']:.2f} ms; HAProxy {front['front_cpu_us_per_request']:.0f} us CPU per request "
              f"beside Serve's proxy {front['proxy_cpu_us_per_request']:.0f} us")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
