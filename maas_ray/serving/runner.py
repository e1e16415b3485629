"""The model runner: one onnxruntime session, dynamic batching, nothing else.

HTTP, routing and processors live elsewhere; this is the thin part that KServe's
runtimes are (load, predict). The session factory is injectable for unit tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Callable, Optional

import numpy as np

from maas_ray.errors import InferenceError, MaasError
from maas_ray.registry.manifest import Manifest
from maas_ray.runtime import CPU, create_session
from maas_ray.serving.coalesce import Coalescer
from maas_ray.serving.config import BatchingConfig

logger = logging.getLogger(__name__)
Tensors = dict[str, np.ndarray]


class OnnxRunner:
    """Run batched feeds through an onnxruntime session."""

    def __init__(
        self,
        manifest: Manifest,
        model_bytes: bytes,
        *,
        device: str = "auto",
        intra_op_threads: Optional[int] = None,
        spinning: bool = False,
        session_factory: Callable = create_session,
        external_data: Optional[dict[str, bytes]] = None,
    ) -> None:
        self.manifest = manifest
        extra = {"external_data": external_data} if external_data else {}
        self.session = session_factory(model_bytes, device=device, intra_op_threads=intra_op_threads,
                                       spinning=spinning, **extra)
        self.provider = self.session.get_providers()[0]
        self.intra_op_threads = intra_op_threads  # None: onnxruntime's default (all cores)
        self.output_names = [o.name for o in manifest.outputs]
        self.batch1_seconds = float("inf")  # measured by warm_up()
        # A real session can be stopped mid-run (RunOptions.terminate); test fakes cannot.
        try:
            import onnxruntime

            self.terminable = isinstance(self.session, onnxruntime.InferenceSession)
        except ImportError:  # pragma: no cover - the runtime is a dependency
            self.terminable = False
        logger.info("%s:%d runs on %s", manifest.model, manifest.version, self.provider)

    def run_options(self):
        """A fresh ``onnxruntime.RunOptions`` (set ``terminate`` to stop the run), or None."""
        if not self.terminable:
            return None
        import onnxruntime

        return onnxruntime.RunOptions()

    def run(self, feeds: Tensors, options=None) -> Tensors:
        try:
            if options is None:
                return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
            return dict(zip(self.output_names, self.session.run(self.output_names, feeds, options)))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InferenceError(f"{self.manifest.model}:{self.manifest.version} inference failed: {exc}") from exc

    def warm_up(self) -> float:
        """Run zeros so the first request does not pay for lazy initialisation; returns the
        median batch-1 latency in seconds."""
        feeds = {
            s.name: np.zeros([1 if d == -1 else d for d in s.shape], dtype=s.numpy_dtype)
            for s in self.manifest.inputs
        }
        self.run(feeds)
        timings = []
        for _ in range(5):
            t0 = time.perf_counter()
            self.run(feeds)
            timings.append(time.perf_counter() - t0)
        self.batch1_seconds = float(np.median(timings))
        return self.batch1_seconds


def rows(tensors: Tensors) -> int:
    """Rows in a request (its batch dimension). A request with no tensors, or whose first
    tensor has no dimensions, counts as one: the preprocessor refuses it, not the queue."""
    shape = next(iter(tensors.values())).shape if tensors else ()
    return shape[0] if shape else 1


def run_batch(runner: OnnxRunner, requests: list[Tensors], options=None) -> list[Tensors | MaasError]:
    """Concatenate requests along the batch axis, run once per shape group, split back.

    Requests whose non-batch dims differ (dynamic dims) go in separate groups. If a
    group fails, its requests are retried one by one so one bad item fails only its
    own request.
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, feeds in enumerate(requests):
        groups[tuple((n, a.shape[1:]) for n, a in sorted(feeds.items()))].append(i)
    results: list = [None] * len(requests)
    for idx in groups.values():
        sizes = [rows(requests[i]) for i in idx]
        if len(idx) == 1:
            feeds = requests[idx[0]]
        else:
            feeds = {n: np.concatenate([requests[i][n] for i in idx]) for n in requests[idx[0]]}
        try:
            out = runner.run(feeds, options)
        except MaasError:
            if options is not None and options.terminate:
                for i in idx:
                    results[i] = InferenceError("inference stopped: the request ran past its deadline")
                continue
            for i in idx:
                try:
                    results[i] = runner.run(requests[i], options)
                except MaasError as exc:
                    results[i] = exc
            continue
        bounds = np.cumsum([0, *sizes])
        for j, i in enumerate(idx):
            results[i] = {n: a[bounds[j] : bounds[j + 1]] for n, a in out.items()}
    return results


# Below this batch-1 latency a model runs on the event loop: a thread hop costs more
# than the inference itself (tiny models). A CPU session whose threads take all the cores
# its replica was given runs there too: the worker thread would buy an overlap of the loop's
# work with the run, and there is no spare core to overlap on, so the hop only costs CPU and
# latency (one-thread sessions: +8 % items/s on the transformer; the fused wide MLP's
# two-thread replica: +9 %; benchmarks/README.md). Other sessions (GPUs, CPU sessions with
# cores to spare beside them) run in a worker thread.
INLINE_BELOW_S = 0.0005
# Below this one a request also skips the batch queue: the queue (then @serve.batch) cost ~50 us
# per request (queueing, signature binding, metrics; py-spy, benchmarks/README.md), more than
# batching saves on a model whose whole batch-1 run is shorter than that.
UNBATCHED_BELOW_S = 0.00005
# A run expected to take longer than this (rows x the batch-1 latency, an overestimate) leaves the
# event loop even for a model that runs inline: on the loop, nothing could answer 504 at the
# request's deadline, and in a worker thread RunOptions.terminate stops it there (docs/security.md,
# "Bounding a request's work"). One-row requests of the models that run inline stay far below it.
INLINE_MAX_RUN_S = 0.05


