"""Generative requests: the sampling checks every generative protocol shares, and Triton's
OIP *generate extension* (``POST /v2/models/{m}[/versions/{v}]/generate`` and
``.../generate_stream``).

Request (Triton's ``$generate_request``)::

    {"text_input": "Once upon a time", "parameters": {"temperature": 0, "max_tokens": 32}}

``text_input`` (a string, required) is the prompt. Sampling fields go in ``parameters`` or,
as Triton passes "any additional properties" to the model and TensorRT-LLM's clients send
them, at the top level; a field given in both places is a 400. The fields:

- ``max_tokens`` (int, 1..1,000,000; default 16), ``temperature`` (0..2, 0 = greedy),
  ``top_p`` (0 < p <= 1), ``top_k`` (int >= 0, 0 = off), ``seed`` (int, 0..2**63-1; also
  as TensorRT-LLM's ``random_seed``), ``stop`` (a string or a list of at most 16 strings
  of 1..256 characters; also as ``stop_words``; ``""`` means none);
- ``stream`` (boolean): the route decides whether the answer streams; ``stream: true``
  on ``/generate`` is a 400 that points to ``/generate_stream``;
- ``bad_words`` (TensorRT-LLM): only ``""`` or ``[]`` (no-op); ``exclude_input_in_output``:
  only ``true`` (the answer never repeats the prompt).

Anything else is a 400 naming it. Integers are JSON integers (not ``true``, not ``16.0``);
numbers are integers or floats (not booleans). Every error is an
:class:`~maas_ray.errors.InvalidInputError` whose message starts with the field
(``parameters.temperature: expected a number in 0..2, got 3``).

Response (``/generate``)::

    {"model_name": "lm", "model_version": "3", "text_output": " there was",
     "finish_reason": "length", "prompt_tokens": 4, "completion_tokens": 32}

``finish_reason`` and the token counts are extra fields beyond Triton's three (clients
read ``text_output`` and ignore the rest). ``/generate_stream`` answers server-sent
events, one ``data: {...}\\n\\n`` per piece of text with the same fields (the counts
and ``finish_reason`` on the last), and an error after the first event as
``data: {"error": "..."}\\n\\n``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Union

import orjson
from pydantic import ValidationError

from maas_ray.errors import InvalidInputError
from maas_ray.serving.codecs.common import check_keys, invalid, parse_json, short_key
from maas_ray.serving.types import (
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    GenerateRequest,
    GenerationChunk,
    SamplingParams,
)

# SamplingParams' bounds, as error messages say them.
_BOUNDS = {
    "max_tokens": (1, 1_000_000, "an integer in 1..1000000"),
    "temperature": (0.0, 2.0, "a number in 0..2"),
    "top_p": (0.0, 1.0, "a number in (0, 1]"),
    "top_k": (0, 1_000_000, "an integer in 0..1000000"),
    "seed": (0, 2**63 - 1, "an integer in 0..9223372036854775807"),
}
_INTS = frozenset({"max_tokens", "top_k", "seed"})


def check_int(value: Any, where: str, field: str) -> int:
    low, high, words = _BOUNDS[field]
    if type(value) is not int or not low <= value <= high:  # type(True) is bool: no booleans
        raise invalid(where, words, value)
    return value


def check_number(value: Any, where: str, field: str) -> float:
    low, high, words = _BOUNDS[field]
    if type(value) is not float and type(value) is not int or not low <= value <= high:
        raise invalid(where, words, value)
    if field == "top_p" and value == 0:
        raise invalid(where, words, value)
    return float(value)


def check_stop(value: Any, where: str) -> list[str]:
    """A stop string or list of them; ``""`` alone means none (TensorRT-LLM sends it)."""
    if type(value) is str:
        if not value:
            return []
        if len(value) > MAX_STOP_CHARS:
            raise invalid(where, f"a string of 1..{MAX_STOP_CHARS} characters", value)
        return [value]
    if type(value) is not list:
        raise invalid(where, f"a string or a list of at most {MAX_STOP_SEQUENCES} strings", value)
    if len(value) > MAX_STOP_SEQUENCES:
        raise InvalidInputError(f"{where}: expected at most {MAX_STOP_SEQUENCES} stop strings, got {len(value)}")
    for i, s in enumerate(value):
        if type(s) is not str or not 0 < len(s) <= MAX_STOP_CHARS:
            raise invalid(f"{where}[{i}]", f"a string of 1..{MAX_STOP_CHARS} characters", s)
    return value


def check_bool(value: Any, where: str) -> bool:
    if type(value) is not bool:
        raise invalid(where, "a boolean", value)
    return value


def sampling_params(values: Mapping[str, Any], wire: Mapping[str, str]) -> SamplingParams:
    """Checked sampling fields -> :class:`SamplingParams` (only the fields given, so
    ``model_fields_set`` tells the server which ones the client chose, e.g. whether it set
    ``max_tokens``). ``values``: SamplingParams field -> JSON value (nulls already dropped);
    ``wire``: SamplingParams field -> the name the request used, for error messages."""
    kw: dict[str, Any] = {}
    for field, value in values.items():
        where = wire.get(field, field)
        if field == "stop":
            kw[field] = check_stop(value, where)
        elif field in _INTS:
            kw[field] = check_int(value, where, field)
        else:
            kw[field] = check_number(value, where, field)
    try:
        return SamplingParams(**kw)
    except ValidationError as exc:  # a bound the checks above missed: still a 400 naming the field
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "sampling"
        raise InvalidInputError(f"{wire.get(field, field)}: {err['msg']}") from exc


# ---- OIP generate extension ------------------------------------------------------------------
# wire name -> SamplingParams field
_SAMPLING_NAMES = {
    "max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
    "seed": "seed", "random_seed": "seed", "stop": "stop", "stop_words": "stop",
}
_OTHER_NAMES = frozenset({"stream", "bad_words", "exclude_input_in_output"})
_PARAMETER_KEYS = frozenset(_SAMPLING_NAMES) | _OTHER_NAMES
_REQUEST_KEYS = _PARAMETER_KEYS | {"text_input", "parameters"}
_SCALARS = (str, int, float, bool)  # OIP parameter values
_LIST_PARAMETERS = ("stop", "stop_words", "bad_words")  # may also be lists here


def decode_generate(body: Union[bytes, memoryview], *, stream: bool) -> GenerateRequest:
    """Validate and decode a generate-extension body; ``stream``: the route is ``generate_stream``.

    See the module docstring for the fields. Raises only InvalidInputError (400).
    """
    req = parse_json(body)
    if type(req) is not dict:
        raise invalid("request", 'an object with "text_input"', req)
    check_keys(req, _REQUEST_KEYS, "request")
    text = req.get("text_input")
    if type(text) is not str:
        raise invalid("text_input", "a string", text)
    fields: dict[str, tuple[str, Any]] = {}  # wire name -> (where, value)
    for key, value in req.items():
        if key in _PARAMETER_KEYS and value is not None:
            fields[key] = (key, value)
    params = req.get("parameters")
    if params is not None:
        if type(params) is not dict:
            raise invalid("parameters", "an object", params)
        for key, value in params.items():
            where = f"parameters.{short_key(key)}"
            if key not in _PARAMETER_KEYS:
                raise InvalidInputError(
                    f"{where}: unknown parameter; this server takes {sorted(_PARAMETER_KEYS)}"
                )
            if type(value) not in _SCALARS and not (type(value) is list and key in _LIST_PARAMETERS):
                raise invalid(where, "a string, number or boolean", value)
            if key in fields:
                raise InvalidInputError(f"{where}: also given at the top level; give it once")
            fields[key] = (where, value)

    values: dict[str, Any] = {}
    wire: dict[str, str] = {}
    for key, (where, value) in fields.items():
        field = _SAMPLING_NAMES.get(key)
        if field is not None:
            if field in values:
                raise InvalidInputError(f"{where}: {field} given twice (as {wire[field]} and {key})")
            values[field], wire[field] = value, where
        elif key == "stream":
            if check_bool(value, where) and not stream:
                raise InvalidInputError(f"{where}: true is for the generate_stream route; /generate answers once")
        elif key == "bad_words":
            if value != "" and value != []:
                raise invalid(where, '"" or [] (bad words are not supported)', value)
        elif value is not True:  # exclude_input_in_output
            raise invalid(where, "true (the output never repeats the input)", value)
    return GenerateRequest(sampling=sampling_params(values, wire), prompt=text, stream=stream)


def join_chunks(chunks: Iterable[GenerationChunk]) -> GenerationChunk:
    """A whole generation as one chunk: the texts and token ids joined, the last chunk's
    finish reason and counts (for the non-streaming answers of every protocol)."""
    text: list[str] = []
    ids: list[int] = []
    last: Optional[GenerationChunk] = None
    for chunk in chunks:
        text.append(chunk.text)
        ids.extend(chunk.token_ids)
        last = chunk
    if last is None:
        return GenerationChunk("", [], None, 0, 0)
    return GenerationChunk("".join(text), ids, last.finish_reason, last.prompt_tokens, last.completion_tokens)


def _fields(model: str, version: Union[int, str], chunk: GenerationChunk) -> dict[str, Any]:
    out: dict[str, Any] = {"model_name": model, "model_version": str(version), "text_output": chunk.text}
    if chunk.finish_reason is not None:
        out["finish_reason"] = chunk.finish_reason
        out["prompt_tokens"] = chunk.prompt_tokens
        out["completion_tokens"] = chunk.completion_tokens
    return out


def encode_generate(model: str, version: Union[int, str], result: GenerationChunk) -> bytes:
    """The ``/generate`` answer for a whole generation (see :func:`join_chunks`)."""
    out = _fields(model, version, result)
    out.setdefault("finish_reason", None)
    out.setdefault("prompt_tokens", result.prompt_tokens)
    out.setdefault("completion_tokens", result.completion_tokens)
    return orjson.dumps(out)


def generate_event(model: str, version: Union[int, str], chunk: GenerationChunk) -> bytes:
    """One ``/generate_stream`` event for an engine chunk; ``b""`` for a chunk with no new
    text that does not finish (the detokenizer holding back part of a character)."""
    if not chunk.text and chunk.finish_reason is None:
        return b""
    return b"data: " + orjson.dumps(_fields(model, version, chunk)) + b"\n\n"


def generate_error_event(message: str) -> bytes:
    """An error after the stream started (its 200 is sent): ``data: {"error": "..."}``."""
    return b"data: " + orjson.dumps({"error": message}) + b"\n\n"


__all__ = [
    "check_stop", "decode_generate", "encode_generate", "generate_error_event", "generate_event", "join_chunks",
    "sampling_params",
]
