"""Evidence for a rollout step, read from Ray's Prometheus endpoints (the serving metrics).

The controller takes a :class:`Snapshot` of every node's ``/metrics`` when a window opens and
another when it closes; the difference is what happened in the window: requests and server
errors of the candidate (live and mirrored), its latency histogram against the baseline's,
and how its mirrored answers agreed with the primary's. Counters and histogram buckets are
cumulative, so a window's evidence is exact whatever the scrape timing, up to one flush
(1 s) of lag at each end. Every guard reads a native Ray histogram (request counts and
latency from the request latency histogram, agreement from the agreement histogram), which no
scrape sees half-exported (see maas_ray.serving.metrics).

A generative candidate (manifest ``kind: generative``) is judged by :func:`judge_generative`
instead: its time to first token and its inter-token latency (p99 of each, against the
baseline's), its error rate over every route, and how its mirrored generations agreed with
the primary's (:mod:`maas_ray.serving.shadow_generate`). Its end-to-end request latency is
not judged: a generation's length is the caller's ``max_tokens``, not the version's speed.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

from maas_ray.serving.metric_names import (
    LABEL_APP,
    LABEL_LE,
    LABEL_MODEL,
    LABEL_PROTOCOL,
    LABEL_STATUS,
    LABEL_VERSION,
    RAY_INTER_TOKEN_LATENCY_BUCKET,
    RAY_INTER_TOKEN_LATENCY_COUNT,
    RAY_REQUEST_LATENCY_BUCKET,
    RAY_REQUEST_LATENCY_COUNT,
    RAY_SHADOW_AGREEMENT_BUCKET,
    RAY_SHADOW_AGREEMENT_COUNT,
    RAY_TIME_TO_FIRST_TOKEN_BUCKET,
    RAY_TIME_TO_FIRST_TOKEN_COUNT,
)

logger = logging.getLogger(__name__)

LIVE_PROTOCOLS = ("http_v2", "http_v1", "grpc", "handle")
_WANTED = {
    RAY_REQUEST_LATENCY_COUNT, RAY_REQUEST_LATENCY_BUCKET, RAY_SHADOW_AGREEMENT_COUNT, RAY_SHADOW_AGREEMENT_BUCKET,
    RAY_TIME_TO_FIRST_TOKEN_BUCKET, RAY_TIME_TO_FIRST_TOKEN_COUNT,
    RAY_INTER_TOKEN_LATENCY_BUCKET, RAY_INTER_TOKEN_LATENCY_COUNT,
}
# maas_ray.serving.metrics.AGREEMENT_BOUNDS[0], the agreement histogram's first bucket: items
# that disagreed. Written out because importing the serving package imports Ray and Serve; a
# unit test keeps the two equal.
DISAGREED_LE = 1e-6


def metrics_urls() -> list[str]:
    """Every alive node's metrics endpoint (Ray's own metrics export port)."""
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]


class Snapshot:
    """Sums of the maas series over every process of every node, keyed by (name, labels)."""

    def __init__(self, values: dict[tuple, float]) -> None:
        self.values = values

    @classmethod
    def scrape(cls, app: str, model: str, urls: Optional[Iterable[str]] = None) -> "Snapshot":
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        values: dict[tuple, float] = defaultdict(float)
        for url in urls if urls is not None else metrics_urls():
            text = httpx.get(url, timeout=10).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    labels = sample.labels
                    if sample.name not in _WANTED or (labels.get(LABEL_APP), labels.get(LABEL_MODEL)) != (app, model):
                        continue
                    key = (sample.name, labels.get(LABEL_VERSION), labels.get(LABEL_PROTOCOL),
                           labels.get(LABEL_STATUS), labels.get(LABEL_LE))
                    values[key] += sample.value
        return cls(dict(values))

    def minus(self, earlier: "Snapshot") -> "Snapshot":
        return Snapshot({k: v - earlier.values.get(k, 0.0) for k, v in self.values.items()})

    def requests(self, version: int, protocols: Optional[Iterable[str]]) -> tuple[float, float]:
        """(requests, server errors: status >= 500) of a version over the given protocols (None:
        every protocol), from
        the latency histogram's counts by status: recorded per request like the buckets the p99
        comes from, where ``ray_maas_requests_total`` is incremented at each flush, series by
        series, so an export could carry a flush's 5xx without its 2xx."""
        total = errors = 0.0
        wanted = None if protocols is None else set(protocols)
        for (name, v, protocol, status, _), value in self.values.items():
            if name == RAY_REQUEST_LATENCY_COUNT and v == str(version) and (wanted is None or protocol in wanted):
                total += value
                if status is not None and status.isdigit() and int(status) >= 500:
                    errors += value
        return total, errors

    def p99(self, version: int, protocols: Iterable[str]) -> Optional[float]:
        buckets: dict[float, float] = defaultdict(float)
        wanted = set(protocols)
        for (name, v, protocol, _, le), value in self.values.items():
            if name == RAY_REQUEST_LATENCY_BUCKET and v == str(version) and protocol in wanted:
                buckets[math.inf if le == "+Inf" else float(le)] += value
        return quantile(sorted(buckets.items()), 0.99)

    def histogram(self, bucket_name: str, count_name: str, version: int) -> tuple[float, Optional[float]]:
        """(observations, p99) of a version's series of one histogram without a protocol label
        (time to first token, inter-token latency)."""
        buckets: dict[float, float] = defaultdict(float)
        count = 0.0
        for (name, v, _, _, le), value in self.values.items():
            if v != str(version):
                continue
            if name == bucket_name and le is not None:
                buckets[math.inf if le == "+Inf" else float(le)] += value
            elif name == count_name:
                count += value
        return count, quantile(sorted(buckets.items()), 0.99)

    def agreement(self, version: int) -> tuple[float, float]:
        """(items compared, items agreed) of a version's mirrored calls, from one histogram
        whose count and buckets a single observation writes, so no scrape sees them apart."""
        compared = disagreed = 0.0
        for (name, v, _, _, le), value in self.values.items():
            if v != str(version):
                continue
            if name == RAY_SHADOW_AGREEMENT_COUNT:
                compared += value
            elif name == RAY_SHADOW_AGREEMENT_BUCKET and le not in (None, "+Inf") \
                    and math.isclose(float(le), DISAGREED_LE):
                disagreed += value
        return compared, compared - disagreed


