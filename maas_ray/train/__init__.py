"""Distributed data-parallel training with Ray Train, export and publish.

torch is an optional extra (``pip install 'maas-ray[train]'``): only training needs it, so
serving nodes and the registry, keys, rollout and optimize commands run without it.
"""

from typing import Any

from maas_ray.errors import DependencyError

__all__ = [
    "LMTrainConfig", "LMTrainReport", "TabularTrainConfig", "TrainConfig", "TrainReport", "train_and_publish",
    "train_and_publish_lm", "train_tabular",
]

TORCH_INSTALL_HINT = "pip install 'maas-ray[train]'"


def __getattr__(name: str) -> Any:
    # Lazy: `maas_ray.train.data` (splits, tokenizer) is used by `maas optimize`, which must
    # not import torch; importing the package used to pull in pipeline.py and torch with it.
    if name == "TrainConfig":
        from maas_ray.train.config import TrainConfig

        return TrainConfig
    if name == "LMTrainConfig":  # decoder-lm language models (docs/generative.md); no torch
        from maas_ray.train.lm.config import LMTrainConfig

        return LMTrainConfig
    if name in ("TabularTrainConfig", "train_tabular"):  # trees and scikit-learn: no torch
        from maas_ray.train import tabular

        return getattr(tabular, name)
    if name in ("TrainReport", "train_and_publish", "LMTrainReport", "train_and_publish_lm"):
        try:
            from maas_ray.train import pipeline
            from maas_ray.train.lm import pipeline as lm_pipeline
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] != "torch":
                raise
            raise DependencyError(
                f"training needs torch, which is not installed: {TORCH_INSTALL_HINT} "
                "(on CPU-only machines install the CPU wheel of torch first, as .ci/setup.sh does)"
            ) from exc
        return getattr(lm_pipeline if "LM" in name or name.endswith("_lm") else pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