def runs_inline(runner: OnnxRunner, cores: int = 1) -> bool:
    """Whether ``runner`` runs on the event loop rather than in a worker thread (see above).

    ``cores``: CPUs the replica was given (rounded up). A session with onnxruntime's default
    thread count (None: every core of the machine) keeps the worker thread.
    """
    if runner.batch1_seconds < INLINE_BELOW_S:
        return True
    threads = runner.intra_op_threads
    return runner.provider == CPU and threads is not None and threads >= max(1, cores)


class BatchedRunner:
    """Dynamic batching (:class:`~maas_ray.serving.coalesce.Coalescer`); the knobs change live
    via :meth:`set_batching`.

    The queue's entries are groups of requests: one request (:meth:`infer`), or the requests of
    one coalesced handle call (:meth:`infer_many`), which join the queue together and so run in
    the same batch, without a task and a future per request.
    ``on_batch(items)`` is told the size of every onnxruntime call (the batch-size metric).
    ``cores``: CPUs the replica was given, for :func:`runs_inline`.
    """

    def __init__(
        self,
        runner: OnnxRunner,
        batching: Optional[BatchingConfig] = None,
        *,
        on_batch: Optional[Callable[[int], None]] = None,
        cores: int = 1,
    ) -> None:
        self.runner = runner
        self.inline = runs_inline(runner, cores)
        self.on_batch = on_batch
        # One batch at a time: a second concurrent run would only share the session's threads
        # (or the GPU stream); what arrives meanwhile forms the next batch.
        self.queue: Coalescer[list[Tensors], list[tuple]] = Coalescer(
            self._run_groups, max_items=1, size=lambda group: sum(map(rows, group)))
        self.set_batching(batching or BatchingConfig())

    def set_batching(self, batching: BatchingConfig) -> None:
        self.max_batch_size = batching.max_batch_size
        enabled = batching.enabled
        if enabled is None:
            enabled = self.runner.batch1_seconds >= UNBATCHED_BELOW_S
        self.batching_on = enabled and batching.max_batch_size > 1
        self.queue.configure(max_items=batching.max_batch_size, wait_s=batching.batch_wait_timeout_s)
        logger.info("%s:%d: batching %s (max %d items, wait %.4f s), batch-1 run %.1f us, %s",
                    self.runner.manifest.model, self.runner.manifest.version, "on" if self.batching_on else "off",
                    batching.max_batch_size, batching.batch_wait_timeout_s, self.runner.batch1_seconds * 1e6,
                    "on the event loop" if self.inline else "in a worker thread")

    async def infer(self, feeds: Tensors) -> tuple[Tensors, float]:
        """(outputs, seconds the onnxruntime call of this request's batch took)."""
        if self.inline and not self.batching_on and rows(feeds) * self.runner.batch1_seconds <= INLINE_MAX_RUN_S:
            # The tiny-model hot path: one direct run on the event loop, no batch bookkeeping
            # (run_batch's grouping and splitting cost ~5 us per request; in-process benchmark).
            start = time.perf_counter()
            result = self.runner.run(feeds)
            run_s = time.perf_counter() - start
            if self.on_batch is not None:
                self.on_batch(rows(feeds))
            return result, run_s
        result, run_s = (await self.infer_many([feeds]))[0]
        if isinstance(result, MaasError):
            raise result
        return result, run_s

    async def infer_many(self, requests: list[Tensors]) -> list[tuple]:
        """Several requests at once: [(outputs or that request's MaasError, seconds of its batch's
        run)], one per request, in order. They run in one batch when batching is on and they fit
        in max_batch_size; one at a time when batching is off."""
        if not self.batching_on:
            return [(await self._run([feeds]))[0] for feeds in requests]
        if sum(map(rows, requests)) <= self.max_batch_size:
            return await self.queue.submit(requests)
        if len(requests) == 1:  # already a full batch on its own
            return await self._run(requests)
        # More than one batch (max_batch_size changed since the caller grouped them): one entry each.
        return [r for group in await asyncio.gather(*(self.infer_many([f]) for f in requests)) for r in group]

    async def _run_groups(self, groups: list[list[Tensors]]) -> list[list[tuple]]:
        """One batch of every request of these groups, split back per group."""
        results = await self._run([feeds for group in groups for feeds in group])
        out, start = [], 0
        for group in groups:
            out.append(results[start:start + len(group)])
            start += len(group)
        return out

    def _timed_batch(self, requests: list[Tensors], options=None) -> list[tuple]:
        start = time.perf_counter()
        results = run_batch(self.runner, requests, options)
        run_s = time.perf_counter() - start
        if self.on_batch is not None:
            self.on_batch(sum(map(rows, requests)))
        return [(r, run_s) for r in results]

    async def _run(self, requests: list[Tensors]) -> list[tuple]:
        """[(outputs or the item's MaasError, seconds of the batch's run)], one per request."""
        if self.inline and sum(map(rows, requests)) * self.runner.batch1_seconds <= INLINE_MAX_RUN_S:
            return self._timed_batch(requests)
        # onnxruntime releases the GIL: run it off the event loop so requests keep flowing. A
        # cancelled caller (its deadline passed, or it went away) stops the run at its next node.
        options = self.runner.run_options()
        future = asyncio.get_running_loop().run_in_executor(None, self._timed_batch, requests, options)
        try:
            return await future
        except asyncio.CancelledError:
            if options is not None:
                options.terminate = True
            raise
