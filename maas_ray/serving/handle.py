"""The Python handle transport: what ``MaasClient`` and other Ray jobs call on the ingress.

Handle calls come from inside the Ray cluster, which Ray's token authentication guards; API
keys and rate limits apply to the HTTP and gRPC edge only.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Optional

from maas_ray.serving.codecs.handle import decode_handle
from maas_ray.serving.codecs.v2 import v2_response
from maas_ray.serving.core import InferenceService
from maas_ray.serving.status import answer_error
from maas_ray.serving.types import GenerateRequest, GenerationChunk

PROTOCOL = "handle"
GENERATE_PROTOCOL = "handle_generate"


async def predict(
    core: InferenceService, model: str, inputs: dict[str, Any], version: Optional[str] = None,
    key: Optional[str] = None,
) -> dict[str, Any]:
    """One handle infer: returns the OIP v2 response body, as HTTP would; errors are raised
    (they pickle to the caller with their status)."""
    start = time.perf_counter()
    core.metrics.request_started(model)
    number, status, error = None, 200, None
    try:
        slot = await core.pick(model, None if version is None else str(version), key)
        if slot.schema is None:  # a generative version: MaasClient.generate
            raise core.wrong_route(model, slot)
        t0 = time.perf_counter()
        tensors = decode_handle(inputs, slot.schema, core.limits)
        result = await core.run(model, slot, tensors, False, time.perf_counter() - t0, protocol=PROTOCOL)
        number = result.version
        response = v2_response(model, result.version, result.outputs)
        if result.after_response is not None:
            result.after_response()
        return response
    except Exception as exc:
        answer = answer_error(exc)
        status, error = answer.status, answer.error
        raise
    finally:
        core.metrics.request_finished(model, number, PROTOCOL, status, error, time.perf_counter() - start)


async def generate(
    core: InferenceService, model: str, request: GenerateRequest, version: Optional[str] = None,
    key: Optional[str] = None,
) -> AsyncIterator[GenerationChunk]:
    """One handle generation (``MaasClient.generate``): the version's chunks as they are made;
    errors are raised. The caller closing the stream stops the sequence."""
    if not isinstance(request, GenerateRequest):
        from maas_ray.errors import InvalidInputError

        raise InvalidInputError(f"request: expected a GenerateRequest, got {type(request).__name__}")
    start = time.perf_counter()
    core.metrics.request_started(model)
    number, status, error = None, 200, None
    try:
        slot = await core.pick_generative(model, None if version is None else str(version), key)
        number = slot.number
        async for chunk in core.generate(model, slot, request, protocol=GENERATE_PROTOCOL, start=start):
            yield chunk
    except (GeneratorExit, asyncio.CancelledError):
        status, error = 499, "ClientDisconnected"
        raise
    except Exception as exc:
        answer = answer_error(exc)
        status, error = answer.status, answer.error
        raise
    finally:
        core.metrics.request_finished(model, number, GENERATE_PROTOCOL, status, error, time.perf_counter() - start)
