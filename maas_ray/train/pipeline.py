"""train -> best checkpoint -> ONNX export -> parity check -> publish."""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from maas_ray.errors import ConfigError, MaasError
from maas_ray.registry import Manifest, ParentRef, ProcessorSpec, Registry
from maas_ray.train.config import TrainConfig
from maas_ray.train.data import load_dataset
from maas_ray.train.export import export_onnx, parity_check, state_from_onnx
from maas_ray.train.loop import accuracy, load_state, train_loop_per_worker
from maas_ray.train.model import MLPClassifier

logger = logging.getLogger(__name__)

# How sklearn's digits look to the served image preprocessor: 8x8 grey, ink bright,
# raw arrays in the dataset's 0..16 units; PNG/JPEG digits are dark ink on white.
DIGITS_PREPROCESSOR = ProcessorSpec(
    name="image",
    params={"height": 8, "width": 8, "channels": 1, "pixel_max": 16.0, "invert_encoded": True},
)


class TrainReport(BaseModel):
    """What a training run produced and measured."""

    model_config = ConfigDict(protected_namespaces=())

    manifest: Manifest = Field(description="The published version.")
    test_accuracy: float
    parity_max_abs_diff: float
    epochs_run: int = Field(description="Epochs run by the final (possibly restarted) worker group.")
    resumed_from_epoch: int = Field(description="0, or the epoch a restarted run resumed at.")
    mean_epoch_seconds: float
    wall_seconds: float
    checkpoint_path: str


def _cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def train_and_publish(cfg: TrainConfig, registry: Optional[Registry] = None) -> TrainReport:
    """Run DDP training on the connected Ray cluster (started locally if none) and publish."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig
    from ray.train.torch import TorchTrainer

    registry = registry or Registry()
    if not ray.is_initialized():
        ray.init()
    use_gpu = _cluster_has_gpu() if cfg.use_gpu is None else cfg.use_gpu
    loop_config: dict[str, Any] = {"train_config": cfg.model_dump()}
    parent_ref = None
    if cfg.parent:
        pmodel, pref = cfg.parent.split(":")
        loaded = registry.load(pmodel, pref)
        parent_ref = ParentRef(model=pmodel, version=loaded.manifest.version)
        ds = load_dataset(cfg.data, test_fraction=cfg.test_fraction, seed=cfg.seed)
        probe = MLPClassifier(ds.num_features, len(ds.class_labels), cfg.hidden_sizes, cfg.dropout)
        loop_config["init_state"] = state_from_onnx(loaded.model_bytes, probe)

    run_name = cfg.run_name or f"{cfg.model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute="test_accuracy",
                checkpoint_score_order="max",
            ),
            logging_config=LoggingConfig(log_level="WARNING"),  # our loop logs progress itself
        ),
    )
    logger.info("training %s: %d %s workers, run %s", cfg.model_name, cfg.num_workers, "GPU" if use_gpu else "CPU", run_name)
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise MaasError(f"training failed: {result.error}") from result.error
    best = result.get_best_checkpoint("test_accuracy", "max") or result.checkpoint
    if best is None:
        raise MaasError("training produced no checkpoint")
    with best.as_directory() as path:
        state = load_state(path)

    model = MLPClassifier(**state["model_args"])
    model.load_state_dict(state["model"])
    ds = load_dataset(cfg.data, test_fraction=cfg.test_fraction, seed=cfg.seed)
    test_acc = accuracy(model, torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test))
    if test_acc < cfg.min_test_accuracy:
        raise MaasError(f"test accuracy {test_acc:.4f} is below min_test_accuracy {cfg.min_test_accuracy}")
    onnx_bytes = export_onnx(model, ds.num_features)
    diff = parity_check(model, onnx_bytes, ds.x_test.astype(np.float32), cfg.parity_tolerance)

    labels = state["class_labels"]
    if len(labels) != state["model_args"]["num_classes"]:
        raise ConfigError(f"class_labels has {len(labels)} names for {state['model_args']['num_classes']} classes")
    manifest = registry.publish(
        cfg.model_name,
        onnx_bytes,
        preprocessor=DIGITS_PREPROCESSOR if ds.is_digits else ProcessorSpec(name="tensor"),
        postprocessor=ProcessorSpec(name="classification", params={"labels": labels, "top_k": 3}),
        metrics={"test_accuracy": test_acc, "parity_max_abs_diff": diff, "best_epoch": float(state["epoch"])},
        training_config=cfg.model_dump(mode="json"),
        parent=parent_ref,
        description=f"MLP {state['model_args']['hidden_sizes']} trained on {cfg.data}",
    )
    ret = result.return_value or {}
    epoch_seconds = ret.get("epoch_seconds") or [float("nan")]
    return TrainReport(
        manifest=manifest,
        test_accuracy=test_acc,
        parity_max_abs_diff=diff,
        epochs_run=len(ret.get("epoch_seconds", [])),
        resumed_from_epoch=int(ret.get("start_epoch", 0)),
        mean_epoch_seconds=float(np.mean(epoch_seconds)),
        wall_seconds=wall,
        checkpoint_path=best.path,
    )
