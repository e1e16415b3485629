"""The limit: raw onnxruntime in this process, no HTTP, no JSON, at the servers' total thread count."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

from benchmarks.workloads import INPUT_NAME, Workload


def measure_limit(workload: Workload, model_bytes: bytes, batch_sizes: list[int], threads: int,
                  duration_s: float) -> dict:
    """items/s for each batch size (one session, ``threads`` intra-op threads, back-to-back runs)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    sweep = {}
    for bs in batch_sizes:
        feeds = {INPUT_NAME: workload.example(bs, rng)}
        session.run(None, feeds)  # warm-up
        latencies = []
        start = time.perf_counter()
        while time.perf_counter() - start < duration_s:
            t = time.perf_counter()
            session.run(None, feeds)
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
        sweep[bs] = {"items_per_s": round(bs * len(latencies) / elapsed, 1),
                     "batch_p50_ms": round(1e3 * float(np.median(latencies)), 3)}
    best = max(sweep, key=lambda b: sweep[b]["items_per_s"])
    return {"threads": threads, "sweep": sweep, "batch1_items_per_s": sweep[batch_sizes[0]]["items_per_s"],
            "best_batch": best, "best_items_per_s": sweep[best]["items_per_s"]}
