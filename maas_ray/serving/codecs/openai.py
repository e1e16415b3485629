"""OpenAI-compatible generative routes: ``POST /v1/completions``, ``POST /v1/chat/completions``
and ``GET /v1/models``, as the OpenAI API defines them and the stock ``openai`` client sends
and parses them.

**Models and versions.** The ``model`` field addresses a model the way URLs do elsewhere:
``"lm"`` goes through the model's traffic split (and sticky keys), ``"lm:3"`` pins version 3
and ``"lm:production"`` the version an alias names (model and alias names cannot contain
``:``). Responses name the version that answered (``"model": "lm:3"``), as OpenAI names the
snapshot that served a request. ``GET /v1/models`` lists ``lm`` and each ``lm:<version>``.

**Requests.** One ``orjson.loads`` and plain type checks; every error is an
:class:`~maas_ray.errors.InvalidInputError` (400) whose message starts with the field
(``max_tokens: expected an integer in 1..1000000, got 0``). A JSON ``null`` is the same as
leaving a field out. Integers are JSON integers (``true`` and ``16.0`` are not).

- ``prompt`` (completions): a string, or a list of exactly one string. Token-id prompts and
  several prompts per request are a 400 that says so.
- ``messages`` (chat): a non-empty list of ``{"role", "content", "name"?}`` with role
  ``system``, ``developer`` (treated as ``system``), ``user`` or ``assistant``; content a
  string or a list of ``{"type": "text", "text"}`` parts (joined with ``"\\n"``, as vLLM
  does). Tool and function messages, images, audio and tool calls are a 400. The version's
  chat template renders them where the tokenizer lives.
- Sampling: ``max_tokens`` (chat also ``max_completion_tokens``; both given must agree),
  ``temperature``, ``top_p``, ``seed``, ``stop`` (a string or at most 16; ``""`` = none), and
  ``top_k`` (an extension, as vLLM takes it: ``extra_body={"top_k": 40}``; 0 or vLLM's -1 =
  off); the bounds are :class:`~maas_ray.serving.types.SamplingParams`'. Only the fields the client gave are set
  on the SamplingParams (``"max_tokens" in request.sampling.model_fields_set``), so the
  server can tell a default from a choice. ``prompt + max_tokens`` against the context
  length is checked by the engine once the prompt is tokenized.
- ``stream`` (boolean) and ``stream_options`` (``include_usage``; ``include_obfuscation`` is
  accepted and ignored; only with ``stream: true``).
- Accepted only with their no-op value, else a 400 saying it is not supported: ``n`` and
  ``best_of`` (1), ``echo``, chat ``logprobs`` (false), completions ``logprobs`` (null),
  ``top_logprobs`` (0), ``presence_penalty`` / ``frequency_penalty`` (0), ``logit_bias``
  (``{}``), ``tools`` / ``functions`` (``[]``), ``tool_choice`` / ``function_call``
  (``"none"`` or ``"auto"``), ``response_format`` (``{"type": "text"}``), ``modalities``
  (``["text"]``), ``suffix`` (``""``), and ``audio``, ``prediction``, ``reasoning_effort``,
  ``verbosity``, ``web_search_options`` (null).
- Accepted and ignored (type-checked): ``user``, ``metadata``, ``store``, ``service_tier``,
  ``parallel_tool_calls``, ``safety_identifier``, ``prompt_cache_key``.
- Any other field: 400 naming it.

**Responses.** :func:`completion_body` / :func:`chat_completion_body` (``text_completion`` /
``chat.completion`` objects with ``usage``), :class:`EventStream` for ``stream: true``
(server-sent ``data: {...}\\n\\n`` events, the first chat chunk carrying ``role:
"assistant"``, a ``usage`` chunk when asked, then ``data: [DONE]\\n\\n``),
:func:`models_body`, and :func:`error_body` / :meth:`EventStream.error` (OpenAI's
``{"error": {"message", "type", "param", "code"}}``, see
:func:`~maas_ray.serving.status.openai_error`).
"""

