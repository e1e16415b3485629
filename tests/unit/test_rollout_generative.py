"""Generative rollout guards on synthetic windows (no Ray): TTFT and ITL p99 ratios with their
minimum evidence, error rate over every route, agreement of mirrored generations; the config;
and the controller picking the guards by the candidate's manifest kind."""

import math

import pytest
from pydantic import ValidationError

from maas_ray.rollout.controller import RolloutConfig, RolloutController, version_kind
from maas_ray.rollout.evidence import Snapshot, judge_generative, quantile
from maas_ray.serving.metric_names import (
    RAY_INTER_TOKEN_LATENCY_BUCKET,
    RAY_INTER_TOKEN_LATENCY_COUNT,
    RAY_REQUEST_LATENCY_COUNT,
    RAY_SHADOW_AGREEMENT_BUCKET,
    RAY_SHADOW_AGREEMENT_COUNT,
    RAY_TIME_TO_FIRST_TOKEN_BUCKET,
    RAY_TIME_TO_FIRST_TOKEN_COUNT,
)

pytestmark = pytest.mark.unit
BOUNDS = (0.001, 0.01, 0.1, 1.0, math.inf)


def _hist(values, bucket, count, version, n, at):
    """``n`` observations of ``at`` seconds in a histogram with no protocol label."""
    values[(count, str(version), None, None, None)] = n
    for bound in BOUNDS:
        values[(bucket, str(version), None, None, "+Inf" if math.isinf(bound) else repr(bound))] = \
            n if bound >= at else 0


def window(*, cand_ttft=0.05, base_ttft=0.05, cand_itl=0.005, base_itl=0.005, n=20, base_n=20,
           requests=None, compared=0, disagreed=0):
    values = {}
    _hist(values, RAY_TIME_TO_FIRST_TOKEN_BUCKET, RAY_TIME_TO_FIRST_TOKEN_COUNT, 2, n, cand_ttft)
    _hist(values, RAY_TIME_TO_FIRST_TOKEN_BUCKET, RAY_TIME_TO_FIRST_TOKEN_COUNT, 1, base_n, base_ttft)
    _hist(values, RAY_INTER_TOKEN_LATENCY_BUCKET, RAY_INTER_TOKEN_LATENCY_COUNT, 2, n * 8, cand_itl)
    _hist(values, RAY_INTER_TOKEN_LATENCY_BUCKET, RAY_INTER_TOKEN_LATENCY_COUNT, 1, base_n * 8, base_itl)
    for (version, protocol, status), count in (requests or {(2, "shadow", 200): n, (1, "openai", 200): base_n}).items():
        values[(RAY_REQUEST_LATENCY_COUNT, str(version), protocol, str(status), None)] = count
    if compared:
        values[(RAY_SHADOW_AGREEMENT_COUNT, "2", None, None, None)] = compared
        values[(RAY_SHADOW_AGREEMENT_BUCKET, "2", None, None, "1e-06")] = disagreed
    return Snapshot(values)


GUARDS = dict(max_error_rate=0.05, max_ttft_p99_ratio=1.5, max_itl_p99_ratio=1.5, min_agreement=0.9,
              min_requests=10, min_latency_samples=10)


def test_an_identical_candidate_passes_with_its_ratios_and_agreement():
    ev = judge_generative(window(compared=20), 2, 1, **GUARDS)
    assert ev.failed == [] and ev.enough and ev.kind == "generative"
    assert ev.ttft_p99_ratio == pytest.approx(1.0) and ev.itl_p99_ratio == pytest.approx(1.0)
    assert ev.agreement == 1.0 and ev.compared == 20 and ev.p99_ratio is None  # request p99: not a guard here
    assert set(ev.to_dict()) >= {"ttft_p99_ratio", "itl_p99_ratio", "candidate_ttft_p99_s", "baseline_itl_p99_s"}


