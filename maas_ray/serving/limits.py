"""Per-key rate limiting at the ingress: one token bucket per API key id (or client address).

Each ingress replica keeps its own buckets (no shared state, no extra hop), so the
app-wide limit is ``rate_limit_rps`` times the number of ingress replicas.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from maas_ray.errors import ConfigError, PayloadTooLargeError, RateLimitedError

if TYPE_CHECKING:
    from maas_ray.serving.config import Limits

__all__ = ["RateLimiter", "RequestDeadlines", "TokenLimiter", "check_work"]

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


class TokenLimiter:
    """Generated and prompt tokens per key: a bucket of ``per_minute`` tokens refilling
    continuously, charged after a generation (its size is known only then).

    :meth:`check` admits a request while the key's bucket is above zero; :meth:`charge` takes
    the generation's tokens, which may leave the bucket in debt: the key's next request then
    waits (429, Retry-After) until the debt is repaid. So a key gets its budget on average and
    overshoots by at most one request's tokens per ingress replica.
    """

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000) -> None:
        if not per_minute >= 1:
            raise ConfigError(f"token rate limit must be >= 1 token/minute, got {per_minute!r}")
        self.per_minute = per_minute
        self.rate = per_minute / 60.0  # tokens per second
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # key -> [tokens, last refill]

    @classmethod
    def from_limits(cls, limits: "Limits", **kwargs) -> Optional["TokenLimiter"]:
        if limits.rate_limit_tokens_per_minute is None:
            return None
        return cls(limits.rate_limit_tokens_per_minute, **kwargs)

    def _bucket(self, key: str) -> list[float]:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [float(self.per_minute), now]
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(float(self.per_minute), bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        return bucket

    def check(self, key: str) -> None:
        """RateLimitedError (429) while ``key``'s token budget is used up."""
        bucket = self._bucket(key)
        if bucket[0] > _EPSILON:
            return
        retry_after = max(0.01, (_EPSILON - bucket[0]) / self.rate)
        raise RateLimitedError(
            f"token rate limit exceeded: {self.per_minute} tokens (prompt + generated) per minute; "
            f"retry after {retry_after:.2f} s",
            retry_after,
        )

    def charge(self, key: str, tokens: int) -> None:
        """Take a finished generation's tokens from ``key``'s budget."""
        if tokens > 0:
            self._bucket(key)[0] -= tokens


class RequestDeadlines:
    """``limits.request_timeout_s`` for every request of a replica, checked by one watchdog.

    ``asyncio.timeout`` costs ~17 us per request on the replica's uvloop (a timer armed and
    disarmed each time; measured in process through the lean HTTP path), about 5 % of a tiny
    model's whole request. Here a request only registers its
    task in a dict (~0.3 us); a watchdog task wakes every ``check_interval_s`` and cancels the
    tasks past their deadline, so a request gets its 504 within the timeout plus one interval.
    """

    def __init__(self, timeout_s: Optional[float], *, check_interval_s: Optional[float] = None) -> None:
        self.timeout_s = timeout_s
        self.check_interval_s = check_interval_s or (min(1.0, timeout_s / 10) if timeout_s else 1.0)
        self.active: dict[asyncio.Task, float] = {}
        self.expired: set[asyncio.Task] = set()

    def enter(self) -> Optional[asyncio.Task]:
        if self.timeout_s is None:
            return None
        task = asyncio.current_task()
        if task is not None:
            self.active[task] = time.monotonic() + self.timeout_s
        return task

    def exit(self, task: Optional[asyncio.Task]) -> bool:
        """Unregister; True if this task was cancelled because it ran past its deadline."""
        if task is None:
            return False
        self.active.pop(task, None)
        if task in self.expired:
            self.expired.discard(task)
            return True
        return False

    def timed_out(self, task: Optional[asyncio.Task]) -> bool:
        return task is not None and task in self.expired

    async def watch_forever(self) -> None:
        if self.timeout_s is None:
            return
        while True:
            await asyncio.sleep(self.check_interval_s)
            now = time.monotonic()
            for task, deadline in list(self.active.items()):
                if deadline <= now:
                    del self.active[task]
                    self.expired.add(task)
                    task.cancel()


def check_work(model: str, tensors: Mapping[str, Any], max_items: int, max_text_chars: int) -> int:
    """A decoded request's work against its model's limits; returns its items (rows).

    Items: the largest first dimension among the tensors (a scalar counts as one). Text: the
    characters (bytes, for binary items) of every string item together, what the text
    preprocessor tokenizes or the image preprocessor decodes. Over either: 413 naming the
    limit, before any preprocessing or inference.
    """
    items = 1
    for arr in tensors.values():
        shape = getattr(arr, "shape", ())
        if shape and shape[0] > items:
            items = shape[0]
    if items > max_items:
        raise PayloadTooLargeError(
            f"request has {items} items, over the limit of {max_items} for model {model!r} "
            "(limits.max_items, or models[].max_items)")
    chars = 0
    for arr in tensors.values():
        if getattr(arr, "dtype", None) is not None and arr.dtype.kind in "OSU":
            chars += sum(len(x) for x in arr.reshape(-1) if isinstance(x, (str, bytes, bytearray, memoryview)))
    if chars > max_text_chars:
        raise PayloadTooLargeError(
            f"request has {chars} characters of text, over the limit of {max_text_chars} for model {model!r} "
            "(limits.max_text_chars, or models[].max_text_chars)")
    return items
