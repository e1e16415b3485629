"""benchmarks/generate.py and its peers (benchmarks/peers/): the SSE client and statistics, the
deployment rewrite, and, against the real components, the Hugging Face checkpoint converter
(same greedy tokens and logits as the version's ONNX graph) and onnxruntime-genai on that graph."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from benchmarks.generate import (
    RequestResult,
    closed_loop_http,
    maas_config,
    openai_body,
    parse_sse_event,
    stream_openai,
    summarize,
)

pytestmark = pytest.mark.unit


def test_sse_lines():
    assert parse_sse_event(": keep-alive") is None
    assert parse_sse_event("") is None
    assert parse_sse_event("data: [DONE]") == {"done": True}
    assert parse_sse_event('data: {"choices": [{"text": "a"}]}') == {"choices": [{"text": "a"}]}


def test_summary_counts_tokens_latencies_and_errors():
    ok = [RequestResult(0, start=0.0, ttft_s=0.1, itl_s=[0.01] * 9, output_tokens=10, end=0.19),
          RequestResult(1, start=0.0, ttft_s=0.3, itl_s=[0.02] * 4, output_tokens=5, end=0.38)]
    bad = RequestResult(2, start=0.0, error="HTTP 503: busy")
    s = summarize([*ok, bad], wall_s=1.0)
    assert (s["requests"], s["errors"], s["output_tokens"]) == (3, 1, 15)
    assert s["output_tokens_per_s"] == 15.0 and s["mean_output_tokens"] == 7.5
    assert s["ttft_p50_ms"] == pytest.approx(200.0) and s["itl_p50_ms"] == pytest.approx(10.0)
    assert s["error_examples"] == ["HTTP 503: busy"]


def _sse_app(chunks: list[str], status: int = 200):
    """A real ASGI app streaming OpenAI completion events (served in process by httpx)."""

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for c in chunks:
            await send({"type": "http.response.body", "body": c.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def _events(texts: list[str], usage: int | None) -> list[str]:
    ev = [f"data: {json.dumps({'choices': [{'text': t, 'finish_reason': None}]})}\n\n" for t in texts]
    ev.append(f"data: {json.dumps({'choices': [{'text': '', 'finish_reason': 'length'}]})}\n\n")
    if usage is not None:
        ev.append(f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': usage}})}\n\n")
    return [*ev, "data: [DONE]\n\n"]


@pytest.mark.parametrize("usage", [7, None])
def test_stream_client_times_tokens_and_reads_usage(usage):
    import httpx

    async def go():
        transport = httpx.ASGITransport(app=_sse_app(_events(["a", "b", "c"], usage)))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            rec = RequestResult(0, start=__import__("time").perf_counter())
            await stream_openai(client, "http://t/v1/completions", openai_body("m", "p", 3, False), rec)
            return rec

    rec = asyncio.run(go())
    assert rec.error is None and rec.text == "abc" and rec.ttft_s is not None and len(rec.itl_s) == 2
    assert rec.output_tokens == (usage if usage is not None else 3)  # the server's count when it sends one


def test_stream_client_reports_http_and_stream_errors():
    import httpx

    async def go(chunks, status):
        transport = httpx.ASGITransport(app=_sse_app(chunks, status))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            rec = RequestResult(0, start=0.0)
            await stream_openai(client, "http://t/v1/completions", {}, rec)
            return rec

    assert asyncio.run(go(['{"error": "busy"}'], 503)).error.startswith("HTTP 503")
    assert "stream error" in asyncio.run(go(['data: {"error": {"message": "x"}}\n\n'], 200)).error


def test_maas_config_serves_the_version_under_test(tmp_path):
    import yaml

    template = tmp_path / "lm.yaml"
    template.write_text(yaml.safe_dump({
        "http_options": {"host": "0.0.0.0", "port": 8000}, "grpc_options": {"port": 9000},
        "applications": [{"name": "lm", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app",
                          "args": {"models": [{"name": "tiny", "versions": [{"version": "production", "weight": 90},
                                                                               {"version": "candidate", "weight": 10}]}]}}]}))
    cfg = maas_config(template, "bench-lm", 3, 8241)
    assert cfg["http_options"] == {"host": "127.0.0.1", "port": 8241} and "grpc_options" not in cfg
    assert cfg["applications"][0]["args"]["models"] == [{"name": "bench-lm", "versions": [{"version": 3, "weight": 100}]}]


def test_closed_loop_keeps_concurrency_requests_in_flight():
    import httpx

    in_flight, peak = 0, 0

    async def app(scope, receive, send):
        nonlocal in_flight, peak
        await receive()
        in_flight += 1
        peak = max(peak, in_flight)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.01)
        for c in _events(["x"], 1):
            await send({"type": "http.response.body", "body": c.encode(), "more_body": True})
        in_flight -= 1
        await send({"type": "http.response.body", "body": b""})

    orig = httpx.AsyncClient.__init__

    def patched(self, *a, **kw):  # route the loop's client to the in-process app
        kw["transport"] = httpx.ASGITransport(app=app)
        orig(self, *a, **kw)

    httpx.AsyncClient.__init__ = patched
    try:
        results, wall = asyncio.run(closed_loop_http("http://t/v1/completions", lambda i: {}, 4, 4, 0.2, stream_openai))
    finally:
        httpx.AsyncClient.__init__ = orig
    assert peak == 4 and len(results) >= 8 and all(r.error is None for r in results)
    assert {r.prompt_index for r in results} == {0, 1, 2, 3}


# ---- against the real components: a published decoder-lm, transformers, onnxruntime-genai --------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from maas_ray.registry import Registry

    helpers = pytest.importorskip("tests.helpers.lm")
    root = tmp_path_factory.mktemp("reg")
    m = helpers.publish_tiny_lm(Registry(str(root)), "bench-lm", dim=32, layers=2, heads=2, context_length=64)
    return str(root), m


def test_hf_checkpoint_has_the_versions_greedy_tokens_and_logits(tiny, tmp_path):
    pytest.importorskip("transformers")
    from benchmarks.peers.to_hf import registry_to_hf, verify
    from maas_ray.registry import Registry
    from tests.helpers.lm import torch_greedy

    root, m = tiny
    out = registry_to_hf(root, m.model, tmp_path / "hf", m.version)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    prompts = [[0, 5, 6, 7], [0, 40, 41]]
    result = verify(out, m.generation, prompts, steps=12)
    assert result["tokens_identical"] and result["max_abs_logit_diff"] < 1e-4

    import torch
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    for p in prompts:  # and the torch model's own greedy continuation (not stopped at EOS)
        with torch.no_grad():
            got = hf.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              pad_token_id=m.generation.eos_token_id)[0, len(p):].tolist()
        want = torch_greedy(Registry(root), m.model, m.version, p, 8)
        stop = want.index(m.generation.eos_token_id) if m.generation.eos_token_id in want else 8
        assert got[:stop] == want[:stop]


def test_onnxruntime_genai_runs_the_versions_graph(tiny, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("transformers")
    from benchmarks.peers import ort_genai
    from benchmarks.peers.to_hf import onnx_greedy, registry_to_hf

    root, m = tiny
    out = registry_to_hf(root, m.model, tmp_path / "hf", m.version)
    ort_genai.write_config(str(out), m.generation, dim=m.model_spec["model_args"]["dim"], threads=1)
    engine = ort_genai.static_engine(str(out), 4)
    # equal lengths: genai's static batch pads shorter rows on the left and then gives them wrong
    # positions in decode steps (the benchmark's prompts all have the same length for this reason)
    prompts = [[0, 5, 6, 7], [0, 40, 41, 42], [0, 9, 10, 11]]
    buf = engine.create_event_buffer(16)
    reqs = []
    for p in prompts:
        r = engine.create_request()
        o = og.TurnOptions(r)
        o.set_max_generated_tokens(8)
        o.set_min_generated_tokens(8)
        o.set_do_sample(False)
        r.begin_turn(np.asarray(p, np.int32), o)
        reqs.append((r, []))
    by_id = {id(r): toks for r, toks in reqs}
    while engine.has_pending_requests():
        engine.run(buf)
        for k in range(len(buf)):
            ev = buf[k]
            if int(ev.flags) & int(og.EngineEventFlags.TOKEN):
                by_id[id(ev.request)].append(int(ev.token))
    for p, (_, toks) in zip(prompts, reqs):
        want, _ = onnx_greedy(str(out / "model.onnx"), m.generation, p, 8)
        stop = want.index(m.generation.eos_token_id) if m.generation.eos_token_id in want else 8
        assert toks[:stop] == want[:stop]
    assert "position_ids" in (ort_genai.dynamic_batching_error(str(out)) or "position_ids")


def test_maas_engine_target_runs_the_closed_loop_in_process(tiny, tmp_path):
    """The in-process engine target: the version's greedy continuations (as torch's), every
    request counted, one token per streamed chunk."""
    from argparse import Namespace

    from benchmarks.generate import Prompts, resolve_version, run_maas_engine
    from maas_ray.registry import Registry
    from tests.helpers.lm import torch_greedy

    root, m = tiny
    v = resolve_version(root, m.model, str(m.version))
    prompts = Prompts(texts=["a", "b"], ids=[[0, 5, 6, 7], [0, 40, 41]])
    a = Namespace(cores=1, max_tokens=8, concurrency=[1, 2], warmup=0.2, duration=0.5,
                  maas_config=str(tmp_path / "none.yaml"))
    run = run_maas_engine(a, v, prompts)
    for c in ("1", "2"):
        level = run["levels"][c]
        assert level["requests"] >= int(c) and level["errors"] == 0 and level["tokens_per_event"] == 1.0
    from maas_ray.serving.generate import LMTokenizer

    tok = LMTokenizer.from_bytes(v.tokenizer_json.encode(), v.spec)
    for i, ids in enumerate(prompts.ids):
        want = torch_greedy(Registry(root), m.model, m.version, ids, 8)
        eos = m.generation.eos_token_id
        want = want[: want.index(eos)] if eos in want else want
        assert run["texts"][i] == tok.decode(want)
