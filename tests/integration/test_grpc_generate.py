"""Generative versions over gRPC through Serve's real gRPC proxy: Triton's bidi
``ModelStreamInfer``, spoken by the stock ``tritonclient.grpc`` stream API
(``start_stream`` / ``async_stream_infer`` / ``stop_stream``).

One app (API keys on) on the HTTP and gRPC ports: ``lm``, the tiny decoder LM of
``tests/helpers/lm.py`` (engine in the ingress replica), and ``clf``, a classifier. Streamed
tokens joined must equal the HTTP generate answer at temperature 0.
"""

from __future__ import annotations

import os
import queue
import time

import httpx
import numpy as np
import orjson
import pytest

from maas_ray.registry import Registry
from maas_ray.serving.deploy import deploy
from maas_ray.serving.grpc import SERVICER_FUNCTION
from maas_ray.serving.metric_names import RAY_REQUESTS_TOTAL
from tests.helpers import HTTP_PORT, create_key, linear_onnx, scrape, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
GRPC_PORT = int(os.environ.get("MAAS_TEST_GRPC_PORT", "9000"))
URL = f"http://127.0.0.1:{HTTP_PORT}"
CONTEXT = 512  # as tests/integration/test_generative.py: "a" runs the whole context without an EOS
PROMPTS = ["the small cat", "two dogs chase"]


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    from ray import serve

    from tests.helpers.lm import publish_tiny_lm

    root = str(tmp_path_factory.mktemp("grpc-lm-registry"))
    reg = Registry(root)
    publish_tiny_lm(reg, "lm", seed=0, context_length=CONTEXT)
    reg.publish("clf", linear_onnx(4, 3))
    keys_file = str(tmp_path_factory.mktemp("grpc-lm-keys") / "keys.json")
    key = create_key(keys_file, "--name", "all", "--all-models")
    args = {"registry_root": root, "auth": {"enabled": True, "keys_file": keys_file},
            "models": [{"name": "lm", "placement": "ingress", "versions": [{"version": 1}]},
                       {"name": "clf", "placement": "ingress", "versions": [{"version": 1}]}],
            "ingress": {"ray_actor_options": {"num_cpus": 0.5}}}
    deploy({
        "http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
        "grpc_options": {"port": GRPC_PORT, "grpc_servicer_functions": [SERVICER_FUNCTION]},
        "applications": [{"name": "grpcgen", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app",
                          "args": args, "logging_config": {"enable_access_log": False}}],
    })
    headers = {"authorization": f"Bearer {key}"}
    with httpx.Client(base_url=URL, timeout=60, headers=headers) as http:
        wait_until(lambda: http.get("/v2/models/lm/ready").status_code == 200, 120)
        yield http, headers
    serve.shutdown()


def _prompt(text: str):
    import tritonclient.grpc as tg

    inp = tg.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([text.encode()], dtype=object))
    return inp


def _stream(headers: dict, requests: list[dict], *, cancel_after: int = 0) -> list[tuple]:
    """Send ``requests`` (async_stream_infer keyword arguments) on one stream and wait for all
    of them (``stop_stream()``), or cancel it after ``cancel_after`` responses; returns
    (request id, text or None, parameters, error string or None) per response, in order."""
    import tritonclient.grpc as tg

    got: queue.Queue = queue.Queue()

    def callback(result, error):
        if error is not None:
            got.put((None, None, {}, str(error)))
            return
        response = result.get_response()
        text = result.as_numpy("text_output")
        params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()}
        got.put((response.id, None if text is None else text[0].decode(), params, None))

    client = tg.InferenceServerClient(f"127.0.0.1:{GRPC_PORT}")
    try:
        client.start_stream(callback, headers=headers)
        for kw in requests:
            inputs = [_prompt(kw.pop("prompt", PROMPTS[0]))]
            if "stop_words" in kw:  # the optional list input
                words = np.array([w.encode() for w in kw.pop("stop_words")], dtype=object)
                inputs.append(tg.InferInput("stop_words", [len(words)], "BYTES"))
                inputs[-1].set_data_from_numpy(words)
            client.async_stream_infer(kw.pop("model", "lm"), inputs, **kw)
        if cancel_after:
            out = [got.get(timeout=60) for _ in range(cancel_after)]
            client.stop_stream(cancel_requests=True)
            return out
        client.stop_stream()
    finally:
        client.close()
    return [got.get_nowait() for _ in range(got.qsize())]


def _texts(responses: list[tuple]) -> dict[str, str]:
    out: dict[str, str] = {}
    for rid, text, _, error in responses:
        assert error is None, error
        out[rid] = out.get(rid, "") + (text or "")
    return out


