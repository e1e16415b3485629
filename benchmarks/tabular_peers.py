"""Tabular models: maas-ray against KServe's sklearn / xgboost servers, MLServer and the seeds'
Flask, in one run, on the same models, rows and cores (issue 26).

    PYTHONPATH=. flock /tmp/maas-ray.lock .venv/bin/python -m benchmarks.tabular_peers \\
        --out benchmarks/results/issue26

The models are maas-ray's two reference tabular models, trained into ``--registry`` (as
``maas train`` does, with Ray given 4 logical CPUs) from
deployments/train/tabular-{classifier,regression}.yaml when they are not there yet: ``breast-cancer-rf`` (a scikit-learn random forest Pipeline, 30 columns,
classification) and ``diabetes-xgb`` (XGBoost, 10 columns, one categorical, regression).
maas-ray serves the published ONNX graph; every peer serves the native model the same
manifest keeps as its checksummed ``weights`` extra (``model.skops``, converted to the
``model.joblib`` that KServe's and MLServer's sklearn runtimes load; ``model.xgboost.json``
as it is, renamed ``model.json``).

The systems, each its own process group, started one after the other:

- ``maas``: benchmarks/peers/maas_tabular.py, both models in one app, the shipped sizing
  (ingress placement, one replica per server core with one onnxruntime thread, the throughput
  profile); measured over OIP v2 (one tensor per column) and v1 (``instances`` as one JSON
  object per row, by column name);
- ``flask``: the seeds' architecture, benchmarks/peers/flask_tabular.py on gunicorn (one sync
  worker per server core), the native ``predict`` / ``predict_proba``;
- ``kserve``: KServe's sklearnserver (``PREDICT_PROBA=true``) and xgbserver (``--nthread 1``)
  on the ``kserve`` package, benchmarks/peers/kserve_tabular.py, ``--workers`` = server cores;
- ``mlserver``: ``mlserver start`` with mlserver-sklearn (``predict_fn: predict_proba``) and
  mlserver-xgboost, ``parallel_workers`` = server cores.

KServe and Flask take v1 ``instances`` as lists of numbers in feature order (a category as its
index: what their runtimes accept), MLServer one FP32 ``[rows, features]`` tensor; the values
are the same float32 numbers maas-ray's tabular preprocessor builds from the named columns.

Before timing, each system answers ``--check-rows`` complete rows of the model's own data,
which must equal the published ONNX graph's answers (run in this process: what maas-ray serves)
or the system is reported and not timed; at the end every answer is also compared with
maas-ray's own v2 answers on the same rows. Equal: probabilities within ``--tolerance``
absolute and the same argmax; regression values within ``--tolerance`` relative to
max(1, |value|). The systems run in the order of ``--systems`` (the box's load drifts: run
both orders and compare).

CPU budget: the servers (and every process they start) run under ``taskset -c
<--server-cpus>``; this harness and wrk (benchmarks/loadgen.py, closed loop) under
``--loadgen-cpus``. Each point: ``--duration`` s at each ``--concurrency``, one request body of
``--rows`` rows, after a ``--warmup`` s run at c=8.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("maas", "flask", "kserve", "mlserver")
READY_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class Case:
    """One reference model: its registry name, training config and native runtime."""

    key: str
    model: str
    config: str
    task: str  # classification | regression
    native: str  # sklearn | xgboost


CASES = {c.key: c for c in [
    Case("rf", "breast-cancer-rf", "deployments/train/tabular-classifier.yaml", "classification", "sklearn"),
    Case("xgb", "diabetes-xgb", "deployments/train/tabular-regression.yaml", "regression", "xgboost"),
]}


# ---- arguments -----------------------------------------------------------------------------


def parse_ints(text: str, what: str) -> list[int]:
    """``"1,8,32"`` -> [1, 8, 32]; every value a positive integer."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated integers, got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{what} must be positive integers, got {text!r}")
    return values