from __future__ import annotations

import time
import uuid
from itertools import islice
from typing import Any, Iterable, NamedTuple, Optional, Union

import orjson

from maas_ray.errors import InvalidInputError
from maas_ray.registry.manifest import check_name
from maas_ray.serving.codecs.common import (
    check_keys,
    invalid,
    parse_json,
    parse_version_ref,
    short_key,
    show,
)
from maas_ray.serving.codecs.generate import check_bool, sampling_params
from maas_ray.serving.status import ErrorAnswer, openai_error
from maas_ray.serving.types import GenerateRequest, GenerationChunk

VersionRef = Union[int, str]
DONE = b"data: [DONE]\n\n"
OWNED_BY = "maas-ray"


class OpenAIRequest(NamedTuple):
    """A decoded OpenAI request: the model, the version it pins (None: the split), the request."""

    model: str
    version: Optional[VersionRef]
    request: GenerateRequest


def parse_model(value: Any) -> tuple[str, Optional[VersionRef]]:
    """``"lm"`` -> ("lm", None); ``"lm:3"`` -> ("lm", 3); ``"lm:production"`` -> ("lm", "production")."""
    if type(value) is not str:
        raise invalid("model", 'a model name ("lm", "lm:3" or "lm:<alias>")', value)
    name, sep, ref = value.partition(":")
    try:
        check_name("model", name)
    except ValueError as exc:
        raise invalid("model", 'a model name ("lm", "lm:3" or "lm:<alias>")', value) from exc
    if not sep:
        return name, None
    try:
        return name, parse_version_ref(ref)
    except InvalidInputError as exc:
        raise invalid("model", 'a model name with a version number or alias after ":" ("lm:3")', value) from exc


def model_id(model: str, version: Optional[VersionRef] = None) -> str:
    """The ``model`` responses and ``/v1/models`` use: ``lm`` or ``lm:3``."""
    return model if version is None else f"{model}:{version}"


# ---- request fields ---------------------------------------------------------------------------
_SAMPLING = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
             "seed": "seed", "stop": "stop"}
_STR, _BOOL, _OBJ = "a string", "a boolean", "an object"
_IGNORED = {"user": _STR, "metadata": _OBJ, "store": _BOOL, "service_tier": _STR, "parallel_tool_calls": _BOOL,
            "safety_identifier": _STR, "prompt_cache_key": _STR}
_TYPE_OF = {_STR: str, _BOOL: bool, _OBJ: dict}
_OFF = ('"none" or "auto"', ("none", "auto"))
# field -> (what the message says is accepted, the accepted values); null is always accepted.
_NOOP: dict[str, tuple[str, tuple]] = {
    "n": ("1 (one completion per request)", (1,)),
    "best_of": ("1", (1,)),
    "echo": ("false", (False,)),
    "top_logprobs": ("0 (log probabilities are not returned)", (0,)),
    "logit_bias": ("{}", ({},)),
    "tools": ("[] (tool calls are not supported)", ([],)),
    "functions": ("[] (function calls are not supported)", ([],)),
    "tool_choice": _OFF,
    "function_call": _OFF,
    "response_format": ('{"type": "text"}', ({"type": "text"},)),
    "modalities": ('["text"]', (["text"],)),
    "suffix": ('""', ("",)),
    "audio": ("null", ()),
    "prediction": ("null", ()),
    "reasoning_effort": ("null", ()),
    "verbosity": ("null", ()),
    "web_search_options": ("null", ()),
}
_PENALTIES = ("presence_penalty", "frequency_penalty")
_COMMON = frozenset({"model", "stream", "stream_options", *_SAMPLING, *_IGNORED, *_PENALTIES,
                     "n", "logit_bias", "logprobs"})
_COMPLETION_KEYS = _COMMON | {"prompt", "best_of", "echo", "suffix"}
_CHAT_KEYS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                        "function_call", "response_format", "modalities", "audio", "prediction", "reasoning_effort",
                        "verbosity", "web_search_options"}
_STREAM_OPTION_KEYS = frozenset({"include_usage", "include_obfuscation"})


