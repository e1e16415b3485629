"""The limit: raw onnxruntime in this process, no HTTP, no JSON, on the servers' cores.

Two layouts of the same cores, and the better one counts for each batch size: one session
with ``cores`` intra-op threads, and ``cores`` one-thread sessions run side by side from
Python threads (onnxruntime releases the GIL), which is how the one-worker-per-core servers
use the cores and is faster for some models (the transformer on 2 cores).

Raw workloads (cnn-png, text-raw): the limit runs on model-ready feeds, and
:func:`prepost_ceiling` adds what decoding and labelling one item costs in process, and the
ceiling that leaves.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np
import onnxruntime as ort

from benchmarks.workloads import AnyWorkload, Published, RawWorkload


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


def measure_limit(workload: AnyWorkload, model_bytes: bytes, batch_sizes: list[int], threads: int,
                  duration_s: float) -> dict:
    """items/s for each batch size, in the better of the two layouts of ``threads`` cores."""
    layouts = {f"1x{threads}": [_session(model_bytes, threads)]}
    if threads > 1:
        layouts[f"{threads}x1"] = [_session(model_bytes, 1) for _ in range(threads)]
    rng = np.random.default_rng(0)
    input_name = layouts[f"1x{threads}"][0].get_inputs()[0].name
    sweep = {}
    for bs in batch_sizes:
        feeds = {input_name: workload.example(bs, rng)}
        by_layout = {name: round(_items_per_s(s, feeds, duration_s), 1) for name, s in layouts.items()}
        layout = max(by_layout, key=by_layout.get)
        sweep[bs] = {"items_per_s": by_layout[layout], "layout": layout, "by_layout": by_layout}
    best = max(sweep, key=lambda b: sweep[b]["items_per_s"])
    return {"threads": threads, "sweep": sweep, "batch1_items_per_s": sweep[batch_sizes[0]]["items_per_s"],
            "best_batch": best, "best_items_per_s": sweep[best]["items_per_s"]}


def _us_per_call(fn: Callable[[], object], duration_s: float, rounds: int = 5) -> float:
    """Microseconds per call in the fastest of ``rounds`` rounds (as timeit advises: on a shared
    box the slower rounds measure the other processes)."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < duration_s / rounds:
            fn()
            calls += 1
        best = min(best, elapsed / calls)
    return round(1e6 * best, 1)


def prepost_ceiling(workload: RawWorkload, published: Published, limit: dict, cores: int, duration_s: float) -> dict:
    """Pre+postprocessing of the request item, in this process on one core (no inference, no
    HTTP, no JSON), done by maas-ray's processors built from the manifest as serving builds
    them and by the baselines' code (benchmarks/servers/raw.py); and the ceiling: inference
    at the limit plus the cheaper pre+post, spread perfectly over ``cores``:
    ``1 / (1 / limit + prepost / cores)`` items/s.
    """
    from benchmarks.servers.raw import RawCodec
    from maas_ray.registry import Registry
    from maas_ray.serving.processors import make_postprocessor, make_preprocessor

    loaded = Registry(published.registry).load(workload.name, 1, skip_roles=("weights",))
    pre = make_preprocessor(loaded.manifest, files=dict(loaded.files))
    post = make_postprocessor(loaded.manifest)
    codec = RawCodec.from_file(published.raw)
    item = workload.json_item()  # what a JSON request decodes to, for both
    request = {workload.request_input: np.array([item], dtype=object)}
    scores = _session(loaded.model_bytes, 1).run(None, pre(request, strict_dtypes=True))[0]
    logits = {loaded.manifest.outputs[0].name: scores}

    def maas() -> None:
        pre(request, strict_dtypes=True)
        post(logits)

    def baselines() -> None:
        codec.preprocess([item])
        codec.postprocess(scores)

    cost = {"maas": _us_per_call(maas, duration_s), "baselines": _us_per_call(baselines, duration_s)}
    per_item_s = min(cost.values()) / 1e6 / cores
    return {"prepost_us": cost,
            "ceiling_batch1_items_per_s": round(1 / (1 / limit["batch1_items_per_s"] + per_item_s), 1),
            "ceiling_best_items_per_s": round(1 / (1 / limit["best_items_per_s"] + per_item_s), 1)}
