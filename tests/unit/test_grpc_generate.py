"""``ModelStreamInfer`` without Ray: the request decoder (tritonclient's own request builder),
the response encoding (read back by tritonclient's ``InferResult``), and the stream service
over a fake core: concurrent generations, per-request errors, metrics, cancellation."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import pytest

from maas_ray.errors import InvalidInputError, ModelNotFoundError
from maas_ray.serving.config import Limits
from maas_ray.serving.grpc import MalformedRequest
from maas_ray.serving.grpc_generate import (
    _DONE,
    PROTOCOL,
    GrpcGenerateService,
    coalesce,
    decode_stream_request,
    encode_chunk,
    encode_error,
    encode_final,
)
from maas_ray.serving.keys import ANONYMOUS
from maas_ray.serving.limits import RequestDeadlines
from maas_ray.serving.types import GenerationChunk

pytestmark = pytest.mark.unit
KEY_HEADER = "x-request-key"


def request(model: str = "lm", prompts: Any = ("once upon",), *, parameters: Optional[dict] = None,
            request_id: str = "", version: str = "", empty_final: bool = False, name: str = "text_input",
            datatype: str = "BYTES") -> Any:
    """A ModelInferRequest as ``tritonclient.grpc`` builds it for ``async_stream_infer``."""
    import tritonclient.grpc as tg
    from tritonclient.grpc._utils import _get_inference_request

    inp = tg.InferInput(name, [len(prompts)], datatype)
    inp.set_data_from_numpy(np.array([p.encode() if isinstance(p, str) else p for p in prompts], dtype=object)
                            if datatype == "BYTES" else np.zeros(len(prompts), dtype=np.float32))
    req = _get_inference_request(model_name=model, inputs=[inp], model_version=version, request_id=request_id,
                                 outputs=None, sequence_id=0, sequence_start=False, sequence_end=False,
                                 priority=0, timeout=None, parameters=parameters)
    if empty_final:
        req.parameters["triton_enable_empty_final_response"].bool_param = True
    return req


def _with_stop_words(req: Any, words: Any, shape: Optional[list] = None) -> Any:
    """Add the optional ``stop_words`` input as tritonclient sends a BYTES tensor (raw contents)."""
    import tritonclient.grpc as tg
    from tritonclient.grpc._utils import _get_inference_request

    arr = np.array([w.encode() if isinstance(w, str) else w for w in words], dtype=object)
    stop = tg.InferInput("stop_words", shape or [len(words)], "BYTES")
    stop.set_data_from_numpy(arr.reshape(shape or [len(words)]))
    prompt = tg.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([req.raw_input_contents[0][4:]], dtype=object))
    out = _get_inference_request(model_name=req.model_name, inputs=[prompt, stop], model_version="", request_id="",
                                 outputs=None, sequence_id=0, sequence_start=False, sequence_end=False, priority=0,
                                 timeout=None, parameters=None)
    out.parameters.MergeFrom(req.parameters)
    return out


def test_stop_words_input_carries_a_list_of_stop_strings():
    gen, _, _ = decode_stream_request(_with_stop_words(request(parameters={"max_tokens": 4}), ["\n", "é."]),
                                      Limits(), KEY_HEADER)
    assert gen.sampling.stop == ["\n", "é."] and gen.sampling.max_tokens == 4 and gen.prompt == "once upon"
    gen, _, _ = decode_stream_request(_with_stop_words(request(), ["a", "b"], shape=[1, 2]), Limits(), KEY_HEADER)
    assert gen.sampling.stop == ["a", "b"]  # TensorRT-LLM's ensemble sends [batch, n]


@pytest.mark.parametrize("req, message", [
    (lambda: _with_stop_words(request(parameters={"stop": "x"}), ["y"]), "as this input or as a parameter, not both"),
    (lambda: _with_stop_words(request(), [b"\xff"]), "inputs[stop_words]: a stop string is not valid UTF-8"),
    (lambda: _with_stop_words(request(), [str(i) for i in range(17)]), "at most 16 stop strings"),
    (lambda: _with_stop_words(request(), [""]), "inputs[stop_words][0]: expected a string of 1..256 characters"),
])
def test_stop_words_input_is_checked_like_the_parameter(req, message):
    with pytest.raises(InvalidInputError) as err:
        decode_stream_request(req(), Limits(), KEY_HEADER)
    assert message in err.value.message


def _with_int_flag(req: Any) -> Any:
    req.parameters["triton_enable_empty_final_response"].int64_param = 1  # tritonclient sends a bool
    return req


# ---- decoding ---------------------------------------------------------------------------
def test_decode_reads_the_prompt_sampling_parameters_id_and_flags():
    req = request(parameters={"max_tokens": 8, "temperature": 0, "stop": "\n", KEY_HEADER: "user-7"},
                  request_id="r1", empty_final=True)
    gen, empty_final, sticky = decode_stream_request(req, Limits(), KEY_HEADER)
    assert gen.prompt == "once upon" and gen.id == "r1" and gen.stream
    assert (gen.sampling.max_tokens, gen.sampling.temperature, gen.sampling.stop) == (8, 0.0, ["\n"])
    assert empty_final is True and sticky == "user-7"
    gen, empty_final, sticky = decode_stream_request(request(), Limits(), KEY_HEADER)
    assert "max_tokens" not in gen.sampling.model_fields_set and not empty_final and sticky is None


@pytest.mark.parametrize("req, message", [
    (lambda: request(parameters={"temperature": 3}), "parameters.temperature: expected a number in 0..2"),
    (lambda: request(parameters={"max_tokens": 0}), "parameters.max_tokens"),
    (lambda: request(parameters={"beam_width": 2}), "parameters.beam_width: unknown parameter"),
    (lambda: request(prompts=("a", "b")), "expected one prompt"),
    (lambda: request(prompts=(b"\xff\xfe",)), "not valid UTF-8"),
    (lambda: request(name="prompt"), 'unknown input "prompt"'),
    (lambda: request(datatype="FP32"), "inputs[0].datatype"),
    (lambda: request(model=""), "model_name"),
    (lambda: _with_int_flag(request()), "triton_enable_empty_final_response: expected a boolean"),
])
def test_decode_rejects_bad_requests_naming_the_field(req, message):
    with pytest.raises(InvalidInputError) as err:
        decode_stream_request(req(), Limits(), KEY_HEADER)
    assert message in err.value.message


def test_chunks_encode_as_tritonclient_reads_them():
    from tritonclient.grpc import InferResult

    middle = encode_chunk("lm", 2, "r1", GenerationChunk("é a", [5], None, 3, 1), False)
    result = InferResult(middle.infer_response)
    assert result.as_numpy("text_output").tolist() == ["é a".encode()]
    params = result.get_response().parameters
    assert result.get_response().id == "r1" and result.get_response().model_version == "2"
    assert params["triton_final_response"].bool_param is False and "finish_reason" not in params
    last = encode_chunk("lm", 2, "r1", GenerationChunk("", [], "length", 3, 4), True).infer_response.parameters
    assert last["triton_final_response"].bool_param is True and last["finish_reason"].string_param == "length"
    assert (last["prompt_tokens"].int64_param, last["completion_tokens"].int64_param) == (3, 4)


def test_queued_responses_of_one_request_are_joined_and_others_pass_unchanged():
    from maas_ray.serving.status import ErrorAnswer

    def chunk(text: str, reason: Optional[str] = None) -> Any:
        return encode_chunk("lm", 1, "r", GenerationChunk(text, [1], reason, 2, 3), reason is not None)

    error = encode_error("lm", None, "e", ErrorAnswer(404, "NOT_FOUND", "nope", "ModelNotFoundError"))
    items = [(1, chunk("a")), (1, chunk("b")), (2, chunk("x")), (1, chunk("c")), (1, chunk("d", "stop")),
             (1, encode_final("lm", 1, "r")), (3, error), _DONE, (2, chunk("y"))]
    out = coalesce(items)
    texts = [None if o is _DONE or not o.infer_response.outputs else o.infer_response.raw_output_contents[0][4:]
             for o in out]
    assert texts == [b"ab", b"x", b"cd", None, None, None, b"y"]
    joined = out[2].infer_response
    assert joined.raw_output_contents[0][:4] == (2).to_bytes(4, "little")
    assert joined.parameters["triton_final_response"].bool_param
    assert joined.parameters["finish_reason"].string_param == "stop"
    assert not out[0].infer_response.parameters["triton_final_response"].bool_param
    assert out[4] is error and out[5] is _DONE


# ---- the stream over a fake core --------------------------------------------------------
class Route:
    def __init__(self, n: int, pause: float = 0.0) -> None:
        self.n, self.pause, self.closed = n, pause, 0

    async def _gen(self, request):
        try:
            for i in range(self.n):
                await asyncio.sleep(self.pause)
                last = i == self.n - 1
                yield GenerationChunk(f"{request.prompt}{i}", [i], "length" if last else None, 2, i + 1)
        finally:
            self.closed += 1

    def generate(self, request):
        return self._gen(request)


class Metrics:
    def __init__(self) -> None:
        self.finished: list[tuple] = []
        self.generations: list[dict] = []

    def request_started(self, model):
        pass

    def request_finished(self, model, version, protocol, status, error, total_s, stages=None):
        self.finished.append((model, version, protocol, status, error))

    def generation(self, model, version, **kw):
        self.generations.append(kw)


class Core:
    key_header = KEY_HEADER

    def __init__(self, route: Route) -> None:
        self.limits = Limits()
        self.deadlines = RequestDeadlines(None)
        self.metrics = Metrics()
        self.tokens = None
        self.route = route
        self.picked: list[tuple] = []

    def admit(self, api_key, client, model, *, admin=False):
        return ANONYMOUS

    async def pick_generative(self, model, version, key):
        self.picked.append((model, version, key))
        if model != "lm":
            raise ModelNotFoundError(f"model {model!r} not found")
        return SimpleNamespace(number=int(version or 1), route=self.route, generative=True)

    def token_key(self, principal, client):
        return None

    async def generate(self, model, slot, req, *, protocol, who=None, start=None):
        """The core's contract: the route's chunks; closing early stops the route's stream."""
        stream, reason = slot.route.generate(req), "error"
        try:
            async for chunk in stream:
                yield chunk
            reason = "done"
        except (asyncio.CancelledError, GeneratorExit):
            reason = "cancelled"
            raise
        finally:
            await stream.aclose()
            self.metrics.generation(model, slot.number, finish_reason=reason)