def _unsupported(key: str, value: Any, accepted: str) -> InvalidInputError:
    return InvalidInputError(f"{key}: not supported by this server (only {accepted} is accepted), got {show(value)}")


def _common(req: dict, keys: frozenset, sampling: dict[str, str]) -> tuple[str, Optional[VersionRef], dict]:
    """Checks shared by both routes; returns (model, version, GenerateRequest keyword arguments)."""
    if not req.keys() <= keys:
        unknown = sorted(short_key(k) for k in islice(req.keys() - keys, 5))
        raise InvalidInputError(f"request: unknown field(s) {unknown}: not OpenAI fields this server takes")
    model, version = parse_model(req.get("model"))
    values: dict[str, Any] = {}
    wire: dict[str, str] = {}
    stream = False
    include_usage = False
    for key, value in req.items():
        if value is None:
            continue
        field = sampling.get(key)
        if field is not None:
            if field in values and (values[field] != value or type(values[field]) is not type(value)):
                raise InvalidInputError(f"{key}: disagrees with {wire[field]} ({show(values[field])}); give one")
            values[field], wire[field] = value, key
        elif key in _NOOP:
            accepted, ok = _NOOP[key]
            if type(value) is not int and key in ("n", "best_of", "top_logprobs"):
                raise invalid(key, "an integer", value)
            if value not in ok or type(value) is not type(ok[0]):
                raise _unsupported(key, value, accepted)
        elif key in _IGNORED:
            if type(value) is not _TYPE_OF[_IGNORED[key]]:
                raise invalid(key, _IGNORED[key], value)
        elif key in _PENALTIES:
            if type(value) not in (int, float) or not -2 <= value <= 2:
                raise invalid(key, "a number in -2..2", value)
            if value != 0:
                raise _unsupported(key, value, "0")
        elif key == "stream":
            stream = check_bool(value, key)
    options = req.get("stream_options")
    if options is not None:
        if type(options) is not dict:
            raise invalid("stream_options", "an object", options)
        if not stream:
            raise InvalidInputError("stream_options: only allowed when stream is true")
        check_keys(options, _STREAM_OPTION_KEYS, "stream_options")
        for k, v in options.items():
            if v is not None:
                check_bool(v, f"stream_options.{k}")
        include_usage = options.get("include_usage") is True
    if values.get("top_k") == -1 and type(values["top_k"]) is int:
        values["top_k"] = 0  # vLLM's "off"
    kwargs = {"sampling": sampling_params(values, wire), "stream": stream, "include_usage": include_usage}
    return model, version, kwargs


def decode_completion(body: Union[bytes, memoryview]) -> OpenAIRequest:
    """Validate and decode a ``POST /v1/completions`` body (see the module docstring)."""
    req = parse_json(body)
    if type(req) is not dict:
        raise invalid("request", 'an object with "model" and "prompt"', req)
    logprobs = req.get("logprobs")
    if logprobs is not None:
        if type(logprobs) is not int:
            raise invalid("logprobs", "an integer or null", logprobs)
        raise _unsupported("logprobs", logprobs, "null (log probabilities are not returned)")
    model, version, kwargs = _common(req, _COMPLETION_KEYS, _SAMPLING)
    prompt = req.get("prompt")
    if type(prompt) is list and len(prompt) == 1 and type(prompt[0]) is str:
        prompt = prompt[0]
    if type(prompt) is not str:
        if type(prompt) is list and prompt and type(prompt[0]) is str:
            raise InvalidInputError(f"prompt: expected one prompt per request, got a list of {len(prompt)}")
        if type(prompt) is list and prompt and (type(prompt[0]) is int or type(prompt[0]) is list):
            raise InvalidInputError("prompt: token-id prompts are not supported; send the text as a string")
        raise invalid("prompt", "a string", prompt)
    return OpenAIRequest(model, version, GenerateRequest(prompt=prompt, **kwargs))


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MESSAGE_KEYS = frozenset({"role", "content", "name"})
_ASSISTANT_KEYS = _MESSAGE_KEYS | {"refusal", "tool_calls", "function_call", "audio"}
_PART_KEYS = frozenset({"type", "text"})
_CHAT_SAMPLING = {**_SAMPLING, "max_completion_tokens": "max_tokens"}