def test_streamed_tokens_joined_equal_the_http_completion(served):
    http, headers = served
    sampling = {"max_tokens": 16, "temperature": 0}
    want, pieces = {}, {}
    for p in PROMPTS:
        r = http.post("/v2/models/lm/generate", json={"text_input": p, "parameters": sampling})
        assert r.status_code == 200, r.text
        want[p] = r.json()["text_output"]
        done = http.post("/v1/completions", json={"model": "lm", "prompt": p, **sampling}).json()
        assert done["choices"][0]["text"] == want[p]
        with http.stream("POST", "/v2/models/lm/generate_stream", json={"text_input": p, **sampling}) as r:
            pieces[p] = [orjson.loads(line[6:])["text_output"] for line in r.iter_lines() if line.startswith("data: ")]
    # two generations on one stream at once, one of them with Triton's empty final response
    responses = _stream(headers, [
        {"prompt": PROMPTS[0], "request_id": "a", "parameters": sampling},
        {"prompt": PROMPTS[1], "request_id": "b", "model_version": "1", "parameters": sampling,
         "enable_empty_final_response": True},
    ])
    assert _texts(responses) == {"a": want[PROMPTS[0]], "b": want[PROMPTS[1]]}
    a = [r for r in responses if r[0] == "a"]
    # the pieces of the SSE events, some joined when made while the previous one was being sent
    assert len(a) <= len(pieces[PROMPTS[0]]) and "".join(pieces[PROMPTS[0]]) == want[PROMPTS[0]]
    assert [r[2]["triton_final_response"] for r in a] == [False] * (len(a) - 1) + [True]
    assert a[-1][2]["finish_reason"] in ("stop", "length") and a[-1][2]["completion_tokens"] >= 1
    b = [r for r in responses if r[0] == "b"]
    assert b[-1][1] is None and b[-1][2]["triton_final_response"] is True  # no outputs, final flag
    # several stop strings: the stop_words input, as the HTTP route's stop list
    full = want[PROMPTS[0]]
    stops = [full[len(full) // 2:len(full) // 2 + 2], "\u2603never"]
    r = http.post("/v2/models/lm/generate", json={"text_input": PROMPTS[0], "parameters": {**sampling, "stop": stops}})
    assert r.status_code == 200, r.text
    assert len(r.json()["text_output"]) < len(full)  # the stop string cut it short
    assert _texts(_stream(headers, [{"prompt": PROMPTS[0], "request_id": "s", "parameters": sampling,
                                     "stop_words": stops}])) == {"s": r.json()["text_output"]}


def test_bad_input_unknown_model_keys_and_wrong_kind_answer_in_stream_with_their_codes(served):
    _, headers = served
    responses = _stream(headers, [
        {"request_id": "bad", "parameters": {"temperature": 3}},
        {"model": "nope", "request_id": "unknown"},
        {"request_id": "pin", "model_version": "7"},
        {"model": "clf", "request_id": "clf"},
        {"request_id": "ok", "parameters": {"max_tokens": 2}},  # the stream is still usable
    ])
    errors = sorted(r[3] for r in responses if r[3] is not None)
    assert len(errors) == 4, responses
    assert any(e.startswith("[StatusCode.INVALID_ARGUMENT] parameters.temperature: expected a number in 0..2")
               for e in errors), errors
    assert any(e.startswith("[StatusCode.NOT_FOUND]") and "nope" in e for e in errors), errors
    assert any(e.startswith("[StatusCode.NOT_FOUND]") and "7" in e for e in errors), errors
    assert any(e.startswith("[StatusCode.INVALID_ARGUMENT]") and "ModelInfer" in e for e in errors), errors
    assert [r[2]["triton_final_response"] for r in responses if r[0] == "ok"][-1] is True
    unauthenticated = _stream({"authorization": "Bearer mk_nope"}, [{"request_id": "x"}])
    assert len(unauthenticated) == 1 and unauthenticated[0][3].startswith("[StatusCode.UNAUTHENTICATED]")


def test_cancelling_the_stream_frees_the_sequence_and_metrics_say_grpc_generate(served):
    from ray import serve

    _, headers = served
    handle = serve.get_app_handle("grpcgen")

    def stats() -> dict:
        return handle.generation_stats.remote().result()["lm"]["1"]

    before = stats()["cancelled"]
    first = _stream(headers, [{"prompt": "a", "request_id": "long", "parameters": {"max_tokens": CONTEXT - 8}}],
                    cancel_after=1)
    assert first[0][0] == "long" and first[0][3] is None
    wait_until(lambda: stats()["running"] == 0, 30)
    assert stats()["cancelled"] == before + 1
    labels = {"app": "grpcgen", "model": "lm", "protocol": "grpc_generate"}
    deadline = time.monotonic() + 30  # replicas flush every second, Ray exports every second here
    while scrape(RAY_REQUESTS_TOTAL, **labels, status="499") < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert scrape(RAY_REQUESTS_TOTAL, **labels, status="499") >= 1
    assert scrape(RAY_REQUESTS_TOTAL, **labels, status="200") >= 2
    assert scrape(RAY_REQUESTS_TOTAL, **labels, status="400") >= 1
