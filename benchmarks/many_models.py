"""Many models on few replicas, on real Ray Serve: a dynamic pool under a memory budget against
the same models all loaded, in one run (issue 25, "Measure").

    flock /tmp/maas-ray.lock python -m benchmarks.many_models --out benchmarks/results/issue25/many_models.md

What it does, on one Ray instance (``ray.init(num_cpus=4)``, as the integration tests):

1. Publishes ``--small`` small and ``--medium`` medium linear models (``input (1, in) -> logits
   (1, out)``, seeded weights, built with ``onnx.helper``; weights dominate their bytes) to a
   temporary registry.
2. **all-loaded** (the baseline): a dynamic app (``dynamic: {models: ["*"]}``) whose pool
   budget holds every model; one request per model at concurrency 1 loads them all (each load
   alone in its replica, so its bytes are measured, not estimated), then the measured phases run
   on warm replicas. Why this baseline and not a static app (``models: [...]``, placement
   ``ingress``): it differs from the pool app in the budget only (same ingress, same handle hop,
   same router, same batching), so the ratio is the cost of loading and evicting, not of the hop.
3. **pool**: the same app with ``memory_budget_bytes`` per replica = ``--budget-share`` x (the
   bytes every model held in the baseline) / ``--pool-replicas`` (or ``--budget-mb``), so the
   whole pool holds about a third of the models' bytes; it starts empty and runs a warm-up of
   ``--warmup`` seconds of the same traffic before each measured phase.

Both apps run one after the other on the same cores, the same pool sizes and the same request
sequence: closed-loop HTTP (OIP v2 infer, one connection per client) at ``--concurrency``, each
request's model drawn from Zipf(s) over all models (a seeded popularity order, the same for
every s and both apps; size and popularity independent), ``--duration`` seconds per s.

Reported per app and s: throughput (2xx responses/s), client p50/p99 (all requests, small and
medium apart), the pool's hit rate (its replicas' ``stats()`` hits and misses, read before and
after: per pool call, and the ingress coalesces concurrent requests for one version into one
call), warm and cold p50/p99 (``ray_maas_cache_request_seconds`` by ``cache=warm|cold`` from the
node's Prometheus endpoint, differenced over the phase, quantiles from the buckets as Prometheus's
``histogram_quantile`` does: the time inside the pool replica, a cold one including its load),
loads and evictions; and each pool replica's held bytes and RSS sampled every second through a
``stats()`` handle call routed by a version the replica holds (its peak and mean against the
budget, RSS min/max, and the series in the JSON), and the ingress replica's RSS (read inside its
named actor: it holds no model). ``--render run.json`` re-renders a run's table. Every ``--check-every``-th response is checked
against ``x @ W + b`` computed here.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

MB = 1 << 20
PROBE = "__bench_probe__"  # a routing ID no request uses: reaches a replica for stats() before it holds anything
ALL_APP, POOL_APP = "allloaded", "pool"


# ---- models -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # small | medium
    in_features: int
    out_features: int
    seed: int

    @property
    def weight_bytes(self) -> int:
        return 4 * (self.in_features * self.out_features + self.out_features)


def parse_dims(text: str) -> tuple[int, int]:
    """``"256x1024"`` -> (256, 1024)."""
    try:
        a, b = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"dims {text!r}: expected INxOUT, e.g. 256x1024") from None
    if a < 1 or b < 1:
        raise argparse.ArgumentTypeError(f"dims {text!r}: both must be >= 1")
    return a, b


def model_specs(n_small: int, n_medium: int, small: tuple[int, int], medium: tuple[int, int]) -> list[ModelSpec]:
    specs = [ModelSpec(f"s{i:03d}", "small", *small, seed=1000 + i) for i in range(n_small)]
    specs += [ModelSpec(f"m{i:02d}", "medium", *medium, seed=5000 + i) for i in range(n_medium)]
    return specs


def weights(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    return (rng.normal(size=(spec.in_features, spec.out_features)).astype(np.float32),
            rng.normal(size=(spec.out_features,)).astype(np.float32))


def linear_onnx(w: np.ndarray, b: np.ndarray) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"])],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", w.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def example(in_features: int) -> np.ndarray:
    return np.random.default_rng(in_features).normal(size=(1, in_features)).astype(np.float32)


def request_body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": [round(float(v), 6) for v in x.ravel()]}]}).encode()


def publish_all(root: str, specs: Sequence[ModelSpec]) -> dict[str, np.ndarray]:
    """Publish every model (v1) and return each one's expected logits for :func:`example`."""
    from maas_ray.registry import Registry

    reg = Registry(root)
    expected = {}
    for spec in specs:
        w, b = weights(spec)
        reg.publish(spec.name, linear_onnx(w, b))
        x = np.asarray(json.loads(request_body(example(spec.in_features)))["inputs"][0]["data"], np.float32)
        expected[spec.name] = x.reshape(1, -1) @ w + b
    return expected


