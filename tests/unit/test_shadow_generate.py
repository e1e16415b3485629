"""Generative shadow without Ray: the comparisons, which generations are mirrored, the
in-flight bound, failures and timeouts counted (never raised), the candidate's TTFT and ITL
recorded under its version; and the ingress core mirroring a finished primary stream."""

import asyncio
import random
import time

import pytest

from maas_ray.errors import ConfigError, InferenceError
from maas_ray.serving.shadow import ShadowMirror, ShadowTarget, parse_shadow
from maas_ray.serving.shadow_generate import DEFAULT_MIN_OVERLAP, GenerativeMirror, agrees, token_overlap
from maas_ray.serving.types import GenerateRequest, GenerationChunk, SamplingParams

pytestmark = pytest.mark.unit


class Recorder:
    def __init__(self):
        self.events = []

    def request_started(self, model):
        self.events.append(("started", model))

    def request_finished(self, model, version, protocol, status, error, total_s, stages=None):
        self.events.append(("finished", model, version, protocol, status, error))

    def shadow(self, model, version, *, compared, agreed, max_abs_diff):
        self.events.append(("shadow", model, version, compared, agreed))

    def shadow_dropped(self, model, version):
        self.events.append(("dropped", model, version))

    def generation(self, model, version, *, prompt_tokens, completion_tokens, finish_reason, ttft_s=None, itl_s=()):
        self.events.append(("generation", model, version, prompt_tokens, completion_tokens, finish_reason,
                            ttft_s is not None, len(list(itl_s))))

    def of(self, kind):
        return [e for e in self.events if e[0] == kind]


def chunks(text, reason="stop"):
    """One chunk per word, the last with the finish reason (3 prompt tokens)."""
    words = text.split(" ")
    return [GenerationChunk(w if i == 0 else " " + w, [i + 10], reason if i == len(words) - 1 else None, 3, i + 1)
            for i, w in enumerate(words)]


def request(temperature=0.0, **kw):
    return GenerateRequest(sampling=SamplingParams(temperature=temperature, max_tokens=8, seed=1), prompt="hi",
                           stream=True, include_usage=True, id="r1", **kw)


def test_token_overlap_is_a_multiset_jaccard_of_words():
    assert token_overlap("a b c", "a b c") == 1.0
    assert token_overlap("", "") == 1.0 and token_overlap("a", "") == 0.0
    assert token_overlap("a b c d", "a b x y") == pytest.approx(2 / 6)
    assert token_overlap("a a b", "a b b") == pytest.approx(2 / 4)  # repeats count: {a,b} of {a,a,b,b}
    assert token_overlap("the  cat\nsat", "the cat sat") == 1.0  # whitespace is not a word


def test_greedy_needs_identical_text_sampled_needs_the_overlap():
    assert agrees("the cat sat", "the cat sat", 0.0, 0.5) == (True, None)
    assert agrees("the cat sat", "the cat sat.", 0.0, 0.0) == (False, None)  # greedy: exact, threshold unused
    assert agrees("a b c d", "a b x y", 0.8, 0.3) == (True, pytest.approx(1 / 3))
    assert agrees("a b c d", "a b x y", 0.8, 0.5)[0] is False
    assert DEFAULT_MIN_OVERLAP == 0.5


def test_parse_shadow_takes_an_optional_min_overlap_quoting_a_bad_one():
    resolve = {"2": 2, "1": 1}.get
    assert parse_shadow("m", {"version": 2, "share": 1, "min_overlap": 0.7}, resolve, {1, 2}) == \
        ShadowTarget(2, 1.0, 0.7)
    assert parse_shadow("m", {"version": 2}, resolve, {1, 2}).min_overlap is None
    with pytest.raises(ConfigError, match=r"shadow\.m\.min_overlap: expected a number in \[0, 1\], got 'high'"):
        parse_shadow("m", {"version": 2, "min_overlap": "high"}, resolve, {1, 2})


def _mirror(call, metrics, **kw):
    shadow = ShadowMirror(None, metrics, rng=random.Random(0))
    shadow.targets["m"] = ShadowTarget(2, 1.0)
    return shadow, GenerativeMirror(shadow, call, metrics, **kw)