def _content(value: Any, where: str) -> str:
    if type(value) is str:
        return value
    if type(value) is not list:
        raise invalid(where, "a string or a list of text parts", value)
    texts = []
    for j, part in enumerate(value):
        at = f"{where}[{j}]"
        if type(part) is not dict:
            raise invalid(at, '{"type": "text", "text": ...}', part)
        kind = part.get("type")
        if kind != "text":
            if type(kind) is not str:
                raise invalid(f"{at}.type", '"text"', kind)
            raise InvalidInputError(f"{at}.type: only text parts are supported, got {show(kind)}")
        check_keys(part, _PART_KEYS, at)
        text = part.get("text")
        if type(text) is not str:
            raise invalid(f"{at}.text", "a string", text)
        texts.append(text)
    return "\n".join(texts)


def _messages(value: Any) -> list[dict[str, str]]:
    if type(value) is not list or not value:
        raise invalid("messages", "a non-empty list of message objects", value)
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if type(m) is not dict:
            raise invalid(where, "an object with role and content", m)
        role = _ROLES.get(m.get("role")) if type(m.get("role")) is str else None
        if role is None:
            got = m.get("role")
            if got in ("tool", "function"):
                raise InvalidInputError(f"{where}.role: {got} messages are not supported (no tool calls)")
            raise invalid(f"{where}.role", "one of system, developer, user, assistant", got)
        keys = _ASSISTANT_KEYS if role == "assistant" else _MESSAGE_KEYS
        if not m.keys() <= keys:
            check_keys(m, keys, where)
        name = m.get("name")
        if name is not None and type(name) is not str:
            raise invalid(f"{where}.name", "a string", name)
        if role == "assistant":
            for key in ("tool_calls", "function_call", "audio", "refusal"):
                v = m.get(key)
                if v is not None and v != []:
                    raise _unsupported(f"{where}.{key}", v, "null")
        if "content" not in m:
            raise InvalidInputError(f"{where}.content: missing")
        out.append({"role": role, "content": _content(m["content"], f"{where}.content")})
    return out


def decode_chat(body: Union[bytes, memoryview]) -> OpenAIRequest:
    """Validate and decode a ``POST /v1/chat/completions`` body (see the module docstring)."""
    req = parse_json(body)
    if type(req) is not dict:
        raise invalid("request", 'an object with "model" and "messages"', req)
    logprobs = req.get("logprobs")
    if logprobs is not None and logprobs is not False:
        if type(logprobs) is not bool:
            raise invalid("logprobs", "a boolean", logprobs)
        raise _unsupported("logprobs", logprobs, "false (log probabilities are not returned)")
    model, version, kwargs = _common(req, _CHAT_KEYS, _CHAT_SAMPLING)
    return OpenAIRequest(model, version, GenerateRequest(messages=_messages(req.get("messages")), **kwargs))


# ---- responses ------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    """A response id: ``chatcmpl-<hex>`` or ``cmpl-<hex>``."""
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def _now(created: Optional[int]) -> int:
    return int(time.time()) if created is None else created


def _usage(chunk: GenerationChunk) -> dict[str, int]:
    return {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens,
            "total_tokens": chunk.prompt_tokens + chunk.completion_tokens}


def completion_body(model: str, result: GenerationChunk, *, id: Optional[str] = None,
                    created: Optional[int] = None) -> bytes:
    """A ``text_completion`` object for a whole generation (``join_chunks`` of the engine's
    chunks); ``model`` as :func:`model_id` names it. A missing finish reason reads ``stop``."""
    choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason or "stop"}
    return orjson.dumps({"id": id or new_id(False), "object": "text_completion", "created": _now(created),
                         "model": model, "choices": [choice], "usage": _usage(result)})


