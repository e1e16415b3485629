"""Generative candidates under shadow traffic and the rollout controller, on real Serve: the tiny
decoder LM of ``tests/helpers/lm.py`` as ``lm:1`` (production) and ``lm:2`` (the same weights,
published again: an identical candidate), both with their engine in the ingress replica.

Every generative route mirrors a finished primary to the candidate; Prometheus shows the
candidate's agreement (identical greedy texts, seeded sampled ones), its mirrored requests and
its TTFT under its own version; the controller, reading the real scrape, judges the windows
with the TTFT / ITL ratios and promotes the candidate with no caller-visible failure.
"""

from __future__ import annotations

import time

import httpx
import pytest

from maas_ray.registry import ExtraFile, Registry
from maas_ray.serving.deploy import deploy
from maas_ray.serving.metric_names import (
    RAY_REQUEST_LATENCY_COUNT,
    RAY_SHADOW_AGREEMENT_BUCKET,
    RAY_SHADOW_AGREEMENT_COUNT,
    RAY_TIME_TO_FIRST_TOKEN_COUNT,
)
from tests.helpers import HTTP_PORT, scrape, wait_until
from tests.helpers.load import SteadyRequests

pytestmark = [pytest.mark.integration, pytest.mark.slow]
URL = f"http://127.0.0.1:{HTTP_PORT}"
APP = "genroll"
PROMPTS = ["the small cat", "two dogs chase", "every", "a bird sings in the", "one more", "the big"]


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    from ray import serve

    from tests.helpers.lm import publish_tiny_lm

    reg = Registry(str(tmp_path_factory.mktemp("genroll-registry")))
    publish_tiny_lm(reg, "lm", seed=0, context_length=128)
    first = reg.load("lm", 1)  # lm:2, the same bytes and files: a candidate that must agree
    reg.publish("lm", first.model_bytes, preprocessor=first.manifest.preprocessor,
                postprocessor=first.manifest.postprocessor, model_spec=first.manifest.model_spec,
                generation=first.manifest.generation,
                files={n: ExtraFile(d, first.manifest.files[n].role) for n, d in first.files.items()})
    reg.set_alias("lm", "production", 1)
    deploy({
        "http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
        "applications": [{"name": APP, "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app",
                          "logging_config": {"enable_access_log": False}, "args": {
                              "registry_root": reg.root, "alias_poll_interval_s": 0.5,
                              "models": [{"name": "lm", "placement": "ingress", "generation": {"max_num_seqs": 8},
                                          "versions": [{"version": "production", "weight": 1},
                                                       {"version": 2, "weight": 0}],
                                          "shadow": {"version": 2, "share": 1.0}}],
                              "ingress": {"ray_actor_options": {"num_cpus": 0.5}}}}],
    })
    with httpx.Client(base_url=URL, timeout=60) as client:
        for v in (1, 2):
            wait_until(lambda v=v: client.get(f"/v2/models/lm/versions/{v}/ready").status_code == 200, 120)
        yield client, reg
    serve.shutdown()


def test_every_route_is_mirrored_and_prometheus_shows_the_candidates_agreement(served):
    client, _ = served
    labels = {"app": APP, "model": "lm", "version": "2"}
    before = scrape(RAY_SHADOW_AGREEMENT_COUNT, **labels)
    versions = []
    for i, prompt in enumerate(PROMPTS[:4]):
        r = client.post("/v1/completions", json={"model": "lm", "prompt": prompt, "max_tokens": 8, "temperature": 0})
        versions.append(r.headers["x-model-version"])
        r = client.post("/v1/completions", json={"model": "lm", "prompt": prompt, "max_tokens": 8,
                                                 "temperature": 0.9, "seed": i})  # sampled, seeded
        versions.append(r.headers["x-model-version"])
        r = client.post("/v2/models/lm/generate", json={"text_input": prompt, "max_tokens": 8, "temperature": 0})
        versions.append(r.headers["x-model-version"])
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "lm", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
                "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200 and any(line == "data: [DONE]" for line in r.iter_lines())
            versions.append(r.headers["x-model-version"])
    assert set(versions) == {"1"}  # callers get the primary's answers only
    wait_until(lambda: scrape(RAY_SHADOW_AGREEMENT_COUNT, **labels) - before >= 16, 30)
    disagreed = scrape(RAY_SHADOW_AGREEMENT_BUCKET, **labels, le="1e-06")
    assert disagreed == 0, f"{disagreed} of the identical candidate's mirrored generations disagreed"
    assert scrape(RAY_REQUEST_LATENCY_COUNT, **labels, protocol="shadow", status="200") >= 16
    assert scrape(RAY_TIME_TO_FIRST_TOKEN_COUNT, **labels) >= 16  # the candidate's TTFT, from mirrored calls


def Load() -> SteadyRequests:  # noqa: N802 - reads as the class it was
    """Steady greedy completions, counting what callers see."""
    return SteadyRequests(URL, "/v1/completions", lambda i: {
        "model": "lm", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 8, "temperature": 0})


def test_the_controller_judges_ttft_and_itl_and_promotes_an_identical_candidate(served):
    from maas_ray.rollout import RolloutConfig, rollout_status, start_rollout

    _, reg = served
    config = RolloutConfig(app=APP, model="lm", candidate=2, shadow_s=3, steps=[50, 100], interval_s=3,
                           min_requests=5, min_latency_samples=5, min_generation_agreement=0.9,
                           # the ratios' own numbers are recorded; a shared box's noise must not decide
                           max_ttft_p99_ratio=20.0, max_itl_p99_ratio=20.0)
    with Load() as load:
        time.sleep(1)
        start_rollout(config, reg.root)
        deadline = time.monotonic() + 90
        state = None
        while time.monotonic() < deadline:
            state = rollout_status(APP, "lm")
            if state and state["phase"] in ("promoted", "rolled_back", "aborted"):
                break
            time.sleep(0.5)
        time.sleep(1.5)  # requests after the promotion reach the candidate through the alias
    assert state["kind"] == "generative" and state["phase"] == "promoted", state
    shadow = state["history"][0]
    ev = shadow["evidence"]
    print("shadow window:", {k: ev[k] for k in ("candidate_requests", "error_rate", "ttft_p99_ratio",
                                                "itl_p99_ratio", "agreement", "compared")})
    assert shadow["phase"] == "shadow" and ev["kind"] == "generative" and shadow["verdict"] == "pass"
    assert ev["ttft_p99_ratio"] is not None and ev["itl_p99_ratio"] is not None
    assert ev["agreement"] == 1.0 and ev["compared"] >= 5 and ev["error_rate"] == 0
    assert reg.resolve("lm", "production") == 2
    assert [s for s in load.seen if s[0] != 200] == []
    assert {v for _, v in load.seen[-5:]} == {"2"}