def test_mirrors_the_share_compares_and_records_the_candidates_tokens_under_its_version():
    async def go():
        seen = []

        async def call(model, version, req):
            seen.append((version, req.stream, req.include_usage, req.id, req.sampling.seed))
            for c in chunks("the cat sat" if req.sampling.temperature == 0 else "the dog sat"):
                await asyncio.sleep(0)
                yield c

        metrics = Recorder()
        shadow, gm = _mirror(call, metrics)
        shadow.targets.clear()
        assert gm.plan("m", 1) is None  # no target
        shadow.targets["m"] = ShadowTarget(2, 0.5)
        assert gm.plan("m", 2) is None  # the candidate answered itself
        planned = [gm.plan("m", 1) for _ in range(400)]
        assert 150 < sum(p is not None for p in planned) < 250  # about half
        cases = [(ShadowTarget(2, 1.0), 0.0, "the cat sat"),  # greedy, identical: agreed
                 (ShadowTarget(2, 1.0), 0.0, "the cat sat down"),  # greedy, different: not
                 (ShadowTarget(2, 1.0), 1.0, "the cat sat"),  # sampled: overlap 2/4 >= 0.5: agreed
                 (ShadowTarget(2, 1.0, 0.9), 1.0, "the cat sat"),  # a stricter target: not
                 (ShadowTarget(2, 1.0), 0.0, None)]  # the primary did not finish: not compared
        futures = []
        for target, temperature, _ in cases:
            shadow.targets["m"] = target
            futures.append(gm.begin("m", 1, request(temperature), time.perf_counter()))
        await asyncio.sleep(0.01)
        assert len(seen) == 5 and metrics.of("shadow") == []  # they ran alongside; the comparison waits
        for future, (_, _, text) in zip(futures, cases):
            future.set_result(text)
        await asyncio.gather(*gm.tasks)
        assert seen[0] == (2, False, False, "r1-shadow", 1)  # non-streaming, same sampling (seed included)
        assert [e[4] for e in metrics.of("shadow")] == [1, 0, 1, 0]
        assert metrics.of("generation") == [("generation", "m", 2, 3, 3, "stop", True, 2)] * 5
        assert metrics.of("finished") == [("finished", "m", 2, "shadow", 200, None)] * 5
        assert gm.in_flight == 0

    asyncio.run(go())


def test_bounded_in_flight_drops_and_failures_and_timeouts_are_counted_not_raised():
    async def go():
        gate = asyncio.Event()

        async def broken(model, version, req):
            await gate.wait()
            yield chunks("a")[0]
            raise InferenceError("candidate broke")

        metrics = Recorder()
        _, gm = _mirror(broken, metrics, max_in_flight=2)
        futures = [gm.begin("m", 1, request(), time.perf_counter()) for _ in range(5)]
        assert futures[2:] == [None] * 3  # not mirrored
        assert gm.in_flight == 2 and metrics.of("dropped") == [("dropped", "m", 2)] * 3
        gate.set()
        await asyncio.gather(*gm.tasks)
        assert gm.in_flight == 0 and metrics.of("shadow") == []
        assert metrics.of("finished") == [("finished", "m", 2, "shadow", 500, "InferenceError")] * 2
        assert metrics.of("generation")[0][5:7] == ("error", True)  # the token it made is timed

        closed = []

        async def stuck(model, version, req):
            try:
                yield chunks("a b")[0]
                await asyncio.sleep(60)
            finally:
                closed.append(True)

        metrics = Recorder()
        _, gm = _mirror(stuck, metrics, timeout_s=0.05)
        gm.begin("m", 1, request(), time.perf_counter())
        await asyncio.gather(*gm.tasks)
        assert metrics.of("finished") == [("finished", "m", 2, "shadow", 504, "RequestTimeoutError")]
        assert closed == [True]  # the candidate's sequence is closed
        assert gm.in_flight == 0

    asyncio.run(go())


class _Route:
    def __init__(self, texts, log, name):
        self.texts, self.calls, self.log, self.name = texts, [], log, name

    async def generate(self, req):
        self.calls.append(req)
        for c in chunks(self.texts[len(self.calls) - 1]):
            self.log.append(self.name)
            await asyncio.sleep(0)
            yield c


class _Slot:
    def __init__(self, number, route):
        self.number, self.route, self.generative, self.state, self.dynamic = number, route, True, "ready", False

    def require_ready(self, model):
        pass


class _Versions:
    def __init__(self, slots):
        self.slots = slots

    def slot(self, model, number):
        return self.slots[number]


def test_the_core_mirrors_alongside_the_primary_and_compares_only_a_finished_one():
    from maas_ray.serving.core import IngressCore

    async def go():
        log = []
        primary, candidate = _Route(["the cat sat"] * 3, log, "p"), _Route(["the cat sat"] * 3, log, "c")
        core = IngressCore.__new__(IngressCore)  # the generate path only: no Ray, no app args
        core.metrics, core.tokens = Recorder(), None
        core.versions = _Versions({1: _Slot(1, primary), 2: _Slot(2, candidate)})
        core.shadow = ShadowMirror(None, core.metrics)
        core.generative_shadow = GenerativeMirror(core.shadow, core._shadow_generate, core.metrics)
        core.shadow.targets["m"] = ShadowTarget(2, 1.0)
        got = [c.text async for c in core.generate("m", core.versions.slots[1], request(), protocol="openai")]
        assert "".join(got) == "the cat sat"
        await asyncio.gather(*core.generative_shadow.tasks)
        assert log[0] == "p" and "c" in log[:3]  # the primary submitted first; the mirror ran alongside
        assert len(candidate.calls) == 1 and core.metrics.of("shadow") == [("shadow", "m", 2, 1, 1)]
        gen = core.generate("m", core.versions.slots[1], request(), protocol="openai")
        await gen.__anext__()
        await gen.aclose()  # the client went away after the first chunk: nothing to compare
        await asyncio.gather(*core.generative_shadow.tasks)
        assert len(candidate.calls) == 2 and len(core.metrics.of("shadow")) == 1
        assert core.metrics.of("finished")[-1] == ("finished", "m", 2, "shadow", 200, None)  # still timed

    asyncio.run(go())