def quantile(cumulative: list[tuple[float, float]], q: float) -> Optional[float]:
    """Prometheus ``histogram_quantile`` over (upper bound, cumulative count) pairs."""
    if cumulative:  # a window's difference can dip where a replica restarted: keep it monotone, >= 0
        running, fixed = 0.0, []
        for bound, count in cumulative:
            running = max(running, count)
            fixed.append((bound, running))
        cumulative = fixed
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # in the +Inf bucket: the highest finite bound, as Prometheus does
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass
class Evidence:
    """What one window showed, and the verdict of the guards on it."""

    candidate_requests: float
    candidate_errors: float
    error_rate: Optional[float]
    candidate_p99_s: Optional[float]
    baseline_p99_s: Optional[float]
    p99_ratio: Optional[float]
    compared: float
    agreement: Optional[float]
    failed: list[str]
    enough: bool
    kind: str = "predictive"  # "generative": judged by judge_generative (the fields below)
    candidate_ttft_p99_s: Optional[float] = None
    baseline_ttft_p99_s: Optional[float] = None
    ttft_p99_ratio: Optional[float] = None
    candidate_itl_p99_s: Optional[float] = None
    baseline_itl_p99_s: Optional[float] = None
    itl_p99_ratio: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


def judge(
    window: Snapshot,
    candidate: int,
    baseline: int,
    *,
    max_error_rate: float,
    max_p99_ratio: float,
    min_agreement: Optional[float],
    min_requests: int,
    baseline_p99_fallback: Optional[float] = None,
) -> Evidence:
    """Apply the guards to one window. The candidate's evidence is its live and its mirrored
    calls; the baseline's p99 is from its live calls (or the last window that had some)."""
    protocols = (*LIVE_PROTOCOLS, "shadow")
    total, errors = window.requests(candidate, protocols)
    cand_p99 = window.p99(candidate, protocols)
    base_p99 = window.p99(baseline, LIVE_PROTOCOLS) or baseline_p99_fallback
    compared, agreed = window.agreement(candidate)
    error_rate = errors / total if total else None
    ratio = cand_p99 / base_p99 if cand_p99 is not None and base_p99 else None
    agreement = agreed / compared if compared else None
    failed = []
    if error_rate is not None and error_rate > max_error_rate:
        failed.append(f"error rate {error_rate:.4f} > max {max_error_rate} ({errors:.0f} of {total:.0f} requests)")
    if ratio is not None and ratio > max_p99_ratio:
        failed.append(f"p99 ratio {ratio:.2f} > max {max_p99_ratio} (candidate {cand_p99 * 1e3:.2f} ms, "
                      f"baseline {base_p99 * 1e3:.2f} ms)")
    if min_agreement is not None and agreement is not None and agreement < min_agreement:
        failed.append(f"agreement {agreement:.4f} < min {min_agreement} ({agreed:.0f} of {compared:.0f} items)")
    return Evidence(total, errors, error_rate, cand_p99, base_p99, ratio, compared, agreement, failed,
                    enough=total >= min_requests)


