"""What build_app builds (no Ray cluster): the deployments of each placement, their options and
the user_config that reweights and re-batches them live."""

import pytest

from maas_ray.registry import ProcessorSpec, Registry
from maas_ray.serving import build_app
from tests.helpers import linear_onnx
from tests.helpers.apps import bound_deployments, one_model_args, two_version_registry

pytestmark = pytest.mark.unit

SPLIT = [{"version": "production", "weight": 3}, {"version": 2, "weight": 1}]
INFERENCE = {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.25}}


@pytest.fixture
def root(tmp_path):
    return two_version_registry(str(tmp_path))


@pytest.mark.parametrize(
    ("placement", "names"),
    [
        ("split", ["Ingress", "m-v1-pre", "m-v1", "m-v1-post", "m-v2-pre", "m-v2", "m-v2-post"]),
        ("fused", ["Ingress", "m-v1", "m-v2"]),
    ],
)
def test_split_and_fused_bind_an_inference_deployment_per_version(root, placement, names):
    deployments = bound_deployments(build_app(one_model_args(root, SPLIT, placement=placement, inference=INFERENCE)))
    assert sorted(deployments) == sorted(names)
    ingress = deployments["Ingress"]
    # aliases stay aliases in the traffic (the ingress follows them when they move)
    assert ingress.user_config["traffic"] == {"m": {"production": 3, "2": 1}}
    assert ingress.user_config["batching"] == {}  # the inference replicas batch, not the ingress
    for version in (1, 2):
        infer = deployments[f"m-v{version}"]
        assert infer.ray_actor_options == INFERENCE["ray_actor_options"]
        assert infer.user_config["max_batch_size"] == 32  # batching: the replica's user_config, changed live
    for name in set(names) - {"Ingress", "m-v1", "m-v2"}:  # pre/post: the defaults, no user_config
        assert deployments[name].ray_actor_options == {"num_cpus": 0.25} and deployments[name].user_config is None


def test_ingress_placement_is_one_deployment_that_runs_the_model(root):
    deployments = bound_deployments(build_app(one_model_args(root, [{"version": 1}], placement="ingress")))
    assert list(deployments) == ["Ingress"]
    ingress = deployments["Ingress"]
    assert ingress.user_config["traffic"] == {"m": {"1": 1}}
    assert ingress.user_config["batching"]["m"]["max_batch_size"] == 32  # the ingress batches this model
    assert ingress.ray_actor_options == {"num_cpus": 1}  # a whole core: it runs onnxruntime itself


def test_a_version_with_its_own_postprocessor_builds(root):
    Registry(root).publish("m", linear_onnx(), postprocessor=ProcessorSpec(name="classification"))
    deployments = bound_deployments(build_app(one_model_args(root, [{"version": 3}])))
    assert list(deployments) == ["Ingress"]
    assert deployments["Ingress"].user_config["traffic"] == {"m": {"3": 1}}