def chat_completion_body(model: str, result: GenerationChunk, *, id: Optional[str] = None,
                         created: Optional[int] = None) -> bytes:
    """A ``chat.completion`` object for a whole generation (see :func:`completion_body`)."""
    choice = {"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": None},
              "logprobs": None, "finish_reason": result.finish_reason or "stop"}
    return orjson.dumps({"id": id or new_id(True), "object": "chat.completion", "created": _now(created),
                         "model": model, "choices": [choice], "usage": _usage(result)})


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class EventStream:
    """The server-sent events of one ``stream: true`` completion or chat completion, in order.

    Pure: it turns engine chunks into bytes and keeps only the id and whether the chat role
    was sent. Use::

        events = EventStream(chat=True, model="lm:3", include_usage=request.include_usage)
        async for chunk in engine.generate(...):
            send(events.push(chunk))       # b"" for a chunk with no new text
        send(events.end())                 # the usage chunk (if asked) and data: [DONE]
        # an error after the 200 went out:  send(events.error(answer_error(exc)))
    """

    def __init__(self, *, chat: bool, model: str, include_usage: bool = False, id: Optional[str] = None,
                 created: Optional[int] = None) -> None:
        self.chat = chat
        self.id = id or new_id(chat)
        self.include_usage = include_usage
        self._head = {"id": self.id, "object": "chat.completion.chunk" if chat else "text_completion",
                      "created": _now(created), "model": model}
        self._last: Optional[GenerationChunk] = None
        self._started = False

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        obj = {**self._head, "choices": [choice]}
        if self.include_usage:
            obj["usage"] = None
        return _event(obj)

    def start(self) -> bytes:
        """The first chat event (``delta: {"role": "assistant", "content": ""}``); ``b""``
        for completions or once sent. :meth:`push` sends it if this was not called."""
        if self._started or not self.chat:
            self._started = True
            return b""
        self._started = True
        return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None})

    def push(self, chunk: GenerationChunk) -> bytes:
        """The events for one engine chunk: its text (if any), and the finish reason on the last."""
        out = self.start()
        self._last = chunk
        reason = chunk.finish_reason
        if not self.chat:
            if not chunk.text and reason is None:
                return out
            return out + self._chunk({"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": reason})
        if chunk.text:
            out += self._chunk({"index": 0, "delta": {"content": chunk.text}, "logprobs": None, "finish_reason": None})
        if reason is not None:
            out += self._chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason})
        return out

    def end(self) -> bytes:
        """After the last chunk: the ``usage`` chunk (``choices: []``) when include_usage, then ``[DONE]``."""
        if not self.include_usage:
            return DONE
        last = self._last or GenerationChunk("", [])
        return _event({**self._head, "choices": [], "usage": _usage(last)}) + DONE

    def error(self, answer: ErrorAnswer) -> bytes:
        """An error after the stream started: ``data: {"error": {...}}`` (the openai client raises
        ``APIError`` on it), then ``[DONE]``."""
        return _event(openai_error(answer)) + DONE


def error_body(answer: ErrorAnswer) -> bytes:
    """The JSON body of an error answered before any event (with ``answer.status``)."""
    return orjson.dumps(openai_error(answer))


def models_body(models: Iterable[tuple[str, Iterable[VersionRef]]], *, created: int = 0) -> bytes:
    """The ``GET /v1/models`` list from ``(model, versions)`` pairs: per model, ``model`` (the
    split) then ``model:<version>`` for each version number or alias given."""
    data = []
    for model, versions in models:
        data.append({"id": model, "object": "model", "created": created, "owned_by": OWNED_BY})
        data.extend({"id": model_id(model, v), "object": "model", "created": created, "owned_by": OWNED_BY}
                    for v in versions)
    return orjson.dumps({"object": "list", "data": data})


__all__ = [
    "DONE", "EventStream", "OpenAIRequest", "chat_completion_body", "completion_body", "decode_chat",
    "decode_completion", "error_body", "model_id", "models_body", "new_id", "parse_model",
]
