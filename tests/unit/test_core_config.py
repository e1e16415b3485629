"""The ingress core's user_config: weights stated once (in args), a YAML user_config merged over
what the args built (traffic per model, batching per field), and nothing applied when any of it
is wrong. A real core over a real registry and onnxruntime, without Ray Serve."""

from __future__ import annotations

import pytest

from maas_ray.errors import ConfigError, ModelNotFoundError
from maas_ray.registry import Registry
from maas_ray.serving.config import AppArgs
from maas_ray.serving.core import IngressCore
from tests.helpers import linear_onnx

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("registry"))
    reg = Registry(root)
    for model in ("a", "b"):
        reg.publish(model, linear_onnx(4, 3, seed=1))
        reg.publish(model, linear_onnx(4, 3, seed=2))
    reg.set_alias("a", "production", 1)
    args = AppArgs.model_validate({
        "registry_root": root,
        "models": [
            {"name": "a", "placement": "ingress", "versions": [{"version": "production", "weight": 90},
                                                               {"version": 2, "weight": 10}],
             "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.002}},
            {"name": "b", "placement": "ingress", "versions": [{"version": 1, "weight": 1}, {"version": 2, "weight": 0}]},
        ],
    })
    routes = {"a": {1: {}, 2: {}}, "b": {1: {}, 2: {}}}
    resolved = {"a": {"production": 1, "2": 2}, "b": {"1": 1, "2": 2}}
    return IngressCore(args, routes, resolved)


def _batching(core, model, version):
    batched = core.versions.slots[model][version].route.local.batched
    return batched.max_batch_size, batched.queue


def test_the_args_weights_apply_without_any_user_config(core):
    core.reconfigure(core.args.ingress_user_config())
    assert core.versions.weights == {"a": {1: 90.0, 2: 10.0}, "b": {1: 1.0, 2: 0.0}}


def test_a_user_config_overrides_only_the_models_it_names(core):
    core.reconfigure({"traffic": {"b": {"1": 0, "2": 5}}})
    assert core.versions.weights["b"] == {1: 0.0, 2: 5.0}
    assert core.versions.weights["a"] == {1: 90.0, 2: 10.0}  # from args, not dropped
    core.reconfigure({})  # the override removed: back to the args
    assert core.versions.weights["b"] == {1: 1.0, 2: 0.0}


def test_batching_is_merged_field_by_field_with_the_built_one(core):
    core.reconfigure({"batching": {"a": {"batch_wait_timeout_s": 0.0}}})
    assert core.batching["a"] == {**core.args.models[0].batching.model_dump(), "batch_wait_timeout_s": 0.0}
    assert core.batching["a"]["max_batch_size"] == 16  # kept from args
    assert _batching(core, "a", 1)[0] == 16
    core.reconfigure({"batching": {"a": {"max_batch_size": 4}}})
    assert _batching(core, "a", 2)[0] == 4


@pytest.mark.parametrize("user_config, message", [
    ({"traffic": {"a": {"production": -1}}}, "user_config.traffic.a.production: weight must be a number >= 0"),
    ({"traffic": {"a": {"7": 1}}}, "user_config.traffic.a: version '7' is not deployed"),
    ({"traffic": {"a": {"production": 0, "2": 0}}}, "user_config.traffic.a: all weights are 0"),
    ({"traffic": ["a"]}, "user_config.traffic: expected {model: ...}"),
    ({"batching": {"a": {"max_batch_size": 0}}}, "user_config.batching.a: max_batch_size"),
    ({"shadow": {"a": {"version": 9, "share": 0.5}}}, "9"),
])
def test_a_bad_user_config_is_refused_whole(core, user_config, message):
    core.reconfigure({"traffic": {"b": {"1": 3, "2": 1}}})
    before = (dict(core.versions.weights), dict(core.batching), dict(core.shadow.targets))
    bad = {**user_config, "traffic": {"b": {"1": 1, "2": 1}, **user_config.get("traffic", {})}} \
        if isinstance(user_config.get("traffic", {}), dict) else user_config
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("(", r"\(")):
        core.reconfigure(bad)
    assert (core.versions.weights, core.batching, core.shadow.targets) == before  # b's 1:1 not applied either


def test_an_unknown_model_in_user_config_is_refused(core):
    with pytest.raises(ModelNotFoundError):
        core.reconfigure({"traffic": {"nope": {"1": 1}}})


def test_health_checks_keep_loops_with_nothing_to_do_and_restart_failed_ones(core, caplog):
    """A static app's dynamic-refresh loop returns at once: that is not a stopped loop (it was
    logged as an error and every loop restarted at each health check). A loop that raised is."""
    import asyncio

    async def scenario():
        core.ensure_background()
        await asyncio.sleep(0.05)  # the loops with nothing to do in this app return
        assert any(t.done() for t in core._background)
        first = list(core._background)
        core.check_health()
        assert core._background == first and "background loop stopped" not in caplog.text

        async def broken():
            raise RuntimeError("registry gone")

        core._background.append(asyncio.get_running_loop().create_task(broken()))
        await asyncio.sleep(0)
        core.check_health()
        assert "background loop stopped" in caplog.text and core._background != first
        for task in core._background:
            task.cancel()
        core._background = []

    asyncio.run(scenario())