def _ratio_guard(label: str, cand: Optional[float], base: Optional[float], enough: tuple[bool, bool],
                 fallback: Optional[float], max_ratio: float,
                 failed: list[str]) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """(candidate p99, baseline p99, ratio) of one latency histogram; appends a failure when the
    ratio is over ``max_ratio``. ``enough``: whether the candidate and the baseline each had
    enough generations in the window (else no p99 for that side, or the baseline's fallback)."""
    if not enough[0]:
        cand = None
    if not enough[1]:
        base = fallback
    ratio = cand / base if cand is not None and base else None
    if ratio is not None and ratio > max_ratio:
        failed.append(f"{label} p99 ratio {ratio:.2f} > max {max_ratio} (candidate {cand * 1e3:.2f} ms, "
                      f"baseline {base * 1e3:.2f} ms)")
    return cand, base, ratio


def judge_generative(
    window: Snapshot,
    candidate: int,
    baseline: int,
    *,
    max_error_rate: float,
    max_ttft_p99_ratio: float,
    max_itl_p99_ratio: float,
    min_agreement: Optional[float],
    min_requests: int,
    min_latency_samples: int,
    baseline_fallback: Optional[tuple[Optional[float], Optional[float]]] = None,
) -> Evidence:
    """Apply the generative guards to one window: the candidate's error rate over its live and
    mirrored requests (every route), its TTFT p99 and ITL p99 against the baseline's live ones
    (each judged once both sides have ``min_latency_samples`` generations, counted by their
    TTFT observations; the candidate's series hold its mirrored generations too), and the
    share of its mirrored generations that agreed with the primary. ``baseline_fallback``: (TTFT p99, ITL p99) from an earlier window,
    for a window where the baseline had too few."""
    total, errors = window.requests(candidate, None)
    compared, agreed = window.agreement(candidate)
    error_rate = errors / total if total else None
    agreement = agreed / compared if compared else None
    failed: list[str] = []
    if error_rate is not None and error_rate > max_error_rate:
        failed.append(f"error rate {error_rate:.4f} > max {max_error_rate} ({errors:.0f} of {total:.0f} requests)")
    fallback = baseline_fallback or (None, None)
    ttft_n = {v: window.histogram(RAY_TIME_TO_FIRST_TOKEN_BUCKET, RAY_TIME_TO_FIRST_TOKEN_COUNT, v)
              for v in (candidate, baseline)}
    itl_p99 = {v: window.histogram(RAY_INTER_TOKEN_LATENCY_BUCKET, RAY_INTER_TOKEN_LATENCY_COUNT, v)[1]
               for v in (candidate, baseline)}
    # Evidence is counted in generations (TTFT observations) for both ratios: one straggling
    # generation gives many inter-token gaps, not a baseline to compare with.
    enough = (ttft_n[candidate][0] >= min_latency_samples, ttft_n[baseline][0] >= min_latency_samples)
    ttft = _ratio_guard("TTFT", ttft_n[candidate][1], ttft_n[baseline][1], enough, fallback[0],
                        max_ttft_p99_ratio, failed)
    itl = _ratio_guard("ITL", itl_p99[candidate], itl_p99[baseline], enough, fallback[1], max_itl_p99_ratio, failed)
    if min_agreement is not None and agreement is not None and agreement < min_agreement:
        failed.append(f"agreement {agreement:.4f} < min {min_agreement} ({agreed:.0f} of {compared:.0f} "
                      "mirrored generations)")
    return Evidence(total, errors, error_rate, None, None, None, compared, agreement, failed,
                    enough=total >= min_requests, kind="generative",
                    candidate_ttft_p99_s=ttft[0], baseline_ttft_p99_s=ttft[1], ttft_p99_ratio=ttft[2],
                    candidate_itl_p99_s=itl[0], baseline_itl_p99_s=itl[1], itl_p99_ratio=itl[2])
