"""A corpus of hostile generative requests, with the status each must get and the field its
error message must name; and :func:`valid` requests of the same routes that must still be
answered 200.

Shared by the unit tests (``tests/unit/test_codec_openai.py``, ``test_codec_generate.py``:
the codecs alone) and the live-server test, which POSTs every case to its route and expects
exactly ``expect``, a JSON error body (OpenAI's ``{"error": {"message", ...}}`` on the
``/v1`` routes, ``{"error": "..."}`` on the OIP routes) whose message contains ``field``,
0 x 5xx, and the server still answering. Routes (``ROUTES``):

- ``completions``: ``POST /v1/completions``; ``chat``: ``POST /v1/chat/completions``
- ``generate``: ``POST /v2/models/{model}/generate``; ``generate_stream``: ``.../generate_stream``

Cases with ``live_only=True`` need the model (its tokenizer and context length: a prompt
longer than the context, ``max_tokens`` past it): the codecs accept them and the engine's
check must refuse them, so only the live test replays them. Build the corpus for the served
model with ``corpus(model, context_length)``.
"""

from __future__ import annotations

import copy
import json
from typing import Any, NamedTuple, Optional

ROUTES = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
    "generate": "/v2/models/{model}/generate",
    "generate_stream": "/v2/models/{model}/generate_stream",
}
JSON = "JSON"  # what an unparseable body's message names


class GenerativeCase(NamedTuple):
    name: str
    route: str  # a key of ROUTES
    body: bytes
    expect: int  # the exact HTTP status
    field: Optional[str]  # a string the error message must contain (None: live-only cases)
    live_only: bool = False


class ValidGenerative(NamedTuple):
    name: str
    route: str
    body: bytes


def _j(obj: Any) -> bytes:
    # the standard library, not orjson: orjson refuses to write lists nested past 255 levels
    return json.dumps(obj, ensure_ascii=False).encode()


def _nested(depth: int, leaf: Any = "x") -> Any:
    out = leaf
    for _ in range(depth):
        out = [out]
    return out


# Characters a byte-level BPE rarely merges, so a prompt of N of them is well over N/2 tokens.
_NOISE = "~`!@#$%^&*()_+{}|:<>?[];',./-=\\\"0123456789QWXZqwxz"