def parse_cpus(text: str) -> list[int]:
    """A taskset-style CPU list, ``"0"``, ``"2-3"``, ``"0,2-3"`` -> sorted CPU ids; ``""`` -> []."""
    cpus: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"a CPU list is like '0,2-3', got {text!r}") from exc
        if a < 0 or b < a:
            raise argparse.ArgumentTypeError(f"a CPU list is like '0,2-3', got {text!r}")
        cpus.update(range(a, b + 1))
    return sorted(cpus)


def parse_names(text: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{what} must be a comma-separated subset of {list(known)}, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tabular_peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", help="registry root holding the reference models (trained there if missing; "
                                      "default: a new temporary one)")
    p.add_argument("--models", default="rf,xgb", help="rf (breast-cancer-rf), xgb (diabetes-xgb)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"a subset of {','.join(SYSTEMS)}")
    p.add_argument("--concurrency", default="1,8,32", help="closed-loop connections per point")
    p.add_argument("--rows", default="1,32", help="rows per request, one body per size")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measured point")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load at c=8 before a target's points")
    p.add_argument("--check-rows", type=int, default=64, help="rows each system must answer as maas-ray does")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest difference from maas-ray's answer (probabilities: absolute; values: relative "
                        "to max(1, |value|))")
    p.add_argument("--server-cpus", default="1", help="CPUs every server runs on (taskset list)")
    p.add_argument("--loadgen-cpus", default="0", help="CPUs of this harness and wrk ('' = not pinned)")
    p.add_argument("--base-port", type=int, default=8300, help="servers listen on base..base+4 (never 8000)")
    p.add_argument("--kserve-python", default=os.environ.get("KSERVE_PYTHON", "/tmp/peers-venv/bin/python"))
    p.add_argument("--mlserver-python", default=os.environ.get("MLSERVER_PYTHON", "/tmp/mlserver-venv/bin/python"))
    p.add_argument("--out", help="write peers.md and peers.json here (server logs: the work folder printed first)")
    return p


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        a.models = parse_names(a.models, tuple(CASES), "--models")
        a.systems = parse_names(a.systems, SYSTEMS, "--systems")
        a.concurrency = parse_ints(a.concurrency, "--concurrency")
        a.rows = parse_ints(a.rows, "--rows")
        a.server_cpus = parse_cpus(a.server_cpus)
        a.loadgen_cpus = parse_cpus(a.loadgen_cpus)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    if not a.server_cpus:
        p.error("--server-cpus must name at least one CPU, got ''")
    if set(a.server_cpus) & set(a.loadgen_cpus):
        p.error(f"--server-cpus {a.server_cpus} and --loadgen-cpus {a.loadgen_cpus} overlap: give them "
                "different CPUs, or --loadgen-cpus '' to leave the load generator unpinned")
    if a.duration <= 0 or a.warmup < 0:
        p.error(f"--duration must be > 0 and --warmup >= 0, got {a.duration} and {a.warmup}")
    if a.tolerance < 0:
        p.error(f"--tolerance must be >= 0, got {a.tolerance}")
    if a.check_rows < max(a.rows):
        p.error(f"--check-rows ({a.check_rows}) must cover the largest --rows ({max(a.rows)})")
    if a.base_port <= 8000 < a.base_port + 5:
        p.error(f"--base-port {a.base_port} would use port 8000, which the integration tests use")
    return a


# ---- answers and their comparison (pure) ---------------------------------------------------


def extract(reply: dict, task: str) -> np.ndarray:
    """A reply's answer as an array: probabilities ``(N, C)`` or values ``(N,)``.

    OIP v2 (``outputs``): the tensor named ``probabilities`` / ``value`` (maas-ray), else the
    first one (MLServer's ``predict_proba`` / ``predict``). v1 (``predictions``): rows, or
    maas-ray's one object per row, from which the same name is taken.
    """
    name = "probabilities" if task == "classification" else "value"
    if "outputs" in reply:
        outs = reply["outputs"]
        out = next((o for o in outs if o.get("name") == name), outs[0] if outs else None)
        if out is None:
            raise ValueError("the reply has no outputs")
        arr = np.asarray(out["data"], dtype=np.float64).reshape(out["shape"])
    elif "predictions" in reply:
        preds = reply["predictions"]
        if preds and isinstance(preds[0], dict):
            preds = [p[name] for p in preds]
        arr = np.asarray(preds, dtype=np.float64)
    else:
        raise ValueError(f"the reply has neither outputs nor predictions: {sorted(reply)[:5]}")
    return arr.reshape(len(arr), -1) if task == "classification" else arr.reshape(-1)


