"""Shadow traffic: mirror a share of a model's live requests to a candidate version.

The caller only ever gets the primary's answer. A mirrored call starts after the primary's
response is written (the protocol calls :meth:`ShadowMirror.after_response`), runs as its own
task, and can neither fail nor block the caller: at most ``max_in_flight`` run at once per
replica, and a request that finds them all busy is not mirrored (counted as dropped). Each
mirrored call records the candidate's latency and errors (``protocol="shadow"`` in the request
metrics) and how it agrees with the primary: top-1 agreement where both answer a ``label``
output (classifiers), the largest absolute difference over the float outputs both return.
Generative models are mirrored to the same target by :mod:`maas_ray.serving.shadow_generate`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

import numpy as np

from maas_ray.errors import ConfigError, MaasError, unwrap_remote

logger = logging.getLogger(__name__)


def shadow_failure(model: str, version: int, exc: BaseException) -> tuple[int, str]:
    """(HTTP status, error class) a failed mirrored call is counted with (Ray's wrapper removed)."""
    exc = unwrap_remote(exc)
    logger.debug("shadow %s:%d failed: %r", model, version, exc)
    return (exc.status_code if isinstance(exc, MaasError) else 500), type(exc).__name__
Tensors = dict[str, np.ndarray]

# A mirrored call that takes longer than this is abandoned (counted as an error): the
# candidate must not pile up work a slow version never finishes.
SHADOW_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ShadowTarget:
    version: int
    share: float  # 0..1 of the model's requests
    # Generative models: a sampled continuation agrees when its word overlap with the primary's
    # is at least this (None: maas_ray.serving.shadow_generate.DEFAULT_MIN_OVERLAP).
    min_overlap: Optional[float] = None


def compare(primary: Tensors, candidate: Tensors) -> tuple[int, int, Optional[float]]:
    """(items compared by top-1 label, items that agreed, max |difference| over float outputs)."""
    compared = agreed = 0
    if "label" in primary and "label" in candidate and primary["label"].shape == candidate["label"].shape:
        compared = int(primary["label"].shape[0])
        agreed = int(np.sum(primary["label"] == candidate["label"]))
    diffs = [
        float(np.max(np.abs(a.astype(np.float64) - candidate[n].astype(np.float64)))) if a.size else 0.0
        for n, a in primary.items()
        if n in candidate and a.dtype.kind == "f" and candidate[n].shape == a.shape
    ]
    return compared, agreed, (max(diffs) if diffs else None)


def parse_shadow(model: str, raw: Any, resolve: Callable[[str], Optional[int]], versions: set[int]) -> Optional[ShadowTarget]:
    """``{"version": ref, "share": 0..1, "min_overlap": 0..1 (generative models, optional)}``
    (or null to stop mirroring) -> ShadowTarget."""
    where = f"user_config.shadow.{model}"
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"version", "share", "min_overlap"} or "version" not in raw:
        raise ConfigError(f"{where}: expected {{version: <number or alias>, share: 0..1, min_overlap: 0..1 "
                          f"(optional)}}, got {raw!r}")
    number = resolve(str(raw["version"]))
    if number not in versions:
        raise ConfigError(f"{where}.version: {raw['version']!r} is not deployed in this app; deployed: {sorted(versions)}")
    share = raw.get("share", 1.0)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise ConfigError(f"{where}.share: expected a number in [0, 1], got {share!r}")
    overlap = raw.get("min_overlap")
    if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, (int, float))
                                or not 0 <= overlap <= 1):
        raise ConfigError(f"{where}.min_overlap: expected a number in [0, 1], got {overlap!r}")
    return ShadowTarget(number, float(share), None if overlap is None else float(overlap))


class ShadowMirror:
    """Per-replica mirroring state: targets per model, the in-flight bound, the metrics calls.

    ``call(model, version, tensors, strict)`` runs one candidate request and returns its
    outputs (the ingress passes its route call); ``metrics`` is a ServingMetrics.
    """

    def __init__(
        self,
        call: Callable[[str, int, Tensors, bool], Awaitable[Tensors]],
        metrics: Any,
        *,
        max_in_flight: int = 32,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.call, self.metrics, self.max_in_flight = call, metrics, max_in_flight
        self.targets: dict[str, ShadowTarget] = {}
        self.in_flight = 0
        self.rng = rng or random.Random()
        self.tasks: set[asyncio.Task] = set()  # strong references until done

    def plan(self, model: str, primary_version: int, tensors: Tensors, primary: Tensors, strict: bool):
        """Decide now whether this request is mirrored; returns the call to start after the
        response is written, or None. Costs one dict lookup when the model has no target."""
        target = self.targets.get(model)
        if target is None or target.version == primary_version or self.rng.random() >= target.share:
            return None
        return lambda: self._start(model, target.version, tensors, primary, strict)

    def _start(self, model: str, version: int, tensors: Tensors, primary: Tensors, strict: bool) -> None:
        if self.in_flight >= self.max_in_flight:
            self.metrics.shadow_dropped(model, version)
            return
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(model, version, tensors, primary, strict))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, model: str, version: int, tensors: Tensors, primary: Tensors, strict: bool) -> None:
        start = time.perf_counter()
        status, error = 200, None
        self.metrics.request_started(model)
        try:
            outputs = await asyncio.wait_for(self.call(model, version, tensors, strict), SHADOW_TIMEOUT_S)
            compared, agreed, diff = compare(primary, outputs)
            self.metrics.shadow(model, version, compared=compared, agreed=agreed, max_abs_diff=diff)
        except asyncio.TimeoutError:
            status, error = 504, "RequestTimeoutError"
        except Exception as exc:  # a failing candidate is what shadowing is for: count it, never raise
            status, error = shadow_failure(model, version, exc)
        finally:
            self.in_flight -= 1
            self.metrics.request_finished(model, version, "shadow", status, error, time.perf_counter() - start)
