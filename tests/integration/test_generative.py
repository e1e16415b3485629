"""Generative versions served end to end: the tiny decoder LM of ``tests/helpers/lm.py``,
published into a registry, served by ``build_app`` next to a classifier, and called by the
stock ``openai`` client, OIP generate over httpx and ``MaasClient.generate``.

One Serve instance for the module holds two apps: ``gen`` at ``/`` (API keys on; ``lm``
versions 1 and 2 in ``fused`` placement, each its own GenerativeServer replica, split 50/50;
``lmi``, the same weights as ``lm:1`` with the engine in the ingress process; ``clf``, a
classifier) and ``limited`` at ``/limited`` (no keys, a token rate limit).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson
import pytest

from maas_ray.registry import ExtraFile, Registry
from maas_ray.serving.deploy import deploy
from maas_ray.serving.metric_names import RAY_COMPLETION_TOKENS_TOTAL, RAY_TIME_TO_FIRST_TOKEN_COUNT
from tests.helpers import HTTP_PORT, create_key, linear_onnx, scrape, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
URL = f"http://127.0.0.1:{HTTP_PORT}"
CONTEXT = 512
PROMPTS = ["the small cat", "two dogs chase", "every", "a bird sings in the"]


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    from ray import serve

    from maas_ray.serving.generate.tokenizer import LMTokenizer
    from tests.helpers.lm import publish_tiny_lm

    root = str(tmp_path_factory.mktemp("lm-registry"))
    reg = Registry(root)
    publish_tiny_lm(reg, "lm", seed=0, context_length=CONTEXT)
    publish_tiny_lm(reg, "lm", seed=1, context_length=CONTEXT)  # its own tokenizer too (trained with seed 1)
    # lmi: lm:1 again (its bytes and files), so both placements run the same weights
    first = reg.load("lm", 1)
    reg.publish("lmi", first.model_bytes, preprocessor=first.manifest.preprocessor,
                postprocessor=first.manifest.postprocessor, model_spec=first.manifest.model_spec,
                generation=first.manifest.generation,
                files={n: ExtraFile(d, first.manifest.files[n].role) for n, d in first.files.items()})
    reg.publish("clf", linear_onnx(4, 3))

    def tokenizer(model: str, version: int) -> LMTokenizer:
        spec = reg.describe(model, version).generation
        return LMTokenizer.from_bytes(reg.read_file(model, version, spec.tokenizer_file), spec)

    keys_file = str(tmp_path_factory.mktemp("keys") / "keys.json")
    keys = {"all": create_key(keys_file, "--name", "all", "--all-models"),
            "clf": create_key(keys_file, "--name", "clf-only", "--models", "clf")}
    lm_model = {"name": "lm", "placement": "fused", "generation": {"max_num_seqs": 8},
                "versions": [{"version": 1, "weight": 1}, {"version": 2, "weight": 1}],
                "inference": {"ray_actor_options": {"num_cpus": 0.5}}}
    gen = {"registry_root": root, "auth": {"enabled": True, "keys_file": keys_file},
           "models": [lm_model,
                      {"name": "lmi", "placement": "ingress", "versions": [{"version": 1}]},
                      {"name": "clf", "placement": "ingress", "versions": [{"version": 1}]}],
           "ingress": {"ray_actor_options": {"num_cpus": 0.5}}}
    limited = {"registry_root": root, "limits": {"rate_limit_tokens_per_minute": 60},
               "models": [{"name": "lmi", "versions": [{"version": 1}]}],
               "ingress": {"ray_actor_options": {"num_cpus": 0.25}}}
    deploy({
        "http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
        "applications": [
            {"name": "gen", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app", "args": gen,
             "logging_config": {"enable_access_log": False}},  # as the shipped YAMLs: no line per request
            {"name": "limited", "route_prefix": "/limited", "import_path": "maas_ray.serving.app:build_app",
             "args": limited, "logging_config": {"enable_access_log": False}},
        ],
    })
    with httpx.Client(base_url=URL, timeout=60, headers={"authorization": f"Bearer {keys['all']}"}) as client:
        for v in (1, 2):
            wait_until(lambda v=v: client.get(f"/v2/models/lm/versions/{v}/ready").status_code == 200, 120)
        yield client, keys, reg, tokenizer
    serve.shutdown()


def _greedy_text(reg: Registry, tokenizers, model: str, version: int, prompt: str, n: int) -> tuple[list, str]:
    """torch's greedy continuation, cut at the first EOS (where serving stops), and its text."""
    from tests.helpers.lm import torch_greedy

    tokenizer = tokenizers(model, version)
    ids = torch_greedy(reg, model, version, tokenizer.encode(prompt), n)
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return ids, tokenizer.decode(ids)