@dataclass
class Check:
    """How one system's answers compare with the reference's on the check rows."""

    max_diff: float
    labels_agree: float  # classification: share of rows with the same argmax; regression: 1.0
    ok: bool


def compare(reference: np.ndarray, got: np.ndarray, task: str, tolerance: float) -> Check:
    """Classification: max absolute probability difference, and the same argmax on every row.
    Regression: max ``|a - b| / max(1, |a|)``. Shapes must match."""
    reference, got = np.asarray(reference, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if reference.shape != got.shape:
        return Check(float("inf"), 0.0, False)
    if task == "classification":
        diff = float(np.max(np.abs(reference - got))) if reference.size else 0.0
        agree = float(np.mean(reference.argmax(axis=1) == got.argmax(axis=1))) if len(reference) else 1.0
    else:
        diff = float(np.max(np.abs(reference - got) / np.maximum(1.0, np.abs(reference)))) if reference.size else 0.0
        agree = 1.0
    return Check(diff, agree, bool(diff <= tolerance and agree == 1.0))


# ---- results and their tables (pure) -------------------------------------------------------


@dataclass
class Row:
    """One measured point."""

    model: str
    system: str  # e.g. "maas-ray", "KServe sklearnserver"
    protocol: str  # "v1" | "v2"
    rows: int  # rows per request
    concurrency: int
    rps: float  # 2xx requests/s
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def rows_per_s(self) -> float:
        return self.rps * self.rows


MAAS = "maas-ray"


def maas_ratio(rows: list[Row], row: Row) -> tuple[Optional[float], Optional[float]]:
    """(maas-ray's requests/s ÷ the row's, maas-ray's p99 ÷ the row's) at the same model,
    protocol, rows per request and concurrency; None where maas-ray has no such point or the
    row's value is 0."""
    ref = next((r for r in rows if r.system == MAAS and (r.model, r.protocol, r.rows, r.concurrency)
                == (row.model, row.protocol, row.rows, row.concurrency)), None)
    if ref is None:
        return None, None
    rps = ref.rps / row.rps if row.rps else None
    p99 = ref.p99_ms / row.p99_ms if row.p99_ms else None
    return rps, p99


def peaks(rows: list[Row]) -> list[Row]:
    """Each (model, system, protocol, rows) group's point with the most requests/s, in first-seen order."""
    best: dict[tuple, Row] = {}
    for r in rows:
        key = (r.model, r.system, r.protocol, r.rows)
        if key not in best or r.rps > best[key].rps:
            best[key] = r
    return list(best.values())


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _n(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def render(rows: list[Row]) -> str:
    """Markdown: the peak of each system, then every point, with maas-ray's ratios."""
    out = ["### Peak of each system (over the concurrencies)", "",
           ("maas ÷ peer: maas-ray's number over the peer's on the same protocol, rows per request and "
            "concurrency (req/s above 1: maas-ray serves more; p99 below 1: maas-ray answers faster)."), "",
           "| model | rows/req | system | protocol | peak req/s (c) | rows/s | p50 / p99 ms | maas ÷ peer req/s | maas ÷ peer p99 |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    peak_rows = peaks(rows)
    for r in peak_rows:
        # the ratio at the peer's peak concurrency
        rps, p99 = maas_ratio(rows, r) if r.system != MAAS else (None, None)
        out.append(f"| {r.model} | {r.rows} | {r.system} | {r.protocol} | {_n(r.rps)} (c={r.concurrency}) | "
                   f"{_n(r.rows_per_s)} | {r.p50_ms:.2f} / {r.p99_ms:.2f} | {_x(rps)} | {_x(p99)} |")
    out += ["", "### Every point", "",
            "| model | rows/req | system | protocol | c | req/s | rows/s | p50 ms | p99 ms | errors | maas ÷ peer req/s | maas ÷ peer p99 |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rps, p99 = maas_ratio(rows, r) if r.system != MAAS else (None, None)
        out.append(f"| {r.model} | {r.rows} | {r.system} | {r.protocol} | {r.concurrency} | {_n(r.rps)} | "
                   f"{_n(r.rows_per_s)} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} | {_x(rps)} | {_x(p99)} |")
    return "\n".join(out) + "\n"


# ---- the models and the request bodies -----------------------------------------------------


@dataclass
class Prepared:
    """One reference model, ready for every system."""

    case: Case
    version: int
    columns: list[dict]  # the manifest's tabular schema, in feature order
    matrix: np.ndarray  # float32 (check_rows, F): the model input, as maas-ray's preprocessor builds it
    table: list[dict]  # the same rows by column name, as clients send them to maas-ray
    kserve_dir: str  # holds the one model file KServe's runtime loads
    native_path: str  # the manifest's native extra, as published
    onnx_reference: np.ndarray  # the published ONNX graph on ``matrix``, in process


def _ensure_trained(registry: str, case: Case) -> None:
    from maas_ray.registry import Registry

    if Registry(registry).list_versions(case.model, must_exist=False):
        return
    # As `maas train --config <config>` does, in a child process (its own Ray, gone when it
    # exits), with 4 logical CPUs: on a 2-core box Ray's default (2) is all taken by the 2
    # XGBoost workers, and Ray Data's read task then waits for a CPU forever.
    code = ("import sys; from maas_ray.registry import Registry; "
            "from maas_ray.train.tabular import TabularTrainConfig, train_tabular; "
            "r = train_tabular(TabularTrainConfig.load(sys.argv[1]), Registry(sys.argv[2]), "
            "ray_init={'num_cpus': 4, 'include_dashboard': False}, on_progress=print); "
            "print('published', r.manifest.model, r.manifest.version)")
    print(f"training {case.model} from {case.config}", flush=True)
    subprocess.run([sys.executable, "-c", code, str(ROOT / case.config), registry],
                   check=True, cwd=ROOT, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)})


def _column_value(col: dict, v: Any) -> Any:
    if col["categories"] is not None:
        return str(v)
    if col["dtype"] == "INT64":
        return int(v)
    if col["dtype"] == "BOOL":
        return bool(v)
    return float(np.float32(v))  # the float32 value, exactly, as JSON


def prepare(registry: str, case: Case, work: Path, check_rows: int) -> Prepared:
    """Read the version, its native extra and the model's own data (complete rows only:
    KServe's xgbserver has no way to take a missing value in JSON)."""
    import importlib

    import onnxruntime as ort

    from maas_ray.registry import Registry
    from maas_ray.train.tabular import TabularColumn, encode_features

    reg = Registry(registry)
    manifest = reg.describe(case.model)
    version = manifest.version
    columns = manifest.preprocessor.params["columns"]
    names = [c["name"] for c in columns]
    module, _, fn = manifest.training_config["data"].partition(":")
    frame = getattr(importlib.import_module(module), fn)()[names].dropna().head(check_rows).reset_index(drop=True)
    if len(frame) < check_rows:
        raise SystemExit(f"{case.model}: only {len(frame)} complete rows, --check-rows is {check_rows}")
    matrix = encode_features(frame, [TabularColumn(**c) for c in columns])
    table = [{c["name"]: _column_value(c, row[c["name"]]) for c in columns} for row in frame.to_dict("records")]

    native_name = manifest.model_spec["native_file"]
    native = reg.read_file(case.model, version, native_name)  # checksum verified
    d = work / case.key
    kserve_dir = d / "kserve"
    kserve_dir.mkdir(parents=True, exist_ok=True)
    native_path = d / native_name
    native_path.write_bytes(native)
    if case.native == "sklearn":
        import joblib
        import skops.io

        model = skops.io.loads(native, trusted=skops.io.get_untrusted_types(data=native))
        joblib.dump(model, kserve_dir / "model.joblib")
    else:
        shutil.copyfile(native_path, kserve_dir / "model.json")

    sess = ort.InferenceSession(reg.load(case.model, version).model_bytes, providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: matrix})))
    ref = outs["probabilities"] if case.task == "classification" else outs["value"].reshape(-1)
    return Prepared(case, version, columns, matrix, table, str(kserve_dir), str(native_path), ref)


