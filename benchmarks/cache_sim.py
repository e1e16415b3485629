"""Many models on many replicas, past one machine: a discrete-event simulation of the version cache.

    python -m benchmarks.cache_sim --models 10000 --replicas 100 --requests 200000 \\
        --out benchmarks/results/issue25/cache_sim.md

No Ray and no asyncio: one heap of events, in simulated seconds. It drives the REAL placement and
eviction code of ``maas_ray.serving.cache`` (``CachePolicy`` per replica, ``replicas_wanted`` for
hot models), so what it reports is what replicas do with that code. What it models:

- ``--models`` versions, sizes from a mixed distribution (80% small, uniform 5-20 MB; 20% medium,
  uniform 100-400 MB), seeded; Zipf(s) popularity over them in a random order (size and
  popularity independent); Poisson arrivals at ``--rate`` requests/s in total.
- ``--replicas`` replicas, each one server (FIFO, ``--service-ms`` per request) with a cache of
  one policy: **bytes** (``CachePolicy(budget)``, maas-ray) or **count** (Serve's
  ``@serve.multiplexed``: ``CachePolicy(None, max_entries=budget / mean size)``). A load takes
  ``0.05 s + size / 400 MB/s``, at most 2 at once per replica (``max_concurrent_loads``); room is
  made first, never by evicting a version with requests in flight (a load with no room waits for
  an unpin). A loading version is held at its size, pinned, like VersionCache's placeholder.
- Routing as Serve's multiplexed router does it: replicas holding (or loading) the version
  first, the least outstanding of them under ``--max-ongoing`` (requests waiting for a load count
  as outstanding, as in Serve); if none (or all saturated), the fallback: Serve's "the replica with
  the fewest versions" (``fewest-models``), or ``pow2`` (the less busy of two random replicas).
  Plus the hot-model rule: when ``replicas_wanted`` (the version's rate, an exponentially decayed
  count over ``--rate-window`` s, times the service time, at ``--target-utilization``) exceeds the
  replicas holding it, the request goes to one more replica (chosen by the fallback), which loads it.
- Each budget x skew runs three ways: bytes + fewest-models, bytes + pow2, count + fewest-models.
  A second table runs the hot-model rule on and off (``--hot-rate``, ``--hot-budget-gb``).

Not modelled: load timeouts (a request waits for its load however long; VersionCache answers 503
after ``load_timeout_s``), replica autoscaling, load bandwidth shared between concurrent loads.
Defaults finish in about 2.5 minutes on one core (40 runs of 200,000 requests).

Reported after a warm-up (``--warmup`` of the requests): hit rate (the routed replica held the
version), loads per second (cluster), p50/p99 latency (arrival to finish, load waits included),
the cold share of the slowest 1% (how much of p99 is cold starts), p99 of cold requests, and the
peak bytes one replica held against the budget, with how many replicas ever went over it (only
the count policy can).
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from maas_ray.serving.cache import CachePolicy, replicas_wanted

MB = 1_000_000
GB = 1_000_000_000
_LOAD, _DONE = 0, 1  # event kinds (a load finished; a request finished)


@dataclass
class SimConfig:
    models: int = 10_000
    replicas: int = 100
    requests: int = 200_000
    rate: float = 500.0             # requests/s, all models together
    skew: float = 1.0               # Zipf s
    budget_bytes: int = 1 * GB      # per replica
    policy: str = "bytes"           # "bytes" | "count"
    service_s: float = 0.010        # replica time per request
    load_base_s: float = 0.05
    load_bytes_per_s: float = 400 * MB
    max_concurrent_loads: int = 2
    max_ongoing: int = 5            # Serve's max_ongoing_requests default
    hot_rule: bool = True
    fallback: str = "fewest-models"  # no replica holds it: "fewest-models" (Serve's) | "pow2"
    target_utilization: float = 0.7
    rate_window_s: float = 10.0
    warmup: float = 0.25            # share of the requests left out of the statistics
    seed: int = 0


@dataclass
class SimResult:
    config: SimConfig
    hit_rate: float
    refused: float                  # share of requests refused: their version is over the whole budget
    loads_per_s: float
    p50_ms: float
    p99_ms: float
    cold_p99_ms: float
    cold_share_of_slowest_1pct: float
    peak_bytes: int                 # the most one replica held (loading versions included)
    replicas_over_budget: int       # replicas that ever held more than the budget
    loads_over_budget: float        # share of loads after which the replica held more than the budget
    max_entries: Optional[int]
    evictions: int
    simulated_s: float
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)


def model_sizes(n: int, seed: int) -> list[int]:
    """80% small (5-20 MB), 20% medium (100-400 MB), uniform within each, seeded."""
    rng = random.Random(seed)
    return [int(rng.uniform(5, 20) * MB) if rng.random() < 0.8 else int(rng.uniform(100, 400) * MB)
            for _ in range(n)]


def zipf_cum_weights(n: int, skew: float, seed: int) -> tuple[list[int], list[float]]:
    """(model of each popularity rank, cumulative weights by rank): rank i has weight 1/i^s, and
    ranks are dealt to models in a seeded random order."""
    order = list(range(n))
    random.Random(seed + 1).shuffle(order)
    return order, list(itertools.accumulate(1.0 / (i + 1) ** skew for i in range(n)))


class _Replica:
    __slots__ = ("policy", "outstanding", "busy_until", "loads_running", "load_queue", "waiting",
                 "peak", "over")

    def __init__(self, policy: CachePolicy) -> None:
        self.policy = policy
        self.outstanding = 0
        self.busy_until = 0.0
        self.loads_running = 0
        self.load_queue: deque[int] = deque()      # models queued for a load slot or room
        self.waiting: dict[int, list] = {}          # model -> requests waiting for its load
        self.peak = 0
        self.over = False


def simulate(cfg: SimConfig) -> SimResult:
    started = time.perf_counter()
    rng = random.Random(cfg.seed + 2)
    sizes = model_sizes(cfg.models, cfg.seed)
    keys = [str(m) for m in range(cfg.models)]
    mean_size = sum(sizes) / len(sizes)
    max_entries = None
    if cfg.policy == "count":
        max_entries = max(1, int(cfg.budget_bytes / mean_size))
    elif cfg.policy != "bytes":
        raise ValueError(f"policy must be 'bytes' or 'count', got {cfg.policy!r}")
    if cfg.fallback not in ("fewest-models", "pow2"):
        raise ValueError(f"fallback must be 'fewest-models' or 'pow2', got {cfg.fallback!r}")
    reps = [_Replica(CachePolicy(cfg.budget_bytes) if max_entries is None else CachePolicy(None, max_entries=max_entries))
            for _ in range(cfg.replicas)]
    holders: dict[int, set[int]] = {}               # model -> replicas holding or loading it
    rank_model, cum = zipf_cum_weights(cfg.models, cfg.skew, cfg.seed)
    total_w = cum[-1]
    hottest = rank_model[0]
    hot_latencies: list[float] = []
    rate_est: dict[int, tuple[float, float]] = {}   # model -> (decayed rate, at time)
    tau = cfg.rate_window_s

    events: list = []
    seq = itertools.count()
    latencies: list[float] = []
    cold_flags: list[bool] = []
    hits = counted = loads = loads_counted = loads_over = evictions = hot_routes = longest_queue = 0
    refused = [0, 0]  # requests refused (version over the budget): in warm-up, measured
    measure_from = int(cfg.requests * cfg.warmup)
    t_measure = None

    def fallback_replica(exclude: set[int]) -> int:
        """The replica a version no replica holds goes to (``cfg.fallback``)."""
        if cfg.fallback == "pow2":  # two random replicas, the less busy (requests + queued loads)
            picks: list[int] = []
            while len(picks) < 2:  # some replica is not excluded: callers exclude fewer than all
                c = rng.randrange(cfg.replicas)
                if c not in exclude:
                    picks.append(c)
            a, b = reps[picks[0]], reps[picks[1]]
            return picks[0] if a.outstanding + len(a.load_queue) <= b.outstanding + len(b.load_queue) else picks[1]
        best, best_key = -1, None
        for i, r in enumerate(reps):
            if i in exclude:
                continue
            k = (len(r.policy), r.outstanding)
            if best_key is None or k < best_key:
                best, best_key = i, k
        return best

    def serve(x: int, model: int, arrival: float, cold: bool, measured: bool, now: float) -> None:
        r = reps[x]
        r.policy.touch(keys[model], now)
        r.policy.pin(keys[model])
        start = max(now, r.busy_until)
        r.busy_until = start + cfg.service_s
        heapq.heappush(events, (r.busy_until, next(seq), _DONE, x, model))
        if measured:
            latencies.append(r.busy_until - arrival)
            cold_flags.append(cold)
            if model == hottest:
                hot_latencies.append(r.busy_until - arrival)

    def start_loads(x: int, now: float) -> None:
        nonlocal loads, loads_counted, loads_over, evictions
        r = reps[x]
        while r.loads_running < cfg.max_concurrent_loads and r.load_queue:
            model = r.load_queue[0]
            victims = r.policy.victims(sizes[model])
            if victims is None and r.policy.budget_bytes is not None and sizes[model] > r.policy.budget_bytes:
                # bigger than the whole budget: VersionCache refuses it (503), here the requests fail
                r.load_queue.popleft()
                holders[model].discard(x)
                for _, measured in r.waiting.pop(model):
                    r.outstanding -= 1
                    refused[measured] += 1
                continue
            if victims is None:
                return  # only versions in flight stand in the way: wait for an unpin
            r.load_queue.popleft()
            for key in victims:
                r.policy.remove(key)
                holders[int(key)].discard(x)
                evictions += 1
            r.policy.add(keys[model], sizes[model], now)
            r.policy.pin(keys[model])  # the loading placeholder
            held = r.policy.held_bytes
            r.peak = max(r.peak, held)
            loads += 1
            if t_measure is not None:
                loads_counted += 1
                if held > cfg.budget_bytes:
                    loads_over += 1
            if held > cfg.budget_bytes:
                r.over = True
            r.loads_running += 1
            done = now + cfg.load_base_s + sizes[model] / cfg.load_bytes_per_s
            heapq.heappush(events, (done, next(seq), _LOAD, x, model))

    def handle(ev) -> None:
        now, _, kind, x, model = ev
        r = reps[x]
        key = keys[model]
        if kind == _LOAD:
            r.loads_running -= 1
            r.policy.unpin(key)
            for arrival, measured in r.waiting.pop(model):
                serve(x, model, arrival, True, measured, now)
            start_loads(x, now)
        else:
            r.policy.unpin(key)
            r.outstanding -= 1
            if r.load_queue and not r.policy.in_flight(key):
                start_loads(x, now)

    t = 0.0
    for i in range(cfg.requests):
        t += rng.expovariate(cfg.rate)
        while events and events[0][0] <= t:
            handle(heapq.heappop(events))
        if i == measure_from:
            t_measure = t
        measured = t_measure is not None
        model = rank_model[bisect.bisect_left(cum, rng.random() * total_w)]
        old, at = rate_est.get(model, (0.0, t))
        rate = old * math.exp(-(t - at) / tau) + 1.0 / tau
        rate_est[model] = (rate, t)

        hs = holders.setdefault(model, set())
        x = -1
        if hs and cfg.hot_rule and len(hs) < cfg.replicas and len(hs) < replicas_wanted(
                rate, cfg.service_s, target_utilization=cfg.target_utilization, max_replicas=cfg.replicas):
            x = fallback_replica(hs)  # one more replica for a hot version
            hot_routes += 1
        elif hs:
            best = None
            for h in hs:
                o = reps[h].outstanding
                if o < cfg.max_ongoing and (best is None or o < best):
                    x, best = h, o
        if x < 0:
            x = fallback_replica(set())
        r = reps[x]
        r.outstanding += 1
        key = keys[model]
        if model in r.waiting:  # loading (or queued) here: wait for it
            r.waiting[model].append((t, measured))
        elif key in r.policy:
            if measured:
                hits += 1
            serve(x, model, t, False, measured, t)
        else:
            r.waiting[model] = [(t, measured)]
            r.load_queue.append(model)
            if len(r.load_queue) > longest_queue:
                longest_queue = len(r.load_queue)
            hs.add(x)
            start_loads(x, t)
        if measured:
            counted += 1
    while events:
        handle(heapq.heappop(events))

    # a version queued for a load counts as held for routing: make sure none was left waiting
    assert all(not r.waiting and not r.load_queue for r in reps), "requests left waiting at the end"
    lat_sorted = sorted(range(len(latencies)), key=latencies.__getitem__)
    n = len(lat_sorted)
    p50 = latencies[lat_sorted[n // 2]]
    cut = int(n * 0.99)
    p99 = latencies[lat_sorted[cut]]
    slowest = lat_sorted[cut:]
    cold = sorted(latency for latency, c in zip(latencies, cold_flags) if c)
    span = t - t_measure
    return SimResult(
        config=cfg,
        hit_rate=hits / counted,
        refused=refused[1] / counted,
        loads_per_s=loads_counted / span,
        p50_ms=p50 * 1e3,
        p99_ms=p99 * 1e3,
        cold_p99_ms=(cold[int(len(cold) * 0.99)] * 1e3) if cold else 0.0,
        cold_share_of_slowest_1pct=sum(cold_flags[i] for i in slowest) / max(1, len(slowest)),
        peak_bytes=max(r.peak for r in reps),
        replicas_over_budget=sum(r.over for r in reps),
        loads_over_budget=loads_over / max(1, loads_counted),
        max_entries=max_entries,
        evictions=evictions,
        simulated_s=t,
        wall_s=time.perf_counter() - started,
        extra={"hot_routes": hot_routes, "most_holders": max(len(h) for h in holders.values()),
               "longest_load_queue": longest_queue,
               "hottest_share": 1.0 / total_w,
               "hottest_p50_ms": _quantile(hot_latencies, 0.5) * 1e3,
               "hottest_p99_ms": _quantile(hot_latencies, 0.99) * 1e3},
    )


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _row(res: SimResult) -> str:
    c = res.config
    over = f"{res.replicas_over_budget} ({res.loads_over_budget:.0%} of loads)" if res.replicas_over_budget else "0"
    policy = ("bytes" if c.policy == "bytes" else f"count ≤{res.max_entries}") + f", {c.fallback}"
    return (f"| {c.budget_bytes / GB:g} GB | {c.skew:g} | {policy} | {res.hit_rate:.1%} | {res.loads_per_s:.0f} | "
            f"{res.p50_ms:.1f} | {res.p99_ms:.0f} | {res.cold_p99_ms:.0f} | {res.cold_share_of_slowest_1pct:.0%} | "
            f"{res.peak_bytes / GB:.2f} GB ({res.peak_bytes / c.budget_bytes:.0%}) | {over} |")


# (policy, routing of a version no replica holds): maas-ray's byte budget under Serve's routing and
# under power-of-two choices, and Serve's count bound under Serve's routing.
RUNS = [("bytes", "fewest-models"), ("bytes", "pow2"), ("count", "fewest-models")]
HEADER = ("| budget/replica | Zipf s | policy, fallback | hit rate | loads/s | p50 ms | p99 ms | cold p99 ms | "
          "cold share of slowest 1% | peak held/replica (of budget) | replicas over budget |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--replicas", type=int, default=100)
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--rate", type=float, default=500.0, help="requests/s, all models together")
    ap.add_argument("--budgets-gb", type=float, nargs="+", default=[0.5, 1, 2, 4])
    ap.add_argument("--skews", type=float, nargs="+", default=[0.8, 1.0, 1.2])
    ap.add_argument("--service-ms", type=float, default=10.0)
    ap.add_argument("--max-ongoing", type=int, default=5)
    ap.add_argument("--target-utilization", type=float, default=0.7)
    ap.add_argument("--rate-window", type=float, default=10.0)
    ap.add_argument("--no-hot-rule", action="store_true", help="leave out the hot-model rule")
    ap.add_argument("--no-hot-table", action="store_true", help="skip the hot-model rule on/off table")
    ap.add_argument("--hot-budget-gb", type=float, default=4.0, help="budget of the hot-model table")
    ap.add_argument("--hot-rate", type=float, default=2000.0, help="requests/s of the hot-model table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    base = dict(models=args.models, replicas=args.replicas, requests=args.requests, rate=args.rate,
                service_s=args.service_ms / 1e3, max_ongoing=args.max_ongoing,
                target_utilization=args.target_utilization, rate_window_s=args.rate_window,
                hot_rule=not args.no_hot_rule, seed=args.seed)
    rows = []
    for budget in args.budgets_gb:
        for skew in args.skews:
            for policy, fallback in RUNS:
                res = simulate(SimConfig(budget_bytes=int(budget * GB), skew=skew, policy=policy,
                                         fallback=fallback, **base))
                rows.append(_row(res))
                print(rows[-1], f"  [{res.wall_s:.1f}s, {res.extra}]", flush=True)
    hot_rows = []
    if not args.no_hot_table:
        # the hot-model rule against Serve's only spreading (a saturated holder falls through)
        for max_ongoing in (args.max_ongoing, 100):
            for hot in (True, False):
                cfg = SimConfig(**{**base, "max_ongoing": max_ongoing, "hot_rule": hot, "rate": args.hot_rate},
                                budget_bytes=int(args.hot_budget_gb * GB), skew=max(args.skews),
                                policy="bytes", fallback="pow2")
                res = simulate(cfg)
                x = res.extra
                hot_rows.append(
                    f"| {max_ongoing} | {'on' if hot else 'off'} | {res.hit_rate:.1%} | {res.p50_ms:.1f} | "
                    f"{res.p99_ms:.0f} | {x['hottest_p50_ms']:.1f} | {x['hottest_p99_ms']:.0f} | "
                    f"{x['most_holders']} | {x['hot_routes']} |")
                hottest_rps = args.hot_rate * x["hottest_share"]
                print(hot_rows[-1], f"  [{res.wall_s:.1f}s]", flush=True)
    wall = time.perf_counter() - started
    sizes = model_sizes(args.models, args.seed)
    mean = sum(sizes) / len(sizes)
    command = "python -m benchmarks.cache_sim " + " ".join(
        (argv if argv is not None else __import__("sys").argv[1:]))
    text = "\n".join([
        "# Version cache simulation: byte budget vs count-based LRU (issue 25)",
        "",
        f"    {command}",
        "",
        f"{args.models} models ({sum(sizes) / GB:.0f} GB in all, mean {mean / MB:.0f} MB: 80% 5-20 MB, "
        f"20% 100-400 MB), {args.replicas} replicas, {args.requests} Poisson requests at {args.rate:g}/s "
        f"(Zipf over models), {args.service_ms:g} ms per request, loads 0.05 s + size / 400 MB/s "
        f"(2 at once per replica), max_ongoing {args.max_ongoing}, hot-model rule "
        f"{'off' if args.no_hot_rule else f'on (target utilization {args.target_utilization:g})'}. "
        "The first 25% of requests are warm-up and left out. `count ≤N` is Serve's @serve.multiplexed "
        "policy with max_num_models_per_replica = budget / mean size. Latency = arrival to finish, "
        "load waits included; cold = waited for a load. Peak held counts a loading version at its size.",
        "",
        HEADER,
        *rows,
        "",
        *([
            f"## Hot-model rule (Zipf s {max(args.skews):g}, {args.hot_rate:g} requests/s, "
            f"{args.hot_budget_gb:g} GB, bytes, pow2)",
            "",
            f"The hottest version gets {hottest_rps:.0f} requests/s ({hottest_rps * args.service_ms / 1e3:.1f} "
            "replicas' worth). With Serve's default max_ongoing_requests (5) a saturated holder already "
            "spills it to more replicas; with a deep queue (100) only the requests that pile up during "
            "its first load spill, and the hot-model rule (replicas_wanted) adds the rest.",
            "",
            "| max_ongoing | hot rule | hit rate | p50 ms | p99 ms | hottest p50 ms | hottest p99 ms | "
            "most replicas holding one version | requests routed by the rule |",
            "|---|---|---|---|---|---|---|---|---|",
            *hot_rows,
            "",
        ] if hot_rows else []),
        f"Wall time: {wall:.0f} s for {len(rows) + len(hot_rows)} runs (pure Python, one process).",
        "",
    ])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(f"wall {wall:.0f} s")


if __name__ == "__main__":
    main()
