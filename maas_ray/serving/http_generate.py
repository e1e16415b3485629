"""The HTTP transport's generative routes, on the same ASGI app and port as the infer routes:

- OpenAI: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``
  (:mod:`maas_ray.serving.codecs.openai`; errors in OpenAI's ``{"error": {...}}`` shape);
- OIP generate extension (Triton's): ``POST /v2/models/{m}[/versions/{v}]/generate`` and
  ``.../generate_stream`` (:mod:`maas_ray.serving.codecs.generate`; errors ``{"error": "..."}``).

Order, as on the infer routes: API key and request rate limit (no body read yet; an OpenAI
body names its model, so the key's model scope is checked once it is decoded) -> body limit
-> decode -> pick the version (split, pin, sticky key; ``"model": "lm:3"`` pins on the
OpenAI routes) -> generate. A classifier on a generative route is a 400 naming its route.

A non-streaming request collects the chunks and answers one JSON. A streaming one answers
``text/event-stream``: the 200 and its headers once the first chunk is made (so an error
before it, such as a prompt over the context, is a normal 4xx/5xx JSON answer), then each
chunk as an event as it arrives (ASGI ``more_body``), then ``data: [DONE]`` (OpenAI). An
error after the first event is an error event. The request timeout
(``limits.request_timeout_s``) covers the whole generation: 504, or an error event. A client
that disconnects (ASGI ``http.disconnect``, a failed send, or Serve cancelling the request)
closes the stream, and the engine frees the sequence and its KV cache at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any, Awaitable, Callable, Optional

from maas_ray.errors import MethodNotAllowedError, RequestTimeoutError
from maas_ray.serving.codecs import generate as oip
from maas_ray.serving.codecs import openai
from maas_ray.serving.core import InferenceService
from maas_ray.serving.keys import extract_key
from maas_ray.serving.metrics import UNKNOWN_MODEL
from maas_ray.serving.status import ErrorAnswer, answer_error
from maas_ray.serving.types import GenerationChunk

logger = logging.getLogger(__name__)

OPENAI_ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/models": "models"}
GENERATE_ROUTE = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/(generate|generate_stream)")
VERSION_HEADER = b"x-model-version"
REQUEST_ID_HEADER = "x-request-id"
_JSON = (b"content-type", b"application/json")
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
OPENAI_PROTOCOL = "openai"
GENERATE_PROTOCOL = "http_generate"


class _ClientGone(Exception):
    """The client disconnected while its stream was being written."""


class GenerativeRoutes:
    """The generative routes of one ingress replica's HTTP app (see the module docstring)."""

    def __init__(self, core: InferenceService, read_body: Callable[[dict[str, str], Callable], Awaitable]) -> None:
        self.core = core
        self.read_body = read_body
        self.timeout_s = core.limits.request_timeout_s

    async def dispatch(self, path: str, scope: dict, receive: Callable, send: Callable) -> bool:
        """Answer ``path`` if it is a generative route; False if it is not one."""
        kind = OPENAI_ROUTES.get(path)
        if kind is not None:
            method = "GET" if kind == "models" else "POST"
            if scope["method"] != method:
                exc = MethodNotAllowedError(f"method {scope['method']} is not allowed on {path}; use {method}")
                await _send(send, answer_error(exc).status, openai.error_body(answer_error(exc)),
                            [(b"allow", method.encode())])
            elif kind == "models":
                await self._models(scope, send)
            else:
                await self._generate(kind, None, None, scope, receive, send)
            return True
        match = GENERATE_ROUTE.fullmatch(path)
        if match is None:
            return False
        if scope["method"] != "POST":
            exc = MethodNotAllowedError(f"method {scope['method']} is not allowed on {path}; use POST")
            await _send(send, 405, _error_json(answer_error(exc)), [(b"allow", b"POST")])
        else:
            await self._generate(match.group(3), match.group(1), match.group(2), scope, receive, send)
        return True

    async def _models(self, scope: dict, send: Callable) -> None:
        headers = _headers(scope)
        client = scope["client"][0] if scope.get("client") else "-"
        try:
            principal = self.core.admit(extract_key(headers), client, None)
            listed = [(m, versions) for m, versions in self.core.generative_models() if principal.may_call(m)]
            await _send(send, 200, openai.models_body(listed))
        except Exception as exc:
            answer = answer_error(exc, headers.get(REQUEST_ID_HEADER))
            await _send(send, answer.status, openai.error_body(answer), answer.headers)

    async def _generate(self, kind: str, url_model: Optional[str], url_version: Optional[str], scope: dict,
                        receive: Callable, send: Callable) -> None:
        """One generation, streamed or not (see the module docstring)."""
        start = time.perf_counter()
        core = self.core
        is_openai = kind in ("completions", "chat")
        protocol = OPENAI_PROTOCOL if is_openai else GENERATE_PROTOCOL
        headers = _headers(scope)
        request_id = headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        client = scope["client"][0] if scope.get("client") else "-"
        state = _Stream(send)
        model: Optional[str] = url_model
        number: Optional[int] = None
        gen = None
        events: Any = None
        watcher: Optional[asyncio.Task] = None
        task = core.deadlines.enter()  # the whole generation, body read included
        # The in-flight gauge counts the request under its model once known (OpenAI: in the body).
        label = model or UNKNOWN_MODEL
        started = model is not None
        if started:
            core.metrics.request_started(model)

        def finished(status: int, error: Optional[str]) -> None:
            if not started:
                core.metrics.request_started(label)
            core.metrics.request_finished(label, number, protocol, status, error, time.perf_counter() - start)

        try:
            principal = core.admit(extract_key(headers), client, url_model)
            body = await self.read_body(headers, receive)
            if body is None:  # the client went away before sending its body
                finished(499, "ClientDisconnected")
                return
            if is_openai:
                decoded = (openai.decode_chat if kind == "chat" else openai.decode_completion)(body)
                model, version, request = decoded.model, decoded.version, decoded.request
                principal.check_model(model)
                stream = request.stream
            else:
                request = oip.decode_generate(body, stream=kind == "generate_stream")
                version, stream = url_version, kind == "generate_stream"
            request.id = request.id or request_id
            if not started:  # the model came with the body
                label, started = model, True
                core.metrics.request_started(model)
            slot = await core.pick_generative(model, None if version is None else str(version),
                                              headers.get(core.key_header))
            number = slot.number
            gen = core.generate(model, slot, request, protocol=protocol, who=core.token_key(principal, client),
                                start=start)
            first = await gen.__anext__()  # errors up to here answer as JSON with their status
            if not stream:
                chunks = [first]
                if first.finish_reason is None:
                    chunks.extend([c async for c in gen])
                result = oip.join_chunks(chunks)
                if is_openai:
                    body_fn = openai.chat_completion_body if kind == "chat" else openai.completion_body
                    payload = body_fn(openai.model_id(model, number), result, id=_openai_id(kind, request_id))
                else:
                    payload = oip.encode_generate(model, number, result)
                await _send(send, 200, payload, [(VERSION_HEADER, str(number).encode())])
                finished(200, None)
                return
            # streaming: the 200 goes out with the first chunk's events
            if is_openai:
                events = openai.EventStream(chat=kind == "chat", model=openai.model_id(model, number),
                                            include_usage=request.include_usage, id=_openai_id(kind, request_id))
                encode = events.push
            else:
                def encode(chunk: GenerationChunk) -> bytes:
                    return oip.generate_event(model, number, chunk)
            await state.head([(VERSION_HEADER, str(number).encode())])
            watcher = asyncio.get_running_loop().create_task(state.watch(receive, asyncio.current_task()))
            await state.write(encode(first))
            if first.finish_reason is None:
                async for chunk in gen:
                    await state.write(encode(chunk))
            await state.end(events.end() if events is not None else b"")
            finished(200, None)
        except asyncio.CancelledError:
            timed_out = core.deadlines.exit(task)
            task = None
            if not timed_out:  # the client went away (our watcher, or Serve cancelling the request)
                finished(499, "ClientDisconnected")
                if state.gone:  # our own watcher cancelled us: the request ends here, quietly
                    asyncio.current_task().uncancel()
                    return
                raise
            timeout = RequestTimeoutError(f"request not answered within limits.request_timeout_s={self.timeout_s}")
            finished(*await self._fail(timeout, state, is_openai, events, request_id))
        except _ClientGone:
            finished(499, "ClientDisconnected")
        except Exception as exc:
            finished(*await self._fail(exc, state, is_openai, events, request_id))
        finally:
            if task is not None:
                core.deadlines.exit(task)
            if watcher is not None:
                watcher.cancel()
            if gen is not None:
                await gen.aclose()  # a stream left early: the engine frees the sequence

    @staticmethod
    async def _fail(exc: BaseException, state: "_Stream", is_openai: bool, events: Any,
                    request_id: str) -> tuple[int, str]:
        """Tell the client: a JSON error before the stream started, an error event after.
        Returns (status, error class) for the metrics."""
        answer = answer_error(exc, request_id)
        try:
            if not state.started:
                body = openai.error_body(answer) if is_openai else _error_json(answer)
                await _send(send=state.send, status=answer.status, payload=body, extra=answer.headers)
            elif is_openai and events is not None:
                await state.end(events.error(answer))
            else:
                await state.end(oip.generate_error_event(answer.message))
        except Exception:  # noqa: BLE001 - the client is gone: nothing more to tell it
            logger.debug("request %s: the client went away before its error was sent", request_id)
        return answer.status, answer.error