def body_maas_v2(p: Prepared, n: int) -> bytes:
    return json.dumps({"inputs": [
        {"name": c["name"], "datatype": c["dtype"], "shape": [n], "data": [row[c["name"]] for row in p.table[:n]]}
        for c in p.columns]}).encode()


def body_maas_v1(p: Prepared, n: int) -> bytes:
    return json.dumps({"instances": p.table[:n]}).encode()


def body_instances(p: Prepared, n: int) -> bytes:
    return json.dumps({"instances": p.matrix[:n].astype(np.float64).tolist()}).encode()


def body_mlserver(p: Prepared, n: int) -> bytes:
    x = p.matrix[:n]
    return json.dumps({"inputs": [{"name": "input-0", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.reshape(-1).astype(np.float64).tolist()}]}).encode()


# ---- the servers ---------------------------------------------------------------------------


class Proc:
    """A server in its own session under ``taskset``, logging to a file; stopped with SIGTERM,
    then its process group is cleared."""

    def __init__(self, name: str, cmd: list[str], cpus: list[int], env: dict[str, str], log: Path) -> None:
        self.name, self.log_path = name, log
        self.log = open(log, "w")
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", **env}
        self.proc = subprocess.Popen(["taskset", "-c", ",".join(map(str, cpus)), *cmd], cwd=ROOT, env=full_env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, url: str, body: bytes, timeout_s: float = READY_TIMEOUT_S) -> dict:
        import httpx

        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=10)
                if r.status_code == 200:
                    return r.json()
                last = f"{r.status_code} {r.text[:300]}"
                if "not ready" in r.text:  # MLServer loads its models after it listens
                    pass
                elif r.status_code in (400, 405, 422, 500):  # an answer, not a server still starting
                    raise RuntimeError(f"{self.name} refuses the request: {last}")
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready after {timeout_s}s: {last}; see {self.log_path}")

    def stop(self, timeout_s: float = 60.0) -> None:
        from benchmarks.systems import stop_server

        stop_server(self.proc, self.log, timeout_s=timeout_s, pause_s=1.0)


