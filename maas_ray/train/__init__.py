"""Distributed data-parallel training with Ray Train, export and publish."""

from typing import Any

__all__ = ["TrainConfig", "TrainReport", "train_and_publish"]


def __getattr__(name: str) -> Any:
    # Lazy: `maas_ray.train.data` (splits, tokenizer) is used by `maas optimize`, which must
    # not import torch; importing the package used to pull in pipeline.py and torch with it.
    if name == "TrainConfig":
        from maas_ray.train.config import TrainConfig

        return TrainConfig
    if name in ("TrainReport", "train_and_publish"):
        from maas_ray.train import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
