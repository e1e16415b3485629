"""The Ray-based systems, one per process: the harness sets the Serve env vars
(RAY_SERVE_THROUGHPUT_OPTIMIZED, RAY_SERVE_ENABLE_HA_PROXY, ...) before this starts Ray.

    python -m benchmarks.servers.ray_server ray-plain --port 8103 --model-path m.onnx
    python -m benchmarks.servers.ray_server ray-tuned --port 8104 --model-path m.onnx --max-batch-size 64
    python -m benchmarks.servers.ray_server maas --port 8105 --registry /tmp/reg --model mlp --placement fused

It starts its own Ray instance (``address="local"``), serves until SIGTERM/SIGINT,
then shuts Serve and Ray down (which also stops HAProxy). ``--raw spec.json`` (raw
workloads): ray-plain and ray-tuned decode, run and label raw inputs
(benchmarks/servers/raw.py); maas uses the manifest's processors.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class.
import argparse
import asyncio
import logging
import json
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
from fastapi import FastAPI, Request

logger = logging.getLogger("benchmarks.ray_server")
DTYPES = {"FP32": np.float32, "INT64": np.int64}


def _decode(body: dict) -> dict[str, np.ndarray]:
    return {t["name"]: np.asarray(t["data"], dtype=DTYPES[t["datatype"]]).reshape(t["shape"]) for t in body["inputs"]}


def _encode(model: str, names: list[str], outputs: list[np.ndarray]) -> dict:
    return {"model_name": model, "outputs": [
        {"name": n, "datatype": "FP32", "shape": list(a.shape), "data": a.reshape(-1).tolist()}
        for n, a in zip(names, outputs)]}


def plain_app(model_path: str, raw: Optional[dict] = None):
    """What a newcomer writes from the Serve docs: FastAPI ingress, defaults everywhere."""
    import onnxruntime as ort
    from ray import serve

    from benchmarks.servers.raw import RawCodec, label_response

    api = FastAPI()

    @serve.deployment
    @serve.ingress(api)
    class OnnxModel:
        def __init__(self, path: str, raw: Optional[dict]) -> None:
            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            self.names = [o.name for o in self.session.get_outputs()]
            self.input = self.session.get_inputs()[0].name
            self.codec = RawCodec(raw) if raw else None

        @api.post("/v2/models/{model}/infer")
        async def infer(self, model: str, request: Request) -> dict:
            body = await request.json()
            if self.codec is not None:
                x = self.codec.preprocess(body["inputs"][0]["data"])
                return label_response(model, self.codec.postprocess(self.session.run(None, {self.input: x})[0]))
            return _encode(model, self.names, self.session.run(self.names, _decode(body)))

    return OnnxModel.bind(model_path, raw)


def tuned_app(model_path: str, max_batch_size: int, threads: int, raw: Optional[dict] = None):
    """The same deployment with ``@serve.batch`` and a high ``max_ongoing_requests``; raw inputs
    are decoded per request and the decoded tensors batched."""
    import onnxruntime as ort
    from ray import serve

    from benchmarks.servers.raw import RawCodec, label_response

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=1024)
    @serve.ingress(api)
    class OnnxModel:
        def __init__(self, path: str, raw: Optional[dict]) -> None:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            self.names = [o.name for o in self.session.get_outputs()]
            self.input = self.session.get_inputs()[0].name
            self.codec = RawCodec(raw) if raw else None

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=0.002)
        async def run(self, xs: list[np.ndarray]) -> list[list[np.ndarray]]:
            sizes = np.cumsum([0, *[len(x) for x in xs]])
            # onnxruntime releases the GIL: run it off the event loop so requests keep flowing
            outs = await asyncio.to_thread(self.session.run, self.names, {self.input: np.concatenate(xs)})
            return [[o[a:b] for o in outs] for a, b in zip(sizes[:-1], sizes[1:])]

        @api.post("/v2/models/{model}/infer")
        async def infer(self, model: str, request: Request) -> dict:
            body = await request.json()
            if self.codec is not None:
                outs = await self.run(self.codec.preprocess(body["inputs"][0]["data"]))
                return label_response(model, self.codec.postprocess(outs[0]))
            return _encode(model, self.names, await self.run(_decode(body)[self.input]))

    return OnnxModel.bind(model_path, raw)


def maas_config(port: int, registry: str, model: str, placement: str, max_batch_size: int, threads: int,
                replicas: int = 1, access_log: bool = True, grpc_port: int = 0) -> dict:
    """A Serve config for maas_ray's real app (``build_app``), sized for 2 cores.

    ``replicas`` > 1: that many ingress replicas. In ingress placement they share the cores,
    each with ``threads // replicas`` onnxruntime threads, as gunicorn runs one worker per
    core; in fused and split placement they share the HTTP and processing work in front of
    one inference replica with ``threads`` threads.
    ``access_log=False``: no per-request access log line (the throughput profile).
    ``grpc_port``: also serve OIP v2 over gRPC there (0: HTTP only).
    """
    m = {
        "name": model, "placement": placement, "versions": [{"version": 1}],
        "intra_op_threads": max(1, threads // replicas) if placement == "ingress" else threads,
        "batching": {"max_batch_size": max_batch_size},  # the default wait: 0 (adaptive batching)
    }
    if placement != "ingress":  # in ingress placement the ingress replica runs the model
        m["inference"] = {"ray_actor_options": {"num_cpus": 1.5}}
    if placement == "split":
        m["preprocess"] = m["postprocess"] = {"ray_actor_options": {"num_cpus": 0.1}}
    ingress_cpus = round((1.5 if placement == "ingress" else 0.25) / replicas, 3)
    from maas_ray.serving.grpc import SERVICER_FUNCTION

    grpc = {"grpc_options": {"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]}} if grpc_port else {}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": port},
        **grpc,
        "applications": [{
            "name": "maas", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app",
            "logging_config": {"enable_access_log": access_log},
            "args": {"registry_root": registry, "models": [m],
                     "ingress": {"num_replicas": replicas, "ray_actor_options": {"num_cpus": ingress_cpus}}},
        }],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("system", choices=["ray-plain", "ray-tuned", "maas"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--num-cpus", type=float, default=2)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--model-path", help="ONNX file (ray-plain, ray-tuned)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--replicas", type=int, default=1, help="ingress replicas (maas, ingress placement)")
    p.add_argument("--registry", help="registry root (maas)")
    p.add_argument("--model", help="registry model name (maas)")
    p.add_argument("--placement", choices=["split", "fused", "ingress"], default="fused")
    p.add_argument("--no-access-log", action="store_true", help="drop Serve's per-request access log (maas)")
    p.add_argument("--grpc-port", type=int, default=0, help="also serve OIP v2 over gRPC on this port (maas)")
    p.add_argument("--metrics-port", type=int, help="Ray's Prometheus metrics export port (default: Ray picks one)")
    p.add_argument("--raw", help="a raw workload's processing spec, JSON (ray-plain, ray-tuned)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=a.num_cpus, include_dashboard=False, _metrics_export_port=a.metrics_port)
    try:
        if a.system == "maas":
            import maas_ray
            from maas_ray.serving.deploy import deploy

            logger.info("maas_ray from %s", maas_ray.__file__)

            deploy(maas_config(a.port, a.registry, a.model, a.placement, a.max_batch_size, a.threads, a.replicas,
                               access_log=not a.no_access_log, grpc_port=a.grpc_port))
        else:
            serve.start(http_options={"host": "127.0.0.1", "port": a.port})
            raw = json.loads(Path(a.raw).read_text()) if a.raw else None
            app = plain_app(a.model_path, raw) if a.system == "ray-plain" else tuned_app(
                a.model_path, a.max_batch_size, a.threads, raw)
            serve.run(app, name="bench", route_prefix="/")
        print(f"READY {a.system} on port {a.port}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt as exc:
        logger.info("stopping: %s", exc)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        logger.info("Serve and Ray are down")


if __name__ == "__main__":
    sys.exit(main())