# ---- traffic ------------------------------------------------------------------------------------
def zipf_weights(n: int, s: float) -> list[float]:
    """P(rank k) proportional to 1 / k^s, k = 1..n, normalized."""
    if n < 1:
        raise ValueError(f"zipf over {n} items: need at least 1")
    raw = [1.0 / (k ** s) for k in range(1, n + 1)]
    total = sum(raw)
    return [r / total for r in raw]


class ZipfSampler:
    """Model names with Zipf(s) popularity. The popularity order is a seeded shuffle of ``names``
    that does not depend on ``s``, so every skew (and every app) has the same hot models."""

    def __init__(self, names: Sequence[str], s: float, seed: int = 0) -> None:
        self.ranked = list(names)
        random.Random(seed).shuffle(self.ranked)
        self.probs = zipf_weights(len(self.ranked), s)
        self._cum = []
        acc = 0.0
        for p in self.probs:
            acc += p
            self._cum.append(acc)
        self._cum[-1] = 1.0
        self._rng = random.Random(f"{seed}/{s}")

    def sample(self) -> str:
        return self.ranked[bisect.bisect_left(self._cum, self._rng.random())]

    def sequence(self, k: int) -> list[str]:
        return [self.sample() for _ in range(k)]


# ---- statistics ---------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def histogram_quantile(buckets: dict[float, float], q: float) -> Optional[float]:
    """Prometheus's ``histogram_quantile``: ``buckets`` maps each upper bound (``math.inf`` last)
    to its cumulative count; linear interpolation inside the bucket holding rank q x total, the
    first bucket's lower bound 0, the highest finite bound if the rank falls in +Inf."""
    bounds = sorted(buckets)
    if not bounds or bounds[-1] != math.inf:
        return None
    total = buckets[math.inf]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == math.inf:
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def bucket_delta(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {le: after[le] - before.get(le, 0.0) for le in after}


@dataclass
class Req:
    model: str
    kind: str
    start: float
    latency_s: float
    status: int  # 0: no response (connection error, timeout)
    wrong: bool = False  # checked and not x @ W + b
    error: str = ""


def summarize_requests(reqs: Sequence[Req], wall_s: float) -> dict:
    ok = [r for r in reqs if r.status == 200]
    out = {"requests": len(reqs), "ok": len(ok), "errors": len(reqs) - len(ok),
           "wrong": sum(r.wrong for r in reqs), "wall_s": round(wall_s, 2),
           "rps": round(len(ok) / wall_s, 1) if wall_s > 0 else 0.0}
    for label, sel in (("", ok), ("small_", [r for r in ok if r.kind == "small"]),
                       ("medium_", [r for r in ok if r.kind == "medium"])):
        lat = [r.latency_s * 1e3 for r in sel]
        out[f"{label}p50_ms"] = _r(percentile(lat, 50))
        out[f"{label}p99_ms"] = _r(percentile(lat, 99))
    out["distinct_models"] = len({r.model for r in reqs})
    errs = sorted({f"{r.status} {r.error}"[:200] for r in reqs if r.status != 200})
    out["error_examples"] = errs[:5]
    return out


def _r(v: Optional[float], nd: int = 2) -> Optional[float]:
    return None if v is None else round(v, nd)


def summarize_counters(before: dict[str, dict], after: dict[str, dict]) -> dict:
    """Pool replicas' stats() before and after a phase (replica id -> stats): the deltas summed.
    A replica absent before (started or restarted meanwhile) counts from zero."""
    keys = ("hits", "misses", "loads", "load_failures", "evictions")
    total = {k: sum(s.get(k, 0) - before.get(r, {}).get(k, 0) for r, s in after.items()) for k in keys}
    lookups = total["hits"] + total["misses"]
    total["hit_rate"] = round(total["hits"] / lookups, 4) if lookups else None
    return total


def summarize_memory(samples: Sequence[dict], budget: int) -> dict[str, dict]:
    """Per replica, over samples ``{"replica", "held_bytes", "rss_bytes", "count"}``: peak and mean
    held bytes (and against the budget), RSS min/max, most versions held."""
    by: dict[str, list[dict]] = {}
    for s in samples:
        by.setdefault(s["replica"], []).append(s)
    out = {}
    for replica, rows in sorted(by.items()):
        held = [r["held_bytes"] for r in rows]
        rss = [r["rss_bytes"] for r in rows if r.get("rss_bytes")]
        out[replica] = {
            "samples": len(rows), "peak_held_bytes": max(held), "mean_held_bytes": int(statistics.fmean(held)),
            "peak_of_budget": round(max(held) / budget, 3) if budget else None,
            "mean_of_budget": round(statistics.fmean(held) / budget, 3) if budget else None,
            "over_budget_samples": sum(h > budget for h in held),
            "rss_min_bytes": min(rss) if rss else None, "rss_max_bytes": max(rss) if rss else None,
            "max_count": max(r["count"] for r in rows),
        }
    return out


# ---- the live system ----------------------------------------------------------------------------
def app_config(name: str, root: str, budget: int, args: argparse.Namespace) -> dict:
    return {
        "http_options": {"host": "127.0.0.1", "port": args.port},
        "applications": [{
            "name": name, "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app",
            "logging_config": {"enable_access_log": False},
            "args": {
                "registry_root": root,
                "dynamic": {"models": ["*"], "memory_budget_bytes": int(budget), "load_timeout_s": 60,
                            "pool": {"num_replicas": args.pool_replicas,
                                     "ray_actor_options": {"num_cpus": args.pool_cpus}}},
                "ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": args.ingress_cpus}},
            },
        }],
    }


