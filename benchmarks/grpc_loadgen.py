"""Closed-loop gRPC load generator for OIP v2 ``ModelInfer`` (the gRPC counterpart of wrk).

``ghz`` is not packaged for apt or PyPI, so this is an asyncio ``grpc.aio`` client:
``concurrency`` workers on one channel each keep one request in flight (closed loop, as
wrk's connections do), for ``duration_s``. The request is serialized once, as tritonclient
builds it (``raw_input_contents``), and sent as bytes, so the client spends its CPU on gRPC,
not on protobuf. Reports a :class:`benchmarks.loadgen.Point` like :func:`run_wrk`.

One Python process drives the load: on a 2-core box it shares the CPUs with the server, as
wrk does; its own ceiling is a few thousand requests per second (see benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import struct
import time

import numpy as np

from benchmarks.loadgen import Point

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def infer_request(model: str, name: str, x: np.ndarray, datatype: str) -> bytes:
    """A serialized ``ModelInferRequest`` carrying ``x`` as raw_input_contents (tritonclient's form;
    BYTES: an object array of bytes, each element a 4-byte little-endian length and the bytes)."""
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name=model)
    req.inputs.add(name=name, datatype=datatype, shape=list(x.shape))
    if datatype == "BYTES":
        raw = b"".join(struct.pack("<I", len(b)) + b for b in x.reshape(-1))
    else:
        raw = np.ascontiguousarray(x, x.dtype.newbyteorder("<")).tobytes()
    req.raw_input_contents.append(raw)
    return req.SerializeToString()


async def _run(target: str, request: bytes, concurrency: int, duration_s: float, timeout_s: float) -> Point:
    import grpc

    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        # No (de)serializers: bytes in, bytes out.
        call = channel.unary_unary(METHOD)
        await call(request, timeout=timeout_s)  # connect before the clock starts
        start = time.perf_counter()
        deadline = start + duration_s

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    await call(request, timeout=timeout_s)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1e3 if latencies else np.zeros(1)
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    return Point(
        concurrency=concurrency, duration_s=round(elapsed, 2), requests=len(latencies) + errors,
        ok=len(latencies), errors=errors, rps=round(len(latencies) / elapsed, 1),
        p50_ms=round(float(p50), 3), p90_ms=round(float(p90), 3), p99_ms=round(float(p99), 3),
        max_ms=round(float(lat.max()), 3),
    )


def run_grpc(target: str, request: bytes, concurrency: int, duration_s: float, *, timeout_s: float = 10.0) -> Point:
    """``concurrency`` requests in flight against ``target`` (host:port) for ``duration_s``."""
    return asyncio.run(_run(target, request, concurrency, duration_s, timeout_s))


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="host:port of the gRPC server")
    p.add_argument("--model", default="mlp")
    p.add_argument("--input", default="input")
    p.add_argument("--shape", default="1,64")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=5.0)
    a = p.parse_args()
    x = np.zeros([int(d) for d in a.shape.split(",")], dtype=np.float32)
    print(run_grpc(a.target, infer_request(a.model, a.input, x, "FP32"), a.concurrency, a.duration).as_dict())
