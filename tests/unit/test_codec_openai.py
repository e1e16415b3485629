"""The OpenAI codec: every accepted body decodes to the right GenerateRequest, every hostile one
in the shared corpus is a 400 naming its field (and nothing but InvalidInputError ever escapes,
fuzzed), and what the encoders write is what the stock ``openai`` client parses, through its
own pydantic types and through the client itself over an in-process transport."""

from __future__ import annotations

import pickle
import random

import httpx
import openai
import orjson
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from maas_ray.errors import (
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    PayloadTooLargeError,
    RateLimitedError,
    UnauthenticatedError,
)
from maas_ray.serving.codecs.generate import join_chunks
from maas_ray.serving.codecs.openai import (
    DONE,
    EventStream,
    chat_completion_body,
    completion_body,
    decode_chat,
    decode_completion,
    error_body,
    model_id,
    models_body,
    parse_model,
)
from maas_ray.serving.status import answer_error, openai_error
from maas_ray.serving.types import GenerationChunk, SamplingParams
from tests.helpers.hostile_generate import CASES, JSON, VALID, corpus, mutate

pytestmark = pytest.mark.unit

DECODERS = {"completions": decode_completion, "chat": decode_chat}
OURS = [c for c in CASES if c.route in DECODERS]


def _j(obj) -> bytes:
    return orjson.dumps(obj)


# ---- the hostile corpus ----------------------------------------------------------------------
def test_corpus_covers_every_class():
    names = " ".join(c.name for c in OURS)
    for word in ("max_tokens_0", "n_int_2", "invalid_utf8", "surrogate", "stop", "nested", "body_list", "empty_body",
                 "unknown_field", "messages_role_tool", "prompt_token_ids", "logit_bias", "tools", "response_format"):
        assert word in names, word
    assert len(OURS) >= 250 and all(c.expect == 400 for c in OURS)
    assert len({c.name for c in CASES}) == len(CASES)
    assert corpus("other-model", 64)  # builds for any model and context


@pytest.mark.parametrize("case", [c for c in OURS if not c.live_only], ids=lambda c: c.name)
def test_hostile_body_is_a_400_naming_its_field(case):
    with pytest.raises(InvalidInputError) as info:
        DECODERS[case.route](case.body)
    err = info.value
    assert type(err) is InvalidInputError and err.status_code == case.expect
    assert case.field in err.message, err.message
    assert 0 < len(err.message) < 400, err.message
    assert pickle.loads(pickle.dumps(err)).message == err.message
    body = openai_error(answer_error(err))["error"]
    assert body["type"] == "invalid_request_error" and body["message"] == err.message
    if case.field != JSON and not err.message.startswith("request"):
        assert body["param"] and err.message.startswith(body["param"] + ": "), body


@pytest.mark.parametrize("case", [c for c in OURS if c.live_only], ids=lambda c: c.name)
def test_context_cases_pass_the_codec_for_the_engine_to_refuse(case):
    DECODERS[case.route](case.body)


@pytest.mark.parametrize("case", [v for v in VALID if v.route in DECODERS], ids=lambda v: v.name)
def test_valid_bodies_decode(case):
    decoded = DECODERS[case.route](case.body)
    assert decoded.model == "lm" and decoded.version in (None, 1)
    SamplingParams.model_validate(decoded.request.sampling.model_dump())


