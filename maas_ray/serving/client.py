"""A typed Python client for other Ray jobs: the same results as HTTP, through Serve handles."""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np

from maas_ray.errors import unwrap_remote


class MaasClient:
    """Call a running maas-ray app from any Ray driver or task connected to the cluster.

    Example::

        ray.init(address="auto")
        with MaasClient(app_name="digits") as client:
            result = client.infer("digits", {"input": x})          # OIP v2 response dict
            result = client.infer("digits", {"input": x}, version=2)
        ray.shutdown()

    Close the client (``with``, or :meth:`close`) before ``ray.shutdown()``: the Serve handle's
    router keeps a background thread that probes replicas, and a probe that outlives the driver's
    connection calls ``ray.init`` again from that thread (a fresh local Ray, then exit status 1).
    """

    def __init__(self, app_name: str = "default") -> None:
        from ray import serve

        self.app_name = app_name
        self._handle: Optional[Any] = serve.get_app_handle(app_name)

    def close(self) -> None:
        """Stop the handle's router (its replica probes and long-poll); idempotent."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.shutdown()

    def __enter__(self) -> "MaasClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

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
        if self._handle is None:  # as httpx does: a programming error, not a serving one
            raise RuntimeError("cannot send a request: this MaasClient has been closed")
        return self._handle.predict.remote(model, inputs, None if version is None else str(version), key)

    @staticmethod
    def output(result: dict[str, Any], name: str) -> np.ndarray:
        """One output of a response as a numpy array of its shape."""
        for out in result["outputs"]:
            if out["name"] == name:
                return np.asarray(out["data"]).reshape(out["shape"])
        raise KeyError(f"no output {name!r}; outputs: {[o['name'] for o in result['outputs']]}")