class Context:
    def invocation_metadata(self):
        return [(KEY_HEADER, "sticky-1")]

    def peer(self):
        return "ipv4:127.0.0.1:5555"


async def _requests(items: list):
    for item in items:
        await asyncio.sleep(0)
        yield item


def test_one_stream_generates_its_requests_concurrently_with_per_request_errors():
    core = Core(Route(3))
    reqs = [request(prompts=("a",), request_id="A"), request(model="nope", request_id="B"),
            request(prompts=("c",), request_id="C", version="2", empty_final=True),
            request(parameters={"top_p": 0}, request_id="D"), MalformedRequest("inference.ModelInferRequest", "x")]

    async def run():
        return [r async for r in GrpcGenerateService(core).stream(_requests(reqs), Context())]

    responses = asyncio.run(run())
    by_id: dict[str, list] = {}
    for r in responses:
        by_id.setdefault(r.infer_response.id, []).append(r)
    texts = [r.infer_response.raw_output_contents[0][4:].decode() for r in by_id["A"]]
    assert texts == ["a0", "a1", "a2"]
    assert [r.infer_response.parameters["triton_final_response"].bool_param for r in by_id["A"]] == [False] * 2 + [True]
    c = by_id["C"]  # the final flag on an extra, empty response
    assert len(c) == 4 and not c[-1].infer_response.outputs and c[-1].infer_response.model_version == "2"
    assert [r.infer_response.parameters["triton_final_response"].bool_param for r in c] == [False] * 3 + [True]
    assert by_id["B"][0].error_message == "[StatusCode.NOT_FOUND] model 'nope' not found"
    assert by_id["D"][0].error_message.startswith("[StatusCode.INVALID_ARGUMENT] parameters.top_p")
    assert by_id[""][0].error_message.startswith("[StatusCode.INVALID_ARGUMENT] request: not a valid")
    assert ("lm", None, "sticky-1") in core.picked and ("lm", "2", "sticky-1") in core.picked
    assert sorted(f[3] for f in core.metrics.finished) == [200, 200, 400, 400, 404]
    assert {f[2] for f in core.metrics.finished} == {PROTOCOL}