def scrape_cache(app: str) -> dict:
    """From the node's Prometheus endpoint: the pool's request-latency buckets by cache
    (warm|cold) summed over models and replicas, {cache: {le: cumulative count}}."""
    import httpx
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    from maas_ray.serving.metric_names import RAY_CACHE_REQUEST_LATENCY_BUCKET

    port = ray.nodes()[0]["MetricsExportPort"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, dict[float, float]] = {"warm": {}, "cold": {}}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == RAY_CACHE_REQUEST_LATENCY_BUCKET and s.labels.get("app") == app:
                cache = s.labels.get("cache", "")
                le = float(s.labels["le"])  # "+Inf" -> inf
                d = out.setdefault(cache, {})
                d[le] = d.get(le, 0.0) + s.value
    return out


class ReplicaSampler(threading.Thread):
    """Every ``interval_s``: each pool replica's stats(), through a handle call routed by a
    version that replica holds (its most recently used), or by a probe ID before it holds any."""

    def __init__(self, app: str, replicas: int, interval_s: float = 1.0) -> None:
        super().__init__(daemon=True, name="replica-sampler")
        from ray import serve

        self.pool = serve.get_deployment_handle("ModelPool", app)
        self.replicas, self.interval_s = replicas, interval_s
        self.route: dict[str, str] = {}  # replica -> routing ID that reached it
        self.latest: dict[str, dict] = {}
        self.samples: list[dict] = []
        self.phase = "start"
        self.t0 = time.monotonic()
        self._halt = threading.Event()
        self._probe = 0
        self.app = app
        self.ingress_samples: list[dict] = []  # {"t", "phase", "rss_bytes"}: the ingress replica's RSS
        self._ingress: list = []

    def _call(self, routing: str) -> Optional[dict]:
        try:
            return self.pool.options(multiplexed_model_id=routing).stats.remote().result(timeout_s=10)
        except Exception:  # a replica restarting: the next tick tries again
            return None

    def snapshot(self) -> dict[str, dict]:
        """Reach every replica once (probing until ``replicas`` answered, at most 40 calls)."""
        seen: dict[str, dict] = {}
        for replica, routing in list(self.route.items()):
            s = self._call(routing)
            if s is not None:
                seen[s["replica"]] = s
        tries = 0
        while len(seen) < self.replicas and tries < 40:
            tries += 1
            self._probe += 1
            routing = f"{PROBE}:{self._probe}"
            s = self._call(routing)
            if s is not None and s["replica"] not in seen:
                seen[s["replica"]] = s
                self.route[s["replica"]] = routing
        for replica, s in seen.items():
            if s["entries"]:
                self.route[replica] = s["entries"][-1]["key"]  # most recently used: reported as held
            self.latest[replica] = s
        return seen

    def record(self) -> dict[str, dict]:
        seen = self.snapshot()
        t = round(time.monotonic() - self.t0, 2)
        for replica, s in seen.items():
            self.samples.append({"t": t, "phase": self.phase, "replica": replica, "held_bytes": s["held_bytes"],
                                 "rss_bytes": s.get("rss_bytes"), "count": s["count"], "hits": s["hits"],
                                 "misses": s["misses"], "loads": s["loads"], "evictions": s["evictions"]})
        return seen

    def ingress_rss(self) -> Optional[int]:
        """The ingress replica's RSS, read inside its actor (Ray's named actors, as tests/helpers/live.py's
        replica_pids): it holds no model, so what it holds is the request path's own memory."""
        import ray

        try:
            if not self._ingress:
                prefix = f"SERVE_REPLICA::{self.app}#Ingress#"
                self._ingress = [ray.get_actor(a["name"], namespace=a["namespace"])
                                 for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
            return sum(ray.get(h.__ray_call__.remote(_own_rss), timeout=5) for h in self._ingress) or None
        except Exception:  # a replica restarting: look it up again next time
            self._ingress = []
            return None

    def run(self) -> None:
        while not self._halt.is_set():
            start = time.monotonic()
            self.record()
            rss = self.ingress_rss()
            if rss:
                self.ingress_samples.append({"t": round(time.monotonic() - self.t0, 2), "phase": self.phase,
                                             "rss_bytes": rss})
            self._halt.wait(max(0.0, self.interval_s - (time.monotonic() - start)))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def _own_rss(_actor: object) -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def closed_loop(url: str, names: Sequence[str], kinds: dict[str, str], bodies: dict[str, bytes],
                      concurrency: int, duration_s: float, expected: Optional[dict[str, np.ndarray]] = None,
                      check_every: int = 0) -> tuple[list[Req], float]:
    """``concurrency`` clients, one connection each, each keeping one request in flight, the
    models taken in order from ``names`` (cycled) until ``duration_s`` has passed (0: one pass
    over ``names``). Requests in flight then finish and count."""
    import httpx

    reqs: list[Req] = []
    it = iter(names)
    one_pass = duration_s <= 0
    start = time.perf_counter()
    end = start + duration_s
    counter = [0]

    def next_name() -> Optional[str]:
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            if one_pass:
                return None
            it = iter(names)
            return next(it)

    async def worker() -> None:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=1)) as client:
            while one_pass or time.perf_counter() < end:
                name = next_name()
                if name is None:
                    return
                counter[0] += 1
                check = expected is not None and check_every > 0 and counter[0] % check_every == 0
                t = time.perf_counter()
                try:
                    r = await client.post(f"{url}/v2/models/{name}/infer", content=bodies[name],
                                          headers={"content-type": "application/json"})
                    lat = time.perf_counter() - t
                    req = Req(name, kinds[name], t - start, lat, r.status_code,
                              error="" if r.status_code == 200 else r.text[:160])
                    if check and r.status_code == 200:
                        out = r.json()["outputs"][0]
                        got = np.asarray(out["data"], np.float32).reshape(out["shape"])
                        req.wrong = not np.allclose(got, expected[name], rtol=1e-3, atol=1e-2)
                except httpx.HTTPError as exc:
                    req = Req(name, kinds[name], t - start, time.perf_counter() - t, 0, error=repr(exc)[:160])
                reqs.append(req)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return reqs, time.perf_counter() - start


