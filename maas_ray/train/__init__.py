"""Distributed data-parallel training with Ray Train, export and publish."""

from maas_ray.train.config import TrainConfig
from maas_ray.train.pipeline import TrainReport, train_and_publish

__all__ = ["TrainConfig", "TrainReport", "train_and_publish"]
