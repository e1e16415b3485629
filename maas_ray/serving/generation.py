"""Generative versions (manifest ``kind: generative``): the engine that serves one, in the
ingress process or in its own Serve deployment.

A generative version is a decoder language model with a KV cache (the graph contract in
:class:`maas_ray.registry.manifest.GenerationSpec`). :class:`GenerativePipeline` loads it
from the registry (checksums verified, decrypted as classifiers are), builds the
onnxruntime session (CUDA when the replica sees a GPU, else CPU; the provider is logged),
the version's tokenizer and a continuous-batching
:class:`~maas_ray.serving.generate.engine.GenerationEngine`, and turns a
:class:`~maas_ray.serving.types.GenerateRequest` into a stream of
:class:`~maas_ray.serving.types.GenerationChunk`.

Placement (``ModelConfig.placement``): ``ingress`` runs the pipeline in the ingress replica
(no hop per token); ``fused`` and ``split`` (the same thing for a generative version) run it
in a :class:`GenerativeServer` deployment of its own, which the ingress streams from with
Serve's streaming handles. A consumer that stops reading (a client gone, a timeout) closes
the stream, and the engine frees the sequence and its KV cache at its next step.

The tokenizer and the engine (jinja2, tokenizers) are imported when a generative version
loads, so a classifier-only replica never imports them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, AsyncIterator, Optional, Union

from maas_ray.errors import ConfigError, InferenceError, MaasError
from maas_ray.runtime import create_session
from maas_ray.serving.config import ModelConfig
from maas_ray.serving.metrics import ServingMetrics
from maas_ray.serving.replicas import (
    SKIP_ROLES,
    VersionServer,
    artifact_registry,
    replica_cpus,
)
from maas_ray.serving.types import GenerateRequest, GenerationChunk

logger = logging.getLogger(__name__)
_END = object()  # the end of one stream's chunks (GenerativeServer)


def engine_config(model: ModelConfig) -> Any:
    """The model's ``generation:`` section as the engine's EngineConfig (ConfigError if bad)."""
    from pydantic import ValidationError

    from maas_ray.errors import format_validation_error
    from maas_ray.serving.generate.engine import EngineConfig

    try:
        return EngineConfig.model_validate(model.generation or {})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"models[{model.name}].generation")) from exc


class GenerativePipeline:
    """One generative version in this process: session, tokenizer, engine."""

    def __init__(
        self,
        registry_root: Optional[str],
        model: ModelConfig,
        version: int,
        *,
        metrics: Optional[ServingMetrics] = None,
        security: Optional[dict[str, Any]] = None,
    ) -> None:
        from maas_ray.serving.generate.engine import GenerationEngine
        from maas_ray.serving.generate.tokenizer import LMTokenizer

        self.label = f"{model.name}:{version}"
        config = engine_config(model)
        loaded = artifact_registry(registry_root, security).load(model.name, version, skip_roles=SKIP_ROLES)
        spec = loaded.manifest.generation
        if spec is None:
            raise ConfigError(f"{self.label} is not a generative version (its manifest has no `generation`)")
        tokenizer_json = loaded.files.get(spec.tokenizer_file)
        if tokenizer_json is None:
            raise ConfigError(f"{self.label}: the manifest names tokenizer {spec.tokenizer_file!r}, "
                              f"which is not among its files {sorted(loaded.files)}")
        # External data (weights > 2 GB) goes to onnxruntime from memory, never to disk.
        session = create_session(loaded.model_bytes, device=model.device,
                                 intra_op_threads=model.intra_op_threads or replica_cpus(),
                                 spinning=model.intra_op_spinning, external_data=loaded.external_data())
        self.provider = session.get_providers()[0]
        logger.info("%s: generation on %s (pid %d)", self.label, self.provider, os.getpid())
        self.spec = spec
        self.tokenizer = LMTokenizer.from_bytes(tokenizer_json, spec)
        self.engine = GenerationEngine(session, spec, self.tokenizer, config)
        self._started = False
        if metrics is not None:
            metrics.watch_engine(model.name, version, self.engine.stats)

    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        """Tokenize the prompt (or render the chat messages with the version's template) and
        check it against the version's limits (400 naming the limit)."""
        if request.messages is not None:
            encode_chat = getattr(self.tokenizer, "encode_chat", None)
            ids = (encode_chat(request.messages) if encode_chat is not None
                   else self.tokenizer.encode(self.tokenizer.render_chat(request.messages)))
        else:
            ids = self.tokenizer.encode(request.prompt or "")
        self.engine.check(ids, request.sampling)
        return ids

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        """The request's chunks as the engine makes them; a bad request raises before the first."""
        ids = self.prompt_ids(request)
        if not self._started:  # on the event loop the engine steps on
            self.engine.start()
            self._started = True
        async for chunk in self.engine.generate(ids, request.sampling, request_id=request.id):
            yield chunk

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def reconfigure(self, batching: dict[str, Any]) -> None:
        """Batching knobs are a classifier's; the engine batches continuously."""

    def describe(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "provider": self.provider,
            "state": "ready",
            "kind": "generative",
            "context_length": self.spec.context_length,
            "vocab_size": self.spec.vocab_size,
            "chat": self.spec.chat_template is not None,
            "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1]}],
            "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1]}],
        }

    def stop(self) -> None:
        if self._started:
            self.engine.stop()
            self._started = False


class GenerativeServer(VersionServer):
    """Deployment for a generative version in ``fused`` (or ``split``) placement.

    A version that fails to load keeps its replica up and reports ``failed`` with the reason,
    as :class:`~maas_ray.serving.replicas.ModelServer` does; the ingress routes nothing to it.
    """

    def _load(self, registry_root: Optional[str], cfg: ModelConfig, version: int, limits: Optional[dict],
              security: Optional[dict[str, Any]]) -> GenerativePipeline:
        return GenerativePipeline(registry_root, cfg, version, metrics=self.metrics, security=security)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Nothing to apply (Serve calls it with the deployment's user_config)."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[Union[GenerationChunk, MaasError]]]:
        """Serve streaming method: the ingress calls ``handle.options(stream=True).generate``.

        Each item is a list of the chunks made since the last item went out: one per token
        while the stream keeps up, several when the hop lags (under load), so a stream costs
        one Ray object per send, not per token. A request's own failure (a prompt over the
        context, the queue full) is the last element, not raised: the ingress raises it (as a
        classifier's coalesced calls return each request's error), and Serve logs no
        traceback for a client's 400. Closing the stream cancels the sequence."""
        queue: asyncio.Queue = asyncio.Queue()
        pump = asyncio.get_running_loop().create_task(self._pump(request, queue))
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                done = items[-1] is _END
                if done:
                    items.pop()
                if items:
                    yield items
                if done:
                    return
        finally:
            pump.cancel()  # the engine frees the sequence at its next step

    async def _pump(self, request: GenerateRequest, queue: asyncio.Queue) -> None:
        try:
            async for chunk in self._ready().generate(request):
                queue.put_nowait(chunk)
        except MaasError as exc:
            queue.put_nowait(exc)
        except Exception as exc:  # noqa: BLE001 - onnxruntime or a bug: a 500 that names it
            logger.exception("%s: generation failed", self.label)
            queue.put_nowait(InferenceError(f"{type(exc).__name__}: {exc}"))
        finally:
            queue.put_nowait(_END)

    def stats(self) -> dict[str, Any]:
        return self._ready().stats()

    def describe(self) -> dict[str, Any]:
        if self.pipeline is None:
            return {"pid": os.getpid(), "state": "failed", "reason": self.reason, "kind": "generative"}
        return self.pipeline.describe()

    def __del__(self) -> None:
        if getattr(self, "pipeline", None) is not None:
            try:
                self.pipeline.stop()
            except Exception:  # noqa: BLE001 - shutting down
                pass