# ---- what accepted bodies decode to --------------------------------------------------------------
def test_completion_fields_decode():
    d = decode_completion(_j({"model": "lm:production", "prompt": ["Hi"], "max_tokens": 5, "temperature": 0,
                              "top_p": 0.5, "top_k": 3, "seed": 9, "stop": "\n", "stream": True,
                              "stream_options": {"include_usage": True}, "user": "u", "n": 1, "echo": False}))
    assert (d.model, d.version) == ("lm", "production")
    r = d.request
    assert r.prompt == "Hi" and r.messages is None and r.stream and r.include_usage
    assert r.sampling == SamplingParams(max_tokens=5, temperature=0.0, top_p=0.5, top_k=3, seed=9, stop=["\n"])
    assert r.sampling.model_fields_set == {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop"}


def test_defaults_and_nulls_leave_fields_unset():
    r = decode_completion(_j({"model": "lm", "prompt": "", "max_tokens": None, "stop": None, "stream": None,
                              "stream_options": None})).request
    assert r.prompt == "" and not r.stream and not r.include_usage
    assert r.sampling == SamplingParams() and r.sampling.model_fields_set == set()
    vllm_off = decode_chat(_j({"model": "lm", "messages": [{"role": "user", "content": "x"}], "top_k": -1}))
    assert vllm_off.request.sampling.top_k == 0


def test_chat_fields_decode():
    d = decode_chat(_j({"model": "lm:3", "messages": [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
        {"role": "assistant", "content": "ok", "tool_calls": [], "refusal": None},
        {"role": "system", "content": []}], "max_completion_tokens": 7, "stop": ["x", "y"], "logprobs": False}))
    assert (d.model, d.version) == ("lm", 3)
    assert d.request.messages == [{"role": "system", "content": "rules"}, {"role": "user", "content": "a\nb"},
                                  {"role": "assistant", "content": "ok"}, {"role": "system", "content": ""}]
    assert d.request.sampling.max_tokens == 7 and d.request.sampling.stop == ["x", "y"]
    assert d.request.prompt is None and not d.request.stream
    same = decode_chat(_j({"model": "lm", "messages": [{"role": "user", "content": "x"}], "max_tokens": 7,
                           "max_completion_tokens": 7}))
    assert same.request.sampling.max_tokens == 7


def test_model_ids():
    assert parse_model("lm") == ("lm", None)
    assert parse_model("lm:12") == ("lm", 12)
    assert parse_model("a.b-c_d:canary") == ("a.b-c_d", "canary")
    assert model_id("lm") == "lm" and model_id("lm", 3) == "lm:3"
    for bad in ("", ":3", "lm:", "lm::3", "lm:3:4", "l m", 3, None, "lm:" + "1" * 19):
        with pytest.raises(InvalidInputError, match="^model: "):
            parse_model(bad)


# ---- fuzz: only InvalidInputError, and what decodes is valid ---------------------------------
@pytest.mark.parametrize("route", sorted(DECODERS))
def test_fuzzed_bodies_raise_only_invalid_input(route):
    rng = random.Random(24)
    seeds = [v.body for v in VALID if v.route == route]
    decode = DECODERS[route]
    accepted = rejected = 0
    for i in range(3000):
        body = mutate(rng.choice(seeds), rng)
        try:
            d = decode(body)
        except InvalidInputError as exc:
            assert type(exc) is InvalidInputError and exc.message, body
            rejected += 1
            continue
        accepted += 1
        SamplingParams.model_validate(d.request.sampling.model_dump())
        assert isinstance(d.model, str) and d.version is None or isinstance(d.version, (int, str))
        if route == "chat":
            assert d.request.messages and all(
                set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
                and isinstance(m["content"], str) for m in d.request.messages)
        else:
            assert isinstance(d.request.prompt, str)
    assert accepted > 50 and rejected > 1000, (accepted, rejected)


# ---- encoders through the openai package's own types -------------------------------------------
RESULT = GenerationChunk(" there was a", [5, 6, 7], "length", prompt_tokens=4, completion_tokens=3)


def test_completion_body_parses_as_openai_completion():
    c = Completion.model_validate_json(completion_body("lm:3", RESULT, created=5))
    assert c.object == "text_completion" and c.id.startswith("cmpl-") and c.model == "lm:3" and c.created == 5
    assert c.choices[0].text == " there was a" and c.choices[0].finish_reason == "length"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (4, 3, 7)


def test_chat_body_parses_as_openai_chat_completion():
    c = ChatCompletion.model_validate_json(chat_completion_body("lm:3", RESULT))
    assert c.object == "chat.completion" and c.id.startswith("chatcmpl-")
    assert c.choices[0].message.role == "assistant" and c.choices[0].message.content == " there was a"
    assert c.usage.total_tokens == 7


def _events(raw: bytes) -> list:
    assert raw.endswith(b"\n\n")
    out = []
    for block in raw.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: "), block
        data = block[len(b"data: "):]
        out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


STREAM = [GenerationChunk(" there", [5], None, 4, 1), GenerationChunk("", [6], None, 4, 2),
          GenerationChunk(" was", [7], "stop", 4, 3)]


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_events_parse_as_chunks(include_usage):
    s = EventStream(chat=True, model="lm:3", include_usage=include_usage)
    raw = b"".join(s.push(c) for c in STREAM) + s.end()
    events = _events(raw)
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    assert len({c.id for c in chunks}) == 1 and chunks[0].id == s.id
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " there was"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
        assert all(c.usage is None for c in chunks[:-1])
    else:
        assert all(c.usage is None for c in chunks)


def test_completion_stream_events_parse_as_completions():
    s = EventStream(chat=False, model="lm", include_usage=True)
    assert s.start() == b""
    raw = b"".join(s.push(c) for c in STREAM) + s.end()
    events = _events(raw)
    # OpenAI's own completion streams send "finish_reason": null until the last chunk, which
    # the (non-streaming) Completion type does not allow; the client builds chunks without
    # validating. Everything else must validate.
    for e in events[:-3]:  # the last text chunk, the usage chunk, [DONE]
        assert e["choices"][0]["finish_reason"] is None
        e["choices"][0]["finish_reason"] = "stop"
    chunks = [Completion.model_validate(e) for e in events[:-1]]
    assert [c.choices[0].text for c in chunks[:-1]] == [" there", " was"]
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].usage.total_tokens == 7