class _Stream:
    """The response side of one server-sent-event stream."""

    def __init__(self, send: Callable) -> None:
        self.send = send
        self.started = False
        self.gone = False

    async def head(self, extra: list) -> None:
        await self.send({"type": "http.response.start", "status": 200, "headers": [*_SSE, *extra]})
        self.started = True

    async def write(self, data: bytes) -> None:
        if not data:
            return
        try:
            await self.send({"type": "http.response.body", "body": data, "more_body": True})
        except Exception as exc:  # the connection is closed: stop generating
            self.gone = True
            raise _ClientGone() from exc

    async def end(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": False})

    async def watch(self, receive: Callable, task: Optional[asyncio.Task]) -> None:
        """Wait for the client's ``http.disconnect`` and stop the request's task."""
        try:
            while True:
                message = await receive()
                if message.get("type") == "http.disconnect":
                    break
        except asyncio.CancelledError:
            return
        except Exception:  # noqa: BLE001 - a receive channel that failed: the client is gone too
            pass
        self.gone = True
        if task is not None and not task.done():
            task.cancel()


def _openai_id(kind: str, request_id: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id


def _headers(scope: dict) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def _error_json(answer: ErrorAnswer) -> bytes:
    import orjson

    return orjson.dumps(answer.body)


async def _send(send: Callable, status: int, payload: bytes, extra: Optional[list] = None) -> None:
    headers: list[Any] = [_JSON, (b"content-length", str(len(payload)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
