"""Offline scoring throughput: ``maas batch`` vs the raw onnxruntime limit vs the HTTP service.

    PYTHONPATH=. flock /tmp/maas-ray.lock .venv/bin/python -m benchmarks.batch_bench [--rows 200000]

One tabular classifier (tests/helpers/tabular_models.py: 5 columns, one of them categorical,
a linear layer + softmax), one parquet file of ``--rows`` rows, on this machine's cores:

- raw onnxruntime: one session in this process (intra_op threads = the machine's cores) over
  the prebuilt FP32 feature matrix, in batches of ``--batch-size`` (no reading, no processors);
- in-process pipeline: the same rows as Arrow columns through the version's LocalPipeline
  (tabular preprocessor -> onnxruntime -> classification postprocessor), one process;
- ``maas batch``: run_batch with ``--actors`` actors (1 CPU each), wall time including Ray
  Data's read, the actor pool's start (model load) and the parquet write;
- ``maas batch`` over ``--files`` files of ``--file-rows`` rows each (issue 26): the job's one
  actor pool for all files (``run_batch``) against the former pipeline-and-pool per file
  (``job._run_per_unit``, kept for this comparison only), alternated ``--rounds`` times;
- HTTP: the version served by Serve (ingress placement, one replica), ``--clients`` threads
  each posting OIP v2 JSON requests of 256 rows (one tensor per column).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--http-rows", type=int, default=40_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--files", type=int, default=10, help="multi-file job: files")
    ap.add_argument("--file-rows", type=int, default=10_000, help="multi-file job: rows per file")
    ap.add_argument("--rounds", type=int, default=2, help="multi-file job: alternations of old and new")
    ap.add_argument("--only-files", action="store_true", help="run only the multi-file comparison")
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from maas_ray.registry import Registry
    from maas_ray.runtime import create_session
    from tests.helpers.tabular_models import features, publish_tabular, random_rows, tabular_onnx

    root = tempfile.mkdtemp(prefix="maas-batch-bench-")
    reg = Registry(os.path.join(root, "registry"))
    m = publish_tabular(reg, "churn", "classifier")
    rows = random_rows(args.rows, seed=1, missing_ages=False)
    table = pa.table({"id": np.arange(args.rows), **{k: pa.array(v) for k, v in rows.items()}})
    src = os.path.join(root, "in.parquet")
    pq.write_table(table, src)
    results: dict[str, float] = {}
    cores = os.cpu_count() or 1

    # raw onnxruntime on the prebuilt matrix
    x = features(rows)
    sess = create_session(tabular_onnx("classifier"), device="cpu", intra_op_threads=cores)
    t0 = time.perf_counter()
    for i in range(0, args.rows, args.batch_size):
        sess.run(None, {"input": x[i:i + args.batch_size]})
    results["raw onnxruntime (prebuilt matrix, 1 session)"] = args.rows / (time.perf_counter() - t0)

    import ray

    from maas_ray.batch import BatchConfig, run_batch
    from maas_ray.batch.scorer import VersionScorer

    # (Before anything asks Ray's runtime context, which would start a default Ray.)
    ray.init(num_cpus=2 * cores, logging_level="ERROR", log_to_driver=False)

    # the serving pipeline in process, on Arrow batches

    scorer = VersionScorer(reg.root, "churn", m.version, "parquet", "cpu", cores)
    t0 = time.perf_counter()
    for batch in table.to_batches(max_chunksize=args.batch_size):
        scorer(pa.Table.from_batches([batch]))
    results["in-process pipeline (pre + onnxruntime + post)"] = args.rows / (time.perf_counter() - t0)

    try:
        results.update(_multi_file(reg.root, m.version, root, args))
        if args.only_files:
            return _print(results, args, cores)
        report = run_batch(BatchConfig(model="churn", version=str(m.version), input=src,
                                       output=os.path.join(root, "out"), registry=reg.root,
                                       actors=args.actors, batch_size=args.batch_size))
        results[f"maas batch ({args.actors} actors, wall incl. start + write)"] = report.rows_per_s
        results["http"] = _http(reg.root, m.version, rows, args)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    _print(results, args, cores)


def _print(results: dict, args: argparse.Namespace, cores: int) -> None:
    print(f"\n{args.rows} rows (multi-file: {args.files} x {args.file_rows}), {cores} cores "
          f"({os.uname().nodename})\n")
    print("| path | rows/s |\n|---|---:|")
    for k, v in results.items():
        name = f"HTTP v2 JSON, {args.clients} clients x 256-row requests" if k == "http" else k
        print(f"| {name} | {v:,.0f} |")


def _multi_file(root_registry: str, version: int, root: str, args: argparse.Namespace) -> dict[str, float]:
    """run_batch (one pool for the job) vs the former pool per file, on the same files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from maas_ray.batch import BatchConfig, run_batch
    from maas_ray.batch.job import _run_per_unit
    from tests.helpers.tabular_models import random_rows

    src = os.path.join(root, "multi")
    os.makedirs(src)
    for i in range(args.files):
        rows = random_rows(args.file_rows, seed=100 + i, missing_ages=False)
        ids = np.arange(i * args.file_rows, (i + 1) * args.file_rows)
        pq.write_table(pa.table({"id": ids, **{k: pa.array(v) for k, v in rows.items()}}),
                       os.path.join(src, f"part-{i:03d}.parquet"))
    runs: dict[str, list[float]] = {"one pool": [], "pool per file": []}
    for r in range(args.rounds):
        for name, fn in (("pool per file", _run_per_unit), ("one pool", run_batch)):
            out = os.path.join(root, f"multi-out-{name.replace(' ', '-')}-{r}")
            report = fn(BatchConfig(model="churn", version=str(version), input=src, output=out,
                                    registry=root_registry, actors=args.actors, batch_size=args.batch_size))
            assert report.rows == args.files * args.file_rows, report.line()
            runs[name].append(report.rows_per_s)
            print(f"round {r} {name}: {report.line()}", flush=True)
    label = f"maas batch, {args.files} files x {args.file_rows} rows ({args.actors} actors), "
    return {label + name + " (best of " + str(args.rounds) + ")": max(v) for name, v in runs.items()}


def _http(root: str, version: int, rows: dict, args: argparse.Namespace) -> float:
    import httpx

    from maas_ray.serving.deploy import deploy

    deploy({
        "http_options": {"host": "127.0.0.1", "port": args.port},
        "applications": [{"name": "bench", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app",
                          "args": {"registry_root": root, "models": [
                              {"name": "churn", "versions": [{"version": version}], "placement": "ingress"}]}}],
    })
    types = {"age": "FP32", "income": "FP64", "city": "BYTES", "member": "BOOL", "visits": "INT64"}
    n = min(args.http_rows, len(rows["age"]))
    bodies = [{"inputs": [{"name": c, "datatype": t, "shape": [len(rows[c][i:i + 256])], "data": rows[c][i:i + 256]}
                          for c, t in types.items()]} for i in range(0, n, 256)]
    url = f"http://127.0.0.1:{args.port}"
    with httpx.Client(base_url=url, timeout=60) as http:
        deadline = time.monotonic() + 120
        while http.get("/v2/models/churn/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the model did not become ready")
            time.sleep(0.5)
        http.post("/v2/models/churn/infer", json=bodies[0]).raise_for_status()  # warm

        def post(body: dict) -> None:
            http.post("/v2/models/churn/infer", json=body).raise_for_status()

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(post, bodies))
        return n / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