def test_each_generative_guard_fails_naming_itself_with_numbers():
    requests = {(2, "shadow", 200): 15, (2, "shadow", 503): 1, (2, "http_generate", 500): 4, (1, "openai", 200): 20}
    ev = judge_generative(window(cand_ttft=0.5, cand_itl=0.05, requests=requests, compared=20, disagreed=5),
                          2, 1, **GUARDS)
    assert [f.split(" p99")[0].split(" rate")[0].split(" ")[0] for f in ev.failed] == \
        ["error", "TTFT", "ITL", "agreement"]
    assert "5 of 20 requests" in ev.failed[0]  # errors over every route, live and mirrored
    assert "TTFT p99 ratio" in ev.failed[1] and "ms" in ev.failed[1]
    assert "15 of 20 mirrored generations" in ev.failed[3]


def test_ratios_wait_for_the_minimum_evidence_on_both_sides():
    ev = judge_generative(window(cand_ttft=0.5, n=5), 2, 1, **GUARDS)  # 5 candidate TTFTs < 10
    assert ev.ttft_p99_ratio is None and not ev.enough and ev.failed == []
    ev = judge_generative(window(cand_ttft=0.5, base_n=0), 2, 1, **GUARDS)  # the baseline had no traffic
    assert ev.ttft_p99_ratio is None and ev.failed == []
    straggler = window(cand_itl=0.5, base_n=1)  # one late baseline generation: 8 gaps, 1 TTFT
    ev = judge_generative(straggler, 2, 1, **{**GUARDS, "min_latency_samples": 5})
    assert ev.itl_p99_ratio is None and ev.failed == []  # counted in generations, not gaps
    ev = judge_generative(window(cand_ttft=0.5, base_n=0), 2, 1, **GUARDS, baseline_fallback=(0.05, 0.005))
    assert ev.ttft_p99_ratio == pytest.approx((0.1 + 0.9 * 0.99) / 0.05)  # the fallback stands in and ev.failed[0].startswith("TTFT")
    ev = judge_generative(window(compared=20, disagreed=20), 2, 1, **{**GUARDS, "min_agreement": None})
    assert ev.agreement == 0.0 and ev.failed == []  # the agreement guard off


def test_a_window_that_dips_where_a_replica_restarted_reads_monotone():
    assert quantile([(0.01, 10.0), (0.1, 8.0), (math.inf, 10.0)], 0.99) == pytest.approx(0.0099)
    assert quantile([(0.01, -3.0), (math.inf, -3.0)], 0.99) is None


def test_rollout_config_generative_fields_validate_quoting_the_value():
    cfg = RolloutConfig(app="a", model="m", candidate=2)
    assert (cfg.max_ttft_p99_ratio, cfg.max_itl_p99_ratio, cfg.min_generation_agreement, cfg.min_overlap,
            cfg.min_latency_samples) == (1.5, 1.5, 0.9, 0.5, 10)
    with pytest.raises(ValidationError, match=r"min_overlap[\s\S]*input_value=1.5"):
        RolloutConfig(app="a", model="m", candidate=2, min_overlap=1.5)
    with pytest.raises(ValidationError, match=r"max_ttft_p99_ratio[\s\S]*input_value=0"):
        RolloutConfig(app="a", model="m", candidate=2, max_ttft_p99_ratio=0)
    assert RolloutConfig(app="a", model="m", candidate=2, min_generation_agreement=None).min_generation_agreement \
        is None


class _Manifest:
    def __init__(self, kind):
        self.kind = kind


class _Registry:
    def __init__(self, kinds):
        self.kinds = kinds

    def describe(self, model, version):
        return _Manifest(self.kinds[version])


def test_the_controller_judges_a_generative_candidate_with_the_generative_guards():
    assert version_kind(_Registry({2: "generative"}), "m", 2) == "generative"
    controller = RolloutController.__new__(RolloutController)  # no thread, no Ray: the judging only
    controller.config = RolloutConfig(app="a", model="m", candidate=2, min_requests=10)
    controller.state = {"baseline": 1}
    controller.generative = True
    ev = controller._judge(window(cand_ttft=0.5, compared=20))
    assert ev.kind == "generative" and ev.failed[0].startswith("TTFT p99 ratio")
    controller.generative = False
    ev = controller._judge(window(cand_ttft=0.5, compared=20))
    assert ev.kind == "predictive"