def long_prompt(context_length: int) -> str:
    n = 4 * context_length
    return (_NOISE * (n // len(_NOISE) + 1))[:n]


def corpus(model: str = "lm", context_length: int = 128) -> list[GenerativeCase]:
    """Every hostile case for ``model`` (whose context is ``context_length`` tokens)."""
    out: list[GenerativeCase] = []

    def add(name: str, route: str, body: Any, field: Optional[str], expect: int = 400, live_only: bool = False) -> None:
        raw = body if isinstance(body, bytes) else _j(body)
        out.append(GenerativeCase(name, route, raw, expect, field, live_only))

    def cmpl(**kw: Any) -> dict:
        return {"model": model, "prompt": "Once upon a time", "max_tokens": 4, **kw}

    def chat(**kw: Any) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **kw}

    def gen(**kw: Any) -> dict:
        return {"text_input": "Once upon a time", "parameters": {"max_tokens": 4}, **kw}

    bodies = {"completions": cmpl, "chat": chat, "generate": gen}

    # ---- bodies that are not a JSON object --------------------------------------------------
    for route in ("completions", "chat", "generate", "generate_stream"):
        add(f"{route}_empty_body", route, b"", JSON)
        add(f"{route}_truncated_json", route, b'{"model": "x", "prompt": "a', JSON)
        add(f"{route}_invalid_utf8", route, b'{"model": "' + model.encode() + b'", "prompt": "\xff\xfe", '
            b'"messages": [{"role": "user", "content": "\xc3\x28"}], "text_input": "\xed\xa0\x80"}', JSON)
        add(f"{route}_lone_high_surrogate", route, b'{"prompt": "a\\ud800b", "text_input": "a\\ud800b", '
            b'"messages": [{"role": "user", "content": "\\ud800"}], "model": "' + model.encode() + b'"}', JSON)
        add(f"{route}_lone_low_surrogate", route, b'{"prompt": "\\udc00", "text_input": "\\udc00", "model": "m"}', JSON)
        add(f"{route}_reversed_surrogates", route, b'{"prompt": "\\ude00\\ud83d", "text_input": "\\ude00\\ud83d"}',
            JSON)
        add(f"{route}_nan", route, b'{"temperature": NaN, "prompt": "a", "text_input": "a"}', JSON)
        add(f"{route}_infinity", route, b'{"temperature": Infinity, "prompt": "a", "text_input": "a"}', JSON)
        add(f"{route}_huge_exponent", route, b'{"temperature": 1e400, "prompt": "a", "text_input": "a"}', JSON)
        add(f"{route}_nested_2000_deep", route, b"[" * 2000 + b"]" * 2000, JSON)
        add(f"{route}_int_past_64_bits", route,
            _j(bodies[route](max_tokens=0) if route in ("completions", "chat") else {"text_input": "a", "max_tokens": 0}
               ).replace(b'"max_tokens": 0', b'"max_tokens": 99999999999999999999999'),
            "max_tokens")
        for kind, value in (("list", []), ("string", "hello"), ("number", 1), ("null", None), ("true", True)):
            add(f"{route}_body_{kind}", route, value, "request")
        add(f"{route}_unknown_field", route, {**bodies.get(route, gen)(), "frobnicate": 1}, "frobnicate")
        add(f"{route}_unknown_sampling_field", route, {**bodies.get(route, gen)(), "repetition_penalty": 1.2},
            "repetition_penalty")

    # ---- sampling fields, every route (generate: at the top level and in parameters) ------------
    bad_sampling = [
        ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 1_000_001), ("max_tokens", 2**63),
        ("max_tokens", True), ("max_tokens", "16"), ("max_tokens", 16.5), ("max_tokens", 16.0), ("max_tokens", [4]),
        ("max_tokens", {"n": 4}),
        ("temperature", -0.1), ("temperature", 2.5), ("temperature", "0.5"), ("temperature", True), ("temperature", []),
        ("top_p", 0), ("top_p", 1.5), ("top_p", -1), ("top_p", "1"), ("top_p", False),
        ("top_k", -2), ("top_k", 1.5), ("top_k", True), ("top_k", "40"),
        ("seed", -1), ("seed", 2**63), ("seed", "1"), ("seed", True), ("seed", 1.0),
        ("stop", [f"s{i}" for i in range(17)]), ("stop", [f"s{i}" for i in range(20_000)]), ("stop", "x" * 300),
        ("stop", ["ok", ""]), ("stop", ["ok", 5]), ("stop", [["nested"]]), ("stop", {"a": 1}), ("stop", 5),
        ("stop", ["y" * 100_000]), ("stop", True),
    ]
    for k, (field, value) in enumerate(bad_sampling):
        tag = f"{field}_{k}_{type(value).__name__}_{str(value)[:10]}".replace(" ", "")
        add(f"completions_{tag}", "completions", cmpl(**{field: value}), field)
        add(f"chat_{tag}", "chat", chat(**{field: value}), field)
        add(f"generate_{tag}", "generate", {"text_input": "a", field: value}, field)
        if type(value) in (int, float, str, bool):  # parameters take scalars (and stop lists)
            add(f"generate_parameters_{tag}", "generate", {"text_input": "a", "parameters": {field: value}},
                f"parameters.{field}")
    add("chat_max_completion_tokens_0", "chat", chat(max_tokens=None, max_completion_tokens=0),
        "max_completion_tokens")
    add("chat_max_completion_tokens_bool", "chat", chat(max_tokens=None, max_completion_tokens=True),
        "max_completion_tokens")
    add("chat_max_tokens_disagree", "chat", chat(max_tokens=4, max_completion_tokens=8), "max_completion_tokens")

    # ---- OpenAI fields this server does not do -------------------------------------------------
    for route, make in (("completions", cmpl), ("chat", chat)):
        for field, value in [
            ("n", 2), ("n", 0), ("n", True), ("n", "1"), ("n", 1.5), ("n", 100_000),
            ("presence_penalty", 0.5), ("frequency_penalty", -1), ("presence_penalty", 3), ("frequency_penalty", "0"),
            ("presence_penalty", True),
            ("logit_bias", {"50256": -100}), ("logit_bias", "x"), ("logit_bias", [1]),
            ("stream", "yes"), ("stream", 1), ("stream", []),
            ("stream_options", {"include_usage": True}),  # without stream: true
            ("user", 5), ("user", ["u"]), ("metadata", "x"),
        ]:
            add(f"{route}_{field}_{type(value).__name__}_{str(value)[:12]}".replace(" ", ""), route,
                make(**{field: value}), field)
        add(f"{route}_stream_options_not_bool", route, make(stream=True, stream_options={"include_usage": "yes"}),
            "stream_options.include_usage")
        add(f"{route}_stream_options_unknown", route, make(stream=True, stream_options={"foo": True}), "foo")
        add(f"{route}_stream_options_number", route, make(stream=True, stream_options=5), "stream_options")
        add(f"{route}_many_unknown_fields", route, {**make(), **{f"k{i}": i for i in range(5000)}}, "unknown")
        for bad in (None, 5, "", "lm:", "lm:a:b", "bad name", "../etc", f"{model}:-1", f"{model}:" + "9" * 30,
                    ["lm"], "x" * 300):
            add(f"{route}_model_{str(bad)[:10]}", route, {**make(), "model": bad}, "model")
        add(f"{route}_model_missing", route, {k: v for k, v in make().items() if k != "model"}, "model")
    for field, value in [("best_of", 2), ("echo", True), ("logprobs", 1), ("logprobs", 0), ("logprobs", "x"),
                         ("suffix", "end")]:
        add(f"completions_{field}_{value}", "completions", cmpl(**{field: value}), field)
    for k, (field, value) in enumerate([
        ("logprobs", True), ("logprobs", 1), ("top_logprobs", 3), ("top_logprobs", True),
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]), ("tools", "x"),
        ("tool_choice", "required"), ("tool_choice", {"type": "function", "function": {"name": "f"}}),
        ("functions", [{"name": "f"}]), ("function_call", {"name": "f"}),
        ("response_format", {"type": "json_object"}),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
        ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy", "format": "wav"}),
        ("prediction", {"type": "content", "content": "x"}), ("reasoning_effort", "high"),
        ("web_search_options", {}), ("store", "yes"), ("parallel_tool_calls", 1),
    ]):
        add(f"chat_{field}_{k}", "chat", chat(**{field: value}), field)

    # ---- prompts -----------------------------------------------------------------------------
    for tag, value in [("missing", ...), ("null", None), ("int", 5), ("two_strings", ["a", "b"]),
                       ("token_ids", [1, 2, 3]), ("token_id_lists", [[1, 2], [3]]), ("object", {"text": "a"}),
                       ("empty_list", []), ("list_of_int_and_str", ["a", 1]), ("nested_500", _nested(500)),
                       ("bool", True)]:
        body = cmpl() if value is ... else cmpl(prompt=value)
        if value is ...:
            del body["prompt"]
        add(f"completions_prompt_{tag}", "completions", body, "prompt")

    # ---- chat messages -------------------------------------------------------------------------
    user = {"role": "user", "content": "hi"}
    for tag, value in [
        ("missing", ...), ("null", None), ("empty", []), ("string", "hi"), ("object", user), ("list_of_int", [1]),
        ("no_role", [{"content": "x"}]), ("role_tool", [user, {"role": "tool", "content": "x", "tool_call_id": "1"}]),
        ("role_function", [{"role": "function", "content": "x", "name": "f"}]), ("role_robot", [{"role": "robot",
                                                                                                 "content": "x"}]),
        ("role_int", [{"role": 5, "content": "x"}]), ("role_list", [{"role": ["user"], "content": "x"}]),
        ("content_missing", [{"role": "user"}]), ("content_int", [{"role": "user", "content": 5}]),
        ("content_null", [{"role": "user", "content": None}]),
        ("content_object", [{"role": "user", "content": {"type": "text", "text": "x"}}]),
        ("image_part", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
        ("audio_part", [{"role": "user", "content": [{"type": "input_audio",
                                                      "input_audio": {"data": "", "format": "wav"}}]}]),
        ("part_no_text", [{"role": "user", "content": [{"type": "text"}]}]),
        ("part_text_int", [{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        ("part_unknown_key", [{"role": "user", "content": [{"type": "text", "text": "x", "extra": 1}]}]),
        ("part_string", [{"role": "user", "content": ["x"]}]),
        ("part_type_missing", [{"role": "user", "content": [{"text": "x"}]}]),
        ("message_unknown_key", [{"role": "user", "content": "x", "weight": 1}]),
        ("name_int", [{"role": "user", "content": "x", "name": 5}]),
        ("assistant_tool_calls", [user, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]),
        ("assistant_refusal", [user, {"role": "assistant", "content": "x", "refusal": "no"}]),
        ("assistant_content_null", [user, {"role": "assistant", "content": None}]),
        ("nested_content_300", [{"role": "user", "content": _nested(300)}]),
        ("ten_thousand_bad", [user] * 10_000 + [5]),
    ]:
        body = chat() if value is ... else chat(messages=value)
        if value is ...:
            del body["messages"]
        add(f"chat_messages_{tag}", "chat", body, "messages")

    # ---- OIP generate -----------------------------------------------------------------------------
    for route in ("generate", "generate_stream"):
        for tag, value in [("missing", ...), ("null", None), ("int", 5), ("list", ["a"]), ("object", {"a": 1}),
                           ("nested_500", _nested(500)), ("bool", False)]:
            body = gen() if value is ... else gen(text_input=value)
            if value is ...:
                del body["text_input"]
            add(f"{route}_text_input_{tag}", route, body, "text_input")
        for tag, value in [("list", []), ("string", "x"), ("int", 1)]:
            add(f"{route}_parameters_{tag}", route, gen(parameters=value), "parameters")
        add(f"{route}_parameter_unknown", route, gen(parameters={"min_p": 0.1}), "min_p")
        add(f"{route}_parameter_object", route, gen(parameters={"temperature": {"v": 1}}), "parameters.temperature")
        add(f"{route}_parameter_twice", route, gen(temperature=0.5, parameters={"temperature": 0.5}),
            "parameters.temperature")
        add(f"{route}_seed_and_random_seed", route, gen(seed=1, parameters={"random_seed": 1}), "random_seed")
        add(f"{route}_stop_and_stop_words", route, gen(stop="x", stop_words="y"), "stop")
        add(f"{route}_stream_string", route, gen(stream="yes"), "stream")
        add(f"{route}_bad_words", route, gen(bad_words=["x"]), "bad_words")
        add(f"{route}_exclude_input_false", route, gen(exclude_input_in_output=False), "exclude_input_in_output")
        add(f"{route}_shared_memory_parameter", route, gen(parameters={"shared_memory_region": "r"}),
            "shared_memory_region")
    add("generate_stream_true_on_generate", "generate", gen(stream=True), "stream")
    add("generate_parameter_stream_true_on_generate", "generate", gen(parameters={"stream": True}), "parameters.stream")

    # ---- decided by the live server: the prompt and max_tokens against the context ---------------
    long = long_prompt(context_length)
    for name, route, body in [
        ("completions_long_prompt", "completions", cmpl(prompt=long)),
        ("chat_long_message", "chat", chat(messages=[{"role": "user", "content": long}])),
        ("generate_long_text_input", "generate", gen(text_input=long)),
        ("generate_stream_long_text_input", "generate_stream", gen(text_input=long)),
        ("completions_max_tokens_context", "completions", cmpl(max_tokens=context_length)),
        ("chat_max_completion_tokens_context", "chat", chat(max_tokens=None, max_completion_tokens=context_length)),
        ("generate_max_tokens_context", "generate", gen(parameters={"max_tokens": context_length})),
        ("completions_max_tokens_1e6", "completions", cmpl(max_tokens=1_000_000)),
        ("chat_max_tokens_1e6", "chat", chat(max_tokens=1_000_000)),
        ("generate_stream_max_tokens_1e6", "generate_stream", gen(max_tokens=1_000_000, parameters={})),
    ]:
        add(f"live_{name}", route, body, None, live_only=True)
    return out


def valid(model: str = "lm") -> list[ValidGenerative]:
    """Requests of every accepted form (small ``max_tokens``): each must be answered 200."""
    msgs = [{"role": "user", "content": "hello"}]
    base = {"model": model, "max_tokens": 4}
    cases = [
        ("completions_minimal", "completions", {"model": model, "prompt": "Once upon a time"}),
        ("completions_prompt_list_of_one", "completions", {**base, "prompt": ["Once upon a time"]}),
        ("completions_greedy_stop", "completions", {**base, "prompt": "a", "temperature": 0, "stop": "\n"}),
        ("completions_sampling", "completions", {**base, "prompt": "a", "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                                                 "seed": 7, "stop": ["x", "y"]}),
        ("completions_noops", "completions", {**base, "prompt": "a", "n": 1, "best_of": 1, "echo": False,
                                              "logprobs": None, "presence_penalty": 0, "frequency_penalty": 0.0,
                                              "logit_bias": {}, "suffix": "", "user": "u-1"}),
        ("completions_nulls", "completions", {**base, "prompt": "a", "temperature": None, "top_p": None,
                                              "stop": None, "seed": None, "stream": None, "stream_options": None}),
        ("completions_stream_usage", "completions", {**base, "prompt": "a", "stream": True,
                                                     "stream_options": {"include_usage": True}}),
        ("completions_pinned_version", "completions", {**base, "model": f"{model}:1", "prompt": "a"}),
        ("chat_minimal", "chat", {"model": model, "messages": msgs, "max_tokens": 4}),
        ("chat_max_completion_tokens", "chat", {"model": model, "messages": msgs, "max_completion_tokens": 4}),
        ("chat_both_max_agree", "chat", {**base, "messages": msgs, "max_completion_tokens": 4}),
        ("chat_roles_and_parts", "chat", {**base, "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "x"}]},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}],
             "name": "bob"},
            {"role": "assistant", "content": "hello", "tool_calls": [], "refusal": None},
            {"role": "user", "content": "again"}]}),
        ("chat_noops", "chat", {**base, "messages": msgs, "n": 1, "logprobs": False, "top_logprobs": 0, "tools": [],
                                "tool_choice": "none", "response_format": {"type": "text"}, "modalities": ["text"],
                                "parallel_tool_calls": False, "store": False, "metadata": {"k": "v"},
                                "service_tier": "auto", "user": "u"}),
        ("chat_stream_usage", "chat", {**base, "messages": msgs, "stream": True,
                                       "stream_options": {"include_usage": True}}),
        ("chat_unicode", "chat", {**base, "messages": [{"role": "user", "content": "héllo 😀 \\ud83d\u0000"}]}),
        ("generate_minimal", "generate", {"text_input": "Once upon a time", "parameters": {"max_tokens": 4}}),
        ("generate_top_level", "generate", {"text_input": "a", "max_tokens": 4, "temperature": 0, "top_k": 5,
                                            "bad_words": "", "stop_words": "", "exclude_input_in_output": True}),
        ("generate_trtllm_style", "generate", {"text_input": "a", "max_tokens": 4, "bad_words": [],
                                               "stop_words": ["\n"], "random_seed": 3, "stream": False}),
        ("generate_stream_minimal", "generate_stream", {"text_input": "a", "parameters": {"max_tokens": 4,
                                                                                          "stream": True}}),
    ]
    return [ValidGenerative(n, r, _j(b)) for n, r, b in cases]


CASES = corpus()
VALID = valid()


# ---- fuzzing: random mutations of valid bodies --------------------------------------------------
_JUNK: list[Any] = [
    None, True, False, 0, -1, 1, 2, 17, 2**31, 2**63, 2**64 - 1, -(2**63), 0.0, -0.0, 0.5, 1.5, 2.0000001, 1e308,
    -1e-308, "", "x", "\u0000", "😀", "\\ud800", "a" * 300, "none", "auto", "text", "user", "lm:1", "lm:", [], [1],
    [""], ["x"], ["x"] * 17, [[1, 2]], {}, {"type": "text"}, {"type": "text", "text": "x"}, {"role": "user"},
    {"role": "user", "content": "x"}, {"include_usage": True}, {"temperature": 0}, {"a": {"b": [None]}},
]


def _junk(rng: Any) -> Any:
    return copy.deepcopy(rng.choice(_JUNK))  # a fresh copy: a mutation never makes a cycle


def _paths(obj: Any, path: tuple = ()) -> list[tuple]:
    """Every path (a tuple of keys/indexes) to a value inside ``obj``, the root included."""
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:20]):
            out += _paths(v, (*path, i))
    return out


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return obj


def mutate(body: bytes, rng: Any) -> bytes:
    """One random mutation of a valid JSON body (``rng``: a ``random.Random``): a value replaced
    by junk, a key dropped or added, a value wrapped in a list, or the bytes cut, flipped or
    spliced with a lone surrogate escape."""
    kind = rng.random()
    if kind < 0.15:  # byte level
        raw = bytearray(body)
        op = rng.randrange(4)
        i = rng.randrange(len(raw) + 1)
        if op == 0:
            return bytes(raw[:i])
        if op == 1 and raw:
            raw[min(i, len(raw) - 1)] = rng.randrange(256)
            return bytes(raw)
        if op == 2:
            splice = rng.choice([b"\\ud800", b"\xff", b"\xed\xa0\x80", b"\x00", b"\\", b'"'])
            return bytes(raw[:i]) + splice + bytes(raw[i:])
        return bytes(raw[:i]) + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8))) + bytes(raw[i:])
    obj = json.loads(body)
    for _ in range(rng.randrange(1, 4)):
        paths = _paths(obj)
        path = rng.choice(paths)
        op = rng.random()
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        if op < 0.55:
            obj = _set(obj, path, _junk(rng))
        elif op < 0.7 and path and isinstance(parent, dict):
            del parent[path[-1]]
        elif op < 0.85:
            target = obj if not path else parent
            if isinstance(target, dict):
                target[rng.choice(["n", "stop", "seed", "stream", "stream_options", "top_k", "max_tokens",
                                   "max_completion_tokens", "parameters", "text_input", "prompt", "messages", "x"])] = (
                    _junk(rng))
            elif isinstance(target, list):
                target.append(_junk(rng))
        else:
            current = obj
            for key in path:
                current = current[key]
            obj = _set(obj, path, [current])
    return _j(obj)
