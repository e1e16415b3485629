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
import tempfile
from typing import Any, Optional

import numpy as np

from maas_ray.registry import ONNX_EXTERNAL_DATA, LoadedModel, Registry
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


# Extra files a serving replica does not read: torch weights are for fine-tuning only.
SKIP_ROLES = ("weights",)
# ...and preprocessors get neither the weights nor ONNX external data.
PROCESSOR_SKIP_ROLES = ("weights", ONNX_EXTERNAL_DATA)


def load_batched_runner(
    registry_root: Optional[str], model: ModelConfig, version: int, loaded: Optional[LoadedModel] = None
) -> BatchedRunner:
    loaded = loaded or Registry(registry_root).load(model.name, version, skip_roles=SKIP_ROLES)  # checksums verified
    with tempfile.TemporaryDirectory(prefix="maas-model-") as tmp:
        # Weights in ONNX external data (> 2 GB): onnxruntime opens the graph from a path,
        # reading the data file beside it while the session is created.
        source = loaded.write_to(tmp) if loaded.file_for(ONNX_EXTERNAL_DATA) else loaded.model_bytes
        runner = OnnxRunner(
            loaded.manifest,
            source,
            device=model.device,
            intra_op_threads=model.intra_op_threads or replica_cpus(),
        )
    runner.warm_up()
    return BatchedRunner(runner, model.batching)


def _processor_files(loaded: LoadedModel) -> dict[str, bytes]:
    roles = {n: e.role for n, e in loaded.manifest.files.items()}
    return {n: b for n, b in loaded.files.items() if roles.get(n) not in PROCESSOR_SKIP_ROLES}


class LocalPipeline:
    """pre -> batched inference -> post, all in this process."""

    def __init__(self, registry_root: Optional[str], model: ModelConfig, version: int) -> None:
        loaded = Registry(registry_root).load(model.name, version, skip_roles=SKIP_ROLES)
        self.batched = load_batched_runner(registry_root, model, version, loaded)
        manifest = self.batched.runner.manifest
        self.pre = make_preprocessor(manifest, model.preprocessor, files=_processor_files(loaded))
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
        reg = Registry(registry_root)
        manifest = reg.describe(cfg.name, version)
        files = {
            n: reg.read_file(cfg.name, version, n)
            for n, e in manifest.files.items() if e.role not in PROCESSOR_SKIP_ROLES
        }
        self.pre = make_preprocessor(manifest, cfg.preprocessor, files=files)

    def __call__(self, tensors: Tensors, strict: bool) -> Tensors:
        return self.pre(tensors, strict_dtypes=strict)


class PostprocessServer:
    """Deployment for the ``split`` postprocess stage."""

    def __init__(self, registry_root: Optional[str], model: dict[str, Any], version: int) -> None:
        cfg = ModelConfig.model_validate(model)
        self.post = make_postprocessor(Registry(registry_root).describe(cfg.name, version), cfg.postprocessor)

    def __call__(self, outputs: Tensors) -> Tensors:
        return self.post(outputs)