@dataclass
class Target:
    """One thing to measure: a system answering one model over one protocol."""

    system: str
    protocol: str
    case: Case
    url: str
    body: Any  # (Prepared, rows) -> bytes


@dataclass
class Launch:
    """One server process and the targets it answers."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    targets: list[Target]
    python: Optional[str] = None  # the interpreter it needs (a peer's venv), checked first
    stop_timeout_s: float = 10.0  # SIGTERM, then this long before the process group is killed


def _mlserver_dir(work: Path, cases: list[Prepared], port: int, workers: int) -> Path:
    d = work / "mlserver"
    d.mkdir(exist_ok=True)
    (d / "settings.json").write_text(json.dumps({
        "http_port": port, "grpc_port": port + 1000, "metrics_port": port + 50, "parallel_workers": workers,
        "debug": False}))
    for p in cases:
        m = d / p.case.model
        m.mkdir(exist_ok=True)
        uri = str(Path(p.kserve_dir) / ("model.joblib" if p.case.native == "sklearn" else "model.json"))
        settings = {"name": p.case.model, "parameters": {"uri": uri, "version": str(p.version)},
                    "implementation": ("mlserver_sklearn.SKLearnModel" if p.case.native == "sklearn"
                                       else "mlserver_xgboost.XGBoostModel")}
        if p.case.task == "classification":
            settings["parameters"]["extra"] = {"predict_fn": "predict_proba"}
        (m / "model-settings.json").write_text(json.dumps(settings))
    return d


def launches(a: argparse.Namespace, prepared: list[Prepared], work: Path) -> list[Launch]:
    """The servers to start, in the order of ``--systems``."""
    n = len(a.server_cpus)
    port = {s: a.base_port + i for i, s in enumerate(["maas", "flask", "kserve-sklearn", "kserve-xgboost", "mlserver"])}
    url = "http://127.0.0.1:{port}"
    out: list[Launch] = []
    if "maas" in a.systems:
        from benchmarks.systems import THROUGHPUT_PROFILE

        base = url.format(port=port["maas"])
        targets = []
        for p in prepared:
            targets.append(Target(MAAS, "v2", p.case, f"{base}/v2/models/{p.case.model}/infer", body_maas_v2))
            targets.append(Target(MAAS, "v1", p.case, f"{base}/v1/models/{p.case.model}:predict", body_maas_v1))
        out.append(Launch("maas", [sys.executable, "-m", "benchmarks.peers.maas_tabular", "--port", str(port["maas"]),
                                   "--registry", a.registry, "--replicas", str(n),
                                   *[x for p in prepared for x in ("--model", f"{p.case.model}:{p.version}")]],
                          dict(THROUGHPUT_PROFILE), targets, stop_timeout_s=60.0))  # Serve, then Ray, shut down
    if "flask" in a.systems:
        base = url.format(port=port["flask"])
        models = {p.case.model: {"kind": p.case.native, "path": p.native_path} for p in prepared}
        out.append(Launch("flask", [sys.executable, "-m", "gunicorn", "-w", str(n), "-b", f"127.0.0.1:{port['flask']}",
                                    "--backlog", "4096", "benchmarks.peers.flask_tabular:app"],
                          {"TABULAR_MODELS": json.dumps(models), "TABULAR_NTHREAD": "1"},
                          [Target("Flask + native predict (seeds)", "v1", p.case,
                                  f"{base}/v1/models/{p.case.model}:predict", body_instances) for p in prepared]))
    if "kserve" in a.systems:
        for p in prepared:
            runtime = "sklearn" if p.case.native == "sklearn" else "xgboost"
            key = f"kserve-{runtime}"
            base = url.format(port=port[key])
            out.append(Launch(key, [a.kserve_python, str(ROOT / "benchmarks/peers/kserve_tabular.py"), runtime,
                                    "--model_dir", p.kserve_dir, "--model_name", p.case.model,
                                    "--http_port", str(port[key]), "--grpc_port", str(port[key] + 1000),
                                    "--enable_grpc", "false", "--workers", str(n), "--nthread", "1"],
                              {"PREDICT_PROBA": "true"} if runtime == "sklearn" else {},
                              [Target(f"KServe {'sklearnserver' if runtime == 'sklearn' else 'xgbserver'}", "v1",
                                      p.case, f"{base}/v1/models/{p.case.model}:predict", body_instances)],
                              python=a.kserve_python))
    if "mlserver" in a.systems:
        d = _mlserver_dir(work, prepared, port["mlserver"], n)
        base = url.format(port=port["mlserver"])
        mlserver = str(Path(a.mlserver_python).with_name("mlserver"))
        out.append(Launch("mlserver", [mlserver, "start", str(d)], {},
                          [Target("MLServer", "v2", p.case, f"{base}/v2/models/{p.case.model}/infer", body_mlserver)
                           for p in prepared], python=a.mlserver_python))
    return sorted(out, key=lambda launch: a.systems.index(launch.name.split("-")[0]))


def _versions(python: str, packages: list[str]) -> dict[str, str]:
    code = ("import json, importlib.metadata as m\n"
            f"names = {packages!r}\n"
            "out = {}\n"
            "for n in names:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return json.loads(r.stdout) if r.returncode == 0 else {}


# ---- the run -------------------------------------------------------------------------------


def run(a: argparse.Namespace) -> dict:
    from benchmarks.loadgen import run_wrk, wrk_path

    wrk_path()  # fail early without wrk
    t_start = time.monotonic()
    a.registry = a.registry or tempfile.mkdtemp(prefix="maas-tabular-peers-")
    work = Path(tempfile.mkdtemp(prefix="maas-tabular-peers-work-"))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"registry {a.registry}, work folder and server logs {work}", flush=True)
    cases = [CASES[k] for k in a.models]
    for c in cases:
        _ensure_trained(a.registry, c)
    prepared = [prepare(a.registry, c, work, a.check_rows) for c in cases]
    if a.loadgen_cpus:
        os.sched_setaffinity(0, a.loadgen_cpus)  # this process and wrk, which inherits it

    result: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.tabular_peers", *sys.argv[1:]]),
        "host": {"nodename": os.uname().nodename, "cpus": os.cpu_count()},
        "server_cpus": a.server_cpus, "loadgen_cpus": a.loadgen_cpus, "duration_s": a.duration,
        "tolerance": a.tolerance, "check_rows": a.check_rows,
        "models": {p.case.model: {"version": p.version, "features": len(p.columns), "task": p.case.task}
                   for p in prepared},
        "versions": {"maas (.venv)": _versions(sys.executable, ["ray", "onnxruntime", "scikit-learn", "xgboost",
                                                                "skops", "flask", "gunicorn"])},
        "checks": [], "not_run": [], "points": [], "load_average": [],  # 1-minute, the whole machine
    }
    by_case = {p.case.key: p for p in prepared}
    answers: dict[tuple[str, str, str], np.ndarray] = {}  # (system, protocol, model) -> its check answers
    rows: list[Row] = []
    for launch in launches(a, prepared, work):
        if launch.python and not Path(launch.python).exists():
            result["not_run"].append({"system": launch.name, "reason": f"no python at {launch.python}"})
            print(f"skip {launch.name}: no python at {launch.python}", flush=True)
            continue
        if launch.python:
            result["versions"][launch.name] = _versions(launch.python, [
                "kserve", "mlserver", "mlserver-sklearn", "mlserver-xgboost", "scikit-learn", "xgboost", "fastapi",
                "uvicorn"])
        print(f"start {launch.name}", flush=True)
        result["load_average"].append({"system": launch.name, "before": round(os.getloadavg()[0], 2)})
        t0 = time.monotonic()
        proc = Proc(launch.name, launch.cmd, a.server_cpus, launch.env, logs / f"{launch.name}.log")
        try:
            first = launch.targets[0]
            proc.wait_ready(first.url, first.body(by_case[first.case.key], 1))
            print(f"  ready in {time.monotonic() - t0:.1f}s", flush=True)
            for t in launch.targets:
                p = by_case[t.case.key]
                entry: dict[str, Any] = {"system": t.system, "protocol": t.protocol, "model": t.case.model}
                try:  # also waits for a model a multi-model server is still loading
                    reply = proc.wait_ready(t.url, t.body(p, a.check_rows), timeout_s=60)
                except (RuntimeError, TimeoutError) as exc:
                    entry.update(ok=False, error=str(exc))
                    result["checks"].append(entry)
                    print(f"  {t.system} {t.protocol} {t.case.model}: {entry['error']}", flush=True)
                    continue
                got = extract(reply, t.case.task)
                answers[(t.system, t.protocol, t.case.model)] = got
                # Timed only if it answers as the published graph does (what maas-ray serves, in
                # whatever order the systems run); checked against maas-ray's own answers at the end.
                chk = compare(p.onnx_reference, got, t.case.task, a.tolerance)
                entry.update(asdict(chk), reference="the published ONNX graph in process")
                result["checks"].append(entry)
                print(f"  {t.system} {t.protocol} {t.case.model}: max diff {chk.max_diff:.2e} vs the published "
                      f"graph, labels agree {chk.labels_agree:.0%}: {'OK' if chk.ok else 'WRONG, not timed'}", flush=True)
                if not chk.ok:
                    continue
                if a.warmup:
                    run_wrk(t.url, t.body(p, a.rows[0]), 8, a.warmup)
                for n in a.rows:
                    body = t.body(p, n)
                    for c in a.concurrency:
                        pt = run_wrk(t.url, body, c, a.duration)
                        row = Row(t.case.model, t.system, t.protocol, n, c, pt.rps, pt.p50_ms, pt.p99_ms, pt.errors)
                        rows.append(row)
                        print(f"    rows={n} c={c}: {pt.rps:,.0f} req/s, p50 {pt.p50_ms:.2f} ms, "
                              f"p99 {pt.p99_ms:.2f} ms, errors {pt.errors}", flush=True)
        except (RuntimeError, TimeoutError) as exc:
            result["not_run"].append({"system": launch.name, "reason": str(exc)})
            print(f"  {launch.name} failed: {exc}", flush=True)
        finally:
            proc.stop(launch.stop_timeout_s)
    for entry in result["checks"]:  # every answer against maas-ray's v2 answer on the same rows
        case = next(c for c in cases if c.model == entry["model"])
        ours, got = answers.get((MAAS, "v2", case.model)), answers.get((entry["system"], entry["protocol"], case.model))
        if ours is not None and got is not None and (entry["system"], entry["protocol"]) != (MAAS, "v2"):
            entry["vs_maas"] = asdict(compare(ours, got, case.task, a.tolerance))
    result["points"] = [{**asdict(r), "rows_per_s": r.rows_per_s} for r in rows]
    result["wall_s"] = round(time.monotonic() - t_start, 1)
    result["markdown"] = render(rows)
    return result


def report(result: dict, md: str) -> str:
    """The run as markdown: the command, the CPU budget, versions, the answers' check, what
    did not run, then ``md`` (render's tables)."""
    checks = "\n".join(
        f"- {c['system']} {c['protocol']} {c['model']}: "
        + (f"max diff {c['max_diff']:.2e} vs {c['reference']}, labels agree {c['labels_agree']:.0%}, "
           f"{'OK' if c['ok'] else 'WRONG (not timed)'}" if "max_diff" in c else f"error {c['error']}")
        + (f"; vs maas-ray v2: max diff {c['vs_maas']['max_diff']:.2e}, labels agree "
           f"{c['vs_maas']['labels_agree']:.0%}, {'OK' if c['vs_maas']['ok'] else 'DIFFERENT'}" if "vs_maas" in c else "")
        for c in result["checks"])
    not_run = "\n".join(f"- {n['system']}: {n['reason']}" for n in result["not_run"]) or "- none"
    versions = "\n".join(f"- {where}: " + ", ".join(f"{k} {v}" for k, v in pkgs.items())
                         for where, pkgs in result["versions"].items())
    load = ", ".join(f"{x['system']} {x['before']}" for x in result["load_average"])
    return (f"`{result['command']}`, wall {result['wall_s']} s, on {result['host']['nodename']} "
            f"({result['host']['cpus']} CPUs); servers (and every process they start) on CPUs "
            f"{result['server_cpus']}, this harness and wrk on {result['loadgen_cpus'] or 'any CPU'}; "
            f"{result['duration_s']:g} s per point. The machine's 1-minute load average as each server "
            f"started: {load}.\n\n{versions}\n\n### Answers on {result['check_rows']} rows "
            f"(tolerance {result['tolerance']:g})\n\n{checks}\n\n### Not run\n\n{not_run}\n\n{md}")


def main(argv: Optional[list[str]] = None) -> None:
    a = parse_args(argv)
    result = run(a)
    md = result.pop("markdown")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "peers.json").write_text(json.dumps(result, indent=1))
    text = report(result, md)
    print("\n" + text)
    if a.out:
        (out / "peers.md").write_text(f"# Tabular models against their usual servers\n\n{text}")
        print(f"wrote {out / 'peers.json'} and {out / 'peers.md'}")


if __name__ == "__main__":
    main()
