"""Per-version Serve deployments, and the in-process pipeline they share.

Placement (ModelConfig.placement) decides where the three stages run:

- ``split``:   Preprocess -> Inference -> Postprocess, three deployments that scale apart;
- ``fused``:   one ModelServer deployment runs pre, batched inference and post;
- ``ingress``: the ingress replica runs a LocalPipeline itself (no hops at all).

These are plain classes; :mod:`maas_ray.serving.app` turns them into deployments.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional

import numpy as np

from maas_ray.registry import Registry
from maas_ray.serving.config import BatchingConfig, ModelConfig
from maas_ray.serving.processors import make_postprocessor, make_preprocessor
from maas_ray.serving.runner import BatchedRunner, OnnxRunner

logger = logging.getLogger(__name__)
Tensors = dict[str, np.ndarray]


def replica_cpus(default: int = 1) -> int:
    """CPUs Ray assigned to this replica (rounded up): the onnxruntime thread count."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    except Exception:  # not inside a Ray worker
        return default
    return max(1, math.ceil(cpus)) if cpus else default


def load_batched_runner(registry_root: Optional[str], model: ModelConfig, version: int) -> BatchedRunner:
    loaded = Registry(registry_root).load(model.name, version)  # checksum verified
    runner = OnnxRunner(
        loaded.manifest,
        loaded.model_bytes,
        device=model.device,
        intra_op_threads=model.intra_op_threads or replica_cpus(),
    )
    runner.warm_up()
    return BatchedRunner(runner, model.batching)


class LocalPipeline:
    """pre -> batched inference -> post, all in this process."""

    def __init__(self, registry_root: Optional[str], model: ModelConfig, version: int) -> None:
        self.batched = load_batched_runner(registry_root, model, version)
        manifest = self.batched.runner.manifest
        self.pre = make_preprocessor(manifest, model.preprocessor)
        self.post = make_postprocessor(manifest, model.postprocessor)

    @property
    def provider(self) -> str:
        return self.batched.runner.provider

    def describe(self) -> dict[str, Any]:
        """Which process and onnxruntime provider run this version."""
        return {"pid": os.getpid(), "provider": self.provider}

    def reconfigure(self, batching: dict[str, Any]) -> None:
        self.batched.set_batching(BatchingConfig.model_validate(batching))

    async def infer(self, tensors: Tensors, strict: bool) -> Tensors:
        feeds = self.pre(tensors, strict_dtypes=strict)
        return self.post(await self.batched.infer(feeds))


class ModelServer:
    """Deployment for ``fused`` placement (pre+infer+post) and ``split`` inference (infer only)."""

    def __init__(self, registry_root: Optional[str], model: dict[str, Any], version: int) -> None:
        self.pipeline = LocalPipeline(registry_root, ModelConfig.model_validate(model), version)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.pipeline.reconfigure(user_config)

    async def infer(self, tensors: Tensors, strict: bool) -> Tensors:
        return await self.pipeline.infer(tensors, strict)

    async def run(self, feeds: Tensors) -> Tensors:
        return await self.pipeline.batched.infer(feeds)

    def describe(self) -> dict[str, Any]:
        return self.pipeline.describe()


class PreprocessServer:
    """Deployment for the ``split`` preprocess stage (CPU work that scales apart)."""

    def __init__(self, registry_root: Optional[str], model: dict[str, Any], version: int) -> None:
        cfg = ModelConfig.model_validate(model)
        self.pre = make_preprocessor(Registry(registry_root).describe(cfg.name, version), cfg.preprocessor)

    def __call__(self, tensors: Tensors, strict: bool) -> Tensors:
        return self.pre(tensors, strict_dtypes=strict)


class PostprocessServer:
    """Deployment for the ``split`` postprocess stage."""

    def __init__(self, registry_root: Optional[str], model: dict[str, Any], version: int) -> None:
        cfg = ModelConfig.model_validate(model)
        self.post = make_postprocessor(Registry(registry_root).describe(cfg.name, version), cfg.postprocessor)

    def __call__(self, outputs: Tensors) -> Tensors:
        return self.post(outputs)
