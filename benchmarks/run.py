"""One command, every system side by side: ``python -m benchmarks.run --out benchmarks/results``.

For each workload (``benchmarks/workloads.py``): export to ONNX, publish to a temp
maas_ray registry, measure the limit (raw onnxruntime; for raw workloads also the
pre/postprocessing cost), then start each system (``benchmarks/systems.py``) in its own
process, warm it up, and sweep concurrency with wrk; for maas systems, the mean batch
size of each point from maas_ray's batch-size metric. Writes ``results.json``,
``results.md`` and ``results.png`` under --out.

    python -m benchmarks.run --out benchmarks/results                 # full run, ~11 min per workload
    python -m benchmarks.run --quick --systems flask,maas-fused-tp    # c=32 only, short points
    python -m benchmarks.run --grpc --workloads mlp --systems maas-ingress-tp-x2   # + OIP v2 over gRPC

--grpc: maas systems also serve gRPC (HTTP port + 1000) and each is measured over gRPC
after HTTP, at the same concurrencies, with benchmarks/grpc_loadgen.py (closed loop,
grpc.aio); the points go under ``grpc_points`` beside ``points``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import report
from benchmarks.grpc_loadgen import run_grpc
from benchmarks.limit import measure_limit, prepost_ceiling
from benchmarks.loadgen import run_wrk, wrk_path
from benchmarks.systems import SYSTEMS, Ctx, Server, baseline_system
from benchmarks.workloads import MODEL_PATH, WORKLOADS

# Ports of system i: HTTP base+i, Ray's metrics export base+METRICS_OFFSET+i (maas systems),
# gRPC base+GRPC_OFFSET+i (--grpc), never a port Serve's HAProxy binds for itself (stats 8404,
# Prometheus 9101: with the default base 8100, system 1's gRPC port would be 9101).
METRICS_OFFSET = 50
GRPC_OFFSET = 1000
HAPROXY_OWN_PORTS = (8404, 9101)


def grpc_port_of(base_port: int, i: int) -> int:
    port = base_port + GRPC_OFFSET + i
    while port in HAPROXY_OWN_PORTS:
        port += 100
    return port
# An older maas_ray tree (--baseline-src) publishes the same model with its own Registry:
# tensor workloads bare, raw workloads with the manifest's processor specs and files.
_PUBLISH_WITH_TREE = """
import json, sys
from maas_ray.registry import ProcessorSpec, Registry
root, name, onnx, raw = sys.argv[1:]
kw = {}
if raw:
    spec = json.load(open(raw))
    kw = dict(preprocessor=ProcessorSpec(**spec["preprocessor"]), postprocessor=ProcessorSpec(**spec["postprocessor"]),
              files={n: open(path, "rb").read() for n, path in spec["files"].items()})
