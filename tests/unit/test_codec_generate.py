"""The OIP generate-extension codec (Triton's ``text_input`` / ``text_output``): accepted forms
decode to the right GenerateRequest, every hostile body in the shared corpus is a 400 naming its
field, fuzzed bodies raise nothing but InvalidInputError, and the answers and stream events are
Triton's shapes."""

from __future__ import annotations

import pickle
import random

import orjson
import pytest

from maas_ray.errors import InvalidInputError
from maas_ray.serving.codecs.generate import (
    decode_generate,
    encode_generate,
    generate_error_event,
    generate_event,
    join_chunks,
    sampling_params,
)
from maas_ray.serving.types import GenerationChunk, SamplingParams
from tests.helpers.hostile_generate import CASES, VALID, mutate

pytestmark = pytest.mark.unit

OURS = [c for c in CASES if c.route in ("generate", "generate_stream")]


def _decode(route: str, body: bytes):
    return decode_generate(body, stream=route == "generate_stream")


@pytest.mark.parametrize("case", [c for c in OURS if not c.live_only], ids=lambda c: c.name)
def test_hostile_body_is_a_400_naming_its_field(case):
    with pytest.raises(InvalidInputError) as info:
        _decode(case.route, case.body)
    err = info.value
    assert type(err) is InvalidInputError and err.status_code == case.expect
    assert case.field in err.message and 0 < len(err.message) < 400, err.message
    assert err.to_dict() == {"error": err.message}
    assert pickle.loads(pickle.dumps(err)).message == err.message


@pytest.mark.parametrize("case", [c for c in OURS if c.live_only], ids=lambda c: c.name)
def test_context_cases_pass_the_codec_for_the_engine_to_refuse(case):
    _decode(case.route, case.body)


@pytest.mark.parametrize("case", [v for v in VALID if v.route.startswith("generate")], ids=lambda v: v.name)
def test_valid_bodies_decode(case):
    r = _decode(case.route, case.body)
    assert isinstance(r.prompt, str) and r.messages is None and r.stream == (case.route == "generate_stream")


def test_fields_decode_from_the_top_level_and_parameters():
    r = decode_generate(orjson.dumps({"text_input": "Hi", "max_tokens": 8, "top_k": 4,
                                      "parameters": {"temperature": 0, "top_p": 0.5, "random_seed": 3,
                                                     "stop_words": "\n", "stream": False}}), stream=False)
    assert r.prompt == "Hi" and not r.stream
    assert r.sampling == SamplingParams(max_tokens=8, top_k=4, temperature=0.0, top_p=0.5, seed=3, stop=["\n"])
    r = decode_generate(orjson.dumps({"text_input": "", "stop": ["a", "b"], "bad_words": "", "stop_words": None,
                                      "exclude_input_in_output": True}), stream=True)
    assert r.stream and r.prompt == "" and r.sampling.stop == ["a", "b"]
    assert r.sampling.model_fields_set == {"stop"}
    r = decode_generate(b'{"text_input": "x", "stop_words": ""}', stream=False)
    assert r.sampling.stop == [] and r.sampling.max_tokens == 16


def test_sampling_params_names_the_wire_field():
    with pytest.raises(InvalidInputError, match=r"^max_completion_tokens: expected an integer"):
        sampling_params({"max_tokens": 0}, {"max_tokens": "max_completion_tokens"})
    assert sampling_params({}, {}) == SamplingParams()


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
def test_fuzzed_bodies_raise_only_invalid_input(route):
    rng = random.Random(7)
    seeds = [v.body for v in VALID if v.route.startswith("generate")]
    accepted = rejected = 0
    for _ in range(3000):
        body = mutate(rng.choice(seeds), rng)
        try:
            r = _decode(route, body)
        except InvalidInputError as exc:
            assert type(exc) is InvalidInputError and exc.message, body
            rejected += 1
            continue
        accepted += 1
        assert isinstance(r.prompt, str)
        SamplingParams.model_validate(r.sampling.model_dump())
    assert accepted > 50 and rejected > 1000, (accepted, rejected)


CHUNKS = [GenerationChunk("Once", [1], None, 3, 1), GenerationChunk("", [2], None, 3, 2),
          GenerationChunk(" upon", [3], "length", 3, 3)]


def test_generate_answer_is_tritons_shape_plus_counts():
    whole = join_chunks(CHUNKS)
    assert whole == GenerationChunk("Once upon", [1, 2, 3], "length", 3, 3)
    body = orjson.loads(encode_generate("lm", 3, whole))
    assert body == {"model_name": "lm", "model_version": "3", "text_output": "Once upon", "finish_reason": "length",
                    "prompt_tokens": 3, "completion_tokens": 3}
    assert join_chunks([]) == GenerationChunk("", [], None, 0, 0)


def test_generate_stream_events():
    raw = b"".join(generate_event("lm", 2, c) for c in CHUNKS)
    blocks = raw.split(b"\n\n")
    assert blocks[-1] == b"" and all(b.startswith(b"data: ") for b in blocks[:-1])
    events = [orjson.loads(b[6:]) for b in blocks[:-1]]
    assert [e["text_output"] for e in events] == ["Once", " upon"]  # the empty chunk sends nothing
    assert all(e["model_name"] == "lm" and e["model_version"] == "2" for e in events)
    assert "finish_reason" not in events[0] and events[-1]["finish_reason"] == "length"
    assert events[-1]["completion_tokens"] == 3
    err = generate_error_event('replica "died"\n')
    assert err.startswith(b"data: ") and err.endswith(b"\n\n") and err.count(b"\n\n") == 1
    assert orjson.loads(err[6:]) == {"error": 'replica "died"\n'}
