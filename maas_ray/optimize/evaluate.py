"""Accuracy on held-out rows and in-process latency/throughput, measured the same way for
parent and child (same rows, same session options, same thread count)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from maas_ray.runtime import create_session


@dataclass(frozen=True)
class Measurement:
    accuracy: float
    p50_ms_b1: float  # median latency of one batch-1 run
    best_batch: int
    best_items_per_s: float


def _run(session, name: str, x: np.ndarray) -> np.ndarray:
    return session.run(None, {name: x})[0]


def accuracy(session, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    name = session.get_inputs()[0].name
    pred = np.concatenate([_run(session, name, x[i : i + batch]).argmax(-1) for i in range(0, len(x), batch)])
    return float((pred == y).mean())


def measure(model_bytes: bytes, x: np.ndarray, y: np.ndarray, *, threads: int,
            batch_sizes: list[int], seconds: float) -> Measurement:
    session = create_session(model_bytes, device="cpu", intra_op_threads=threads)
    name = session.get_inputs()[0].name
    acc = accuracy(session, x, y)
    throughput, p50 = {}, float("nan")
    for b in batch_sizes:
        xb = np.resize(x, (b, *x.shape[1:])).astype(x.dtype)  # repeat rows to fill the batch
        _run(session, name, xb)  # warm-up: first run allocates
        times, deadline = [], time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 5:
            t0 = time.perf_counter()
            _run(session, name, xb)
            times.append(time.perf_counter() - t0)
        med = float(np.median(times))
        throughput[b] = b / med
        if b == 1:
            p50 = med * 1e3
    best = max(throughput, key=throughput.get)
    return Measurement(acc, p50, best, throughput[best])
