"""The served systems: how to start each one as its own process, with its own environment.

Every system answers ``POST /v2/models/<workload>/infer`` (OIP v2 JSON) on loopback.
Ray-based systems run in separate processes because the Serve env flags are read
when Ray starts.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROFILE_ENV = ROOT / "deployments/profiles/throughput.env"
# Tuned Ray Serve as the issue defines it: throughput-optimized mode + the HAProxy ingress.
RAY_TUNED_FLAGS = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


def read_profile(path: Path = PROFILE_ENV) -> dict[str, str]:
    """The shipped throughput profile: the ``export NAME=VALUE`` lines of the env file."""
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            parsed = shlex.split(value)  # quoted values with spaces, as bash reads them
            env[name.strip()] = parsed[0] if parsed else ""
    return env


THROUGHPUT_PROFILE = read_profile()
# Ray exports what processes record every 10 s by default; with --batch-sizes, maas systems export
# every second, so the batch-size histogram can be read right after each measured point
# (Server.replica_totals). Off by default: the extra exports are background CPU that shows in the
# p99 on 2 cores.
METRICS_ENV = {"RAY_metrics_report_interval_ms": "1000"}
# The worst case between a batch and its appearance on /metrics: maas_ray flushes its
# aggregates every second, and Ray exports them every second (METRICS_ENV).
METRICS_LAG_S = 2.5
_SERVE_FLAGS = (*RAY_TUNED_FLAGS, *THROUGHPUT_PROFILE, *METRICS_ENV, "RAY_ADDRESS")


def stop_server(proc: "subprocess.Popen", log: Any, *, first: int = signal.SIGTERM, timeout_s: float = 90.0,
                pause_s: float = 2.0) -> None:
    """Stop a server started with ``start_new_session``: ``first`` (SIGTERM; SIGINT for ``serve
    run``, which then shuts Serve down), up to ``timeout_s`` for it to exit, then SIGTERM and
    SIGKILL to its process group (Ray agents that outlive their raylet stay in it, nothing else
    is in it); close its log."""
    if proc.poll() is None:
        proc.send_signal(first)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(pause_s)
    if proc.poll() is None:
        proc.wait(10)
    log.close()


@dataclass
class Ctx:
    """What a system needs to start for one workload."""

    workload: str
    model_path: str  # ONNX file
    registry: str  # maas_ray registry root holding <workload> v1
    port: int
    cores: int
    max_batch_size: int
    kserve_python: str
    maas_src: Optional[str] = None  # a patched copy of maas_ray to import first (experiments)
    grpc_port: Optional[int] = None  # maas systems: also serve OIP v2 over gRPC here (run.py --grpc)
    raw: Optional[str] = None  # raw workloads: the processing spec the baselines follow (Published.raw)
    metrics_port: Optional[int] = None  # maas systems: Ray's metrics export port (the batch sizes)


@dataclass
class System:
    name: str
    description: str
    command: Callable[[Ctx], list[str]]
    env: dict[str, str] = field(default_factory=dict)
    available: Callable[[Ctx], Optional[str]] = lambda ctx: None  # -> reason to skip, or None
    src: Optional[str] = None  # run maas_ray from this tree instead of the checkout (baselines)


def _ray(*args: str) -> Callable[[Ctx], list[str]]:
    return lambda c: [sys.executable, "-m", "benchmarks.servers.ray_server", *args, "--port", str(c.port),
                      "--num-cpus", str(c.cores), "--threads", str(c.cores), "--model-path", c.model_path,
                      "--registry", c.registry, "--model", c.workload, "--max-batch-size", str(c.max_batch_size),
                      *(["--grpc-port", str(c.grpc_port)] if c.grpc_port else []),
                      *(["--metrics-port", str(c.metrics_port)] if c.metrics_port else []),
                      # maas serves raw inputs with the manifest's processors: only the baselines need it
                      *(["--raw", c.raw] if c.raw and args[0] != "maas" else [])]


def _kserve_missing(c: Ctx) -> Optional[str]:
    if not Path(c.kserve_python).exists():
        return (f"no python at {c.kserve_python}: create it with `python3 -m venv /tmp/kserve-venv && "
                "/tmp/kserve-venv/bin/pip install kserve onnxruntime pillow tokenizers` (or pass --kserve-python)")
    if c.raw and subprocess.run([c.kserve_python, "-c", "import PIL, tokenizers"], capture_output=True).returncode:
        return (f"raw workloads need pillow and tokenizers in the KServe venv: "
                f"{c.kserve_python} -m pip install pillow tokenizers")
    return None


def _maas(placement: str, profile: bool, replicas: int = 1) -> System:
    suffix = ("-tp" if profile else "") + (f"-x{replicas}" if replicas > 1 else "")
    return System(
        f"maas-{placement}{suffix}",
        f"maas_ray build_app, placement {placement}, "
        + (f"the throughput profile ({PROFILE_ENV.name}, access log off)" if profile else "Serve defaults")
        + (f", {replicas} ingress replicas" + (" with 1 onnxruntime thread each" if placement == "ingress" else "")
           if replicas > 1 else ""),
        _ray("maas", "--placement", placement, "--replicas", str(replicas), *(["--no-access-log"] if profile else [])),
        THROUGHPUT_PROFILE if profile else {})


def baseline_system(src: str) -> System:
    """The shipped profile (maas-ingress-tp-x2) run from another tree, e.g. the previous commit."""
    shipped = _maas("ingress", True, replicas=2)
    return System("maas-baseline", f"{shipped.description}; maas_ray from {src}", shipped.command,
                  shipped.env, src=str(Path(src).resolve()))


SYSTEMS: dict[str, System] = {s.name: s for s in [
    System("flask", "Flask on gunicorn, one sync worker per core (1 onnxruntime thread each), no batching",
           lambda c: [sys.executable, "-m", "gunicorn", "-w", str(c.cores), "-b", f"127.0.0.1:{c.port}",
                      "--backlog", "4096", "benchmarks.servers.flask_app:app"],
           env={"BENCH_THREADS": "1"}),
    System("kserve", "KServe ModelServer (own venv), onnxruntime Model.predict, defaults (1 worker, gRPC off)",
           lambda c: [c.kserve_python, str(ROOT / "benchmarks/servers/kserve_server.py"),
                      "--model_path", c.model_path, "--model_name", c.workload, "--http_port", str(c.port),
                      "--grpc_port", str(c.port + 1000), "--enable_grpc", "false", "--threads", str(c.cores),
                      *(["--raw", c.raw] if c.raw else [])],
           available=_kserve_missing),
    System("ray-plain", "Ray Serve as in the docs: FastAPI ingress, one deployment, defaults",
           _ray("ray-plain")),
    System("ray-tuned", "Ray Serve: @serve.batch, max_ongoing_requests=1024, THROUGHPUT_OPTIMIZED + HAProxy",
           _ray("ray-tuned"), RAY_TUNED_FLAGS),
    *[_maas(p, tp) for tp in (False, True) for p in ("split", "fused", "ingress")],
    _maas("ingress", True, replicas=2),  # replicas = cores; 3 and 4 measured slower on 2 cores
    _maas("fused", True, replicas=2),  # the HTTP and JSON work of a fused app spread over the cores
]}


class Server:
    """A system's process: started in its own session, stopped gracefully (SIGTERM), logs to a file."""

    def __init__(self, system: System, ctx: Ctx, log_path: Path) -> None:
        self.system, self.ctx, self.log_path = system, ctx, log_path
        env = {k: v for k, v in os.environ.items() if k not in _SERVE_FLAGS}
        # A patched maas_ray (--maas-src) must win over the checkout: Python puts the cwd first
        # on the path of the server and of its Ray workers, so the server runs from there.
        src = system.src or ctx.maas_src
        path = [src] if src else []
        env.update(system.env, **(METRICS_ENV if ctx.metrics_port else {}), BENCH_MODEL_PATH=ctx.model_path, BENCH_RAW=ctx.raw or "",
                   PYTHONPATH=os.pathsep.join([*path, str(ROOT)]), RAY_USAGE_STATS_ENABLED="0")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(system.command(ctx), cwd=src or ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, url: str, body: bytes, check: Optional[Callable[[dict], object]] = None,
                   timeout_s: float = 240.0) -> dict:
        """Poll with the benchmark request until a 200; returns the response JSON.

        ``check(reply)`` raises ValueError if the answer is not of the workload's kind (a
        label, for raw workloads): a system that answers 200 without doing the work fails.
        """
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.system.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=10)
                if r.status_code == 200:
                    reply = r.json()
                    if check is not None:
                        try:
                            check(reply)
                        except ValueError as exc:
                            raise RuntimeError(f"{self.system.name} answers the wrong thing: {exc}") from exc
                    return reply
                if r.status_code in (400, 405, 422):  # a wrong request, not a server still starting
                    raise RuntimeError(f"{self.system.name} rejects the benchmark request: {r.status_code} {r.text[:300]}")
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(1.0)
        raise TimeoutError(f"{self.system.name} not ready after {timeout_s}s: {last}; see {self.log_path}")

    def replica_totals(self) -> Optional[dict[str, float]]:
        """What the system's maas_ray replicas have counted so far, from Ray's metrics endpoint:
        ``items`` and ``batches`` (the batch-size histogram) and, in fused placement, ``hop_s``
        and ``hops`` (the hop stage: what requests waited between the ingress and the
        inference replica beyond the replica's own stages). None if the system exports none.

        Waits METRICS_LAG_S first, so that every batch run before the call is counted:
        call it when the load has stopped.
        """
        if not self.ctx.metrics_port:
            return None
        from prometheus_client.parser import text_string_to_metric_families

        from maas_ray.serving.metric_names import (
            RAY_BATCH_SIZE_COUNT,
            RAY_BATCH_SIZE_SUM,
            RAY_STAGE_LATENCY,
            RAY_STAGE_LATENCY_COUNT,
            RAY_STAGE_LATENCY_SUM,
        )

        time.sleep(METRICS_LAG_S)
        text = httpx.get(f"http://127.0.0.1:{self.ctx.metrics_port}/metrics", timeout=10).text
        series = {RAY_BATCH_SIZE_SUM: "items", RAY_BATCH_SIZE_COUNT: "batches",
                  RAY_STAGE_LATENCY_SUM: "hop_s", RAY_STAGE_LATENCY_COUNT: "hops"}
        totals = dict.fromkeys(series.values(), 0.0)
        found = False
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = series.get(sample.name)
                if name is None or sample.labels.get("model") != self.ctx.workload:
                    continue
                if sample.name.startswith(RAY_STAGE_LATENCY) and sample.labels.get("stage") != "hop":
                    continue
                totals[name] += sample.value  # one series per replica process: summed
                found = True
        return totals if found else None

    def stop(self, timeout_s: float = 90.0) -> None:
        """SIGTERM the server (Ray servers shut Serve and Ray down), then clear its own process group.

        The group is the one ``start_new_session`` made for this server: Ray agents that
        outlive their raylet stay in it, and nothing else is in it.
        """
        stop_server(self.proc, self.log, timeout_s=timeout_s)