def _openai(keys, base: str = URL):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key=keys["all"], max_retries=0, timeout=60)


def test_openai_client_streams_and_completes_greedy_as_torch(served):
    client, keys, reg, tokenizer = served
    oa = _openai(keys)
    for model, version in (("lm:1", 1), ("lm:2", 2), ("lmi", 1)):
        _, want = _greedy_text(reg, tokenizer, model.split(":")[0], version, PROMPTS[0], 12)
        done = oa.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0)
        assert done.choices[0].text == want and done.model == f"{model.split(':')[0]}:{version}"
        assert done.usage.prompt_tokens == len(tokenizer(model.split(":")[0], version).encode(PROMPTS[0]))
        streamed = oa.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
        chunks = list(streamed)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == done.usage.completion_tokens

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    chat_ids = tokenizer("lm", 1).encode_chat(messages)
    from tests.helpers.lm import torch_greedy

    ids = torch_greedy(reg, "lm", 1, chat_ids, 10)
    eos = tokenizer("lm", 1).eos_token_id
    want = tokenizer("lm", 1).decode(ids[: ids.index(eos)] if eos in ids else ids)
    done = oa.chat.completions.create(model="lm:1", messages=messages, max_tokens=10, temperature=0)
    assert done.choices[0].message.content == want and done.choices[0].message.role == "assistant"
    deltas = [c.choices[0].delta for c in oa.chat.completions.create(
        model="lm:1", messages=messages, max_tokens=10, temperature=0, stream=True) if c.choices]
    assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas) == want


