"""A typed Python client for other Ray jobs: the same results as HTTP, through Serve handles."""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np

from maas_ray.errors import unwrap_remote


class MaasClient:
    """Call a running maas-ray app from any Ray driver or task connected to the cluster.

    Example::

        ray.init(address="auto")
        client = MaasClient(app_name="digits")
        result = client.infer("digits", {"input": x})          # OIP v2 response dict
        result = client.infer("digits", {"input": x}, version=2)
    """

    def __init__(self, app_name: str = "default") -> None:
        from ray import serve

        self.app_name = app_name
        self._handle = serve.get_app_handle(app_name)

    def infer(
        self,
        model: str,
        inputs: dict[str, Union[np.ndarray, list]],
        *,
        version: Optional[Union[int, str]] = None,
        key: Optional[str] = None,
        timeout_s: float = 60.0,
    ) -> dict[str, Any]:
        """Blocking inference; raises the same maas_ray errors HTTP maps to 4xx/5xx."""
        try:
            return self._call(model, inputs, version, key).result(timeout_s=timeout_s)
        except Exception as exc:
            raise unwrap_remote(exc) from None

    async def infer_async(self, model: str, inputs: dict[str, Any], *, version=None, key=None) -> dict[str, Any]:
        try:
            return await self._call(model, inputs, version, key)
        except Exception as exc:
            raise unwrap_remote(exc) from None

    def _call(self, model, inputs, version, key):
        return self._handle.predict.remote(model, inputs, None if version is None else str(version), key)

    @staticmethod
    def output(result: dict[str, Any], name: str) -> np.ndarray:
        """One output of a response as a numpy array of its shape."""
        for out in result["outputs"]:
            if out["name"] == name:
                return np.asarray(out["data"]).reshape(out["shape"])
        raise KeyError(f"no output {name!r}; outputs: {[o['name'] for o in result['outputs']]}")
