"""Ray Serve application: ingress, per-version pipelines, batching, traffic split.

Names load lazily: importing a serving module (``maas_ray.serving.metric_names`` for the
rollout controller, a codec in a test) does not import Ray Serve.
"""

from importlib import import_module
from typing import Any

_LAZY = {
    "AppArgs": "maas_ray.serving.config",
    "BatchingConfig": "maas_ray.serving.config",
    "DeploymentOptions": "maas_ray.serving.config",
    "MaasClient": "maas_ray.serving.client",
    "ModelConfig": "maas_ray.serving.config",
    "VersionConfig": "maas_ray.serving.config",
    "build_app": "maas_ray.serving.app",
}

__all__ = ["AppArgs", "BatchingConfig", "DeploymentOptions", "MaasClient", "ModelConfig", "VersionConfig", "build_app"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'maas_ray.serving' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
