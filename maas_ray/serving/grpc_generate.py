"""Generative versions over gRPC: Triton's streaming RPC ``ModelStreamInfer`` of
``inference.GRPCInferenceService``, on the same port and servicer as ``ModelInfer``.

Serve's gRPC proxy (Ray 2.60) routes every RPC shape: unary, server streaming, client
streaming and bidirectional streaming. For a bidi RPC it hands the ingress method a
``ray.serve.grpc_util.gRPCInputStream`` (an async iterator of the client's request messages,
each fetched from the proxy as the method reads it) and streams back what the method yields.
``ModelStreamInfer`` is bidi in Triton's proto, so stock ``tritonclient.grpc`` works as with
Triton's decoupled models::

    client.start_stream(callback, headers={"authorization": "Bearer <key>"})
    client.async_stream_infer("lm", [text_input], request_id="r1",
                              parameters={"max_tokens": 32, "temperature": 0})
    client.stop_stream()          # waits for the open generations; cancel_requests=True cancels them

Request (one ``ModelInferRequest`` per generation; any number per stream, generated at the same
time): one input ``text_input`` (BYTES, one element: the UTF-8 prompt) and optionally
``stop_words`` (BYTES, the stop strings: a list, which a scalar request parameter cannot carry),
sampling fields as request ``parameters`` with the names and checks of the OIP generate extension
(:func:`maas_ray.serving.codecs.generate.decode_generate`: ``max_tokens``, ``temperature``,
``top_p``, ``top_k``, ``seed``, ``stop``, ...); ``model_version`` pins a version; the sticky key
is the app's ``request_key_header`` as metadata or a request parameter, as for ``ModelInfer``.

Responses: one ``ModelStreamInferResponse`` per piece of text, its ``infer_response`` holding
``text_output`` (BYTES ``[1]``, raw contents), the request's ``id``, the version that answers as
``model_version``, and the parameter ``triton_final_response`` (false, then true on the last;
the last also carries ``finish_reason``, ``prompt_tokens`` and ``completion_tokens``). With
``enable_empty_final_response=True`` the final flag comes on an extra response without outputs,
as Triton sends it. Pieces made while the previous response was still being sent go out
joined in one (:func:`coalesce`).

Errors: a request that fails (a bad key, scope or rate; bad input; an unknown model or
version; a prompt over the context; the token budget; the request timeout) gets one
``ModelStreamInferResponse`` whose ``error_message`` is ``[StatusCode.<CODE>] <message>``:
the gRPC code the same error gets from ``ModelInfer`` (INVALID_ARGUMENT, NOT_FOUND,
UNAUTHENTICATED, RESOURCE_EXHAUSTED, ...), spelled as tritonclient prints an RPC error, with
the message HTTP gives. The stream stays open for the client's other requests (Triton answers
per-request errors in-stream the same way; tritonclient hands ``error_message`` to the
callback as an ``InferenceServerException``). Its ``infer_response`` carries the request's
``id`` for raw-gRPC clients (tritonclient drops it).

Every request goes through the path HTTP generate takes: admission (API keys from metadata,
the request rate limit, the key's model scope), the version table (split, pin, sticky key),
the token rate limit and the generation metrics of
:meth:`~maas_ray.serving.core.InferenceService.generate`, and the request metrics with the
protocol label ``grpc_generate``. A client that cancels the stream (``stop_stream(
cancel_requests=True)``, a closed channel, a deadline) cancels its generations: the engine
frees each sequence and its KV cache at its next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
import time
import uuid
from typing import Any, AsyncIterator, Callable, Optional

import orjson

from maas_ray.errors import InvalidInputError, RequestTimeoutError
from maas_ray.serving.codecs import generate as oip
from maas_ray.serving.codecs.common import invalid
from maas_ray.serving.codecs.grpc import decode_grpc
from maas_ray.serving.core import InferenceService
from maas_ray.serving.grpc import MalformedRequest, _metadata, _pb, _peer
from maas_ray.serving.keys import extract_key
from maas_ray.serving.metrics import UNKNOWN_MODEL
from maas_ray.serving.status import ErrorAnswer, answer_error
from maas_ray.serving.types import GenerateRequest, GenerationChunk, RequestSchema

logger = logging.getLogger(__name__)

PROTOCOL = "grpc_generate"
TEXT_INPUT = "text_input"
STOP_WORDS = "stop_words"  # optional BYTES input: a list of stop strings, as TensorRT-LLM's ensemble takes them
TEXT_OUTPUT = "text_output"
FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"
SCHEMA = RequestSchema(inputs={TEXT_INPUT: frozenset({"BYTES"}), STOP_WORDS: frozenset({"BYTES"})},
                       outputs=(TEXT_OUTPUT,), optional=frozenset({STOP_WORDS}))
_DONE = object()  # a reader or generation task finished (GrpcGenerateService.stream)


def decode_stream_request(request: Any, limits: Any, key_header: str) -> tuple[GenerateRequest, bool, Optional[str]]:
    """A ``ModelInferRequest`` of ``ModelStreamInfer`` -> (the generation request, whether the
    client asked for an empty final response, the sticky key given as a parameter).

    The tensor checks are ``ModelInfer``'s (:func:`~maas_ray.serving.codecs.grpc.decode_grpc`
    against a one-input schema); the sampling parameters go through the OIP generate decoder,
    so every field, bound and message is the HTTP route's. Raises only InvalidInputError
    (PayloadTooLargeError past the element limit)."""
    if not request.model_name:
        raise invalid("model_name", "the name of a generative model", request.model_name)
    decoded = decode_grpc(request, SCHEMA, limits)
    prompt = decoded.tensors[TEXT_INPUT]
    if prompt.size != 1:
        raise InvalidInputError(f"inputs[{TEXT_INPUT}]: expected one prompt (shape [1]), got {prompt.size} elements")
    try:
        text = bytes(prompt.reshape(-1)[0]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"inputs[{TEXT_INPUT}]: the prompt is not valid UTF-8 ({exc.reason})") from exc
    params = dict(decoded.parameters or {})
    empty_final = params.pop(EMPTY_FINAL, False)
    if type(empty_final) is not bool:
        raise invalid(f"parameters.{EMPTY_FINAL}", "a boolean", empty_final)
    sticky = params.pop(key_header, None)
    if STOP_WORDS in decoded.tensors:  # a list, which a scalar request parameter cannot carry
        if "stop" in params or STOP_WORDS in params:
            raise InvalidInputError(f"inputs[{STOP_WORDS}]: give stop strings as this input or as a parameter, not both")
        try:
            words = [bytes(w).decode("utf-8") for w in decoded.tensors[STOP_WORDS].reshape(-1)]
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"inputs[{STOP_WORDS}]: a stop string is not valid UTF-8 ({exc.reason})") from exc
        params["stop"] = oip.check_stop(words, f"inputs[{STOP_WORDS}]")  # errors name the input
    body: dict[str, Any] = {TEXT_INPUT: text}
    if params:
        body["parameters"] = params
    generate = oip.decode_generate(orjson.dumps(body), stream=True)
    generate.id = decoded.id
    return generate, empty_final, None if sticky is None else str(sticky)


def _response(model: str, version: Any, request_id: Optional[str], final: bool) -> Any:
    response = _pb().ModelStreamInferResponse()
    infer = response.infer_response
    infer.model_name = model
    if version is not None:
        infer.model_version = str(version)
    if request_id:
        infer.id = request_id
    infer.parameters[FINAL].bool_param = final
    return response


def encode_chunk(model: str, version: int, request_id: Optional[str], chunk: GenerationChunk, final: bool) -> Any:
    """One ``ModelStreamInferResponse`` with the chunk's text as ``text_output`` (BYTES [1],
    raw contents: a 4-byte little-endian length, then the UTF-8 bytes); the finish reason and
    token counts as parameters once the chunk finishes the generation."""
    response = _response(model, version, request_id, final)
    infer = response.infer_response
    infer.outputs.add(name=TEXT_OUTPUT, datatype="BYTES", shape=[1])
    data = chunk.text.encode("utf-8")
    infer.raw_output_contents.append(struct.pack("<I", len(data)) + data)
    if chunk.finish_reason is not None:
        infer.parameters["finish_reason"].string_param = chunk.finish_reason
        infer.parameters["prompt_tokens"].int64_param = chunk.prompt_tokens
        infer.parameters["completion_tokens"].int64_param = chunk.completion_tokens
    return response


def encode_final(model: str, version: int, request_id: Optional[str]) -> Any:
    """The empty final response (``enable_empty_final_response``): no outputs, final flag set."""
    return _response(model, version, request_id, True)


def encode_error(model: str, version: Optional[int], request_id: Optional[str], answer: ErrorAnswer) -> Any:
    """A request's failure: ``error_message`` is ``[StatusCode.<CODE>] <message>``."""
    response = _response(model, version, request_id, True)
    response.error_message = f"[StatusCode.{answer.grpc_code}] {answer.message}"
    return response


