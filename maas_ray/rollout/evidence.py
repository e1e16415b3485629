"""Evidence for a rollout step, read from Ray's Prometheus endpoints (the serving metrics).

The controller takes a :class:`Snapshot` of every node's ``/metrics`` when a window opens and
another when it closes; the difference is what happened in the window: requests and server
errors of the candidate (live and mirrored), its latency histogram against the baseline's,
and how its mirrored answers agreed with the primary's. Counters and histogram buckets are
cumulative, so a window's evidence is exact whatever the scrape timing, up to one flush
(1 s) of lag at each end. Every guard reads a native Ray histogram (request counts and
latency from the request latency histogram, agreement from the agreement histogram), which no
scrape sees half-exported (see maas_ray.serving.metrics).
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
    RAY_REQUEST_LATENCY_BUCKET,
    RAY_REQUEST_LATENCY_COUNT,
    RAY_SHADOW_AGREEMENT_BUCKET,
    RAY_SHADOW_AGREEMENT_COUNT,
)

logger = logging.getLogger(__name__)

LIVE_PROTOCOLS = ("http_v2", "http_v1", "grpc", "handle")
_WANTED = {
    RAY_REQUEST_LATENCY_COUNT, RAY_REQUEST_LATENCY_BUCKET, RAY_SHADOW_AGREEMENT_COUNT, RAY_SHADOW_AGREEMENT_BUCKET,
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

    def requests(self, version: int, protocols: Iterable[str]) -> tuple[float, float]:
        """(requests, server errors: status >= 500) of a version over the given protocols, from
        the latency histogram's counts by status: recorded per request like the buckets the p99
        comes from, where ``ray_maas_requests_total`` is incremented at each flush, series by
        series, so an export could carry a flush's 5xx without its 2xx."""
        total = errors = 0.0
        wanted = set(protocols)
        for (name, v, protocol, status, _), value in self.values.items():
            if name == RAY_REQUEST_LATENCY_COUNT and v == str(version) and protocol in wanted:
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
