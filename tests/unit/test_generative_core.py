"""The serving side of generative versions without Ray: the token rate limit, the generative
metrics, the core's generation path (metrics, token charging, closing the stream) and the
HTTP routes' streaming, errors and disconnects over a fake core."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, Optional

import orjson
import pytest

from maas_ray.errors import InvalidInputError, ModelNotReadyError, RateLimitedError
from maas_ray.serving import metric_names as names
from maas_ray.serving.config import Limits
from maas_ray.serving.core import IngressCore
from maas_ray.serving.http_generate import GenerativeRoutes
from maas_ray.serving.keys import ANONYMOUS
from maas_ray.serving.limits import RequestDeadlines, TokenLimiter
from maas_ray.serving.shadow import ShadowMirror
from maas_ray.serving.shadow_generate import GenerativeMirror
from maas_ray.serving.metrics import ServingMetrics
from maas_ray.serving.types import GenerationChunk

pytestmark = pytest.mark.unit


# ---- the token rate limit ---------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_token_limiter_admits_until_the_budget_is_spent_then_refills():
    clock = Clock()
    limiter = TokenLimiter(60, clock=clock)  # 1 token per second
    limiter.check("k")
    limiter.charge("k", 50)
    limiter.check("k")  # 10 left
    limiter.charge("k", 30)  # 20 in debt
    with pytest.raises(RateLimitedError, match="60 tokens") as err:
        limiter.check("k")
    assert err.value.status_code == 429 and 19 < err.value.retry_after_s <= 21
    limiter.check("other")  # per key
    clock.t = 21.0
    limiter.check("k")


def test_token_limiter_is_off_without_the_setting_and_bounded_in_keys():
    assert TokenLimiter.from_limits(Limits()) is None
    assert TokenLimiter.from_limits(Limits(rate_limit_tokens_per_minute=5)).per_minute == 5
    limiter = TokenLimiter(10, max_keys=2)
    for key in ("a", "b", "c"):
        limiter.check(key)
    assert len(limiter._buckets) == 2


# ---- metrics ------------------------------------------------------------------------------
class FakeMetric:
    def __init__(self, name, description="", tag_keys=None, boundaries=None):
        self.name, self.values = name, {}

    def _key(self, tags):
        return tuple(sorted((tags or {}).items()))

    def inc(self, value=1, tags=None):
        self.values[self._key(tags)] = self.values.get(self._key(tags), 0) + value

    def set(self, value, tags=None):
        self.values[self._key(tags)] = value

    def observe(self, value, tags=None):
        self.inc(1, tags)


class FakeModule:
    def __init__(self) -> None:
        self.made: dict[str, FakeMetric] = {}

    def _make(self, name, **kw):
        metric = self.made[name] = FakeMetric(name, **kw)
        return metric

    Counter = Gauge = Histogram = _make


def test_generation_metrics_and_engine_gauges_export_by_model_and_version():
    fake = FakeModule()
    fake.Counter = fake.Gauge = fake.Histogram = lambda name, **kw: fake._make(name, **kw)
    sm = ServingMetrics("app", models=["lm"], metrics_module=fake)
    sm.generation("lm", 2, prompt_tokens=5, completion_tokens=7, finish_reason="length", ttft_s=0.02,
                  itl_s=[0.01, 0.011])
    sm.generation("lm", 2, prompt_tokens=3, completion_tokens=0, finish_reason="cancelled")
    sm.watch_engine("lm", 2, lambda: {"running": 3, "waiting": 1, "kv_tokens": 50, "kv_capacity_tokens": 200})
    sm.flush()
    tags = (("app", "app"), ("model", "lm"), ("version", "2"))
    assert fake.made[names.PROMPT_TOKENS].values[tags] == 8
    assert fake.made[names.COMPLETION_TOKENS].values[tags] == 7
    generations = fake.made[names.GENERATIONS].values
    assert generations[tuple(sorted((*tags, ("finish_reason", "cancelled"))))] == 1
    assert fake.made[names.ENGINE_RUNNING].values[tags] == 3
    assert fake.made[names.ENGINE_KV_USAGE].values[tags] == 0.25
    assert fake.made[names.TIME_TO_FIRST_TOKEN].values[tags] == 1  # native histograms: one observation each
    assert fake.made[names.INTER_TOKEN_LATENCY].values[tags] == 2
    sm.flush()  # counters get deltas only
    assert fake.made[names.PROMPT_TOKENS].values[tags] == 8


# ---- the core's generation path -----------------------------------------------------------
def chunks(n: int, reason: str = "length", prompt: int = 4) -> list[GenerationChunk]:
    out = [GenerationChunk(f"t{i}", [i], None, prompt, i + 1) for i in range(n)]
    out[-1].finish_reason = reason
    return out


class FakeRoute:
    def __init__(self, items: list, fail_first: Optional[Exception] = None) -> None:
        self.items, self.fail_first, self.closed = items, fail_first, False

    async def _gen(self):
        try:
            if self.fail_first is not None:
                raise self.fail_first
            for item in self.items:
                await asyncio.sleep(0)
                yield item
        finally:
            self.closed = True

    def generate(self, request):
        return self._gen()


class RecordingMetrics:
    def __init__(self) -> None:
        self.generations: list[dict] = []
        self.finished: list[tuple] = []
        self.started: list[str] = []

    def generation(self, model, version, **kw):
        self.generations.append({"model": model, "version": version, **kw})

    def request_started(self, model):
        self.started.append(model)

    def request_finished(self, model, version, protocol, status, error, total_s, stages=None):
        self.finished.append((model, version, protocol, status, error))


def fake_core(route: FakeRoute, tokens: Optional[TokenLimiter] = None) -> SimpleNamespace:
    core = SimpleNamespace(tokens=tokens, metrics=RecordingMetrics())
    core.generative_shadow = GenerativeMirror(ShadowMirror(None, core.metrics), None, core.metrics)  # no targets
    core.slot = SimpleNamespace(number=3, route=route, generative=True)
    return core


def test_core_generate_records_ttft_gaps_tokens_and_charges_the_key():
    route = FakeRoute(chunks(3))
    limiter = TokenLimiter(100)
    core = fake_core(route, limiter)

    async def run():
        return [c async for c in IngressCore.generate(core, "lm", core.slot, None, protocol="p", who="k")]

    got = asyncio.run(run())
    assert [c.text for c in got] == ["t0", "t1", "t2"] and route.closed
    rec = core.metrics.generations[0]
    assert (rec["finish_reason"], rec["prompt_tokens"], rec["completion_tokens"]) == ("length", 4, 3)
    assert rec["ttft_s"] is not None and len(rec["itl_s"]) == 2
    assert limiter._buckets["k"][0] == pytest.approx(93, abs=0.1)


@pytest.mark.parametrize("n, reason", [(5, "cancelled"), (1, "length")])
def test_core_generate_closed_after_its_first_chunk(n, reason):
    """Closed early, the stream is cancelled and says so. Closed right after its final chunk (a
    non-streaming route reads it and closes; max_tokens=1), the generation had ended: its reason stays."""
    route = FakeRoute(chunks(n))
    core = fake_core(route)

    async def run():
        gen = IngressCore.generate(core, "lm", core.slot, None, protocol="p")
        first = await gen.__anext__()
        await gen.aclose()
        return first

    assert asyncio.run(run()).text == "t0"
    assert route.closed and core.metrics.generations[0]["finish_reason"] == reason


def test_core_generate_refuses_a_spent_token_budget_before_starting():
    limiter = TokenLimiter(10)
    limiter.charge("k", 20)
    route = FakeRoute(chunks(1))
    core = fake_core(route, limiter)

    async def run():
        return [c async for c in IngressCore.generate(core, "lm", core.slot, None, protocol="p", who="k")]

    with pytest.raises(RateLimitedError):
        asyncio.run(run())
    assert not core.metrics.generations  # nothing ran


# ---- the HTTP routes over a fake core -----------------------------------------------------
class FakeCore:
    key_header = "x-request-key"

    def __init__(self, route: FakeRoute, generative: bool = True) -> None:
        self.limits = Limits()
        self.deadlines = RequestDeadlines(None)
        self.metrics = RecordingMetrics()
        self.slot = SimpleNamespace(number=2, route=route, generative=generative)
        self.tokens = None
        self.generative_shadow = GenerativeMirror(ShadowMirror(None, self.metrics), None, self.metrics)  # no targets

    def admit(self, api_key, client, model, *, admin=False):
        return ANONYMOUS

    async def pick_generative(self, model, version, key):
        if model != "lm":
            raise InvalidInputError(f"model {model!r} is not a generative model: send it to /infer")
        return self.slot

    def token_key(self, principal, client):
        return None

    def generate(self, model, slot, request, *, protocol, who=None, start=None):
        return IngressCore.generate(self, model, slot, request, protocol=protocol, who=who, start=start)

    def generative_models(self):
        return [("lm", [1, 2])]


async def _read_body(headers, receive):
    message = await receive()
    return message.get("body", b"")


def call(core: FakeCore, method: str, path: str, body: Any = None, *, disconnect_after: Optional[int] = None):
    """Run one ASGI request through GenerativeRoutes; returns (status, headers, body parts)."""
    sent: list[dict] = []
    raw = body if isinstance(body, bytes) else orjson.dumps(body or {})

    async def run():
        received = 0
        gone = asyncio.Event()

        async def receive():
            nonlocal received
            received += 1
            if received == 1:
                return {"type": "http.request", "body": raw, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            bodies = [m for m in sent if m["type"] == "http.response.body"]
            if disconnect_after is not None and len(bodies) >= disconnect_after:
                gone.set()
                await asyncio.sleep(0.01)

        scope = {"type": "http", "method": method, "path": path, "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1)}
        routes = GenerativeRoutes(core, _read_body)
        watchdog = asyncio.get_running_loop().create_task(core.deadlines.watch_forever())
        assert await routes.dispatch(path, scope, receive, send)
        watchdog.cancel()

    asyncio.run(run())
    start = sent[0]
    return start["status"], dict(start["headers"]), [m.get("body", b"") for m in sent[1:]]


def test_openai_completion_streams_events_then_done():
    core = FakeCore(FakeRoute(chunks(3)))
    status, headers, parts = call(core, "POST", "/v1/completions",
                                  {"model": "lm", "prompt": "a", "stream": True, "max_tokens": 3})
    assert status == 200 and headers[b"content-type"] == b"text/event-stream"
    assert parts[-1].endswith(b"data: [DONE]\n\n")
    texts = [orjson.loads(p[6:])["choices"][0]["text"] for p in parts if p.startswith(b"data: {")]
    assert texts == ["t0", "t1", "t2"]
    assert core.metrics.finished == [("lm", 2, "openai", 200, None)]


def test_non_streaming_answers_one_json_naming_the_version():
    core = FakeCore(FakeRoute(chunks(2)))
    status, headers, parts = call(core, "POST", "/v2/models/lm/generate", {"text_input": "a"})
    body = orjson.loads(b"".join(parts))
    assert status == 200 and headers[b"x-model-version"] == b"2"
    assert body["text_output"] == "t0t1" and body["completion_tokens"] == 2 and body["model_version"] == "2"


def test_an_error_before_the_first_chunk_is_a_json_answer_in_the_routes_shape():
    overflow = InvalidInputError("the prompt plus max_tokens is more than the model's context_length 64")
    status, _, parts = call(FakeCore(FakeRoute([], fail_first=overflow)), "POST", "/v1/chat/completions",
                            {"model": "lm", "messages": [{"role": "user", "content": "x"}], "stream": True})
    err = orjson.loads(b"".join(parts))["error"]
    assert status == 400 and "context_length" in err["message"] and err["type"] == "invalid_request_error"
    status, headers, parts = call(FakeCore(FakeRoute([], fail_first=ModelNotReadyError("queue full", 2.0))), "POST",
                                  "/v2/models/lm/generate_stream", {"text_input": "a"})
    assert status == 503 and headers[b"retry-after"] == b"2" and orjson.loads(b"".join(parts)) == {
        "error": "queue full"}
    status, _, parts = call(FakeCore(FakeRoute([])), "POST", "/v2/models/clf/generate", {"text_input": "a"})
    assert status == 400 and "/infer" in orjson.loads(b"".join(parts))["error"]


class FailingRoute(FakeRoute):
    async def _gen(self):
        try:
            yield GenerationChunk("a", [1], None, 1, 1)
            raise ModelNotReadyError("the generation engine stopped", 1.0)
        finally:
            self.closed = True


def test_an_error_after_the_first_event_is_an_error_event():
    status, _, parts = call(FakeCore(FailingRoute([])), "POST", "/v2/models/lm/generate_stream", {"text_input": "a"})
    assert status == 200 and orjson.loads(parts[-1][6:]) == {"error": "the generation engine stopped"}
    status, _, parts = call(FakeCore(FailingRoute([])), "POST", "/v1/completions",
                            {"model": "lm", "prompt": "a", "stream": True})
    assert status == 200 and b'"error"' in parts[-1] and parts[-1].endswith(b"data: [DONE]\n\n")


def test_a_client_that_disconnects_closes_the_stream():
    route = FakeRoute(chunks(1000))
    core = FakeCore(route)
    status, _, parts = call(core, "POST", "/v2/models/lm/generate_stream", {"text_input": "a"}, disconnect_after=2)
    assert status == 200 and len(parts) < 1000 and route.closed
    assert core.metrics.finished[-1][3] == 499
    assert core.metrics.generations[-1]["finish_reason"] == "cancelled"


def test_models_list_and_methods():
    core = FakeCore(FakeRoute([]))
    status, _, parts = call(core, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in orjson.loads(b"".join(parts))["data"]] == ["lm", "lm:1", "lm:2"]
    status, headers, parts = call(core, "GET", "/v1/completions")
    assert status == 405 and headers[b"allow"] == b"POST" and "error" in orjson.loads(b"".join(parts))


class SlowRoute(FakeRoute):
    async def _gen(self):
        try:
            for i in range(10_000):
                await asyncio.sleep(0.01)
                yield GenerationChunk("x", [i], None, 1, i + 1)
        finally:
            self.closed = True


@pytest.mark.parametrize("stream", [False, True])
def test_the_request_timeout_covers_the_whole_generation(stream):
    route = SlowRoute([])
    core = FakeCore(route)
    core.deadlines = RequestDeadlines(0.2, check_interval_s=0.02)
    status, _, parts = call(core, "POST", "/v2/models/lm/generate" + ("_stream" if stream else ""),
                            {"text_input": "a"})
    if stream:  # the 200 went out with the first token: the timeout is the last event
        assert status == 200 and orjson.loads(parts[-1][6:])["error"].startswith("request not answered within")
    else:
        assert status == 504 and "request_timeout_s" in orjson.loads(b"".join(parts))["error"]
    assert route.closed and core.metrics.finished[-1][3] == 504


# ---- the GenerativeServer's stream -------------------------------------------------------
def _server(generate) -> Any:
    from maas_ray.serving.generation import GenerativeServer

    server = GenerativeServer.__new__(GenerativeServer)  # no registry, no engine: the stream only
    server.label, server.reason = "lm:1", None
    server.pipeline = SimpleNamespace(generate=generate)
    return server


def test_generative_server_sends_the_chunks_made_meanwhile_together_and_errors_as_values():
    async def generate(request):
        for i in range(3):
            yield GenerationChunk(str(i), [i])
        raise InvalidInputError("stop here")

    async def run():
        return [items async for items in _server(generate).generate(None)]

    (items,) = asyncio.run(run())
    assert [c.text for c in items[:3]] == ["0", "1", "2"] and isinstance(items[3], InvalidInputError)


def test_closing_the_generative_servers_stream_cancels_the_engines():
    closed = []

    async def generate(request):
        try:
            yield GenerationChunk("a", [1])
            await asyncio.sleep(60)
            yield GenerationChunk("b", [2])
        finally:
            closed.append(True)

    async def run():
        stream = _server(generate).generate(None)
        first = await stream.__anext__()
        await stream.aclose()
        await asyncio.sleep(0.01)
        return first

    assert [c.text for c in asyncio.run(run())] == ["a"] and closed == [True]


def test_the_lm_deployment_yaml_builds_valid_args_and_engine_config():
    from pathlib import Path

    import yaml

    from maas_ray.serving.config import AppArgs
    from maas_ray.serving.generation import engine_config

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "deployments" / "lm-cpu.yaml").read_text())
    args = AppArgs.model_validate(doc["applications"][0]["args"])
    (lm,) = args.models
    assert lm.name == "lm" and engine_config(lm).max_num_seqs == 32