def _text(response: Any) -> Optional[bytes]:
    infer = response.infer_response
    if response.error_message or not infer.raw_output_contents:
        return None
    return infer.raw_output_contents[0][4:]


def coalesce(items: list) -> list:
    """Queued ``(request number, response)`` items -> the responses to send, in order, each run
    of one request's text responses joined into one (its text concatenated, the last one's
    parameters). Nothing waits for this: responses are joined only when they were made while
    the previous ones were still being sent, so a stream that keeps up gets one response per
    piece of text, and a lagging one a response per send instead of one per token (each costs a
    Ray object from the replica to the proxy). ``_DONE`` markers pass through."""
    out: list = []
    last_seq, last_text = None, None
    for item in items:
        if item is _DONE:
            out.append(item)
            last_seq = None
            continue
        seq, response = item
        text = _text(response)
        if text is not None and seq == last_seq and last_text is not None:
            previous = out[-1].infer_response
            last_text += text
            previous.raw_output_contents[0] = struct.pack("<I", len(last_text)) + last_text
            for key, value in response.infer_response.parameters.items():
                previous.parameters[key].CopyFrom(value)
            continue
        out.append(response)
        last_seq, last_text = seq, text
    return out


class GrpcGenerateService:
    """``ModelStreamInfer`` over one :class:`~maas_ray.serving.core.InferenceService`."""

    def __init__(self, core: InferenceService) -> None:
        self.core = core

    async def stream(self, requests: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        """The responses to a stream of requests, each generated in a task of its own as it
        arrives; ends once the client closed its side and every generation finished. Closing
        this iterator (the client cancelled) cancels the generations still running."""
        meta = _metadata(grpc_context)
        peer = _peer(grpc_context)
        out: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        pending = 1  # the reader, then one per request
        numbers = itertools.count()  # tells each request's responses apart (ids may be empty or repeated)

        def emitter(seq: int) -> Callable[[Any], None]:
            return lambda response: out.put_nowait((seq, response))

        def finished(task: asyncio.Task) -> None:
            tasks.discard(task)
            out.put_nowait(_DONE)

        async def read() -> None:
            nonlocal pending
            async for request in requests:
                pending += 1
                task = loop.create_task(self.one(request, meta, peer, emitter(next(numbers))))
                tasks.add(task)
                task.add_done_callback(finished)
            if getattr(requests, "is_cancelled", lambda: False)():  # the client cancelled the RPC
                for task in list(tasks):
                    task.cancel()

        reader = loop.create_task(read())
        reader.add_done_callback(finished)
        try:
            while pending:
                items = [await out.get()]
                while not out.empty():  # made while the last response went out: join them
                    items.append(out.get_nowait())
                for item in coalesce(items):
                    if item is _DONE:
                        pending -= 1
                    else:
                        yield item
            if not reader.cancelled() and reader.exception() is not None:
                logger.warning("ModelStreamInfer: reading the request stream failed: %r", reader.exception())
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()  # each closes its generation: the engine frees the sequence

    async def one(self, request: Any, meta: dict[str, str], peer: str, emit: Callable[[Any], None]) -> None:
        """One generation of the stream: its responses (or its error) go to ``emit``."""
        core = self.core
        start = time.perf_counter()
        malformed = isinstance(request, MalformedRequest)
        model = "" if malformed else request.model_name
        request_id = None if malformed else (request.id or None)
        label = model or UNKNOWN_MODEL
        number: Optional[int] = None
        gen: Optional[AsyncIterator[GenerationChunk]] = None
        core.metrics.request_started(label)

        def done(status: int, error: Optional[str]) -> None:
            core.metrics.request_finished(label, number, PROTOCOL, status, error, time.perf_counter() - start)

        def fail(exc: BaseException) -> None:
            answer = answer_error(exc, request_id)
            emit(encode_error(model, number, request_id, answer))
            done(answer.status, answer.error)

        task = core.deadlines.enter()  # the whole generation, as on HTTP
        try:
            principal = core.admit(extract_key(meta), peer, model or None)
            if malformed:
                raise request.error()
            generate, empty_final, sticky = decode_stream_request(request, core.limits, core.key_header)
            generate.id = generate.id or meta.get("x-request-id") or uuid.uuid4().hex
            slot = await core.pick_generative(model, request.model_version or None,
                                              meta.get(core.key_header) or sticky)
            number = slot.number
            gen = core.generate(model, slot, generate, protocol=PROTOCOL, who=core.token_key(principal, peer),
                                start=start)
            final_sent = False
            async for chunk in gen:
                last = chunk.finish_reason is not None
                if not chunk.text and not last:
                    continue  # the detokenizer holding back part of a character
                emit(encode_chunk(model, number, request_id, chunk, last and not empty_final))
                final_sent = last and not empty_final
            if not final_sent:
                emit(encode_final(model, number, request_id))
            done(200, None)
        except asyncio.CancelledError:
            timed_out = core.deadlines.exit(task)
            task = None
            if not timed_out:  # the client cancelled the stream
                done(499, "ClientDisconnected")
                raise
            fail(RequestTimeoutError(f"request not answered within limits.request_timeout_s="
                                     f"{core.limits.request_timeout_s}"))
        except Exception as exc:  # noqa: BLE001 - every failure is this request's error response
            fail(exc)
        finally:
            if task is not None:
                core.deadlines.exit(task)
            if gen is not None:
                await gen.aclose()  # a generation left early: the engine frees the sequence
