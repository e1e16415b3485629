"""A typed Python client for other Ray jobs: the same results as HTTP, through Serve handles."""

from __future__ import annotations

from typing import Any, Iterator, Optional, Union

import numpy as np
from pydantic import ValidationError

from maas_ray.errors import InvalidInputError, format_validation_error, unwrap_remote
from maas_ray.serving.codecs.generate import join_chunks
from maas_ray.serving.types import GenerateRequest, GenerationChunk, SamplingParams


class MaasClient:
    """Call a running maas-ray app from any Ray driver or task connected to the cluster.

    Example::

        ray.init(address="auto")
        with MaasClient(app_name="digits") as client:
            result = client.infer("digits", {"input": x})          # OIP v2 response dict
            result = client.infer("digits", {"input": x}, version=2)
            for text in client.generate("lm", "Once upon a time", max_tokens=32, temperature=0):
                print(text, end="")                                  # a generative version, streamed
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

    def generate_chunks(
        self,
        model: str,
        prompt: Optional[str] = None,
        *,
        messages: Optional[list[dict[str, str]]] = None,
        version: Optional[Union[int, str]] = None,
        key: Optional[str] = None,
        **sampling: Any,
    ) -> Iterator[GenerationChunk]:
        """The chunks of one generation as the engine makes them (text, token ids, and on the
        last ``finish_reason`` and the token counts), through a Serve streaming handle.

        ``prompt`` or chat ``messages`` (``[{"role": "user", "content": "..."}]``, rendered with
        the version's chat template); ``sampling``: :class:`~maas_ray.serving.types.SamplingParams`
        fields (max_tokens, temperature (0 = greedy), top_p, top_k, seed, stop). Leaving the loop
        early stops the generation (the engine frees the sequence at its next step)."""
        if self._handle is None:
            raise RuntimeError("cannot send a request: this MaasClient has been closed")
        if (prompt is None) == (messages is None):
            raise InvalidInputError("give a prompt or messages (one of them)")
        try:
            params = SamplingParams(**sampling)
        except ValidationError as exc:
            raise InvalidInputError(format_validation_error(exc, "sampling")) from None
        request = GenerateRequest(sampling=params, prompt=prompt, messages=messages, stream=True)
        response = self._handle.options(stream=True).generate.remote(
            model, request, None if version is None else str(version), key)
        finished = False
        try:
            for chunk in response:
                yield chunk
            finished = True
        except Exception as exc:
            finished = True
            raise unwrap_remote(exc) from None
        finally:
            if not finished:
                response.cancel()

    def generate(self, model: str, prompt: Optional[str] = None, **kwargs: Any) -> Iterator[str]:
        """Stream a generation's text: an iterator of the new text of each step (see
        :meth:`generate_chunks` for the arguments)."""
        for chunk in self.generate_chunks(model, prompt, **kwargs):
            if chunk.text:
                yield chunk.text

    def complete(self, model: str, prompt: Optional[str] = None, **kwargs: Any) -> GenerationChunk:
        """A whole generation at once: one chunk with all the text and token ids, the finish
        reason and the token counts (see :meth:`generate_chunks` for the arguments)."""
        return join_chunks(self.generate_chunks(model, prompt, **kwargs))

    @staticmethod
    def output(result: dict[str, Any], name: str) -> np.ndarray:
        """One output of a response as a numpy array of its shape."""
        for out in result["outputs"]:
            if out["name"] == name:
                return np.asarray(out["data"]).reshape(out["shape"])
        raise KeyError(f"no output {name!r}; outputs: {[o['name'] for o in result['outputs']]}")