def test_closing_the_stream_cancels_running_generations():
    route = Route(1000, pause=0.001)
    core = Core(route)

    async def run():
        stream = GrpcGenerateService(core).stream(_requests([request(), request()]), Context())
        got = [await stream.__anext__() for _ in range(4)]
        await stream.aclose()  # what Serve does when the client cancels the RPC
        for _ in range(20):
            await asyncio.sleep(0.01)
            if route.closed == 2:
                break
        return got

    assert len(asyncio.run(run())) == 4
    assert route.closed == 2
    assert [f[3:] for f in core.metrics.finished] == [(499, "ClientDisconnected")] * 2
    assert [g["finish_reason"] for g in core.metrics.generations] == ["cancelled"] * 2


def test_a_generation_past_the_request_timeout_answers_deadline_exceeded():
    route = Route(1000, pause=0.01)
    core = Core(route)
    core.limits = Limits(request_timeout_s=0.05)
    core.deadlines = RequestDeadlines(0.05, check_interval_s=0.01)

    async def run():
        watchdog = asyncio.get_running_loop().create_task(core.deadlines.watch_forever())
        try:
            return [r async for r in GrpcGenerateService(core).stream(_requests([request(request_id="t")]), Context())]
        finally:
            watchdog.cancel()

    responses = asyncio.run(run())
    assert responses[-1].error_message == (
        "[StatusCode.DEADLINE_EXCEEDED] request not answered within limits.request_timeout_s=0.05")
    assert responses[-1].infer_response.id == "t" and route.closed == 1
    assert core.metrics.finished == [("lm", 1, PROTOCOL, 504, "RequestTimeoutError")]