def run_phase(label: str, app: str, url: str, seq: list[str], specs: dict[str, ModelSpec],
              bodies: dict[str, bytes], expected: dict, sampler: ReplicaSampler, args: argparse.Namespace,
              duration_s: float) -> dict:
    """One measured phase: stats and histogram buckets before and after (after a settle for the
    metrics' export), the closed loop in between."""
    settle = args.settle
    time.sleep(settle)
    before_stats, before_hist = sampler.snapshot(), scrape_cache(app)
    sampler.phase = label
    kinds = {n: s.kind for n, s in specs.items()}
    reqs, wall = asyncio.run(closed_loop(url, seq, kinds, bodies, args.concurrency, duration_s, expected,
                                         args.check_every))
    sampler.phase = f"{label}/settle"
    after_stats = sampler.snapshot()
    time.sleep(settle)
    after_hist = scrape_cache(app)
    out = {"label": label, **summarize_requests(reqs, wall), **summarize_counters(before_stats, after_stats)}
    out["pool_calls"] = out["hits"] + out["misses"]
    for cache in ("warm", "cold"):
        delta = bucket_delta(after_hist.get(cache, {}), before_hist.get(cache, {}))
        n = delta.get(math.inf, 0.0)
        out[f"{cache}_calls"] = int(n)
        for q in (50, 99):
            v = histogram_quantile(delta, q / 100) if n else None
            out[f"{cache}_p{q}_ms"] = _r(None if v is None else v * 1e3)
    print(f"  {label}: {out['rps']} req/s, hit rate {out['hit_rate']}, p50/p99 {out['p50_ms']}/{out['p99_ms']} ms, "
          f"warm p50/p99 {out['warm_p50_ms']}/{out['warm_p99_ms']}, cold p50/p99 {out['cold_p50_ms']}/"
          f"{out['cold_p99_ms']}, errors {out['errors']}, loads {out['loads']}, evictions {out['evictions']}",
          flush=True)
    return out


