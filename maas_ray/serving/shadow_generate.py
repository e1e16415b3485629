"""Shadow traffic for generative versions: mirror a share of a model's generations to a candidate.

The shadow target is the classifier shadow's (``user_config.shadow.<model>``, read from the
replica's :class:`~maas_ray.serving.shadow.ShadowMirror`), and every generative route (OpenAI,
OIP generate, the Python handle, gRPC) is mirrored, because the ingress core's ``generate``
calls :meth:`GenerativeMirror.begin` when the primary starts and hands it the primary's text
when the primary ends. The caller only ever gets the primary's answer:

- the mirrored call runs **alongside** the primary, as its own task, non-streaming, started
  just after the primary submitted its prompt. Its time to first token counts from the same
  instant as the primary's (the request's arrival), and its tokens are made under the same load
  as the primary's, so the two versions' TTFT and ITL compare like for like. Measured on a
  2-core box with an identical candidate (``tests/integration/test_generative_rollout.py``'s
  app, one client at a time): a mirror started after the primary finished read the
  candidate's ITL p99 at 2.2-3.1x the baseline's and its TTFT p99 at 0.3-0.6x (it decoded
  while the next request was being parsed, and its clock skipped the HTTP read), so an
  identical candidate failed a 1.5x ITL guard;
- the comparison waits for the primary's end; a primary that did not finish normally (a client
  gone, an error) is not compared, though the candidate's latency and status still count;
- at most ``max_in_flight`` run at once per replica (a generation holds an engine slot for all
  its tokens, so the bound is tighter than the classifier's); a request that finds them busy is
  not mirrored (``ray_maas_shadow_dropped_total``);
- it can neither fail nor block the caller: errors and timeouts are counted, never raised, and
  the engine runs on its own thread (:mod:`maas_ray.serving.generate.engine`) or in its own
  replica (``fused``), so a mirrored generation never runs on the primary's event loop beyond
  tokenizing its prompt. In ``ingress`` placement it shares the replica's CPUs with the primary.

What a mirrored generation records, under the candidate's version label:

- its latency and status as a request with ``protocol="shadow"`` (the rollout's error rate);
- its time to first token (from the primary's arrival) and inter-token gaps, and its tokens, through
  ``ServingMetrics.generation`` (the TTFT and ITL histograms carry no protocol label, so the
  candidate's series hold its live and its mirrored generations alike);
- whether it agreed with the primary, one compared item per generation in the agreement
  histogram (``ServingMetrics.shadow``): a greedy request (``temperature`` 0) agrees iff the
  two texts are identical; a sampled one iff :func:`token_overlap` of the texts is at least the
  target's ``min_overlap`` (:data:`DEFAULT_MIN_OVERLAP`). The mirrored request keeps the
  primary's sampling parameters, seed included.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from typing import Any, AsyncIterator, Callable, Optional

from maas_ray.serving.shadow import ShadowMirror, ShadowTarget, shadow_failure
from maas_ray.serving.types import GenerateRequest, GenerationChunk

logger = logging.getLogger(__name__)

# A sampled continuation agrees with the primary's when their word overlap is at least this.
DEFAULT_MIN_OVERLAP = 0.5
# Mirrored generations running at once per replica (each holds an engine sequence).
MAX_IN_FLIGHT = 8
# A mirrored generation not finished by then is abandoned (a 504 in the candidate's metrics).
SHADOW_GENERATE_TIMEOUT_S = 120.0
# The primary's finish reasons after which its text is compared: it ran to its end.
COMPLETED = ("stop", "length")


def token_overlap(primary: str, candidate: str) -> float:
    """Multiset Jaccard overlap of the two texts' whitespace-separated words, in [0, 1]:
    ``|A ∩ B| / |A ∪ B|`` counting repeats (1.0 for two empty texts). Words, not token ids,
    so that a candidate with a retrained tokenizer is compared fairly."""
    a, b = Counter(primary.split()), Counter(candidate.split())
    union = sum((a | b).values())
    return 1.0 if union == 0 else sum((a & b).values()) / union


def agrees(primary: str, candidate: str, temperature: float, min_overlap: float) -> tuple[bool, Optional[float]]:
    """(agreed, overlap score): greedy requests need identical text (score None); sampled ones
    an overlap of at least ``min_overlap``."""
    if temperature == 0:
        return primary == candidate, None
    score = token_overlap(primary, candidate)
    return score >= min_overlap, score


@dataclasses.dataclass
class _Progress:
    """What a mirrored generation produced so far (kept when it times out part-way)."""

    texts: list[str] = dataclasses.field(default_factory=list)
    ttft_s: Optional[float] = None
    itl_s: list[float] = dataclasses.field(default_factory=list)
    last: Optional[GenerationChunk] = None


class GenerativeMirror:
    """Per-replica mirroring of generations (see the module docstring).

    ``mirror``: the replica's ShadowMirror, whose ``targets`` (set by ``reconfigure``) name the
    candidate per model; ``call(model, version, request)``: the candidate's chunks (the ingress
    passes a call that checks the version is ready); ``metrics``: a ServingMetrics.
    """

    def __init__(
        self,
        mirror: ShadowMirror,
        call: Callable[[str, int, GenerateRequest], AsyncIterator[GenerationChunk]],
        metrics: Any,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        timeout_s: float = SHADOW_GENERATE_TIMEOUT_S,
    ) -> None:
        self.mirror, self.call, self.metrics = mirror, call, metrics
        self.max_in_flight, self.timeout_s = max_in_flight, timeout_s
        self.in_flight = 0
        self.tasks: set[asyncio.Task] = set()  # strong references until done

    def plan(self, model: str, primary_version: int) -> Optional[ShadowTarget]:
        """Whether this generation is mirrored. One dict lookup when the model has no target."""
        target = self.mirror.targets.get(model)
        if target is None or target.version == primary_version or self.mirror.rng.random() >= target.share:
            return None
        return target

    def begin(self, model: str, primary_version: int, request: GenerateRequest,
              start: float) -> Optional[asyncio.Future]:
        """Start mirroring ``request`` (the primary arrived at ``start``, ``time.perf_counter()``)
        if the model has a target and the share draws it. Returns the future the caller sets to
        the primary's text when it ends (None: it did not finish normally), or None when the
        request is not mirrored."""
        target = self.plan(model, primary_version)
        if target is None:
            return None
        if self.in_flight >= self.max_in_flight:
            self.metrics.shadow_dropped(model, target.version)
            return None
        self.in_flight += 1
        loop = asyncio.get_running_loop()
        primary_text: asyncio.Future = loop.create_future()
        mirrored = dataclasses.replace(request, stream=False, include_usage=False,
                                       id=None if request.id is None else f"{request.id}-shadow")
        task = loop.create_task(self._run(model, target, mirrored, start, primary_text))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return primary_text

    async def _run(self, model: str, target: ShadowTarget, request: GenerateRequest, start: float,
                   primary_text: asyncio.Future) -> None:
        version = target.version
        began = time.perf_counter()
        status, error, reason = 200, None, "error"
        progress = _Progress()
        self.metrics.request_started(model)
        try:
            try:
                await asyncio.wait_for(self._collect(model, version, request, start, progress), self.timeout_s)
                reason = (progress.last.finish_reason if progress.last is not None else None) or "stop"
            except asyncio.TimeoutError:
                status, error, reason = 504, "RequestTimeoutError", "cancelled"
            except Exception as exc:  # a failing candidate is what shadowing is for: count it, never raise
                status, error = shadow_failure(model, version, exc)
            finally:
                last = progress.last
                self.metrics.generation(model, version, prompt_tokens=last.prompt_tokens if last else 0,
                                        completion_tokens=last.completion_tokens if last else 0,
                                        finish_reason=reason, ttft_s=progress.ttft_s, itl_s=progress.itl_s)
                self.metrics.request_finished(model, version, "shadow", status, error, time.perf_counter() - began)
            if status != 200:
                return
            try:
                primary = await asyncio.wait_for(asyncio.shield(primary_text), self.timeout_s)
            except asyncio.TimeoutError:
                primary = None
            if primary is None:  # the primary did not finish normally: nothing to compare
                return
            min_overlap = DEFAULT_MIN_OVERLAP if target.min_overlap is None else target.min_overlap
            agreed, score = agrees(primary, "".join(progress.texts), request.sampling.temperature, min_overlap)
            self.metrics.shadow(model, version, compared=1, agreed=int(agreed), max_abs_diff=None)
            if not agreed:
                logger.debug("shadow %s:%d disagreed (overlap %s)", model, version, score)
        finally:
            self.in_flight -= 1

    async def _collect(self, model: str, version: int, request: GenerateRequest, start: float,
                       progress: _Progress) -> None:
        """Run the candidate's generation to its end, timing its tokens as the ingress times
        a live stream's (first token from the request's arrival; gaps between token events)."""
        stream = self.call(model, version, request)
        last = start
        try:
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.token_ids:
                    if progress.ttft_s is None:
                        progress.ttft_s = now - start
                    else:
                        progress.itl_s.append(now - last)
                    last = now
                progress.texts.append(chunk.text)
                progress.last = chunk
        finally:
            await stream.aclose()  # a timeout: the engine frees the sequence