def test_oip_generate_and_stream_and_models_list(served):
    client, _, reg, tokenizer = served
    _, want = _greedy_text(reg, tokenizer, "lm", 2, PROMPTS[1], 8)
    r = client.post("/v2/models/lm/versions/2/generate", json={"text_input": PROMPTS[1],
                                                               "parameters": {"max_tokens": 8, "temperature": 0}})
    assert r.status_code == 200 and r.headers["x-model-version"] == "2"
    body = r.json()
    assert body["text_output"] == want and body["model_name"] == "lm" and body["model_version"] == "2"
    with client.stream("POST", "/v2/models/lm/versions/2/generate_stream",
                       json={"text_input": PROMPTS[1], "max_tokens": 8, "temperature": 0}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [orjson.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == want
    assert events[-1]["finish_reason"] in ("stop", "length") and events[-1]["completion_tokens"] >= 1
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["lm", "lm:1", "lm:2", "lmi", "lmi:1"]


def test_concurrent_greedy_requests_each_equal_torch_alone(served):
    client, _, reg, tokenizer = served
    wants = [_greedy_text(reg, tokenizer, "lm", 1, p, 24)[1] for p in PROMPTS]

    def one(prompt: str) -> str:
        r = client.post("/v2/models/lm/versions/1/generate", json={"text_input": prompt, "max_tokens": 24,
                                                                   "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["text_output"]

    with ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
        got = list(pool.map(one, PROMPTS * 2))
    assert got == wants * 2


def test_maas_client_generate_streams_the_torch_tokens(served):
    from maas_ray.errors import InvalidInputError
    from maas_ray.serving.client import MaasClient
    from tests.helpers.lm import torch_greedy

    _, _, reg, tokenizer = served
    want = torch_greedy(reg, "lm", 1, tokenizer("lm", 1).encode(PROMPTS[2]), 10)
    with MaasClient(app_name="gen") as mc:
        chunks = list(mc.generate_chunks("lm", PROMPTS[2], version=1, max_tokens=10, temperature=0))
        ids = [t for c in chunks for t in c.token_ids]
        assert ids == want[: len(ids)] and chunks[-1].finish_reason in ("stop", "length")
        assert "".join(mc.generate("lm", PROMPTS[2], version=1, max_tokens=10, temperature=0)) == \
            mc.complete("lm", PROMPTS[2], version=1, max_tokens=10, temperature=0).text
        with pytest.raises(InvalidInputError, match="context_length"):
            list(mc.generate("lm", PROMPTS[2], max_tokens=CONTEXT))
        with pytest.raises(InvalidInputError, match="not a generative model"):
            list(mc.generate("clf", "x"))


def test_split_pin_and_sticky_key_across_versions(served):
    client, _, _, _ = served

    def version(headers=None, model="lm") -> str:
        r = client.post("/v1/completions", json={"model": model, "prompt": "a", "max_tokens": 1}, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == f"lm:{r.headers['x-model-version']}"
        return r.headers["x-model-version"]

    assert {version() for _ in range(24)} == {"1", "2"}  # 50/50: both in 24 draws but with 2**-23 odds
    assert {version({"x-request-key": "user-7"}) for _ in range(8)} in ({"1"}, {"2"})
    assert {version(model="lm:2") for _ in range(4)} == {"2"}


def test_scopes_routes_and_hostile_bodies_answer_4xx_json(served):
    from tests.helpers.hostile_generate import ROUTES, corpus, valid

    client, keys, _, _ = served
    scoped = {"authorization": f"Bearer {keys['clf']}"}
    r = client.post("/v1/completions", json={"model": "lm", "prompt": "a"}, headers=scoped)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert client.post("/v2/models/lm/generate", json={"text_input": "a"}, headers=scoped).status_code == 403
    assert client.get("/v1/models", headers=scoped).json()["data"] == []
    r = client.post("/v1/completions", json={"model": "lm", "prompt": "a"}, headers={"authorization": "Bearer nope"})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    wrong = client.post("/v2/models/clf/generate", json={"text_input": "a"})
    assert wrong.status_code == 400 and "/v2/models/clf/infer" in wrong.json()["error"]
    wrong = client.post("/v2/models/lm/infer", json={"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                                                 "data": [1]}]})
    assert wrong.status_code == 400 and "/v1/completions" in wrong.json()["error"]

    bad = []
    for i, case in enumerate(corpus("lm", CONTEXT)):
        r = client.post(ROUTES[case.route].format(model="lm"), content=case.body,
                        headers={"content-type": "application/json"})
        err = orjson.loads(r.content).get("error")
        shape_ok = (set(err) == {"message", "type", "param", "code"} if case.route in ("completions", "chat")
                    else isinstance(err, str))
        if r.status_code != case.expect or not shape_ok or (case.field and case.field not in str(err)):
            bad.append((case.name, r.status_code, r.content[:200]))
        if i % 50 == 49:
            assert client.post("/v2/models/lm/generate", json={"text_input": "a", "max_tokens": 2}).status_code == 200
    assert not bad, bad
    for case in valid("lm"):
        r = client.post(ROUTES[case.route].format(model="lm"), content=case.body,
                        headers={"content-type": "application/json"})
        assert r.status_code == 200, (case.name, r.text[:300])


def test_a_client_that_disconnects_mid_stream_frees_its_sequence(served):
    from ray import serve

    client, _, _, _ = served
    handle = serve.get_app_handle("gen")

    def stats(model: str, version: str) -> dict:
        return handle.generation_stats.remote().result()[model][version]

    for model, version, path in (("lm", "1", "/v2/models/lm/versions/1/generate_stream"),
                                 ("lmi", "1", "/v2/models/lmi/generate_stream")):
        before = stats(model, version)["cancelled"]
        with client.stream("POST", path, json={"text_input": "a", "max_tokens": CONTEXT - 8}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # generating; now hang up
        wait_until(lambda m=model, v=version: stats(m, v)["running"] == 0, 30)
        assert stats(model, version)["cancelled"] == before + 1


def test_token_rate_limit_429_and_metrics(served):
    client, _, _, _ = served
    statuses = []
    with httpx.Client(base_url=f"{URL}/limited", timeout=60) as plain:
        for _ in range(12):
            r = plain.post("/v1/completions", json={"model": "lmi", "prompt": "a", "max_tokens": 16})
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.json()["error"]["type"] == "rate_limit_error" and float(r.headers["retry-after"]) > 0
                break
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    labels = {"app": "gen", "model": "lm", "version": "1"}
    wait_until(lambda: scrape(RAY_TIME_TO_FIRST_TOKEN_COUNT, **labels) > 0
               and scrape(RAY_COMPLETION_TOKENS_TOTAL, **labels) > 0, 30)
