"""The ``dynamic:`` section of an app's args: its validation (bad values quoted), which registry
names it serves, the per-version config it implies, and the model pool deployment build_app binds
for it (inspected without starting Serve)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from maas_ray.errors import ConfigError
from maas_ray.registry import Registry
from maas_ray.serving import build_app
from maas_ray.serving.app import DEFAULTS, POOL_NAME
from maas_ray.serving.config import AppArgs, DynamicModels, HotModels
from maas_ray.serving.pool import ModelPool
from maas_ray.serving.pool_router import ROUTER_PATH
from tests.helpers import linear_onnx
from tests.helpers.apps import bound_deployments

pytestmark = pytest.mark.unit


# ---- DynamicModels ------------------------------------------------------------------------------
def test_defaults_serve_every_model_by_its_production_alias():
    d = DynamicModels()
    assert d.models == ["*"] and d.exclude == [] and d.version == "production"
    assert d.memory_budget_bytes == 2 << 30 and d.max_models_per_replica is None
    assert d.hot == HotModels() and d.hot.target_utilization == 0.7
    assert d.matches("anything") and d.matches("fraud-eu")


@pytest.mark.parametrize("bad", ["a/b", "", "x" * 129])
@pytest.mark.parametrize("field", ["models", "exclude"])
def test_a_bad_pattern_is_refused_and_quoted(field, bad):
    with pytest.raises(ValidationError) as err:
        DynamicModels.model_validate({field: ["ok-*", bad]})
    assert repr(bad) in str(err.value)


@pytest.mark.parametrize(
    ("fields", "quoted"),
    [
        ({"models": []}, "models"),
        ({"memory_budget_bytes": 1000}, "1000"),
        ({"max_models_per_replica": 0}, "0"),
        ({"load_timeout_s": 0}, "load_timeout_s"),
        ({"max_concurrent_loads": 0}, "max_concurrent_loads"),
        ({"failure_ttl_s": -1}, "-1"),
        ({"refresh_interval_s": 0}, "refresh_interval_s"),
        ({"hot": {"target_utilization": 1.5}}, "1.5"),
        ({"hot": {"target_utilization": 0}}, "target_utilization"),
        ({"hot": {"max_replicas_per_model": 0}}, "max_replicas_per_model"),
        ({"hot": {"window_s": 0}}, "window_s"),
        ({"pool": {"num_replicas": -2}}, "-2"),
        ({"pool": {"ray_actor_options": {"num_cpus": "many"}}}, "'many'"),
        ({"budget": 5}, "budget"),  # a misspelt field is not silently ignored
    ],
)
def test_bad_values_are_refused_naming_the_field_or_value(fields, quoted):
    with pytest.raises(ValidationError) as err:
        DynamicModels.model_validate(fields)
    assert quoted in str(err.value)


def test_bad_values_reach_the_user_as_a_config_error_with_the_path():
    with pytest.raises(ConfigError) as err:
        build_app({"registry_root": "/nonexistent", "dynamic": {"models": ["a/b"]}})
    assert err.value.status_code == 400
    assert "dynamic.models" in str(err.value) and "'a/b'" in str(err.value)


def test_patterns_and_exclusions_choose_the_served_names():
    d = DynamicModels(models=["fraud-*", "churn"], exclude=["fraud-test*"])
    assert d.matches("fraud-eu") and d.matches("churn")
    assert not d.matches("fraud-test-1")  # excluded
    assert not d.matches("churn-2") and not d.matches("other")  # matched by no pattern
    assert not d.matches("FRAUD-eu")  # case matters, as registry names do
    assert DynamicModels(models=["m?"]).matches("m1") and not DynamicModels(models=["m?"]).matches("m10")


def test_version_config_is_a_fused_config_of_the_sections_settings():
    d = DynamicModels(batching={"max_batch_size": 8}, pool={"ray_actor_options": {"num_cpus": 0.5}},
                      max_items=7, max_text_chars=99)
    cfg = d.version_config("fraud-eu", 3)
    assert cfg.name == "fraud-eu" and [v.version for v in cfg.versions] == [3]
    assert cfg.placement == "fused"
    assert cfg.batching.max_batch_size == 8
    assert cfg.inference.ray_actor_options == {"num_cpus": 0.5}
    assert cfg.max_items == 7 and cfg.max_text_chars == 99


# ---- AppArgs -----------------------------------------------------------------------------------
def test_an_app_may_serve_dynamic_models_only():
    args = AppArgs.model_validate({"registry_root": "/r", "dynamic": {}})
    assert args.models == [] and args.dynamic is not None
    assert args.ingress_user_config() == {"traffic": {}, "batching": {}, "shadow": {}}


def test_an_app_with_neither_models_nor_dynamic_is_refused():
    with pytest.raises(ValidationError, match="neither is set"):
        AppArgs.model_validate({"registry_root": "/r"})
    with pytest.raises(ConfigError, match="`models`, `dynamic`, or both: neither is set"):
        build_app({"registry_root": "/r"})
    with pytest.raises(ValidationError, match="neither is set"):
        AppArgs.model_validate({"registry_root": "/r", "models": [], "dynamic": None})


def test_models_listed_twice_are_still_refused_beside_dynamic():
    with pytest.raises(ValidationError, match="models listed twice"):
        AppArgs.model_validate({"registry_root": "/r", "dynamic": {},
                                "models": [{"name": "a", "versions": [{"version": 1}]},
                                           {"name": "a", "versions": [{"version": 2}]}]})


# ---- build_app ---------------------------------------------------------------------------------
@pytest.fixture
def root(tmp_path):
    reg = Registry(str(tmp_path))
    reg.publish("m", linear_onnx())
    reg.publish("other", linear_onnx(seed=1))
    return str(tmp_path)


def test_a_dynamic_app_binds_a_model_pool_with_its_options_and_router(root):
    app = build_app({"registry_root": root,
                     "dynamic": {"models": ["m*"], "memory_budget_bytes": 64 << 20,
                                 "pool": {"num_replicas": 3, "max_ongoing_requests": 16,
                                          "ray_actor_options": {"num_cpus": 0.5}}}})
    deployments = bound_deployments(app)
    assert sorted(deployments) == ["Ingress", POOL_NAME]
    pool = deployments[POOL_NAME]
    assert pool.func_or_class is ModelPool
    assert pool.num_replicas == 3 and pool.max_ongoing_requests == 16
    assert pool.ray_actor_options == {"num_cpus": 0.5}
    assert pool._deployment_config.request_router_config.request_router_class == ROUTER_PATH
    kwargs = pool.init_kwargs
    assert kwargs["registry_root"] == root
    assert DynamicModels.model_validate(kwargs["dynamic"]) == DynamicModels(
        models=["m*"], memory_budget_bytes=64 << 20,
        pool={"num_replicas": 3, "max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.5}})
    assert set(kwargs) == {"registry_root", "dynamic", "limits", "security"}
    ingress = deployments["Ingress"]
    assert ingress.init_kwargs["pool"]._bound_deployment is pool  # the ingress gets the pool's handle
    assert ingress.init_kwargs["routes"] == {} and ingress.init_kwargs["resolved"] == {}
    assert ingress.user_config["traffic"] == {}
    assert AppArgs.model_validate(ingress.init_kwargs["args"]).dynamic.models == ["m*"]


def test_the_pool_gets_the_defaults_and_the_apps_queue_bound(root):
    app = build_app({"registry_root": root, "dynamic": {}, "limits": {"max_queued_requests": 77}})
    pool = bound_deployments(app)[POOL_NAME]
    assert pool.max_ongoing_requests == DEFAULTS["pool"]["max_ongoing_requests"]
    assert pool.ray_actor_options == DEFAULTS["pool"]["ray_actor_options"]
    assert pool.max_queued_requests == 77


def test_an_autoscaled_pool_keeps_its_autoscaling_config(root):
    app = build_app({"registry_root": root,
                     "dynamic": {"pool": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}}})
    pool = bound_deployments(app)[POOL_NAME]
    autoscaling = pool._deployment_config.autoscaling_config
    assert autoscaling is not None and autoscaling.min_replicas == 1 and autoscaling.max_replicas == 4


def test_static_models_and_a_pool_side_by_side(root):
    app = build_app({"registry_root": root, "dynamic": {"exclude": ["m"]},
                     "models": [{"name": "m", "placement": "fused", "versions": [{"version": 1}]}]})
    deployments = bound_deployments(app)
    assert sorted(deployments) == ["Ingress", POOL_NAME, "m-v1"]
    assert deployments["Ingress"].user_config["traffic"] == {"m": {"1": 1}}


def test_an_app_without_dynamic_binds_no_pool(root):
    app = build_app({"registry_root": root, "models": [{"name": "m", "placement": "ingress",
                                                        "versions": [{"version": 1}]}]})
    deployments = bound_deployments(app)
    assert list(deployments) == ["Ingress"]
    assert deployments["Ingress"].init_kwargs["pool"] is None
