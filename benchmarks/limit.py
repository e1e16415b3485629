"""The limit: raw onnxruntime in this process, no HTTP, no JSON, on the servers' cores.

Two layouts of the same cores, and the better one counts for each batch size: one session
with ``cores`` intra-op threads, and ``cores`` one-thread sessions run side by side from
Python threads (onnxruntime releases the GIL), which is how the one-worker-per-core servers
use the cores and is faster for some models (the transformer on 2 cores).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import onnxruntime as ort

from benchmarks.workloads import INPUT_NAME, Workload


def _session(model_bytes: bytes, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def _items_per_s(sessions: list[ort.InferenceSession], feeds: dict, duration_s: float) -> float:
    """Back-to-back runs of every session at once (one Python thread each) for duration_s."""
    for s in sessions:
        s.run(None, feeds)  # warm-up
    counts = [0] * len(sessions)
    stop = time.perf_counter() + duration_s

    def drive(i: int) -> None:
        while time.perf_counter() < stop:
            sessions[i].run(None, feeds)
            counts[i] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return next(iter(feeds.values())).shape[0] * sum(counts) / (time.perf_counter() - start)


def measure_limit(workload: Workload, model_bytes: bytes, batch_sizes: list[int], threads: int,
                  duration_s: float) -> dict:
    """items/s for each batch size, in the better of the two layouts of ``threads`` cores."""
    layouts = {f"1x{threads}": [_session(model_bytes, threads)]}
    if threads > 1:
        layouts[f"{threads}x1"] = [_session(model_bytes, 1) for _ in range(threads)]
    rng = np.random.default_rng(0)
    sweep = {}
    for bs in batch_sizes:
        feeds = {INPUT_NAME: workload.example(bs, rng)}
        by_layout = {name: round(_items_per_s(s, feeds, duration_s), 1) for name, s in layouts.items()}
        layout = max(by_layout, key=by_layout.get)
        sweep[bs] = {"items_per_s": by_layout[layout], "layout": layout, "by_layout": by_layout}
    best = max(sweep, key=lambda b: sweep[b]["items_per_s"])
    return {"threads": threads, "sweep": sweep, "batch1_items_per_s": sweep[batch_sizes[0]]["items_per_s"],
            "best_batch": best, "best_items_per_s": sweep[best]["items_per_s"]}