def deploy_app(name: str, root: str, budget: int, args: argparse.Namespace) -> float:
    from maas_ray.serving.deploy import deploy

    t = time.monotonic()
    deploy(app_config(name, root, budget, args), timeout_s=180)
    return time.monotonic() - t


def delete_app(name: str) -> None:
    from ray import serve

    serve.delete(name)
    time.sleep(1.0)


def run(args: argparse.Namespace) -> dict:
    import ray

    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # Ray exports every 10 s by default
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    t_start = time.monotonic()
    specs_list = model_specs(args.small, args.medium, args.small_dims, args.medium_dims)
    specs = {s.name: s for s in specs_list}
    url = f"http://127.0.0.1:{args.port}"
    result: dict = {"args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                             if k != "out"}, "apps": {}}
    with tempfile.TemporaryDirectory(prefix="maas-many-") as tmp:
        root = str(Path(tmp) / "registry")
        t = time.monotonic()
        expected = publish_all(root, specs_list)
        artifact = {n: sum(f.stat().st_size for f in (Path(root) / n / "1").glob("*.onnx")) for n in specs}
        result["publish_s"] = round(time.monotonic() - t, 1)
        result["artifact_bytes"] = {"small_each": artifact[specs_list[0].name] if args.small else None,
                                    "medium_each": artifact[specs_list[-1].name] if args.medium else None,
                                    "total": sum(artifact.values())}
        print(f"published {len(specs)} models ({sum(artifact.values()) / MB:.0f} MiB of ONNX) in "
              f"{result['publish_s']} s", flush=True)
        bodies = {n: request_body(example(s.in_features)) for n, s in specs.items()}
        seqs = {s: ZipfSampler(list(specs), s, seed=args.seed).sequence(args.sequence) for s in args.zipf}
        result["popularity_top10"] = ZipfSampler(list(specs), 1.0, seed=args.seed).ranked[:10]

        ray.init(num_cpus=args.num_cpus, logging_level="WARNING", log_to_driver=False)
        try:
            # ---- the baseline: every model loaded --------------------------------------------
            big = 1 << 40
            deploy_s = deploy_app(ALL_APP, root, big, args)
            print(f"{ALL_APP}: deployed in {deploy_s:.1f} s; loading all {len(specs)} models", flush=True)
            sampler = ReplicaSampler(ALL_APP, args.pool_replicas, args.sample_interval)
            sampler.snapshot()
            sampler.phase = "load-all"
            sampler.start()
            t = time.monotonic()
            order = [s.name for s in specs_list]
            warm_reqs, _ = asyncio.run(closed_loop(url, order, {n: s.kind for n, s in specs.items()}, bodies, 1, 0,
                                                   expected, check_every=1))
            load_all_s = time.monotonic() - t
            failed = [r for r in warm_reqs if r.status != 200 or r.wrong]
            loaded = sampler.snapshot()
            held_total = sum(s["held_bytes"] for s in loaded.values())
            per_model = {}
            for s in loaded.values():
                for e in s["entries"]:
                    per_model[e["key"].split(":")[0]] = e["bytes"]
            measured = sum(sum(s["measured"].values()) for s in loaded.values())
            print(f"{ALL_APP}: {len(per_model)} models loaded in {load_all_s:.1f} s, {held_total / MB:.0f} MiB held "
                  f"({measured} measured), {len(failed)} failed", flush=True)
            phases = {}
            for s in args.zipf:
                phases[str(s)] = run_phase(f"zipf {s}", ALL_APP, url, seqs[s], specs, bodies, expected, sampler,
                                           args, args.duration)
            sampler.stop()
            small = [b for n, b in per_model.items() if specs[n].kind == "small"]
            medium = [b for n, b in per_model.items() if specs[n].kind == "medium"]
            result["apps"][ALL_APP] = {
                "budget_bytes": big, "deploy_s": round(deploy_s, 1), "load_all_s": round(load_all_s, 1),
                "load_all_failed": [f"{r.model}: {r.status} {r.error}" for r in failed][:10],
                "held_total_bytes": held_total, "models_held": len(per_model), "measured_loads": measured,
                "held_small_median": int(statistics.median(small)) if small else None,
                "held_medium_median": int(statistics.median(medium)) if medium else None,
                "per_replica_after_load": {r: {"held_bytes": s["held_bytes"], "count": s["count"],
                                                "rss_bytes": s["rss_bytes"],
                                                "bytes_per_artifact_byte": s["bytes_per_artifact_byte"]}
                                            for r, s in loaded.items()},
                "phases": phases, "memory": summarize_memory([x for x in sampler.samples if "/" not in x["phase"]
                                                              and x["phase"] != "load-all"], big),
                "samples": sampler.samples, "ingress_samples": sampler.ingress_samples,
            }
            delete_app(ALL_APP)

            # ---- the pool: a budget that holds --budget-share of it ----------------------------
            budget = int(args.budget_mb * MB) if args.budget_mb else int(args.budget_share * held_total
                                                                         / args.pool_replicas)
            deploy_s = deploy_app(POOL_APP, root, budget, args)
            print(f"{POOL_APP}: deployed in {deploy_s:.1f} s; budget {budget / MB:.0f} MiB per replica "
                  f"({args.pool_replicas * budget / max(1, held_total):.0%} of all models' bytes in the pool)",
                  flush=True)
            sampler = ReplicaSampler(POOL_APP, args.pool_replicas, args.sample_interval)
            sampler.snapshot()
            sampler.start()
            phases = {}
            for s in args.zipf:
                if args.warmup > 0:
                    sampler.phase = f"zipf {s} warm-up"
                    warm_seq = ZipfSampler(list(specs), s, seed=args.seed + 1).sequence(args.sequence)
                    asyncio.run(closed_loop(url, warm_seq, {n: x.kind for n, x in specs.items()}, bodies,
                                            args.concurrency, args.warmup))
                phases[str(s)] = run_phase(f"zipf {s}", POOL_APP, url, seqs[s], specs, bodies, expected, sampler,
                                           args, args.duration)
            sampler.stop()
            result["apps"][POOL_APP] = {
                "budget_bytes": budget, "deploy_s": round(deploy_s, 1),
                "pool_share_of_all_bytes": round(args.pool_replicas * budget / max(1, held_total), 3),
                "phases": phases,
                "memory": summarize_memory([x for x in sampler.samples if x["phase"].startswith("zipf")], budget),
                "memory_measured_phases": summarize_memory(
                    [x for x in sampler.samples if x["phase"] in {f"zipf {s}" for s in args.zipf}], budget),
                "samples": sampler.samples, "ingress_samples": sampler.ingress_samples,
            }
            delete_app(POOL_APP)
        finally:
            from ray import serve

            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    result["runtime_s"] = round(time.monotonic() - t_start, 1)
    return result


# ---- report ---------------------------------------------------------------------------------------
def _mb(v: Optional[float]) -> str:
    return "-" if v is None else f"{v / MB:.0f}"


def _f(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.1f}" if isinstance(v, float) else f"{v:,}"


def render(result: dict, command: str) -> str:
    a = result["args"]
    allr, pool = result["apps"][ALL_APP], result["apps"][POOL_APP]
    art = result["artifact_bytes"]
    lines = [
        "# Many models on few replicas: a pool under a memory budget against all loaded (issue 25)",
        "",
        f"    {command}",
        "",
        f"{a['small']} small models ({a['small_dims'][0]}x{a['small_dims'][1]} linear, "
        f"{_mb(art['small_each'])} MiB of ONNX each, held {_mb(allr['held_small_median'])} MiB each) and "
        f"{a['medium']} medium ({a['medium_dims'][0]}x{a['medium_dims'][1]}, {_mb(art['medium_each'])} MiB, held "
        f"{_mb(allr['held_medium_median'])} MiB), {_mb(art['total'])} MiB of ONNX in all; "
        f"**{_mb(allr['held_total_bytes'])} MiB held** when all are loaded ({allr['measured_loads']} of "
        f"{allr['models_held']} loads measured alone). {a['pool_replicas']} pool replicas "
        f"(num_cpus {a['pool_cpus']}) and 1 ingress replica (num_cpus {a['ingress_cpus']}), `ray.init(num_cpus="
        f"{a['num_cpus']})`, on this box's cores; closed-loop HTTP OIP v2 infer at concurrency {a['concurrency']}, "
        f"{a['duration']} s per Zipf skew, models drawn from Zipf(s) over all {a['small'] + a['medium']} (seed "
        f"{a['seed']}, one popularity order for every s and both apps).",
        "",
        f"- **all-loaded**: the same dynamic app with a budget that holds everything, every model loaded "
        f"first (one request each, {allr['load_all_s']} s), then measured warm. It differs from the pool in the "
        "budget only (same ingress, handle hop, router and batching), so the ratio is the cost of loading and "
        "evicting, not of the hop (a static app with placement `ingress` would also drop the hop).",
        f"- **pool**: budget **{_mb(pool['budget_bytes'])} MiB per replica**, the whole pool "
        f"{pool['pool_share_of_all_bytes']:.0%} of all models' held bytes; starts empty, {a['warmup']} s warm-up of "
        "the same traffic (another seed) before each measured phase.",
        "",
        "Hit rate and loads: pool replicas' `stats()`, per pool call: every lookup, the ingress's describe() of a "
        "version it meets for the first time included; in brackets, infer calls only (warm / (warm + cold) of the "
        "histogram below). The ingress coalesces concurrent requests for one version into one call. warm/cold p50/p99: `ray_maas_cache_request_seconds` by `cache`, the time inside "
        "the pool replica (a cold call includes its load), quantiles from the histogram's buckets. Client p50/p99: "
        "every request, end to end.",
        "",
        "| Zipf s | app | req/s | client p50 / p99 ms | small p99 / medium p99 ms | hit rate: calls (requests) | "
        "pool calls | warm p50 / p99 ms | cold p50 / p99 ms (calls) | loads | evictions | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in a["zipf"]:
        for name, app in ((POOL_APP, pool), (ALL_APP, allr)):
            p = app["phases"][str(s)]
            hr = "-" if p["hit_rate"] is None else f"{p['hit_rate']:.1%}"
            infer = p["warm_calls"] + p["cold_calls"]
            hr += f" ({p['warm_calls'] / infer:.1%})" if infer else ""
            lines.append(
                f"| {s} | {name} | {_f(p['rps'])} | {_f(p['p50_ms'])} / {_f(p['p99_ms'])} | "
                f"{_f(p['small_p99_ms'])} / {_f(p['medium_p99_ms'])} | {hr} | {p['pool_calls']:,} | "
                f"{_f(p['warm_p50_ms'])} / {_f(p['warm_p99_ms'])} | {_f(p['cold_p50_ms'])} / {_f(p['cold_p99_ms'])} "
                f"({p['cold_calls']}) | {p['loads']} | {p['evictions']} | {p['errors']} |")
    lines += ["", "Pool against all-loaded, same s:", "",
              "| Zipf s | throughput | client p50 | client p99 |", "|---|---|---|---|"]
    for s in a["zipf"]:
        p, b = pool["phases"][str(s)], allr["phases"][str(s)]
        lines.append(f"| {s} | {_ratio(p['rps'], b['rps'])} | {_ratio(p['p50_ms'], b['p50_ms'])} | "
                     f"{_ratio(p['p99_ms'], b['p99_ms'])} |")
    lines += ["", "Memory per pool replica (sampled every "
              f"{a['sample_interval']} s through `stats()`; held = the versions' measured bytes):", "",
              "| app | replica | samples | peak held MiB (of budget) | mean held MiB (of budget) | samples over budget "
              "| most versions held | RSS min / max MiB |", "|---|---|---|---|---|---|---|---|"]
    for name, app, budget in ((POOL_APP, pool, pool["budget_bytes"]), (ALL_APP, allr, None)):
        for replica, m in app["memory"].items():
            pk = f"{_mb(m['peak_held_bytes'])}" + (f" ({m['peak_of_budget']:.0%})" if budget else "")
            mn = f"{_mb(m['mean_held_bytes'])}" + (f" ({m['mean_of_budget']:.0%})" if budget else "")
            lines.append(f"| {name} | {replica[:8]} | {m['samples']} | {pk} | {mn} | "
                         f"{m['over_budget_samples'] if budget else '-'} | {m['max_count']} | "
                         f"{_mb(m['rss_min_bytes'])} / {_mb(m['rss_max_bytes'])} |")
    for name, app in ((POOL_APP, pool), (ALL_APP, allr)):
        ing = [x["rss_bytes"] for x in app.get("ingress_samples", [])]
        if ing:
            lines.append(f"- {name}: the ingress replica's RSS (it holds no model) {_mb(ing[0])} MiB at the first sample, "
                         f"{_mb(max(ing))} MiB at most, {_mb(ing[-1])} MiB at the last ({len(ing)} samples).")
    lines += ["", "The pool's memory over time (every 10th sample; held / RSS MiB per replica):", ""]
    lines += _timeline(pool["samples"])
    lines += ["", f"Runtime {result['runtime_s']} s (publishing {result['publish_s']} s). Raw numbers, every "
              "sample included: the JSON file beside this one."]
    return "\n".join(lines) + "\n"


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def _timeline(samples: Sequence[dict], every: int = 10) -> list[str]:
    replicas = sorted({s["replica"] for s in samples})
    ticks = sorted({s["t"] for s in samples})
    rows = ["| t s | phase | " + " | ".join(r[:8] for r in replicas) + " |",
            "|---|---|" + "---|" * len(replicas)]
    by_t: dict[float, dict[str, dict]] = {}
    for s in samples:
        by_t.setdefault(s["t"], {})[s["replica"]] = s
    for t in ticks[::every]:
        row = by_t[t]
        phase = next(iter(row.values()))["phase"]
        cells = [f"{_mb(row[r]['held_bytes'])} / {_mb(row[r]['rss_bytes'])}" if r in row else "-" for r in replicas]
        rows.append(f"| {t:.0f} | {phase} | " + " | ".join(cells) + " |")
    return rows


# ---- CLI ------------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 1.0,1.2") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: expected one or more numbers > 0")
    return vals


def _share(text: str) -> float:
    v = float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"budget share {text!r}: expected a number in (0, 1]")
    return v


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.many_models", description=__doc__.split("\n")[0])
    p.add_argument("--small", type=int, default=200, help="small models (default 200)")
    p.add_argument("--medium", type=int, default=20, help="medium models (default 20)")
    p.add_argument("--small-dims", type=parse_dims, default=(256, 1024), help="INxOUT of a small model (1 MiB)")
    p.add_argument("--medium-dims", type=parse_dims, default=(2048, 2560), help="INxOUT of a medium one (20 MiB)")
    p.add_argument("--zipf", type=_floats, default=[1.0, 1.2], help="Zipf skews, comma-separated (1.0,1.2)")
    p.add_argument("--concurrency", type=int, default=8, help="clients, each one request in flight (8)")
    p.add_argument("--duration", type=float, default=40.0, help="measured seconds per app and skew (40)")
    p.add_argument("--warmup", type=float, default=10.0, help="pool: seconds of warm-up traffic before each skew")
    p.add_argument("--settle", type=float, default=3.0, help="idle seconds before reading metrics (Ray exports "
                   "every second here)")
    p.add_argument("--budget-share", type=_share, default=1 / 3,
                   help="the pool's budget in all (replicas x per-replica budget) as a share of the bytes all models "
                   "held in the all-loaded app (1/3)")
    p.add_argument("--budget-mb", type=float, default=None, help="per pool replica, MiB (overrides --budget-share)")
    p.add_argument("--pool-replicas", type=int, default=2)
    p.add_argument("--pool-cpus", type=float, default=0.5, help="num_cpus of a pool replica (0.5)")
    p.add_argument("--ingress-cpus", type=float, default=0.5, help="num_cpus of the ingress replica (0.5)")
    p.add_argument("--num-cpus", type=int, default=4, help="ray.init(num_cpus=...) (4, as the integration tests)")
    p.add_argument("--port", type=int, default=8123, help="Serve's HTTP port (8123; never 8000, the tests')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sequence", type=int, default=200_000, help="model names drawn per skew (cycled if used up)")
    p.add_argument("--sample-interval", type=float, default=1.0, help="seconds between stats() samples")
    p.add_argument("--check-every", type=int, default=25, help="check every N-th response's values (0: never)")
    p.add_argument("--render", default=None, metavar="JSON", help="only re-render the table of a run's JSON file")
    p.add_argument("--out", default=None, help="write the table here (.md) and the raw numbers beside it (.json)")
    args = p.parse_args(argv)
    for name in ("small", "medium", "concurrency", "pool_replicas"):
        if getattr(args, name) < (1 if name != "medium" and name != "small" else 0):
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)!r}: too small")
    if args.small + args.medium < 1:
        p.error("--small + --medium: at least one model")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.many_models " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.render:
        result = json.loads(Path(args.render).read_text())
        command = result["command"]
    else:
        result = run(args)
        result["command"] = command
    text = render(result, command)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
