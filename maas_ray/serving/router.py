"""Per-model weighted version choice, optionally sticky by a request key."""

from __future__ import annotations

import bisect
import hashlib
import random
from typing import Optional

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
