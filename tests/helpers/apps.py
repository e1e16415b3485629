"""What a built (not deployed) Serve application holds: its deployments and their options."""

from __future__ import annotations

from typing import Any


def bound_deployments(app: Any) -> dict[str, Any]:
    """{name: ray.serve Deployment} of every deployment in ``app``'s bound graph: the app's own
    and each one bound into its constructor arguments, at any depth of lists and dicts (what
    ``serve.run`` would deploy)."""
    from ray.serve import Application

    found: dict[str, Any] = {}

    def walk(value: Any) -> None:
        if isinstance(value, Application):
            deployment = value._bound_deployment
            assert deployment.name not in found, f"two deployments named {deployment.name!r}"
            found[deployment.name] = deployment
            walk(deployment.init_args)
            walk(deployment.init_kwargs)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(app)
    return found


def two_version_registry(root: str) -> str:
    """A registry at ``root`` with model ``m`` versions 1 and 2 (linear ONNX) and ``production`` -> 1."""
    from maas_ray.registry import Registry
    from tests.helpers.models import linear_onnx

    reg = Registry(root)
    reg.publish("m", linear_onnx())
    reg.publish("m", linear_onnx(seed=1))
    reg.set_alias("m", "production", 1)
    return root


def one_model_args(root: str, versions: list, **model: Any) -> dict[str, Any]:
    """``build_app`` args serving model ``m`` from ``root`` at these versions."""
    return {"registry_root": root, "models": [{"name": "m", "versions": versions, **model}]}
