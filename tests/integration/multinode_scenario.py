"""Multi-node Ray on one machine: train across nodes, serve across nodes, survive a node removal.

Run as its own process (it starts and stops a whole Ray cluster, so it must not share a
driver with the rest of the integration suite, which holds one ``ray.init`` per session)::

    python tests/integration/multinode_scenario.py --out result.json

Cluster (``ray.cluster_utils.Cluster``: separate GCS + raylets on this machine):
    head  num_cpus=1, resource {"head": 1}, dashboard on 127.0.0.1:8366 (job + state APIs)
    w1    num_cpus=2, resource {"w1": 1}
    w2    num_cpus=2, resource {"w2": 1}

1. ``ray job submit --working-dir <repo> -- maas train ...`` with 2 DDP workers
   of 1.5 CPU each: no node has room for two, so they land on w1 and w2. The node of every
   ``RayTrainWorker`` actor is read from the state API; the job publishes digits:1.
2. ``maas_ray.serving.deploy.deploy`` of the app (head-only HTTP proxy on 127.0.0.1:8300, the
   ingress pinned to the head, inference 2 replicas with ``max_replicas_per_node: 1``); the
   replicas' nodes come from the state API; a real HTTP request classifies held-out digits.
3. A second Ray job calls the app through ``MaasClient`` (a Serve handle) and prints the result.
4. Two load threads send HTTP requests back to back while a worker node that hosts an
   inference replica is removed (``cluster.remove_node``; ``--hard-kill`` for SIGKILL); counts
   failed requests before / during / after the recovery, times the replacement, and counts
   the requests each replica answered (from its Serve access log) to show the traffic moved.

Everything measured goes to the JSON (node ids, counts, timings). The cluster is always shut
down in ``finally``. The whole Ray session lives under a private RAY_TMPDIR, so this run does
not touch ``/tmp/ray/ray_current_cluster`` that other Ray instances on the machine rely on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from maas_ray.runtime import QUICK_TRAIN_REPORTS_ENV

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_PORT = 8366
HTTP_PORT = 8300
DASHBOARD = f"http://127.0.0.1:{DASHBOARD_PORT}"
URL = f"http://127.0.0.1:{HTTP_PORT}"
APP = "maas"
INFER_DEPLOYMENT = "digits-v1"  # build_app names inference deployments <model>-v<version>
TRAIN_CPUS_PER_WORKER = 1.5  # > half a worker node (2 CPUs) and > the head (1 CPU)

# Read when Ray processes start: set before the Cluster so raylets, job drivers, Train
# workers and Serve replicas inherit them (the `maas train` CLI sets the first one only in
# its own process, too late for the already running cluster).
CLUSTER_ENV = {
    **QUICK_TRAIN_REPORTS_ENV,
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_DEDUP_LOGS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def log(msg: str) -> None:
    print(f"[multinode {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def maas_cli() -> str:
    exe = Path(sys.executable).with_name("maas")
    return str(exe) if exe.exists() else (shutil.which("maas") or "maas")


def wait_until(pred, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout}s (last error: {last_exc!r})")


def actors(class_name: str, state: str | None = None) -> list[Any]:
    from ray.util.state import list_actors

    filters = [("class_name", "=", class_name)]
    if state:
        filters.append(("state", "=", state))
    return list_actors(address=DASHBOARD, filters=filters, detail=True, raise_on_missing_output=False)


def replica_calls(work: Path, deployment: str) -> dict[str, int]:
    """Calls each replica of ``deployment`` has answered, by replica id: its Serve access log
    lines (``CALL infer_many OK``; the ingress sends requests in these coalesced calls) in the
    session's log dir (one dir: every node runs here). Shows that the removed replica really
    took traffic and the replacement takes it over."""
    counts = {}
    # session_latest is a symlink to the one session dir: count each file once.
    paths = {p.resolve() for p in work.glob(f"ray/session_*/logs/serve/replica_{APP}_{deployment}_*.log")}
    for path in sorted(paths):
        replica_id = path.stem.rsplit("_", 1)[-1]
        with path.open(errors="replace") as f:
            counts[replica_id] = sum(1 for line in f if " CALL infer_many OK " in line)
    return counts


def submit_job(submission_id: str, entrypoint: list[str], timeout: float, on_poll=None) -> dict[str, Any]:
    """``ray job submit`` (waits and tails the logs); ``on_poll`` runs every second meanwhile."""
    from ray.job_submission import JobSubmissionClient

    runtime_env = {"working_dir": str(REPO), "excludes": [".git", "**/__pycache__", "*.egg-info", "out"]}
    cmd = [ray_cli(), "job", "submit", "--address", DASHBOARD, "--submission-id", submission_id,
           "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        try:
            while proc.poll() is None:
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"job {submission_id} still running after {timeout}s")
                if on_poll is not None:
                    try:
                        on_poll()
                    except Exception as exc:  # noqa: BLE001 - state API may not answer at once
                        log(f"poll error (ignored): {exc!r}")
                time.sleep(1.0)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                JobSubmissionClient(DASHBOARD).stop_job(submission_id)
        out.seek(0)
        output = out.read()
    info = JobSubmissionClient(DASHBOARD).get_job_info(submission_id)
    return {
        "submission_id": submission_id,
        "cli_returncode": proc.returncode,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "driver_node_id": info.driver_node_id,
        "seconds": round(time.monotonic() - t0, 2),
        "output": output,
    }


def serve_config(registry_root: str) -> dict[str, Any]:
    return {
        "proxy_location": "HeadOnly",  # one proxy: every node of this "cluster" shares the machine's ports
        "http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
        "applications": [
            {
                "name": APP,
                "route_prefix": "/",
                "import_path": "maas_ray.serving.app:build_app",
                "args": {
                    "registry_root": registry_root,
                    "models": [
                        {
                            "name": "digits",
                            "placement": "fused",
                            "versions": [{"version": 1, "weight": 1}],
                            "batching": {"max_batch_size": 32, "batch_wait_timeout_s": 0.002},
                            "inference": {
                                "num_replicas": 2,
                                "max_replicas_per_node": 1,
                                "ray_actor_options": {"num_cpus": 0.5},
                            },
                        }
                    ],
                    # The HTTP entry point stays on the head, next to the head-only proxy.
                    "ingress": {"ray_actor_options": {"num_cpus": 0.25, "resources": {"head": 0.01}}},
                },
            }
        ],
    }


def v2_body(x) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}


def labels_of(body: dict[str, Any]) -> list[str]:
    return next(o for o in body["outputs"] if o["name"] == "label")["data"]


class Load:
    """Threads that POST /v2/models/digits/infer back to back and log every outcome."""

    def __init__(self, body: dict[str, Any], expected: list[str], threads: int = 2) -> None:
        self.body, self.expected = body, expected
        self.records: list[tuple[float, float, str]] = []  # (start, end, "ok" | error)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=URL, timeout=15.0) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = client.post("/v2/models/digits/infer", json=self.body)
                    if r.status_code != 200:
                        outcome = f"HTTP {r.status_code}: {r.text[:160]}"
                    elif labels_of(r.json()) != self.expected:
                        outcome = f"wrong labels {labels_of(r.json())}"
                    else:
                        outcome = "ok"
                except Exception as exc:  # noqa: BLE001 - counted as a failed request
                    outcome = f"{type(exc).__name__}: {str(exc)[:160]}"
                with self._lock:
                    self.records.append((t0, time.monotonic(), outcome))
                if outcome != "ok":
                    time.sleep(0.05)  # a failing app answers fast: do not spin

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def snapshot(self) -> list[tuple[float, float, str]]:
        with self._lock:
            return list(self.records)


def run(result: dict[str, Any], work: Path, graceful_removal: bool = True) -> None:
    import numpy as np
    from sklearn.datasets import load_digits

    t_start = time.monotonic()
    timings: dict[str, float] = result.setdefault("timings_s", {})
    for port in (DASHBOARD_PORT, HTTP_PORT):
        if not port_free(port):
            raise RuntimeError(f"port {port} is already in use on 127.0.0.1; free it or change the scenario's ports")

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    registry_root, storage = work / "registry", work / "runs"
    result["registry_root"] = str(registry_root)

    # ---- cluster ---------------------------------------------------------------------------
    t0 = time.monotonic()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"head": 1},
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": DASHBOARD_PORT,
            "dashboard_agent_listen_port": None,  # random: 52365 may belong to another Ray on this box
        },
    )
    result["_cluster"] = cluster  # for finally; removed before the JSON is written
    w1 = cluster.add_node(num_cpus=2, resources={"w1": 1})
    w2 = cluster.add_node(num_cpus=2, resources={"w2": 1})
    cluster.wait_for_nodes()
    # Replica logs stay in their files (the load phase logs every request; counted from there).
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    nodes = {"head": cluster.head_node.node_id, "w1": w1.node_id, "w2": w2.node_id}
    name_of = {v: k for k, v in nodes.items()}
    result["nodes"] = nodes
    result["driver_node_id"] = ray.get_runtime_context().get_node_id()
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert alive == set(nodes.values()), f"live nodes {alive} != started {nodes}"

    from ray.util.state import list_nodes

    wait_until(lambda: {n.node_id for n in list_nodes(address=DASHBOARD)} >= set(nodes.values()),
               60, "dashboard state API answering for this cluster")
    timings["cluster_start"] = round(time.monotonic() - t0, 2)
    log(f"cluster up in {timings['cluster_start']}s: {nodes}; driver on {name_of.get(result['driver_node_id'])}")

    # ---- 1. DDP training job across nodes --------------------------------------------------
    train_nodes: dict[str, str] = {}  # actor id -> node id

    def record_train_workers() -> None:
        for a in actors("RayTrainWorker"):
            if a.node_id:
                train_nodes[a.actor_id] = a.node_id

    # The `maas` console script next to this interpreter, as a user would type it.
    train_cmd = [
        maas_cli(), "train",
        "--config", "deployments/train/digits.yaml",
        "--registry", str(registry_root),
        "--storage-path", str(storage),
        "--run-name", "multinode-digits",
        "--num-workers", "2",
        "--cpus-per-worker", str(TRAIN_CPUS_PER_WORKER),
        "--epochs", "10",
        "--checkpoint-every", "5",
        "--min-test-accuracy", "0.9",
    ]
    log("submitting the training job")
    job = submit_job("multinode-train", train_cmd, timeout=240, on_poll=record_train_workers)
    record_train_workers()  # dead actors keep their node id in the state API
    published = [line for line in job["output"].splitlines() if line.startswith("published digits:")]
    job["published_line"] = published[-1] if published else None
    job["output_tail"] = job.pop("output")[-3000:]
    job["worker_node_ids"] = sorted(set(train_nodes.values()))
    job["worker_nodes"] = sorted(name_of.get(n, n) for n in job["worker_node_ids"])
    job["worker_actors"] = {aid: name_of.get(n, n) for aid, n in train_nodes.items()}
    result["train"] = job
    timings["train_job"] = job["seconds"]
    log(f"training job {job['status']} in {job['seconds']}s on {job['worker_actors']}: {job['published_line']}")
    if job["status"] != "SUCCEEDED":
        raise RuntimeError(f"training job {job['status']}:\n{job['output_tail']}")

    from maas_ray.registry import Registry

    manifest = Registry(str(registry_root)).describe("digits", 1)
    result["published"] = {"model": manifest.model, "version": manifest.version,
                           "test_accuracy": manifest.metrics.get("test_accuracy")}

    # ---- 2. Serve across nodes -------------------------------------------------------------
    from maas_ray.serving.deploy import deploy

    t0 = time.monotonic()
    deploy(serve_config(str(registry_root)), timeout_s=150)
    timings["serve_deploy"] = round(time.monotonic() - t0, 2)
    replica_cls = f"ServeReplica:{APP}:{INFER_DEPLOYMENT}"
    replicas = wait_until(lambda: (r := actors(replica_cls, "ALIVE")) and len(r) == 2 and r,
                          30, "2 alive inference replicas in the state API")
    ingress = actors(f"ServeReplica:{APP}:Ingress", "ALIVE")
    proxies = actors("ProxyActor", "ALIVE")
    controller = actors("ServeController", "ALIVE")
    serving: dict[str, Any] = {
        "replica_node_ids": sorted(r.node_id for r in replicas),
        "replica_nodes": sorted(name_of[r.node_id] for r in replicas),
        "replicas": {r.actor_id: name_of[r.node_id] for r in replicas},
        "ingress_nodes": [name_of[a.node_id] for a in ingress],
        "proxy_nodes": [name_of[a.node_id] for a in proxies],
        "controller_nodes": [name_of[a.node_id] for a in controller],
    }
    result["serve"] = serving
    log(f"app RUNNING in {timings['serve_deploy']}s; inference replicas on {serving['replica_nodes']}, "
        f"ingress on {serving['ingress_nodes']}, proxy on {serving['proxy_nodes']}")

    import httpx

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    r = httpx.post(f"{URL}/v2/models/digits/infer", json=v2_body(x[-100:]), timeout=30)
    r.raise_for_status()
    http_labels = labels_of(r.json())
    serving["http"] = {
        "status": r.status_code,
        "model_version": r.json()["model_version"],
        "accuracy_last_100": float(np.mean([lbl == str(t) for lbl, t in zip(http_labels, y[-100:])])),
    }
    log(f"HTTP check: {serving['http']}")

    # ---- 3. another Ray job calls the app through a handle -----------------------------------
    client_code = (
        "import json, numpy as np, ray\n"
        "from sklearn.datasets import load_digits\n"
        "from maas_ray.serving import MaasClient\n"
        "ray.init()\n"
        "x, y = load_digits(return_X_y=True)\n"
        f"with MaasClient(app_name={APP!r}) as client:\n"
        "    r = client.infer('digits', {'input': x[-20:].astype(np.float32)})\n"
        "print('MAAS_RESULT ' + json.dumps({'model_version': r['model_version'],\n"
        "    'labels': [str(v) for v in MaasClient.output(r, 'label').tolist()],\n"
        "    'true': [str(v) for v in y[-20:].tolist()],\n"
        "    'job_node_id': ray.get_runtime_context().get_node_id()}), flush=True)\n"
    )
    log("submitting the handle client job")
    hjob = submit_job("multinode-handle-client", [sys.executable, "-c", client_code], timeout=120)
    # Ray's job log can run a worker's log line into the same output line, so read just the JSON.
    lines = [line for line in hjob["output"].splitlines() if line.startswith("MAAS_RESULT ")]
    hjob["result"] = json.JSONDecoder().raw_decode(lines[-1][len("MAAS_RESULT "):])[0] if lines else None
    if hjob["result"]:
        res = hjob["result"]
        res["correct"] = sum(a == b for a, b in zip(res["labels"], res["true"]))
    hjob["output_tail"] = hjob.pop("output")[-2000:]
    result["handle_job"] = hjob
    timings["handle_job"] = hjob["seconds"]
    log(f"handle job {hjob['status']} in {hjob['seconds']}s: {hjob['result']}")
    if hjob["status"] != "SUCCEEDED" or not hjob["result"]:
        raise RuntimeError(f"handle client job {hjob['status']}:\n{hjob['output_tail']}")

    # ---- 4. remove a worker node that hosts an inference replica, under load -----------------
    victim_name = next(name_of[r.node_id] for r in sorted(replicas, key=lambda r: name_of[r.node_id])
                       if name_of[r.node_id] in ("w1", "w2") and name_of[r.node_id] not in serving["ingress_nodes"])
    victim = {"w1": w1, "w2": w2}[victim_name]
    sample = x[-4:]
    expected = labels_of(httpx.post(f"{URL}/v2/models/digits/infer", json=v2_body(sample), timeout=30).json())
    load = Load(v2_body(sample), expected, threads=2).start()
    time.sleep(3.0)  # baseline: both replicas answering
    calls_before = replica_calls(work, INFER_DEPLOYMENT)
    t_remove = time.monotonic()
    log(f"removing {victim_name} ({nodes[victim_name]}) under load (graceful={graceful_removal})")
    cluster.remove_node(victim, allow_graceful=graceful_removal)
    t_removed = time.monotonic()

    def replaced():
        rs = actors(replica_cls, "ALIVE")
        app_status = serve.status().applications[APP]
        running = app_status.deployments[INFER_DEPLOYMENT].replica_states.get("RUNNING", 0)
        ok = (len(rs) == 2 and running == 2 and app_status.status == "RUNNING"
              and all(r.node_id != nodes[victim_name] for r in rs))
        return ok and rs

    new_replicas = wait_until(replaced, 90, "a replacement inference replica RUNNING", interval=0.25)
    t_replaced = time.monotonic()
    time.sleep(5.0)  # keep the load on the recovered app
    load.stop()
    t_end = time.monotonic()
    time.sleep(1.0)  # let the access logs flush
    calls_after = replica_calls(work, INFER_DEPLOYMENT)
    node_of_replica = {a.name.rsplit("#", 1)[-1]: name_of.get(a.node_id, a.node_id)
                       for a in actors(replica_cls) if a.name}

    records = load.snapshot()
    before = [r for r in records if r[1] < t_remove]
    during = [r for r in records if r[1] >= t_remove and r[0] < t_replaced]
    after = [r for r in records if r[0] >= t_replaced]
    failed = lambda rs: [r for r in rs if r[2] != "ok"]  # noqa: E731
    first_ok_after_removal = min((r[1] for r in records if r[0] >= t_removed and r[2] == "ok"), default=None)
    errors: dict[str, int] = {}
    for r in failed(records):
        kind = r[2].split(":")[0] if not r[2].startswith("HTTP") else r[2][:60]
        errors[kind] = errors.get(kind, 0) + 1
    result["node_removal"] = {
        "removed_node": victim_name,
        "removed_node_id": nodes[victim_name],
        "graceful": graceful_removal,
        "replica_nodes_before": serving["replica_nodes"],
        # replica id -> [node, requests answered before the removal, by the end of the load]
        "replica_calls": {rid: [node_of_replica.get(rid), calls_before.get(rid, 0), n]
                          for rid, n in sorted(calls_after.items())},
        "replica_nodes_after": sorted(name_of[r.node_id] for r in new_replicas),
        "replica_node_ids_after": sorted(r.node_id for r in new_replicas),
        "requests_total": len(records),
        "requests_before_removal": len(before),
        "failed_before_removal": len(failed(before)),
        "requests_during_recovery": len(during),
        "failed_during_recovery": len(failed(during)),
        "requests_after_recovery": len(after),
        "failed_after_recovery": len(failed(after)),
        "failed_total": len(failed(records)),
        "errors": errors,
        "error_examples": sorted({r[2] for r in failed(records)})[:5],
        "remove_node_call_s": round(t_removed - t_remove, 2),
        "replacement_running_s": round(t_replaced - t_remove, 2),
        "first_success_after_removal_s": None if first_ok_after_removal is None
        else round(first_ok_after_removal - t_remove, 3),
        "load_seconds": round(t_end - (records[0][0] if records else t_end), 2),
    }
    timings["node_removal_to_replacement"] = result["node_removal"]["replacement_running_s"]
    log(f"node removal: {json.dumps(result['node_removal'])}")
    timings["total"] = round(time.monotonic() - t_start, 2)


def leftover_processes(work: Path) -> list[str]:
    """Processes of this run still alive: all inherit RAY_TMPDIR=<work> (worker processes
    rename themselves ``ray::...``, so the command line alone does not tell)."""
    marker = f"RAY_TMPDIR={work}".encode()
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in env or str(work) in cmd:
            out.append(f"{pid} {cmd[:150]}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Where to write the JSON result.")
    parser.add_argument("--deadline-s", type=int, default=420, help="Abort (and clean up) after this long.")
    parser.add_argument("--hard-kill", action="store_true",
                        help="SIGKILL the node's processes (allow_graceful=False) instead of SIGTERM first.")
    parser.add_argument("--keep-work-dir", action="store_true", help="Keep registry, runs and Ray logs.")
    args = parser.parse_args()

    # Short private temp dir: Ray's socket paths live under it (108-byte limit).
    work = Path(tempfile.mkdtemp(prefix="mn-", dir="/tmp"))
    os.environ.update(CLUSTER_ENV)
    os.environ["RAY_TMPDIR"] = str(work)  # session dirs + ray_current_cluster stay private
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        os.environ.pop(var, None)

    def on_deadline(signum, frame):
        raise TimeoutError(f"multinode scenario passed its {args.deadline_s}s deadline")

    signal.signal(signal.SIGALRM, on_deadline)
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.alarm(args.deadline_s)

    result: dict[str, Any] = {"ok": False, "work_dir": str(work)}
    t0 = time.monotonic()
    try:
        run(result, work, graceful_removal=not args.hard_kill)
        result["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - reported in the JSON, then cleaned up
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        log(result["traceback"])
    finally:
        signal.alarm(0)
        cluster = result.pop("_cluster", None)
        t_down = time.monotonic()
        try:
            import ray

            if ray.is_initialized():
                try:
                    from ray import serve

                    serve.shutdown()
                except Exception as exc:  # noqa: BLE001
                    log(f"serve.shutdown failed: {exc!r}")
                ray.shutdown()
        finally:
            if cluster is not None:
                cluster.shutdown()
        result.setdefault("timings_s", {})["shutdown"] = round(time.monotonic() - t_down, 2)
        result["timings_s"]["wall"] = round(time.monotonic() - t0, 2)
        # Every process of this run names the private temp dir; give stragglers 15 s to exit.
        deadline = time.monotonic() + 15
        while leftover_processes(work) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1.0)
        result["leftover_processes"] = leftover_processes(work)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
        log(f"wrote {args.out} (ok={result['ok']}, leftover processes: {len(result['leftover_processes'])})")
        if result["ok"] and not args.keep_work_dir and not result["leftover_processes"]:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
