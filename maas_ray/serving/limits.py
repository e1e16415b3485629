"""Per-key rate limiting at the ingress: one token bucket per API key id (or client address).

Each ingress replica keeps its own buckets (no shared state, no extra hop), so the
app-wide limit is ``rate_limit_rps`` times the number of ingress replicas.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Optional

from maas_ray.errors import ConfigError, RateLimitedError

if TYPE_CHECKING:
    from maas_ray.serving.config import Limits

__all__ = ["RateLimiter"]

_EPSILON = 1e-9


class RateLimiter:
    """Token buckets: ``rps`` tokens per second, at most ``burst`` saved up, one per request.

    Args:
        rps: sustained requests per second per key.
        burst: requests a key may send at once (default: 2 s worth of ``rps``, at least 1).
        clock: monotonic seconds; injected by tests.
        max_keys: most buckets kept. Beyond it the least recently used bucket is dropped;
            a bucket idle for ``burst / rps`` seconds is full again anyway, so dropping it
            loses nothing, and memory stays bounded whatever keys or addresses arrive.
    """

    def __init__(
        self,
        rps: float,
        burst: Optional[int] = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if not rps > 0:
            raise ConfigError(f"rate limit must be > 0 requests/s, got {rps!r}")
        if burst is not None and burst < 1:
            raise ConfigError(f"rate limit burst must be >= 1, got {burst!r}")
        if max_keys < 1:
            raise ConfigError(f"max_keys must be >= 1, got {max_keys!r}")
        self.rps = float(rps)
        self.burst = burst if burst is not None else max(1, math.ceil(2 * rps))
        self.max_keys = max_keys
        self._clock = clock
        # key -> [tokens, last refill time]; order = least recently used first
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    @classmethod
    def from_limits(cls, limits: "Limits", **kwargs) -> Optional["RateLimiter"]:
        """The limiter the app's ``limits`` ask for, or None when ``rate_limit_rps`` is unset."""
        if limits.rate_limit_rps is None:
            return None
        return cls(limits.rate_limit_rps, limits.rate_limit_burst, **kwargs)

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, key: str) -> None:
        """Take one token for ``key``; RateLimitedError with ``retry_after_s`` when there is none.

        The error names neither the key nor the address: callers pass key ids, and the
        client knows who it is.
        """
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [float(self.burst), now]
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rps)
            bucket[1] = now
        # The epsilon absorbs float drift: 10 refills of 0.1 token sum to 0.999..., which
        # would otherwise turn away every tenth request sent exactly at the rate.
        if bucket[0] >= 1.0 - _EPSILON:
            bucket[0] = max(0.0, bucket[0] - 1.0)
            return
        retry_after = (1.0 - bucket[0]) / self.rps
        raise RateLimitedError(
            f"rate limit exceeded: {self.rps:g} requests/s with bursts of {self.burst}; "
            f"retry after {retry_after:.2f} s",
            retry_after,
        )
