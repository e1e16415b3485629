"""build_app validates its args against the registry at build time (no Ray cluster needed)."""

import pytest

from maas_ray.errors import ConfigError
from maas_ray.serving import build_app
from tests.helpers.apps import one_model_args, two_version_registry

pytestmark = pytest.mark.unit


@pytest.fixture
def root(tmp_path):
    return two_version_registry(str(tmp_path))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"versions": [{"version": 9}]}, "models.0.versions.0.version: model 'm' has no version 9; versions are [1, 2]"),
        ({"versions": [{"version": "staging"}]}, "models.0.versions.0.version: model 'm' has no version or alias 'staging'"),
        ({"versions": [{"version": 1, "weight": -1}]}, "models.0.versions.0.weight: Input should be greater than or equal to 0 (got -1)"),
        ({"versions": [{"version": 1, "weight": 0}, {"version": 2, "weight": 0}]}, "all version weights are 0"),
        ({"versions": [{"version": 1}, {"version": "production"}]}, "two entries resolve to the same version: [1, 1]"),
        ({"versions": [{"version": 1}], "postprocessor": {"name": "softmaxx"}}, "models.0.postprocessor: unknown postprocessor 'softmaxx'"),
        ({"versions": [{"version": 1}], "placement": "sideways"}, "models.0.placement: Input should be 'split', 'fused' or 'ingress' (got 'sideways')"),
        ({"versions": [{"version": 1}], "inference": {"ray_actor_options": {"num_gpus": -0.5}}}, "num_gpus must be a number >= 0, got -0.5"),
        ({"versions": [{"version": 1}], "inference": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}}}, "not both"),
        ({"versions": [{"version": 1}], "placement": "ingress", "inference": {"num_replicas": 2}},
         "['inference'] options do not apply to placement 'ingress'"),
        ({"versions": [{"version": 1}, {"version": 2, "weight": 0}], "shadow": {"version": 2, "min_overlap": 1.5}},
         "models.0.shadow.min_overlap: Input should be less than or equal to 1 (got 1.5)"),
    ],
)
def test_bad_config_fails_at_build_time_naming_field_and_value(root, bad, message):
    with pytest.raises(ConfigError) as info:
        build_app(one_model_args(root, **bad))
    assert message in str(info.value)


def test_unknown_model_fails_at_build_time(root):
    with pytest.raises(ConfigError, match="models.0.versions.0.version: model 'x' does not exist"):
        build_app({"registry_root": root, "models": [{"name": "x", "versions": [{"version": 1}]}]})


def test_deployment_yamls_parse(tmp_path):
    from maas_ray.serving.deploy import load_config

    for name in ("digits-cpu.yaml", "digits-gpu.yaml"):
        schema = load_config(f"deployments/{name}")
        app = schema.applications[0]
        assert app.import_path == "maas_ray.serving.app:build_app"
        from maas_ray.serving.app import parse_args

        parsed = parse_args(app.args)
        assert [v.weight for v in parsed.models[0].versions] == [90, 10]


def test_default_placement_is_ingress_on_cpu_and_fused_on_gpu():
    from maas_ray.serving.config import ModelConfig

    assert ModelConfig(name="m", versions=[{"version": 1}]).placement == "ingress"
    gpu = ModelConfig(name="m", versions=[{"version": 1}], inference={"ray_actor_options": {"num_gpus": 0.5}})
    assert gpu.placement == "fused"
    assert ModelConfig(name="m", versions=[{"version": 1}], device="cuda").placement == "fused"


def test_calls_in_flight_follow_the_inference_deployments_size():
    from maas_ray.serving.config import DeploymentOptions

    assert DeploymentOptions().calls_in_flight(per_replica=2) == 2
    assert DeploymentOptions(num_replicas=3).calls_in_flight(per_replica=2) == 6
    # autoscaling: Serve scales on ongoing calls, so enough may be ongoing to reach max_replicas
    scaled = DeploymentOptions(autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3})
    assert scaled.calls_in_flight(per_replica=2) == 12
    assert DeploymentOptions(autoscaling_config={"max_replicas": 5}).calls_in_flight(per_replica=2) == 10  # target 2
    assert DeploymentOptions(num_replicas="auto").calls_in_flight(per_replica=2) >= 100
    # several ingress replicas share the budget (at least one call each), so the replicas
    # see the same load however many ingress replicas send it
    assert DeploymentOptions(num_replicas=3).calls_in_flight(per_replica=2, callers=2) == 3
    assert DeploymentOptions().calls_in_flight(per_replica=2, callers=2) == 1
    assert DeploymentOptions().calls_in_flight(per_replica=2, callers=5) == 1
    assert scaled.calls_in_flight(per_replica=2, callers=5) == 3  # ceil(12 / 5)


def test_min_replicas_is_the_fixed_count_or_the_autoscaling_floor():
    from maas_ray.serving.config import DeploymentOptions

    assert DeploymentOptions().min_replicas() == 1
    assert DeploymentOptions(num_replicas=2).min_replicas() == 2
    assert DeploymentOptions(num_replicas=0).min_replicas() == 1
    assert DeploymentOptions(autoscaling_config={"min_replicas": 3, "max_replicas": 5}).min_replicas() == 3
    assert DeploymentOptions(autoscaling_config={"min_replicas": 0, "max_replicas": 5}).min_replicas() == 1
    assert DeploymentOptions(num_replicas="auto").min_replicas() == 1


def test_a_shadow_min_overlap_in_args_reaches_the_ingress_user_config(root):
    from maas_ray.serving.config import AppArgs

    args = AppArgs.model_validate(one_model_args(
        root, versions=[{"version": 1}, {"version": 2, "weight": 0}], shadow={"version": 2, "min_overlap": 0.8}))
    assert args.ingress_user_config()["shadow"] == {"m": {"version": "2", "share": 1.0, "min_overlap": 0.8}}
