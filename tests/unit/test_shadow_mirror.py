"""Shadow mirroring without Ray: which requests are mirrored, the in-flight bound, failures."""

import asyncio
import random

import numpy as np
import pytest

from maas_ray.errors import ConfigError, InferenceError
from maas_ray.serving.shadow import ShadowMirror, ShadowTarget, compare, parse_shadow

pytestmark = pytest.mark.unit


class Recorder:
    def __init__(self):
        self.events = []

    def request_started(self, model):
        self.events.append(("started", model))

    def request_finished(self, model, version, protocol, status, error, total_s, stages=None):
        self.events.append(("finished", model, version, protocol, status, error))

    def shadow(self, model, version, *, compared, agreed, max_abs_diff):
        self.events.append(("shadow", model, version, compared, agreed, max_abs_diff))

    def shadow_dropped(self, model, version):
        self.events.append(("dropped", model, version))


PRIMARY = {"label": np.array(["1", "2"], dtype=object), "probabilities": np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)}


def test_compare_top1_and_max_abs_diff():
    candidate = {"label": np.array(["1", "1"], dtype=object), "probabilities": np.array([[0.8, 0.2], [0.6, 0.4]], np.float32)}
    compared, agreed, diff = compare(PRIMARY, candidate)
    assert (compared, agreed) == (2, 1) and diff == pytest.approx(0.4)
    assert compare({"y": np.zeros(3, np.float32)}, {"y": np.ones(3, np.float32)}) == (0, 0, 1.0)
    assert compare({"y": np.zeros(3)}, {"z": np.zeros(3)}) == (0, 0, None)  # nothing in common


def test_parse_shadow_validates_version_and_share():
    resolve = {"candidate": 2, "2": 2, "1": 1}.get
    assert parse_shadow("m", {"version": "candidate", "share": 0.25}, resolve, {1, 2}) == ShadowTarget(2, 0.25)
    assert parse_shadow("m", None, resolve, {1, 2}) is None
    with pytest.raises(ConfigError, match="not deployed"):
        parse_shadow("m", {"version": 3}, resolve, {1, 2})
    with pytest.raises(ConfigError, match=r"share: expected a number in \[0, 1\], got 2"):
        parse_shadow("m", {"version": 2, "share": 2}, resolve, {1, 2})
    with pytest.raises(ConfigError, match="expected"):
        parse_shadow("m", {"version": 2, "extra": 1}, resolve, {1, 2})


def test_mirrors_the_share_never_the_candidate_itself_and_after_the_response():
    async def go():
        calls = []

        async def call(model, version, tensors, strict):
            calls.append(version)
            return dict(PRIMARY)

        metrics = Recorder()
        mirror = ShadowMirror(call, metrics, rng=random.Random(0), max_in_flight=1000)
        assert mirror.plan("m", 1, {}, PRIMARY, True) is None  # no target
        mirror.targets["m"] = ShadowTarget(2, 0.5)
        assert mirror.plan("m", 2, {}, PRIMARY, True) is None  # the candidate answered itself
        plans = [mirror.plan("m", 1, {}, PRIMARY, True) for _ in range(400)]
        started = [p for p in plans if p is not None]
        assert 150 < len(started) < 250  # about half
        assert calls == []  # nothing runs until the protocol has answered
        for p in started:
            p()
        await asyncio.gather(*mirror.tasks)
        assert calls == [2] * len(started)
        assert sum(1 for e in metrics.events if e[0] == "shadow" and e[3:5] == (2, 2)) == len(started)
        assert ("finished", "m", 2, "shadow", 200, None) in metrics.events

    asyncio.run(go())


def test_bounded_in_flight_drops_and_failures_are_counted_not_raised():
    async def go():
        gate = asyncio.Event()

        async def call(model, version, tensors, strict):
            await gate.wait()
            raise InferenceError("candidate broke")

        metrics = Recorder()
        mirror = ShadowMirror(call, metrics, max_in_flight=2)
        mirror.targets["m"] = ShadowTarget(2, 1.0)
        for _ in range(5):
            mirror.plan("m", 1, {}, PRIMARY, True)()
        assert mirror.in_flight == 2
        assert metrics.events.count(("dropped", "m", 2)) == 3
        gate.set()
        await asyncio.gather(*mirror.tasks)
        assert mirror.in_flight == 0
        assert metrics.events.count(("finished", "m", 2, "shadow", 500, "InferenceError")) == 2

    asyncio.run(go())