def test_models_body_lists_the_split_and_each_version():
    body = orjson.loads(models_body([("lm", [1, 2, "production"]), ("digits", [])], created=3))
    assert body["object"] == "list"
    models = [Model.model_validate(m) for m in body["data"]]
    assert [m.id for m in models] == ["lm", "lm:1", "lm:2", "lm:production", "digits"]
    for m in models:
        assert parse_model(m.id)[0] in ("lm", "digits")


def test_openai_error_shape_per_status():
    cases = [
        (InvalidInputError("max_tokens: expected an integer, got 0"), 400, "invalid_request_error", "max_tokens", None),
        (InvalidInputError("messages[2].content[0].text: expected a string"), 400, "invalid_request_error",
         "messages[2].content[0].text", None),
        (InvalidInputError("request body is not valid JSON: x"), 400, "invalid_request_error", None, None),
        (PayloadTooLargeError("stop: 5 bytes"), 413, "invalid_request_error", "stop", "payload_too_large"),
        (UnauthenticatedError("missing API key"), 401, "authentication_error", None, None),
        (ModelNotFoundError("no model 'x'"), 404, "not_found_error", None, "model_not_found"),
        (RateLimitedError("over 5 tokens/s", 2.0), 429, "rate_limit_error", None, "rate_limit_exceeded"),
        (ModelNotReadyError("queue full", 1.0), 503, "server_error", None, "model_not_ready"),
        (RuntimeError("boom"), 500, "server_error", None, None),
    ]
    for exc, status, kind, param, code in cases:
        answer = answer_error(exc, "req-1")
        body = orjson.loads(error_body(answer))
        assert answer.status == status
        assert body == {"error": {"message": answer.message, "type": kind, "param": param, "code": code}}, body


# ---- the stock openai client, over an in-process transport --------------------------------------
def _app(request: httpx.Request) -> httpx.Response:
    """What a transport does with these codecs (errors answered through status.answer_error)."""
    path = request.url.path
    if path == "/v1/models":
        return httpx.Response(200, content=models_body([("lm", [1, "production"])]))
    decode = decode_chat if path.endswith("chat/completions") else decode_completion
    chat = decode is decode_chat
    try:
        d = decode(request.content)
    except InvalidInputError as exc:
        return httpx.Response(400, content=error_body(answer_error(exc)))
    name = model_id(d.model, 1 if d.version is None else d.version)
    if d.request.sampling.max_tokens == 13:  # fail after the first event
        s = EventStream(chat=chat, model=name)
        raw = s.push(STREAM[0]) + s.error(answer_error(ModelNotReadyError("replica died", 1.0)))
        return httpx.Response(200, content=raw, headers={"content-type": "text/event-stream"})
    if not d.request.stream:
        body = (chat_completion_body if chat else completion_body)(name, join_chunks(STREAM))
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})
    s = EventStream(chat=chat, model=name, include_usage=d.request.include_usage)
    raw = b"".join(s.push(c) for c in STREAM) + s.end()
    return httpx.Response(200, content=raw, headers={"content-type": "text/event-stream"})


@pytest.fixture
def client():
    with openai.OpenAI(base_url="http://maas.test/v1", api_key="k", max_retries=0,
                       http_client=httpx.Client(transport=httpx.MockTransport(_app))) as c:
        yield c


def test_stock_client_completions(client):
    c = client.completions.create(model="lm", prompt="Once upon a time", max_tokens=3, temperature=0)
    assert c.choices[0].text == " there was" and c.model == "lm:1" and c.usage.total_tokens == 7
    pieces = [ch.choices[0].text for ch in client.completions.create(model="lm:production", prompt="a", stream=True)]
    assert "".join(pieces) == " there was"


def test_stock_client_chat(client):
    c = client.chat.completions.create(model="lm", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert c.choices[0].message.content == " there was" and c.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="lm", messages=[{"role": "system", "content": "s"},
                                                                  {"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": True}, seed=1, stop=["\n"])
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == " there was"
    assert chunks[-1].usage.total_tokens == 7


def test_stock_client_models(client):
    assert [m.id for m in client.models.list()] == ["lm", "lm:1", "lm:production"]


def test_stock_client_raises_on_400_and_on_an_error_event(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="lm", messages=[{"role": "user", "content": "hi"}], n=2)
    assert info.value.status_code == 400 and "n:" in info.value.message
    assert info.value.body["param"] == "n" and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="lm", prompt="a", max_tokens=0)
    stream = client.chat.completions.create(model="lm", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=13, stream=True)
    with pytest.raises(openai.APIError, match="replica died"):
        for _ in stream:
            pass


def test_done_is_the_sse_terminator():
    assert DONE == b"data: [DONE]\n\n"
