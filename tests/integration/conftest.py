"""One real Ray instance for the whole integration session; Serve is shut down between modules."""

import os
import time

import pytest

from tests.helpers import TEST_ENV
from tests.helpers.s3 import moto_s3

NUM_CPUS = 4  # logical CPUs on a 2-core box: room for the ingress, two versions and a scale-up


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    for k, v in TEST_ENV.items():
        os.environ.setdefault(k, v)
    ray.init(num_cpus=NUM_CPUS, logging_level="WARNING", log_to_driver=True)
    yield ray.get_runtime_context().gcs_address
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def fresh_metrics_agent(ray_cluster):
    """Restart the session's Ray for a module that reads counters from Prometheus. Ray's metrics
    agent keeps at most 2,000 label sets per metric name for its lifetime (OpenTelemetry's
    cardinality limit, deployments/monitoring/README.md); a whole integration session's apps,
    statuses and replica WorkerIds approach it, and past it new series are never exported."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    ray.init(num_cpus=NUM_CPUS, logging_level="WARNING", log_to_driver=True)
    yield ray.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def registry_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="session")
def trained(ray_cluster, registry_root, tmp_path_factory):
    """digits:1 trained from scratch, digits:2 fine-tuned from it (parent recorded)."""
    from maas_ray.registry import Registry
    from maas_ray.train import TrainConfig, train_and_publish

    runs = str(tmp_path_factory.mktemp("runs"))
    reg = Registry(registry_root)
    first = train_and_publish(
        TrainConfig.load("deployments/train/digits.yaml", storage_path=runs, run_name="digits-v1"), reg
    )
    second = train_and_publish(
        TrainConfig.load(
            "deployments/train/digits.yaml", storage_path=runs, run_name="digits-v2",
            epochs=8, lr=1e-3, parent="digits:1",
        ),
        reg,
    )
    return first, second


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 for the module, bucket ``tests.helpers.s3.BUCKET``; yields
    ``host:port``, with fake AWS credentials in the environment meanwhile."""
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def serve_cleanup(ray_cluster):
    from ray import serve

    yield
    serve.shutdown()
    time.sleep(0.5)
