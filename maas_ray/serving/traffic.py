"""Traffic: weights per version (parsed from ``user_config.traffic``) and the per-model
weighted version choice, optionally sticky by a request key."""

from __future__ import annotations

import bisect
import hashlib
import random
from typing import Any, Callable, Mapping, Optional

from maas_ray.errors import ConfigError


class TrafficRouter:
    """Pick a version by weight. The same key maps to the same version while weights hold.

    Sticky keys hash to a point in [0, 1) and fall into the version's slice of the
    cumulative weights, so a reweight moves only the keys whose slice changed.
    """

    def __init__(self, weights: dict[int, float]) -> None:
        if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ConfigError(f"traffic weights must be >= 0 with a positive sum, got {weights}")
        self.weights = dict(sorted(weights.items()))
        total = sum(self.weights.values())
        live = [(v, w) for v, w in self.weights.items() if w > 0]
        self._versions = [v for v, _ in live]
        self._cum = []
        acc = 0.0
        for _, w in live:
            acc += w / total
            self._cum.append(acc)
        self._cum[-1] = 1.0

    def choose(self, key: Optional[str] = None) -> int:
        if key is None:
            point = random.random()
        else:
            digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
            point = int.from_bytes(digest, "big") / 2**64
        return self._versions[min(bisect.bisect_right(self._cum, point), len(self._versions) - 1)]


def parse_weights(
    model: str, weights: Any, resolve: Callable[[str], Optional[int]], deployed: set[int]
) -> dict[str, float]:
    """``user_config.traffic.<model>`` ({version number or build-time alias: weight}) -> the same
    map with float weights, checked: every reference deployed, weights numbers >= 0, not all 0."""
    if not isinstance(weights, Mapping):
        raise ConfigError(f"user_config.traffic.{model}: expected {{version: weight}}, got {weights!r}")
    parsed: dict[str, float] = {}
    for ref, weight in weights.items():
        if resolve(str(ref)) not in deployed:
            raise ConfigError(
                f"user_config.traffic.{model}: version {ref!r} is not deployed; deployed: {sorted(deployed)}"
            )
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"user_config.traffic.{model}.{ref}: weight must be a number >= 0, got {weight!r}")
        parsed[str(ref)] = float(weight)
    if sum(parsed.values()) <= 0:
        raise ConfigError(f"user_config.traffic.{model}: all weights are 0: {dict(weights)}")
    return parsed


def weights_by_version(refs: Mapping[str, float], resolve: Callable[[str], Optional[int]]) -> dict[int, float]:
    """Weights per version number from the weights per configured reference (two aliases on
    one version add up)."""
    weights: dict[int, float] = {}
    for ref, weight in refs.items():
        number = resolve(ref)
        weights[number] = weights.get(number, 0.0) + weight
    return weights