Registry(root).publish(name, open(onnx, "rb").read(), **kw)
"""

logger = logging.getLogger("benchmarks")


def _csv(value: str, known: dict) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; known: {sorted(known)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--quick", action="store_true", help="c=32 only, 3 s points, short warm-up")
    p.add_argument("--systems", type=lambda v: _csv(v, {**SYSTEMS, "maas-baseline": None}), default=list(SYSTEMS),
                   help=f"comma list of {', '.join(SYSTEMS)}")
    p.add_argument("--workloads", type=lambda v: _csv(v, WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--concurrency", type=lambda v: [int(c) for c in v.split(",")], default=None,
                   help="default 1,8,32,128 (quick: 32)")
    p.add_argument("--duration", type=float, default=None, help="seconds per point (default 6, quick 3)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="CPUs every system gets in total")
    p.add_argument("--base-port", type=int, default=8100, help="systems use base-port + i (not 8000)")
    p.add_argument("--kserve-python", default=os.environ.get("KSERVE_PYTHON", "/tmp/kserve-venv/bin/python"))
    p.add_argument("--grpc", action="store_true",
                   help="maas systems: also measure OIP v2 over gRPC (port base-port + i + 1000)")
    p.add_argument("--batch-sizes", action="store_true",
                   help="maas systems: report each point's mean batch size (Ray exports metrics every second "
                   "instead of every 10 s, and each point waits 2.5 s for them: background CPU, off by default)")
    p.add_argument("--maas-src", help="directory holding a patched maas_ray package to benchmark instead")
    p.add_argument("--baseline-src", help="a checkout of an earlier commit (git worktree add DIR REV): adds "
                   "'maas-baseline', the shipped profile from that tree, to compare a change in one run")
    a = p.parse_args(argv)
    if a.baseline_src:
        SYSTEMS["maas-baseline"] = baseline_system(a.baseline_src)
        if "maas-baseline" not in a.systems:
            a.systems.append("maas-baseline")
    elif "maas-baseline" in a.systems:
        p.error("maas-baseline needs --baseline-src")
    if len(a.systems) > METRICS_OFFSET:
        p.error(f"at most {METRICS_OFFSET} systems: the metrics ports follow the HTTP ports")
    a.concurrency = a.concurrency or ([32] if a.quick else [1, 8, 32, 128])
    a.duration = a.duration or (3.0 if a.quick else 6.0)
    return a


def bench_system(server: Server, url: str, body: bytes, a: argparse.Namespace) -> list[dict]:
    """The concurrency sweep. maas systems: each point's mean batch size, from the batch-size
    histogram read after the point (Server.replica_totals), and in fused placement its mean hop
    (ingress to inference replica and back, beyond the replica's own stages); a point's
    batches and hops include those of its settle run, at the same concurrency."""
    run_wrk(url, body, 8, 2 if a.quick else 4)  # warm-up, not measured
    before = server.replica_totals()
    points = []
    for c in a.concurrency:
        if not a.quick:
            run_wrk(url, body, c, 1)  # settle at this concurrency
        p = run_wrk(url, body, c, a.duration).as_dict()
        after = server.replica_totals() if before else None
        if after:
            batches, hops = after["batches"] - before["batches"], after["hops"] - before["hops"]
            p.update(batches=int(batches),
                     mean_batch=round((after["items"] - before["items"]) / batches, 2) if batches else None,
                     mean_hop_ms=round(1e3 * (after["hop_s"] - before["hop_s"]) / hops, 2) if hops else None)
        before = after
        logger.info("  %-18s c=%-4d %8.0f items/s  p50 %7.1f ms  p99 %7.1f ms  errors %d%s%s",
                    server.system.name, c, p["rps"], p["p50_ms"], p["p99_ms"], p["errors"],
                    f"  mean batch {p['mean_batch']}" if p.get("mean_batch") else "",
                    f"  mean hop {p['mean_hop_ms']} ms" if p.get("mean_hop_ms") else "")
        points.append(p)
    return points


def bench_grpc(server: Server, target: str, request: bytes, a: argparse.Namespace) -> list[dict]:
    """The same sweep as :func:`bench_system`, over gRPC (benchmarks/grpc_loadgen.py)."""
    run_grpc(target, request, 8, 2 if a.quick else 4)  # warm-up, not measured
    points = []
    for c in a.concurrency:
        if not a.quick:
            run_grpc(target, request, c, 1)
        p = run_grpc(target, request, c, a.duration).as_dict()
        logger.info("  %-18s c=%-4d %8.0f items/s  p50 %7.1f ms  p99 %7.1f ms  errors %d  (gRPC)",
                    server.system.name, c, p["rps"], p["p50_ms"], p["p99_ms"], p["errors"])
        points.append(p)
    return points


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # run the finally blocks: stop the servers


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    wrk_path()
    a.out.mkdir(parents=True, exist_ok=True)
    logs = a.out / "logs"
    logs.mkdir(exist_ok=True)
    results = {"meta": {
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.run " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
        "host": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}",
        "maas_src": a.maas_src, "cores": a.cores, "duration_s": a.duration, "concurrency": a.concurrency,
    }, "workloads": {}}

    def save() -> None:
        (a.out / "results.json").write_text(json.dumps(results, indent=1))
        (a.out / "results.md").write_text(report.markdown(results))

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="maas-bench-") as tmp:
        for wname in a.workloads:
            w = WORKLOADS[wname]
            published = w.publish(Path(tmp))
            model_bytes = Path(published.model_path).read_bytes()
            body = w.request_body()
            logger.info("%s: limit (raw onnxruntime, %d threads)", wname, a.cores)
            limit = measure_limit(w, model_bytes, [1, 8, 32, 128] if a.quick else [1, 8, 32, 128, 512],
                                  a.cores, 1.0 if a.quick else 2.0)
            logger.info("  batch 1: %.0f items/s, best (b%d): %.0f items/s", limit["batch1_items_per_s"],
                        limit["best_batch"], limit["best_items_per_s"])
            if published.raw:
                limit.update(prepost_ceiling(w, published, limit, a.cores, 1.0 if a.quick else 2.0))
                logger.info("  pre+post per item: maas %.0f us, baselines %.0f us; ceiling b1 %.0f items/s, "
                            "best %.0f items/s", limit["prepost_us"]["maas"], limit["prepost_us"]["baselines"],
                            limit["ceiling_batch1_items_per_s"], limit["ceiling_best_items_per_s"])
            entry = results["workloads"][wname] = {"description": w.description, "limit": limit, "systems": {}}
            for i, sname in enumerate(a.systems):
                system = SYSTEMS[sname]
                registry = published.registry
                if system.src:  # an older tree reads only the manifests it wrote: publish with it
                    registry = f"{tmp}/registry-{sname}"
                    subprocess.run([sys.executable, "-c", _PUBLISH_WITH_TREE, registry, wname, published.model_path,
                                    published.raw or ""],
                                   env={**os.environ, "PYTHONPATH": system.src}, cwd=system.src, check=True)
                # The baseline's tree (its ray_server and maas_ray) predates gRPC and the metrics port.
                maas = sname.startswith("maas-") and not system.src
                grpc_port = grpc_port_of(a.base_port, i) if a.grpc and maas else None
                ctx = Ctx(wname, published.model_path, registry, a.base_port + i, a.cores, w.max_batch_size,
                          a.kserve_python, a.maas_src, grpc_port, raw=published.raw,
                          metrics_port=a.base_port + METRICS_OFFSET + i if maas and a.batch_sizes else None)
                skip = system.available(ctx)
                if skip:
                    logger.warning("%s: skipped: %s", sname, skip)
                    entry["systems"][sname] = {"description": system.description, "note": f"skipped: {skip}"}
                    continue
                url = f"http://127.0.0.1:{ctx.port}{MODEL_PATH.format(model=wname)}"
                logger.info("%s / %s: starting on port %d", wname, sname, ctx.port)
                started = time.monotonic()
                server = Server(system, ctx, logs / f"{wname}-{sname}.log")
                rec = entry["systems"][sname] = {"description": system.description, "points": []}
                try:
                    reply = server.wait_ready(url, body, w.sample)
                    rec["startup_s"] = round(time.monotonic() - started, 1)
                    rec.update(w.sample(reply))
                    rec["points"] = bench_system(server, url, body, a)
                    if grpc_port:
                        rec["grpc_points"] = bench_grpc(server, f"127.0.0.1:{grpc_port}", w.grpc_request(), a)
                except Exception as exc:  # record and go on with the next system
                    logger.error("%s / %s failed: %s", wname, sname, exc)
                    rec["note"] = f"failed: {exc}"
                finally:
                    server.stop()
                save()
    report.plot(results, a.out / "results.png")
    save()
    logger.info("done in %.0f s: %s", time.monotonic() - t0, a.out)
    print(report.markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
