"""The GPU path for real: CUDA provider and DDP on GPU. Skipped on machines without a CUDA GPU."""

import numpy as np
import pytest

from maas_ray.runtime import CUDA, create_session
from tests.helpers import linear_onnx

pytestmark = [pytest.mark.integration, pytest.mark.gpu]


def test_onnxruntime_runs_on_cuda():
    session = create_session(linear_onnx(), device="cuda")
    assert session.get_providers()[0] == CUDA
    out = session.run(None, {"input": np.ones((8, 4), np.float32)})[0]
    assert out.shape == (8, 3)


@pytest.mark.slow
def test_ddp_training_on_gpu(ray_cluster, tmp_path):
    import ray

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the Ray cluster has no GPU resource")
    from maas_ray.registry import Registry
    from maas_ray.train import TrainConfig, train_and_publish

    cfg = TrainConfig.load("deployments/train/digits.yaml", use_gpu=True, num_workers=1,
                           storage_path=str(tmp_path / "runs"))
    report = train_and_publish(cfg, Registry(str(tmp_path / "reg")))
    assert report.test_accuracy >= 0.97 and report.parity_max_abs_diff <= 1e-4
