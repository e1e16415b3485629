"""Prometheus metrics for the serving path, exported through Ray's metrics API.

Requests record into plain dicts and lists under a lock and never call Ray; a daemon thread
flushes them to ``ray.util.metrics`` objects once per ``flush_interval_s``. Ray's metrics
agent serves them on each node's metrics export port, with ``ray_`` prepended to every name
(:data:`EXPORTED_NAMES`). Measured in a Ray actor (timeit, 2-core box):
request_started + request_finished with four stages 1.9-3.3 us (10.2 us when the latency
below was observed on the request path), batch() 0.6 us; a flush: one native observation
per request and per counted histogram value (bounded per series, below).

Why aggregate, measured in a Ray actor (Ray 2.60, 2-core box, 5 tags; Cython ``record``
alone: 2.3 us with 1 tag, 3.8 with 3, 5.4 with 6):

    Counter.inc 3.6 us, Histogram.observe 3.7 us, Gauge.set 3.3 us per call

A request records one counter, five latency observations (total and four stages) and the
in-flight gauge twice: ~28 us, 7.6 % of the ~370 us of CPU a tiny-model request costs.
Deferring the same calls to a flush (as Serve's replica does with its latencies) moves
that CPU, it does not remove it.

Histograms that only dashboards read (per-stage latency, batch size, shadow differences) and
the generative TTFT and inter-token histograms are counted in process instead (bucket counts,
a dict update per value) and sent to Ray's native ``Histogram`` at each flush: one observation
per value counted since the last flush, at the midpoint Ray's agent keeps for that bucket (the
agent stores bucket counts and rebuilds ``_sum`` from midpoints anyway). Each series sends at
most :data:`DASHBOARD_MAX_PER_FLUSH` values per flush (:data:`GENERATION_MAX_PER_FLUSH` for
TTFT and ITL, which the rollout guards read), spread evenly over its buckets; beyond that the
flush sends an even sample with the same bucket shares, so quantiles hold and ``_count`` under-
counts (``ray_maas_requests_total`` is the request count). This bounds a flush's cost per series
whatever the request rate. Measured (``benchmarks/metrics_flush_cost.py``, thread CPU, loaded
2-core box): four stage series add 2.3 ms to the flush after 100 requests and 6.6-6.8 ms after
1,000-5,000 (the bound), against 0.4 ms for the gauge layout below and 6-31 ms for the exact
request-latency observations of the same flushes: at most ~0.7 % of a core per model version.

Why not three gauges per series (``_bucket{le=...}``, ``_sum``, ``_count``), the layout this
module used before: Ray's agent exports through OpenTelemetry's SDK, which keeps at most 2,000
label sets per metric name for the agent's lifetime (``_DEFAULT_CARDINALITY_LIMIT``; Ray builds
its ``PrometheusMetricReader`` without a limit of its own) and sends every new label set past that
into one ``otel.metric.overflow`` series. Every label set ever reported counts, including each
replica's ``WorkerId``. A gauge-backed histogram has one label set per bucket (18 for latency),
so 2,000 were reached after ~28 model x version x stage x replica combinations: the many-models
tests lost new apps' stage-latency series that way. A native histogram has one label set per
series, 18x fewer. Dynamic apps also bound how many model names get a label of their own
(``max_models``; the rest share :data:`OTHER_MODEL`).

The two series the classifier rollout guards divide are native Ray ``Histogram`` objects
observed value by value (exact, not sampled): end-to-end request latency (the p99 and error-rate guards), one observation per request, and
shadow agreement, one observation per compared item (1 agreed, 0 not). Ray exports and
ingests series one at a time, so a scrape can see part of a flush: some gauges (or one of two
counters) a flush ahead of the others, and such a torn state can last a whole export
interval. In a rollout window that reads as a bad candidate. Measured with ``benchmarks/torn_reads.py`` (two versions
with identical latencies, both layouts in one run, 134 windows of 3 s): the gauge-backed p99
ratio went over the 1.3x guard in 2 windows (8.0x, 9.1x), the native one in none. Agreement
(70 mirrored items a second, all agreeing, read with the controller's Snapshot): the old pair
of counters was torn in 4 of 894 scrapes, the histogram in none (9 scrapes caught a flush
part-way, at its own rate: the observations are interleaved). One native observation writes a
series' count, sum and buckets together, wherever it is made, so both are observed on the
flush thread, interleaved across series: request latencies buffered per series (at most
:data:`MAX_PENDING_LATENCIES` between flushes), agreement at most
:data:`AGREEMENT_MAX_PER_FLUSH` per series per flush (an even sample of the flush's items
beyond that). Observed on the request path, Ray's ``_record`` was the event loop's frame in
332-383 of ~1,300 samples where the loop ran late by over 6 ms (tiny MLP, c=32); on the flush
thread, 46-61 (Serve's own 100 ms metrics reporter, which defers its latencies the same way).
``benchmarks/torn_reads.py latency`` reads the deferred series untorn (benchmarks/README.md).
Ray's agent rebuilds a native histogram's ``_sum`` from bucket midpoints, so the request
latency ``_sum`` is approximate; its buckets and count are exact.

Ray's agent drops a gauge series that no emitter refreshed for two export intervals
(``2 * max(RAY_metrics_report_interval_ms, 1000) ms``), so every flush re-sets every gauge
series (in flight, version state, engine gauges); ``flush_interval_s`` must stay under that.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from typing import Any, Iterable, Optional

# The names (maas_ray.serving.metric_names): Ray exports each as "ray_" + name (+ "_total" for
# counters). Histograms are native Ray Histograms, which Ray exports as <name>_bucket /
# _sum / _count. Re-exported here: callers use metrics.REQUESTS, metrics.EXPORTED_NAMES, ...
from maas_ray.serving.metric_names import (
    BATCH_SIZE,
    COMPLETION_TOKENS,
    ENGINE_KV_USAGE,
    ENGINE_RUNNING,
    ENGINE_WAITING,
    ERRORS,
    EXPORTED_NAMES,  # noqa: F401 (re-exported: maas_ray.serving.metrics.EXPORTED_NAMES)
    GENERATIONS,
    IN_FLIGHT,
    INTER_TOKEN_LATENCY,
    LABEL_APP,
    LABEL_ERROR,
    LABEL_FINISH_REASON,
    LABEL_MODEL,
    LABEL_PROTOCOL,
    LABEL_STAGE,
    LABEL_STATE,
    LABEL_STATUS,
    LABEL_VERSION,
    PAYLOAD_LOG_DROPPED,
    PROMPT_TOKENS,
    REQUEST_LATENCY,
    REQUESTS,
    SHADOW_AGREEMENT,
    SHADOW_DIFF,
    SHADOW_DROPPED,
    STAGE_LATENCY,
    TIME_TO_FIRST_TOKEN,
    VERSION_STATE,
)

logger = logging.getLogger(__name__)

# decode = decode + preprocess; encode = postprocess + encode; hop (fused placement only): the
# time between the ingress and the inference replica beyond the replica's own stages (waiting
# for a call slot, the handle call's round trip).
STAGES = ("decode", "queue", "inference", "encode", "hop")
PROTOCOLS = ("http_v2", "http_v1", "grpc", "handle", "shadow",  # shadow: mirrored calls to a candidate
             "openai", "http_generate", "handle_generate", "grpc_generate")  # generative routes
# How a generation ended: the engine's finish reasons, a client that went away, an error.
FINISH_REASONS = ("stop", "length", "cancelled", "error")
VERSION_STATES = ("ready", "failed", "loading")
# The model label of requests for models the app does not serve: the name comes from the URL,
# so labelling it as sent would let any client create series without bound. Registry names
# start with a letter or digit, so this cannot collide with a real model.
UNKNOWN_MODEL = "_unknown"
# The model label shared by served models past ``max_models`` (dynamic apps serving a whole
# registry): their series would otherwise use up Ray's 2,000 label sets per metric name.
OTHER_MODEL = "_other"
# Seconds, 0.1 ms .. 30 s (Prometheus `le` buckets; the +Inf bucket is implicit).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
# Inter-token latency, seconds: 1 ms .. 5 s.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)
# Largest |primary - candidate| over a mirrored request's float outputs.
DIFF_BUCKETS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)
# Shadow agreement observes 0 (disagreed) or 1 (agreed) per item: a disagreement lands in the
# first bucket, an agreement in +Inf. Ray's agent rebuilds a histogram's _sum from bucket
# midpoints (first: half its bound; +Inf: twice the last bound), and these bounds make those
# 5e-7 and 1.0, so _sum / _count stays the agreement rate; the controller reads the buckets.
AGREEMENT_BOUNDS = (1e-6, 0.5)
AGREEMENT_MAX_PER_FLUSH = 4096
# Request latencies one replica buffers between flushes (a 1 s flush: 100k requests/s, far over
# what one Python replica serves); beyond it they are counted, logged, and not recorded.
MAX_PENDING_LATENCIES = 100_000
# The flush thread observes one value per request (~3.7 us each, holding the GIL): 3,500
# requests/s make a 13 ms burst, and an event loop waiting for the GIL gets it back only after
# the 5 ms switch interval, several times per flush. The flush sleeps briefly after every
# FLUSH_YIELD_EVERY observations, so the loop waits at most one chunk (~0.25 ms) for the GIL.
# Measured with benchmarks/flush_stall.py (benchmarks/README.md, eighth round). 0 turns it off.
FLUSH_YIELD_EVERY = 64
FLUSH_YIELD_S = 50e-6
# Values one in-process histogram series sends to Ray per flush (see the module docstring):
# dashboard-only histograms, and TTFT / inter-token latency, which the rollout guards divide.
DASHBOARD_MAX_PER_FLUSH = 256
GENERATION_MAX_PER_FLUSH = 4096


class _Hist:
    """One histogram series in process: per-bucket counts (not cumulative), +Inf last."""

    __slots__ = ("bounds", "counts", "sent")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last: +Inf
        self.sent = [0] * (len(bounds) + 1)  # counts already sent to Ray (the flush's side)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # first bound >= value: Prometheus `le`

    def take(self) -> list[int]:
        """Per-bucket counts since the last take (call under the owner's lock)."""
        delta = [c - s for c, s in zip(self.counts, self.sent)]
        self.sent = list(self.counts)
        return delta


def bucket_midpoints(bounds: tuple[float, ...]) -> list[float]:
    """The value Ray's agent records for each bucket of a histogram with these (positive)
    bounds, +Inf last: half the first bound, the middle of the others, twice the last bound.
    Each lies strictly inside its bucket, so it is counted there."""
    points = [bounds[0] / 2.0]
    points += [(lo + hi) / 2.0 for lo, hi in zip(bounds, bounds[1:])]
    points.append(bounds[-1] * 2.0)
    return points


def spread(counts: list[int], limit: int) -> list[int]:
    """Bucket indices to observe for per-bucket ``counts``: one per count, or ``limit`` of
    them with the same shares (largest remainder) when there are more. Spread evenly, so an
    export that catches the flush part-way sees every bucket in about its share."""
    total = sum(counts)
    if total > limit:
        exact = [c * limit / total for c in counts]
        scaled = [int(x) for x in exact]
        for i in sorted(range(len(counts)), key=lambda i: scaled[i] - exact[i])[:limit - sum(scaled)]:
            scaled[i] += 1
        counts, total = scaled, limit
    # Bucket i's j-th value goes at position (j + 0.5) / counts[i]: a stable even interleave.
    order = sorted(((j + 0.5) / c, i) for i, c in enumerate(counts) if c for j in range(c))
    return [i for _, i in order]


class _NativeHistogram:
    """An in-process histogram family sent to a native Ray ``Histogram`` at each flush."""

    def __init__(self, module: Any, name: str, description: str, tag_keys: tuple[str, ...],
                 bounds: tuple[float, ...], max_per_flush: int) -> None:
        self.metric = module.Histogram(name, description=description, boundaries=list(bounds), tag_keys=tag_keys)
        self.values = bucket_midpoints(bounds)
        self.max_per_flush = max_per_flush

    def observations(self, tags: dict[str, str], delta: list[int]) -> list[tuple[float, dict[str, str]]]:
        return [(self.values[i], tags) for i in spread(delta, self.max_per_flush)]


class _RayMetrics:
    """The ray.util.metrics objects, created on first use (never at import)."""

    def __init__(self, module: Any) -> None:
        request_tags = (LABEL_APP, LABEL_MODEL, LABEL_VERSION, LABEL_PROTOCOL, LABEL_STATUS)
        self.requests = module.Counter(
            REQUESTS, description="Inference requests by model, version, protocol and HTTP status.",
            tag_keys=request_tags)
        self.errors = module.Counter(
            ERRORS, description="Failed requests (status >= 400) by exception class.",
            tag_keys=(LABEL_APP, LABEL_MODEL, LABEL_VERSION, LABEL_ERROR))
        self.latency = module.Histogram(
            REQUEST_LATENCY, description="End-to-end request latency in the replica, seconds.",
            boundaries=list(LATENCY_BUCKETS), tag_keys=request_tags)
        self.stage_latency = _NativeHistogram(
            module, STAGE_LATENCY, "Per-stage latency (decode+preprocess, queue, inference, postprocess+encode, "
            "and in fused placement the hop to the inference replica), seconds",
            (LABEL_APP, LABEL_MODEL, LABEL_VERSION, LABEL_STAGE), LATENCY_BUCKETS, DASHBOARD_MAX_PER_FLUSH)
        self.batch_size = _NativeHistogram(
            module, BATCH_SIZE, "Items per inference batch", (LABEL_APP, LABEL_MODEL, LABEL_VERSION),
            BATCH_BUCKETS, DASHBOARD_MAX_PER_FLUSH)
        self.in_flight = module.Gauge(
            IN_FLIGHT, description="Requests in progress in this replica.", tag_keys=(LABEL_APP, LABEL_MODEL))
        shadow_tags = (LABEL_APP, LABEL_MODEL, LABEL_VERSION)
        self.shadow_agreement = module.Histogram(
            SHADOW_AGREEMENT, description="Mirrored items compared with the primary by top-1 label: 1 agreed, 0 not "
            "(count: items compared; bucket le=1e-06: items that disagreed).",
            boundaries=list(AGREEMENT_BOUNDS), tag_keys=shadow_tags)
        self.shadow_dropped = module.Counter(
            SHADOW_DROPPED, description="Requests not mirrored because the shadow calls in flight were at the bound.",
            tag_keys=shadow_tags)
        self.payload_log_dropped = module.Counter(
            PAYLOAD_LOG_DROPPED, description="Payload log events dropped (queue full or sink failing; "
            "maas_ray.serving.payload_log).", tag_keys=(LABEL_APP, LABEL_MODEL))
        self.shadow_diff = _NativeHistogram(
            module, SHADOW_DIFF, "Largest absolute difference between primary and candidate float outputs",
            shadow_tags, DIFF_BUCKETS, DASHBOARD_MAX_PER_FLUSH)
        version_tags = (LABEL_APP, LABEL_MODEL, LABEL_VERSION)
        self.prompt_tokens = module.Counter(
            PROMPT_TOKENS, description="Prompt tokens of finished generations.", tag_keys=version_tags)
        self.completion_tokens = module.Counter(
            COMPLETION_TOKENS, description="Generated tokens of finished generations.", tag_keys=version_tags)
        self.generations = module.Counter(
            GENERATIONS, description="Finished generations by finish reason (stop, length, cancelled: the client "
            "went away, error).", tag_keys=(*version_tags, LABEL_FINISH_REASON))
        self.ttft = _NativeHistogram(
            module, TIME_TO_FIRST_TOKEN, "Time from a generative request's arrival at the ingress to its first "
            "token, seconds", version_tags, LATENCY_BUCKETS, GENERATION_MAX_PER_FLUSH)
        self.itl = _NativeHistogram(
            module, INTER_TOKEN_LATENCY, "Time between a stream's consecutive token events at the ingress, seconds",
            version_tags, TOKEN_BUCKETS, GENERATION_MAX_PER_FLUSH)
        self.engine_running = module.Gauge(
            ENGINE_RUNNING, description="Sequences in a generative version's running batch (per engine replica).",
            tag_keys=version_tags)
        self.engine_waiting = module.Gauge(
            ENGINE_WAITING, description="Sequences waiting to join a generative version's batch.",
            tag_keys=version_tags)
        self.engine_kv_usage = module.Gauge(
            ENGINE_KV_USAGE, description="Share of the engine's KV cache budget in use (0..1).",
            tag_keys=version_tags)
        self.version_state = module.Gauge(
            VERSION_STATE, description="1 for a version's current state (ready, failed, loading), 0 for the others.",
            tag_keys=(LABEL_APP, LABEL_MODEL, LABEL_VERSION, LABEL_STATE))


def agreement_observations(compared: int, agreed: int,
                           limit: int = AGREEMENT_MAX_PER_FLUSH) -> list[float]:
    """A flush's agreement as observations (1.0 agreed, 0.0 not): ``compared`` of them, or an
    even sample of ``limit`` with the same rate. Agreements are spread evenly through the list,
    so an export that catches the flush half-way still sees the flush's rate."""
    n = min(compared, limit)
    # Item i of n agreed when floor((i + 1) * agreed / compared) steps up: exactly
    # round(n * agreed / compared) ones, evenly spaced.
    return [1.0 if (i + 1) * agreed // compared > i * agreed // compared else 0.0
            for i in (j * compared // n for j in range(n))]


def _observe_yielding(observe: Any, observations: Iterable[tuple[float, dict[str, str]]]) -> None:
    """``observe(value, tags)`` for each pair, paced as :func:`_observe_paced`."""
    _observe_paced((observe, value, tags) for value, tags in observations)


def _observe_paced(observations: Iterable[tuple[Any, float, dict[str, str]]]) -> None:
    """``observe(value, tags)`` for each triple, releasing the GIL for :data:`FLUSH_YIELD_S`
    after every :data:`FLUSH_YIELD_EVERY` of them (a real sleep: ``sleep(0)`` releases the GIL
    but this thread usually takes it back before the waiting loop thread wakes)."""
    every = FLUSH_YIELD_EVERY
    for n, (observe, value, tags) in enumerate(observations, 1):
        observe(value, tags)
        if every and n % every == 0:
            time.sleep(FLUSH_YIELD_S)


def _version_label(version: Optional[int]) -> str:
    return "none" if version is None else str(version)


class ServingMetrics:
    """Per-replica request metrics, aggregated in process and flushed to Ray periodically.

    Create it in the replica (``__init__``), not in the driver: it holds a lock and a thread
    and does not pickle. Pair every :meth:`request_started` with one :meth:`request_finished`.

    Args:
        app: the Serve application name (the ``app`` label).
        flush_interval_s: seconds between flushes once :meth:`start` ran.
        models: the served model names; requests naming any other model are labelled
            :data:`UNKNOWN_MODEL` until :meth:`add_model` names them. None labels every name as
            given (trusted callers only).
        max_models: how many names beyond ``models`` get a label of their own (those
            :meth:`add_model` names, or with ``models=None`` the first ones seen); later ones
            share :data:`OTHER_MODEL` and version ``none``. None: no bound. Ray's agent keeps
            2,000 label sets per metric name (see the module docstring).
        metrics_module: where ``Counter`` and ``Gauge`` come from; ``ray.util.metrics``
            by default (imported on first use). Unit tests pass fakes.
    """

    def __init__(self, app: str, *, flush_interval_s: float = 1.0, models: Optional[Iterable[str]] = None,
                 max_models: Optional[int] = None, metrics_module: Any = None) -> None:
        if flush_interval_s <= 0:
            raise ValueError(f"flush_interval_s must be > 0, got {flush_interval_s!r}")
        self.app = app
        if max_models is not None and max_models < 0:
            raise ValueError(f"max_models must be >= 0, got {max_models!r}")
        # Names labelled as given; None: every name (trusted callers), unless bounded below.
        self._models: Optional[set[str]] = None if models is None else set(models)
        self._max_models = max_models
        self._admit_new = models is None and max_models is not None  # trusted, but bounded
        if self._admit_new:
            self._models = set()
        self._admitted = 0  # names labelled beyond `models`
        self._others: set[str] = set()  # names past max_models: OTHER_MODEL
        self._label_lock = threading.Lock()
        self.flush_interval_s = flush_interval_s
        self._module = metrics_module
        self._ray: Optional[_RayMetrics] = None
        self._lock = threading.Lock()  # guards the aggregates below; never held across a Ray call
        self._flush_lock = threading.Lock()  # one flush at a time (thread vs explicit flush())
        self._init_lock = threading.Lock()  # creates the Ray metric objects once (a request or a flush)
        # Cumulative since start; keys hold raw values, labels are formatted at flush.
        self._in_flight: dict[str, int] = {}
        self._requests: dict[tuple, int] = {}  # (model, version, protocol, status) -> n
        self._errors: dict[tuple, int] = {}  # (model, version, error) -> n
        self._stages: dict[tuple, dict[str, _Hist]] = {}  # (model, version) -> stage -> histogram
        self._batches: dict[tuple, _Hist] = {}  # (model, version)
        self._states: dict[tuple, str] = {}  # (model, version) -> state
        self._shadow: dict[tuple, list[int]] = {}  # (model, version) -> [compared, agreed, dropped]
        self._shadow_diff: dict[tuple, _Hist] = {}  # (model, version)
        self._payload_dropped: dict[str, int] = {}  # model -> payload log events dropped
        # Generative versions: (model, version) -> [prompt tokens, completion tokens]; finishes by
        # (model, version, reason); TTFT and inter-token histograms; engines' stats() to poll.
        self._tokens: dict[tuple, list[int]] = {}
        self._finishes: dict[tuple, int] = {}
        self._ttft: dict[tuple, _Hist] = {}
        self._itl: dict[tuple, _Hist] = {}
        self._engines: dict[tuple, Any] = {}
        # Request latencies since the last flush, observed natively by the flush thread.
        self._latencies: dict[tuple, list[float]] = {}  # (model, version, protocol, status) -> seconds
        self._pending = 0
        self._latencies_dropped = 0
        # Flush-side state: what Ray has been told (counters get deltas; histograms keep theirs).
        self._sent: dict[tuple, int] = {}
        self._tags: dict[tuple, dict[str, str]] = {}  # label dicts by series (also the request path's latency)
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._last_error_log = 0.0

    # ---- request path (dict updates only) ----------------------------------------------
    def _label(self, model: str) -> str:
        """The model label: the name, :data:`UNKNOWN_MODEL` or :data:`OTHER_MODEL`."""
        models = self._models
        if models is None or model in models:
            return model
        if model in self._others:
            return OTHER_MODEL
        return self._admit(model) if self._admit_new else UNKNOWN_MODEL

    def _admit(self, model: str, always: bool = False) -> str:
        assert self._models is not None
        with self._label_lock:
            if model in self._models:
                return model
            if always or self._max_models is None or self._admitted < self._max_models:
                self._admitted += not always
                self._others.discard(model)
                self._models.add(model)
                return model
            if model not in self._others:
                self._others.add(model)
                logger.warning("model %r is labelled %r in metrics: %d model names are labelled already "
                               "(max_models; Ray keeps 2,000 label sets per metric name)", model, OTHER_MODEL,
                               self._max_models)
            return OTHER_MODEL

    def request_started(self, model: str) -> None:
        model = self._label(model)
        with self._lock:
            self._in_flight[model] = self._in_flight.get(model, 0) + 1

    def request_finished(
        self,
        model: str,
        version: Optional[int],
        protocol: str,
        status: int,
        error: Optional[str],
        total_s: float,
        stages: Optional[dict[str, float]] = None,
    ) -> None:
        """Count one finished request; ``stages``: seconds per name in :data:`STAGES`."""
        model = self._label(model)
        if model is OTHER_MODEL:
            version = None
        key = (model, version, protocol, status)
        with self._lock:
            self._in_flight[model] = self._in_flight.get(model, 0) - 1
            self._requests[key] = self._requests.get(key, 0) + 1
            if status >= 400:
                ekey = (model, version, error or "unknown")
                self._errors[ekey] = self._errors.get(ekey, 0) + 1
            if stages:
                # One lookup per request, not per stage: this path runs for every request.
                per_stage = self._stages.get((model, version))
                if per_stage is None:
                    per_stage = self._stages[(model, version)] = {}
                for stage, seconds in stages.items():
                    hist = per_stage.get(stage)
                    if hist is None:
                        hist = per_stage[stage] = _Hist(LATENCY_BUCKETS)
                    hist.observe(seconds)
            # The rollout's guards divide this native histogram's series: observed one value
            # at a time on the flush thread (see the module docstring), not here.
            if self._pending < MAX_PENDING_LATENCIES:
                self._pending += 1
                values = self._latencies.get(key)
                if values is None:
                    values = self._latencies[key] = []
                values.append(total_s)
            else:
                self._latencies_dropped += 1

    def batch(self, model: str, version: int, size: int) -> None:
        key = self._version_key(model, version)
        with self._lock:
            hist = self._batches.get(key)
            if hist is None:
                hist = self._batches[key] = _Hist(BATCH_BUCKETS)
            hist.observe(size)

    def shadow(self, model: str, version: int, *, compared: int, agreed: int, max_abs_diff: Optional[float]) -> None:
        """One mirrored request's agreement with the primary (see maas_ray.serving.shadow)."""
        key = self._version_key(model, version)
        with self._lock:
            counts = self._shadow.setdefault(key, [0, 0, 0])
            counts[0] += compared
            counts[1] += agreed
            if max_abs_diff is not None:
                hist = self._shadow_diff.get(key)
                if hist is None:
                    hist = self._shadow_diff[key] = _Hist(DIFF_BUCKETS)
                hist.observe(max_abs_diff)

    def generation(self, model: str, version: Optional[int], *, prompt_tokens: int, completion_tokens: int,
                   finish_reason: str, ttft_s: Optional[float] = None, itl_s: Iterable[float] = ()) -> None:
        """One finished generation (all of it in one call, so a token costs the stream nothing
        here): its token counts, how it ended (:data:`FINISH_REASONS`), the time to its first
        token and the gaps between its token events."""
        key = self._version_key(model, version)
        model, version = key
        with self._lock:
            counts = self._tokens.get(key)
            if counts is None:
                counts = self._tokens[key] = [0, 0]
            counts[0] += prompt_tokens
            counts[1] += completion_tokens
            fkey = (model, version, finish_reason)
            self._finishes[fkey] = self._finishes.get(fkey, 0) + 1
            if ttft_s is not None:
                hist = self._ttft.get(key)
                if hist is None:
                    hist = self._ttft[key] = _Hist(LATENCY_BUCKETS)
                hist.observe(ttft_s)
            hist = self._itl.get(key)
            for gap in itl_s:
                if hist is None:
                    hist = self._itl[key] = _Hist(TOKEN_BUCKETS)
                hist.observe(gap)

    def watch_engine(self, model: str, version: int, stats: Any) -> None:
        """Export a generation engine's ``stats()`` (running, waiting, kv_tokens,
        kv_capacity_tokens) as gauges at every flush; ``stats`` is called on the flush thread."""
        with self._lock:
            self._engines[(model, version)] = stats

    def shadow_dropped(self, model: str, version: int) -> None:
        key = self._version_key(model, version)
        with self._lock:
            self._shadow.setdefault(key, [0, 0, 0])[2] += 1

    def payload_log_dropped(self, model: str, n: int = 1) -> None:
        """``n`` payload log events of ``model`` dropped (called from the logger's thread too)."""
        with self._lock:
            self._payload_dropped[model] = self._payload_dropped.get(model, 0) + n

    def _version_key(self, model: str, version: Optional[int]) -> tuple[str, Optional[int]]:
        label = self._label(model)
        return (label, None) if label is OTHER_MODEL else (label, version)

    def add_model(self, model: str, *, always: bool = False) -> None:
        """Label ``model``'s requests by its name from now on (a dynamic model found in the
        registry), unless ``max_models`` names are labelled already; ``always``: regardless
        (a model a rollout or shadow reads by name)."""
        if self._models is not None:
            self._admit(model, always)

    def version_state(self, model: str, version: int, state: str) -> None:
        if state not in VERSION_STATES:
            raise ValueError(f"state must be one of {VERSION_STATES}, got {state!r}")
        if self._label(model) != model:  # one state per version: nothing to share a label
            return
        with self._lock:
            self._states[(model, version)] = state

    # ---- flushing ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the daemon flush thread (idempotent). Works from ``__init__`` or a loop."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"maas-metrics-{self.app}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the flush thread after one last flush."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._safe_flush()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self._safe_flush()

    def _safe_flush(self) -> None:
        try:
            self.flush()
        except Exception:  # a metrics backend problem must never reach a request
            self._log_failure("flushing serving metrics")

    def _log_failure(self, what: str) -> None:
        now = time.monotonic()
        if now - self._last_error_log > 60:
            self._last_error_log = now
            logger.exception("%s failed (logged at most once a minute)", what)

    def _metrics(self) -> _RayMetrics:
        """The Ray metric objects, created on first use (a request or a flush)."""
        if self._ray is None:
            with self._init_lock:
                if self._ray is None:
                    if self._module is None:
                        from ray.util import metrics as module
                        self._module = module
                    self._ray = _RayMetrics(self._module)
        return self._ray

    def flush(self) -> None:
        """Push the aggregates to Ray now (the flush thread does this every interval)."""
        with self._flush_lock:
            self._metrics()
            # Copy under the lock (O(series)); every Ray call happens after releasing it.
            with self._lock:
                latencies, self._latencies, self._pending = self._latencies, {}, 0
                dropped, self._latencies_dropped = self._latencies_dropped, 0
                in_flight = dict(self._in_flight)
                requests = dict(self._requests)
                errors = dict(self._errors)
                states = dict(self._states)
                shadow = {k: list(v) for k, v in self._shadow.items()}
                payload_dropped = dict(self._payload_dropped)
                tokens = {k: list(v) for k, v in self._tokens.items()}
                finishes = dict(self._finishes)
                engines = dict(self._engines)
                # O(series x buckets) once a second: cheaper than marking the changed series on
                # every request. Only the counts since the last flush are sent.
                deltas = [(kind, key, delta) for kind, source in self._histograms()
                          for key, hist in source for delta in (hist.take(),) if any(delta)]
            self._export_latencies(latencies, dropped)
            self._export_histograms(deltas)
            self._export(in_flight, requests, errors, states)
            self._export_shadow(shadow)
            for model, total in payload_dropped.items():
                self._inc(self._ray.payload_log_dropped, ("payload_dropped", model), total,
                          lambda m: {LABEL_APP: self.app, LABEL_MODEL: m}, model)
            if tokens or finishes or engines:
                self._export_generation(tokens, finishes, engines)

    def _export_generation(self, tokens: dict, finishes: dict, engines: dict) -> None:
        r = self._ray
        assert r is not None
        for key, (prompt, completion) in tokens.items():
            self._inc(r.prompt_tokens, ("prompt_tokens", key), prompt, self._batch_tags, key)
            self._inc(r.completion_tokens, ("completion_tokens", key), completion, self._batch_tags, key)
        for key, total in finishes.items():
            self._inc(r.generations, ("generations", key), total,
                      lambda k: {**self._batch_tags(k[:2]), LABEL_FINISH_REASON: k[2]}, key)
        for key, stats in engines.items():
            try:
                current = stats()
            except Exception:  # an engine that is stopping: its gauges wait for the next flush
                self._log_failure("reading a generation engine's stats")
                continue
            tags = self._tag(("engine", key), self._batch_tags, key)
            capacity = current.get("kv_capacity_tokens") or 0
            r.engine_running.set(current.get("running", 0), tags)
            r.engine_waiting.set(current.get("waiting", 0), tags)
            r.engine_kv_usage.set(current.get("kv_tokens", 0) / capacity if capacity else 0.0, tags)

    def _export_latencies(self, latencies: dict[tuple, list[float]], dropped: int) -> None:
        """One native observation per request, the series interleaved: an export that catches
        the flush part-way sees every series up to about the same request."""
        if dropped:
            logger.warning("%d request latencies over %d since the last flush were not recorded",
                           dropped, MAX_PENDING_LATENCIES)
        if not latencies:
            return
        assert self._ray is not None
        observe = self._ray.latency.observe
        series = [(self._tag(("latency", key), self._request_tags, key), values)
                  for key, values in latencies.items()]

        def interleaved():
            for i in range(max(len(values) for _, values in series)):
                for tags, values in series:
                    if i < len(values):
                        yield values[i], tags

        try:
            _observe_yielding(observe, interleaved())
        except Exception:  # the rest of the flush (counters, gauges) still goes out
            self._log_failure("recording request latencies")

    def _histograms(self) -> Iterable[tuple[str, Iterable[tuple[tuple, _Hist]]]]:
        """Every in-process histogram series as (kind, ((key, histogram), ...)) (under the lock)."""
        yield "stage", (((model, version, stage), hist) for (model, version), per_stage in self._stages.items()
                        for stage, hist in per_stage.items())
        yield "batch", self._batches.items()
        yield "shadow_diff", self._shadow_diff.items()
        yield "ttft", self._ttft.items()
        yield "itl", self._itl.items()

    def _export_histograms(self, deltas: list[tuple[str, tuple, list[int]]]) -> None:
        """Each series' new bucket counts as native observations, the series interleaved (as
        :meth:`_export_latencies` does), so a scrape part-way through sees every series alike."""
        if not deltas:
            return
        r = self._ray
        assert r is not None
        families = {"stage": (r.stage_latency, self._stage_tags), "batch": (r.batch_size, self._batch_tags),
                    "shadow_diff": (r.shadow_diff, self._batch_tags), "ttft": (r.ttft, self._batch_tags),
                    "itl": (r.itl, self._batch_tags)}
        series = []
        for kind, key, delta in deltas:
            family, make_tags = families[kind]
            series.append((family.metric.observe, family.observations(self._tag((kind, key), make_tags, key), delta)))

        def interleaved():
            for i in range(max(len(obs) for _, obs in series)):
                for observe, obs in series:
                    if i < len(obs):
                        yield (observe, *obs[i])

        try:
            _observe_paced(interleaved())
        except Exception:  # the rest of the flush (counters, gauges) still goes out
            self._log_failure("recording histograms")

    def _export(self, in_flight: dict, requests: dict, errors: dict, states: dict) -> None:
        r = self._ray
        assert r is not None
        for key, total in requests.items():
            self._inc(r.requests, ("requests", key), total, self._request_tags, key)
        for key, total in errors.items():
            self._inc(r.errors, ("errors", key), total, self._error_tags, key)
        # Gauges are re-set at every flush: Ray's agent expires series nobody refreshes.
        for model, n in in_flight.items():
            r.in_flight.set(n, {LABEL_APP: self.app, LABEL_MODEL: model})
        for (model, version), current in states.items():
            for state in VERSION_STATES:
                tags = {LABEL_APP: self.app, LABEL_MODEL: model, LABEL_VERSION: _version_label(version),
                        LABEL_STATE: state}
                r.version_state.set(1 if state == current else 0, tags)

    def _export_shadow(self, shadow: dict) -> None:
        r = self._ray
        assert r is not None
        for key, (compared, agreed, dropped) in shadow.items():
            self._inc(r.shadow_dropped, ("shadow_dropped", key), dropped, self._batch_tags, key)
            sent = self._sent.get(("shadow_agreement", key), (0, 0))
            if compared > sent[0]:
                tags = self._tag(("shadow_agreement", key), self._batch_tags, key)
                _observe_yielding(r.shadow_agreement.observe,
                                  ((v, tags) for v in agreement_observations(compared - sent[0], agreed - sent[1])))
                self._sent[("shadow_agreement", key)] = (compared, agreed)

    def _inc(self, counter: Any, sent_key: tuple, total: int, make_tags: Any, key: tuple) -> None:
        delta = total - self._sent.get(sent_key, 0)
        if delta > 0:
            counter.inc(delta, self._tag(sent_key, make_tags, key))
            self._sent[sent_key] = total

    def _tag(self, cache_key: tuple, make_tags: Any, key: tuple) -> dict[str, str]:
        tags = self._tags.get(cache_key)
        if tags is None:
            tags = self._tags[cache_key] = make_tags(key)
        return tags

    def _request_tags(self, key: tuple) -> dict[str, str]:
        model, version, protocol, status = key
        return {LABEL_APP: self.app, LABEL_MODEL: model, LABEL_VERSION: _version_label(version),
                LABEL_PROTOCOL: protocol, LABEL_STATUS: str(status)}

    def _error_tags(self, key: tuple) -> dict[str, str]:
        model, version, error = key
        return {LABEL_APP: self.app, LABEL_MODEL: model, LABEL_VERSION: _version_label(version),
                LABEL_ERROR: error}

    def _stage_tags(self, key: tuple) -> dict[str, str]:
        model, version, stage = key
        return {LABEL_APP: self.app, LABEL_MODEL: model, LABEL_VERSION: _version_label(version),
                LABEL_STAGE: stage}

    def _batch_tags(self, key: tuple) -> dict[str, str]:
        model, version = key
        return {LABEL_APP: self.app, LABEL_MODEL: model, LABEL_VERSION: _version_label(version)}
