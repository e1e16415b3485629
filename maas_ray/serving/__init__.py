"""Ray Serve application: ingress, per-version pipelines, batching, traffic split."""

from maas_ray.serving.app import build_app
from maas_ray.serving.client import MaasClient
from maas_ray.serving.config import AppArgs, BatchingConfig, DeploymentOptions, ModelConfig, VersionConfig

__all__ = ["AppArgs", "BatchingConfig", "DeploymentOptions", "MaasClient", "ModelConfig", "VersionConfig", "build_app"]
