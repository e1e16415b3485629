"""RateLimiter: token buckets per key, with an injected clock."""

from __future__ import annotations

import pickle

import pytest

from maas_ray.errors import ConfigError, RateLimitedError
from maas_ray.serving.config import Limits
from maas_ray.serving.limits import RateLimiter

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _allowed(limiter: RateLimiter, key: str, n: int) -> int:
    ok = 0
    for _ in range(n):
        try:
            limiter.check(key)
            ok += 1
        except RateLimitedError:
            pass
    return ok


def test_burst_then_refill_and_retry_after():
    clock = Clock()
    limiter = RateLimiter(rps=2.0, burst=5, clock=clock)
    assert _allowed(limiter, "k", 10) == 5  # the burst, all at one instant
    with pytest.raises(RateLimitedError) as info:
        limiter.check("k")
    err = info.value
    assert err.status_code == 429 and err.retry_after_s == pytest.approx(0.5)
    assert err.retry_after_header() == "1"
    assert "k" not in err.message.replace("bursts", "").replace("requests", "")  # no key in the message

    clock.now += 0.25  # half a token
    with pytest.raises(RateLimitedError) as info:
        limiter.check("k")
    assert info.value.retry_after_s == pytest.approx(0.25)
    clock.now += 0.25
    limiter.check("k")  # one token back
    clock.now += 100  # refills up to the burst, not beyond
    assert _allowed(limiter, "k", 10) == 5


def test_sustained_rate():
    clock = Clock()
    limiter = RateLimiter(rps=10.0, burst=1, clock=clock)
    ok = 0
    for _ in range(1000):  # 100 requests/s offered for 10 s
        clock.now += 0.01
        ok += _allowed(limiter, "k", 1)
    assert 99 <= ok <= 101


def test_keys_are_isolated():
    clock = Clock()
    limiter = RateLimiter(rps=1.0, burst=2, clock=clock)
    assert _allowed(limiter, "a", 5) == 2
    assert _allowed(limiter, "b", 5) == 2


def test_default_burst_is_two_seconds_of_rate():
    assert RateLimiter(rps=10).burst == 20
    assert RateLimiter(rps=0.1).burst == 1


def test_memory_is_bounded_and_evicts_the_least_recently_used():
    clock = Clock()
    limiter = RateLimiter(rps=1.0, burst=1, clock=clock, max_keys=3)
    for key in ("a", "b", "c"):
        limiter.check(key)
    limiter.check("d")  # evicts "a", the least recently used
    assert len(limiter) == 3
    limiter.check("a")  # a fresh bucket: allowed again (evicts "b")
    with pytest.raises(RateLimitedError):
        limiter.check("c")  # still tracked, still empty
    for i in range(10_000):
        limiter.check(f"addr-{i}")
    assert len(limiter) == 3


def test_from_limits_and_bad_arguments():
    assert RateLimiter.from_limits(Limits()) is None
    limiter = RateLimiter.from_limits(Limits(rate_limit_rps=5, rate_limit_burst=7))
    assert limiter.rps == 5 and limiter.burst == 7
    for kwargs in ({"rps": 0}, {"rps": 1, "burst": 0}, {"rps": 1, "max_keys": 0}):
        with pytest.raises(ConfigError):
            RateLimiter(**kwargs)


def test_error_pickles_with_retry_after():
    clock = Clock()
    limiter = RateLimiter(rps=4.0, burst=1, clock=clock)
    limiter.check("k")
    with pytest.raises(RateLimitedError) as info:
        limiter.check("k")
    err = pickle.loads(pickle.dumps(info.value))
    assert err.retry_after_s == pytest.approx(0.25) and err.status_code == 429
