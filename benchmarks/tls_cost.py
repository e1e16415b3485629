"""What HTTPS costs on the tiny MLP: the same app over HTTP and over HTTPS, wrk at c=8 and c=32.

    python -m benchmarks.tls_cost [--duration 10] [--concurrency 8,32] [--out results/tls_cost.json]

Starts its own Ray (2 CPUs), publishes a tiny MLP (64->128->10, FP32, built with onnx.helper)
in a temporary registry, and deploys deployments/digits-cpu.yaml's app shape (two ingress
replicas, placement ingress, 1 onnxruntime thread) twice: plain, then with ``ssl_certfile`` /
``ssl_keyfile`` from a throwaway CA (tests/helpers/tls.py). Serve's own Python proxy serves both:
the HAProxy throughput profile cannot terminate TLS in Ray 2.60 (docs/security.md, "TLS").
wrk reuses its connections (keep-alive), so the handshake is paid once per connection; what is
measured is the per-request encryption and the TLS record layer in the proxy's event loop.
Besides throughput (noisy on a shared box) it reports the proxy processes' CPU per request.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import run_wrk  # noqa: E402

PORT = 8000
MODEL = "tls-mlp"


def tiny_mlp_onnx() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32) * 0.1, n)
             for n, s in (("W1", (64, 128)), ("b1", (128,)), ("W2", (128, 10)), ("b2", (10,)))]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
         helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["o"]),
         helper.make_node("Add", ["o", "b2"], ["logits"])],
        "tiny_mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def config(registry: str, tls=None) -> dict:
    cfg = yaml.safe_load((ROOT / "deployments" / "digits-cpu.yaml").read_text())
    cfg.pop("grpc_options")
    cfg["http_options"]["port"] = PORT
    if tls is not None:
        cfg["http_options"].update(ssl_certfile=tls.server_cert, ssl_keyfile=tls.server_key)
    app = cfg["applications"][0]
    app["name"] = "tlscost"
    app["args"]["registry_root"] = registry
    model = app["args"]["models"][0]
    model.update(name=MODEL, versions=[{"version": 1}])
    return cfg


def proxy_cpu_s() -> float:
    """CPU seconds (user + system) spent so far by Serve's proxy processes, where TLS runs: a
    measure a busy box disturbs far less than throughput."""
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "ProxyActor" in cmd:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


def measure(scheme: str, body: bytes, concurrency: list[int], duration_s: float) -> list[dict]:
    url = f"{scheme}://127.0.0.1:{PORT}/v2/models/{MODEL}/infer"
    run_wrk(url, body, 8, 3)  # warm-up
    points = []
    for c in concurrency:
        run_wrk(url, body, c, 1)
        cpu0 = proxy_cpu_s()
        p = run_wrk(url, body, c, duration_s).as_dict()
        p["proxy_cpu_us_per_request"] = (proxy_cpu_s() - cpu0) / max(1, p["requests"]) * 1e6
        print(f"{scheme} c={c}: {p['rps']:.0f} req/s, p50 {p['p50_ms']:.2f} ms, p99 {p['p99_ms']:.2f} ms, "
              f"proxy CPU {p['proxy_cpu_us_per_request']:.0f} us/request, errors {p['errors']}", flush=True)
        points.append({"scheme": scheme, **p})
    return points


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", default="8,32")
    ap.add_argument("--out", default=None, help="write the points as JSON here")
    a = ap.parse_args(argv)
    concurrency = [int(c) for c in a.concurrency.split(",")]

    import httpx
    import ray
    from ray import serve

    from maas_ray.registry import Registry
    from maas_ray.serving.deploy import deploy
    from tests.helpers.tls import make_tls_files

    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                   "data": np.random.default_rng(1).normal(size=64).tolist()}]}).encode()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        registry = str(Path(tmp) / "registry")
        Registry(registry).publish(MODEL, tiny_mlp_onnx())
        tls = make_tls_files(Path(tmp) / "tls")
        ray.init(num_cpus=2, logging_level="WARNING")
        try:
            for scheme, files in (("http", None), ("https", tls)):
                deploy(config(registry, files))
                verify = tls.ca if files else True
                deadline = time.monotonic() + 60
                while httpx.post(f"{scheme}://127.0.0.1:{PORT}/v2/models/{MODEL}/infer", content=body,
                                 verify=verify, timeout=10).status_code != 200:
                    assert time.monotonic() < deadline, "app not ready"
                    time.sleep(0.5)
                results += measure(scheme, body, concurrency, a.duration)
                serve.shutdown()
                time.sleep(2)
        finally:
            serve.shutdown()
            ray.shutdown()
    by = {(p["scheme"], p["concurrency"]): p for p in results}
    for c in concurrency:
        plain, tls_point = by[("http", c)], by[("https", c)]
        print(f"c={c}: https/http throughput {tls_point['rps'] / plain['rps']:.2f}, "
              f"p50 {tls_point['p50_ms']:.2f} vs {plain['p50_ms']:.2f} ms, proxy CPU per request "
              f"{tls_point['proxy_cpu_us_per_request'] / plain['proxy_cpu_us_per_request']:.2f}x")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
