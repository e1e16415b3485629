"""Continuous batching over onnxruntime: one step loop serves every generative request of a replica.

A dedicated thread (onnxruntime releases the GIL, so the replica's event loop keeps running)
repeats one **step**:

1. drop cancelled sequences (a consumer that stopped iterating) and admit waiting ones while
   the running count stays within ``max_num_seqs`` and the KV budget (the sum of prompt +
   ``max_tokens`` of the admitted sequences) within ``kv_capacity_tokens``;
2. one **prefill** pass of at most ``prefill_chunk_tokens`` tokens: several short prompts
   together (left-padded), or the next chunk of one long prompt (chunked prefill: a long prompt
   takes several steps, and the running sequences get a token at every one of them). A prompt
   whose last chunk ran samples its first token and **joins** the running batch;
3. one batched **decode** pass for all running sequences (each feeds its last token);
4. sampling (:mod:`.sampling`), incremental detokenizing, EOS / stop strings / ``max_tokens`` /
   context checks; each request's :class:`~maas_ray.serving.types.GenerationChunk` goes to its
   asyncio queue (one ``call_soon_threadsafe`` per event loop per pass); finished sequences
   **leave** the batch and free their KV budget.

The batch cache is batched arrays, left-padded (:class:`.kv.DecodeBatch`): a decode pass feeds
the previous pass's output cache as is; a sequence that leaves frees its row without a copy and a
joiner takes a free row in place; the arrays are copied only to widen, to drop rows free for
``compact_after_steps`` steps, or to trim padding columns no live row needs.
``python -m benchmarks.engine`` measures this against re-padding every step (``--parts layout``)
and against copying at every leave (``--compact-after-steps 1,16``).
A failure inside a pass (an onnxruntime error) fails the requests of that pass with an
:class:`~maas_ray.errors.InferenceError` and the engine keeps serving the others.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from typing import Any, AsyncIterator, Optional, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from maas_ray.errors import (
    InferenceError,
    InvalidInputError,
    MaasError,
    ModelNotReadyError,
)
from maas_ray.registry.manifest import GenerationSpec
from maas_ray.serving.generate.kv import DecodeBatch, GraphRunner, select
from maas_ray.serving.generate.sampling import SamplingBatch, make_generator, sample
from maas_ray.serving.generate.tokenizer import LMTokenizer
from maas_ray.serving.types import GenerationChunk, SamplingParams

logger = logging.getLogger(__name__)


class EngineConfig(BaseModel):
    """Bounds and scheduling of one replica's generation engine."""

    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int = Field(default=32, ge=1, le=4096,
                              description="Most sequences in the running batch (prefilling or decoding).")
    max_waiting: int = Field(default=256, ge=1, le=1_000_000,
                             description="Most requests queued for admission; beyond it requests get 503 "
                                         "with Retry-After.")
    kv_capacity_tokens: Optional[int] = Field(
        default=None, ge=1,
        description="KV cache bound of the replica in tokens: a sequence is admitted only while the sum of "
                    "prompt + max_tokens over admitted sequences fits (else it waits). None = max_num_seqs x "
                    "the model's context length (no bound beyond max_num_seqs). The padded batch arrays can hold "
                    "more cells (rows x the longest row, plus trimmed-late padding): stats() batch_rows x "
                    "batch_width.")
    prefill_chunk_tokens: int = Field(
        default=256, ge=1, le=1_000_000,
        description="Most prompt tokens (padding included) one step prefills; a longer prompt is fed in chunks, "
                    "one per step, between decode passes.")
    retry_after_s: float = Field(default=1.0, gt=0, le=3600,
                                 description="Retry-After sent with the 503 of a full queue.")
    compact_after_steps: int = Field(
        default=16, ge=0, le=1_000_000,
        description="Steps a batch row freed by a finished sequence is kept for a joiner (a join into a free "
                    "row copies nothing) before the cache is compacted (one copy; a free row costs compute). "
                    "0 = copy the cache at every leave and join (no free rows), for comparison.")


class _Seq:
    """One request inside the engine (owned by the step thread once queued)."""

    __slots__ = ("id", "prompt", "params", "loop", "queue", "generator", "detok", "held", "generated",
                 "prefilled", "kv", "cancelled", "done", "need", "reserve")

    def __init__(self, sid: str, prompt: np.ndarray, params: SamplingParams, loop: asyncio.AbstractEventLoop,
                 tokenizer: LMTokenizer) -> None:
        self.id, self.prompt, self.params, self.loop = sid, prompt, params, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.generator = make_generator(params.seed) if params.temperature > 0 else None
        self.detok = tokenizer.detokenizer()
        self.held = ""  # text that may begin a stop string: not sent until decided
        self.generated = 0
        self.prefilled = 0  # prompt tokens in ``kv`` (chunked prefill)
        self.kv: Optional[list] = None
        self.cancelled = False  # set by the consumer's side
        self.done = False  # set by the step thread when the last event is queued
        self.need = len(prompt) + params.max_tokens  # its KV budget: prompt + max_tokens
        self.reserve = 0  # the budget it holds: ``need`` once admitted, 0 once released


class _Outbox:
    """Events of one pass, sent with one ``call_soon_threadsafe`` per event loop."""

    def __init__(self) -> None:
        self.items: dict[Any, list] = {}
        self.lost = False  # some consumer's event loop was closed

    def put(self, seq: _Seq, item: Any) -> None:
        self.items.setdefault(seq.loop, []).append((seq, item))

    def send(self) -> None:
        for loop, items in self.items.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the consumer's event loop is closed: nobody reads these
                for seq, _ in items:
                    seq.cancelled = True
                self.lost = True
        self.items = {}


def _deliver(items: list) -> None:
    for seq, item in items:
        seq.queue.put_nowait(item)


class GenerationEngine:
    """Continuous batching for one generative version (see the module docstring).

    Args:
        session: an onnxruntime ``InferenceSession`` of the version's KV-cache graph
            (:func:`maas_ray.runtime.create_session`; its providers decide CPU or CUDA).
        spec: the version's :class:`~maas_ray.registry.manifest.GenerationSpec`.
        tokenizer: the version's :class:`~.tokenizer.LMTokenizer` (streamed text).
        config: bounds and scheduling.
    """

    def __init__(self, session: Any, spec: GenerationSpec, tokenizer: LMTokenizer,
                 config: Optional[EngineConfig] = None) -> None:
        self.spec, self.tokenizer = spec, tokenizer
        self.config = config or EngineConfig()
        self.runner = GraphRunner(session, spec)
        self.kv_capacity_tokens = self.config.kv_capacity_tokens or self.config.max_num_seqs * spec.context_length
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._prefilling: collections.deque[_Seq] = collections.deque()
        self._batch = DecodeBatch(self.runner, self.config.compact_after_steps)  # the decoding sequences and their cache
        self._reserved = 0
        self._cancel_pending = False
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self._counters = dict.fromkeys(("steps", "prefill_chunks", "decode_steps", "joined_running", "finished",
                                        "cancelled", "failed", "rejected", "max_running", "prompt_tokens",
                                        "generated_tokens"), 0)
        self._next_id = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "GenerationEngine":
        """Start the step thread (idempotent)."""
        with self._cv:
            if self._running:
                return self
            self._running = True
        self._thread = threading.Thread(target=self._loop, name="maas-generate", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the step thread; requests still in the engine fail with ModelNotReadyError."""
        with self._cv:
            self._running = False
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        out = _Outbox()
        with self._cv:
            seqs = [*self._waiting, *self._prefilling, *self._batch.live_seqs()]
            self._waiting.clear()
        self._prefilling.clear()
        self._batch.clear()
        self._reserved = 0
        for s in seqs:
            self._fail(s, ModelNotReadyError("the generation engine stopped", self.config.retry_after_s), out)
        out.send()

    # -- requests ----------------------------------------------------------------------------

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise InvalidInputError (400) unless the request fits this version and engine."""
        if not isinstance(params, SamplingParams):
            raise InvalidInputError(f"sampling parameters must be SamplingParams, got {type(params).__name__}")
        n = len(prompt_ids)
        if n == 0:
            raise InvalidInputError("the prompt is empty: it needs at least one token")
        ids = np.asarray(prompt_ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise InvalidInputError("prompt token ids must be a flat list of integers")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.spec.vocab_size:
            bad = low if low < 0 else high
            raise InvalidInputError(f"prompt token id {bad} is outside the vocabulary (0..{self.spec.vocab_size - 1})")
        ctx = self.spec.context_length
        if n + params.max_tokens > ctx:
            raise InvalidInputError(
                f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) is {n + params.max_tokens} tokens, "
                f"more than the model's context_length {ctx}"
                + ("; the prompt alone is too long" if n >= ctx else f"; ask for at most {ctx - n} tokens"))
        if n + params.max_tokens > self.kv_capacity_tokens:
            raise InvalidInputError(
                f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) is more than this replica's "
                f"kv_capacity_tokens {self.kv_capacity_tokens}")

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                       request_id: Optional[str] = None) -> AsyncIterator[GenerationChunk]:
        """Stream one request's chunks; the last has ``finish_reason``.

        Errors surface at the first ``__anext__``: InvalidInputError (see :meth:`check`),
        ModelNotReadyError (503, ``retry_after_s``) when the waiting queue is full or the engine
        is stopped, InferenceError when onnxruntime failed on the request's pass. Stopping the
        iteration (``aclose()``, task cancellation) cancels the sequence: its slot and KV cache
        are freed at the next step.
        """
        self.check(prompt_ids, params)
        loop = asyncio.get_running_loop()
        with self._cv:
            self._next_id += 1
            seq = _Seq(request_id or f"seq-{self._next_id}", np.asarray(prompt_ids, np.int64), params, loop,
                       self.tokenizer)
            if not self._running:
                raise ModelNotReadyError("the generation engine is not running", self.config.retry_after_s)
            if len(self._waiting) >= self.config.max_waiting:
                self._counters["rejected"] += 1
                raise ModelNotReadyError(
                    f"the generation queue is full ({len(self._waiting)} requests waiting, max_waiting "
                    f"{self.config.max_waiting}); retry later", self.config.retry_after_s)
            self._waiting.append(seq)
            self._cv.notify()
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.done:
                seq.cancelled = True
                with self._cv:
                    self._cancel_pending = True
                    self._cv.notify()

    def stats(self) -> dict[str, int]:
        """Counters and gauges: running (admitted: prefilling + decoding), prefilling, waiting,
        kv_tokens (KV budget in use), kv_capacity_tokens, steps, prefill_chunks, decode_steps,
        joined_running (sequences that joined while others were decoding), finished, cancelled,
        failed, rejected (queue full), max_running, prompt_tokens, generated_tokens."""
        return {
            "running": len(self._prefilling) + self._batch.live, "prefilling": len(self._prefilling),
            "waiting": len(self._waiting), "kv_tokens": self._reserved, "kv_capacity_tokens": self.kv_capacity_tokens,
            "batch_rows": len(self._batch.seqs), "batch_width": self._batch.width,
            "joins_in_place": self._batch.joins_in_place, "batch_rebuilds": self._batch.rebuilds,
            **self._counters,
        }

    # -- the step loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._running and not (self._waiting or self._prefilling or self._batch.seqs):
                    self._cv.wait()
                if not self._running:
                    return
            try:
                self._step()
            except Exception as exc:  # a bug, not a model error: fail what is in flight, keep serving
                logger.exception("generation step failed; failing the sequences in flight")
                out = _Outbox()
                for s in [*self._prefilling, *self._batch.live_seqs()]:
                    self._fail(s, InferenceError(f"generation failed: {type(exc).__name__}: {exc}"), out)
                self._prefilling.clear()
                self._batch.clear()
                out.send()

    def _step(self) -> None:
        self._counters["steps"] += 1
        self._reap()
        self._admit()
        if self._prefilling:
            out = _Outbox()
            self._prefill(out)
            self._send(out)  # first tokens go out before the decode pass runs
        if self._batch.seqs:
            out = _Outbox()
            self._decode(out)
            self._send(out)
            self._batch.maybe_compact(self._counters["steps"])

    def _send(self, out: _Outbox) -> None:
        out.send()
        if out.lost:
            with self._cv:
                self._cancel_pending = True

    def _reap(self) -> None:
        if not self._cancel_pending:  # read without the lock: a cancel missed now is reaped next step
            return
        with self._cv:
            if not self._cancel_pending:
                return
            self._cancel_pending = False
            waiting = [s for s in self._waiting if s.cancelled]
            if waiting:
                self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)
        gone = waiting + [s for s in self._prefilling if s.cancelled]
        if len(gone) > len(waiting):
            self._prefilling = collections.deque(s for s in self._prefilling if not s.cancelled)
        for s in gone:
            self._release(s)
        leaving = [i for i, s in enumerate(self._batch.seqs) if s is not None and s.cancelled]
        for i in leaving:
            self._release(self._batch.seqs[i])
        self._counters["cancelled"] += len(gone) + len(leaving)
        if leaving:
            self._batch.leave(leaving, self._counters["steps"])

    def _admit(self) -> None:
        if self._waiting:  # read without the lock: a request queued meanwhile is admitted next step
            with self._cv:
                while self._waiting:
                    s = self._waiting[0]
                    if len(self._prefilling) + self._batch.live >= self.config.max_num_seqs:
                        break
                    if self._reserved + s.need > self.kv_capacity_tokens:
                        break
                    self._waiting.popleft()
                    s.reserve = s.need
                    self._reserved += s.reserve
                    self._prefilling.append(s)
                    self._counters["prompt_tokens"] += len(s.prompt)
        running = len(self._prefilling) + self._batch.live
        self._counters["max_running"] = max(self._counters["max_running"], running)

    def _prefill(self, out: _Outbox) -> None:
        """One prefill pass: several whole prompts, or the next chunk of one long prompt."""
        budget = self.config.prefill_chunk_tokens
        head = self._prefilling[0]
        if head.prefilled or len(head.prompt) > budget:
            group = [head]
            chunk = head.prompt[head.prefilled:head.prefilled + budget]
            ids = chunk[None, :]
            positions = np.arange(head.prefilled, head.prefilled + len(chunk), dtype=np.int64)[None, :]
            mask = np.ones((1, head.prefilled + len(chunk)), np.int64)
            past = head.kv if head.kv is not None else self.runner.empty(1)
        else:
            group, longest = [head], len(head.prompt)
            for s in list(self._prefilling)[1:]:
                wider = max(longest, len(s.prompt))
                if s.prefilled or wider * (len(group) + 1) > budget:
                    break
                group.append(s)
                longest = wider
            ids = np.zeros((len(group), longest), np.int64)
            mask = np.zeros((len(group), longest), np.int64)
            for r, s in enumerate(group):
                ids[r, longest - len(s.prompt):] = s.prompt
                mask[r, longest - len(s.prompt):] = 1
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
            past = self.runner.empty(len(group))
        self._counters["prefill_chunks"] += 1
        try:
            logits, present = self.runner.run(ids, mask, positions, past)
        except Exception as exc:  # onnxruntime's own error types
            self._fail_pass(group, exc, out)
            for _ in group:
                self._prefilling.popleft()
            return
        if len(group) == 1 and head.prefilled + ids.shape[1] < len(head.prompt):
            head.prefilled += ids.shape[1]
            head.kv = present  # more chunks to come
            return
        for _ in group:
            self._prefilling.popleft()
        for s in group:
            s.prefilled, s.kv = len(s.prompt), None
        sampling = SamplingBatch([s.params for s in group], [s.generator for s in group])
        tokens = sample(logits, sampling)
        lengths = np.array([len(s.prompt) for s in group], np.int64)
        finished = self._accept(group, tokens, out)
        if len(finished) < len(group):
            keep = np.array([i for i in range(len(group)) if i not in finished], np.int64)
            kv, mask = select(self.runner.to_host(present), mask, keep)
            if self._batch.live:
                self._counters["joined_running"] += len(keep)
            self._batch.join([group[i] for i in keep], kv, mask, lengths[keep], tokens[keep])

    def _decode(self, out: _Outbox) -> None:
        """One decode pass of the whole batch: each row feeds its last token."""
        b = self._batch
        mask = np.concatenate([b.mask, np.ones((len(b.seqs), 1), np.int64)], axis=1)  # (B, L + 1)
        self._counters["decode_steps"] += 1
        try:
            logits, present = self.runner.run(b.last[:, None], mask, b.positions[:, None], b.kv)
        except Exception as exc:
            seqs = b.live_seqs()
            b.clear()
            self._fail_pass(seqs, exc, out)
            return
        tokens = sample(logits, b.sampling)
        b.advance(present, mask, tokens)
        finished = self._accept(b.seqs, tokens, out)
        if finished:
            b.leave(finished, self._counters["steps"])

    # -- per-token bookkeeping ---------------------------------------------------------------

    def _accept(self, seqs: Sequence[Optional[_Seq]], tokens: np.ndarray, out: _Outbox) -> list[int]:
        """Text, stop and length checks for each sequence's new token; returns the rows that
        finished. A sequence holds at most context_length tokens, prompt and generated together.
        Runs once per row per step: attribute lookups are hoisted and counters summed once."""
        eos, ctx = self.spec.eos_token_id, self.spec.context_length
        stop_filter, put = self._stop_filter, out.put
        finished: list[int] = []
        accepted = 0
        try:
            for i, t in enumerate(tokens.tolist()):
                s = seqs[i]
                if s is None or s.cancelled:  # a free row; a consumer gone (the next step's reap frees it)
                    continue
                accepted += 1
                s.generated += 1
                finish = None
                if t == eos:
                    text, hit = stop_filter(s, s.detok.flush())
                    text += "" if hit else s.held
                    finish = "stop"
                else:
                    text, hit = stop_filter(s, s.detok.push([t]))
                    if hit:
                        finish = "stop"
                    elif s.generated >= s.params.max_tokens or len(s.prompt) + s.generated >= ctx:
                        tail, hit = stop_filter(s, s.detok.flush())
                        text += tail + ("" if hit else s.held)
                        finish = "stop" if hit else "length"
                put(s, GenerationChunk(text=text, token_ids=[t], finish_reason=finish,
                                       prompt_tokens=len(s.prompt), completion_tokens=s.generated))
                if finish is not None:
                    s.done = True
                    finished.append(i)
                    self._release(s)
        finally:  # counted once per pass, also when a row raised
            self._counters["generated_tokens"] += accepted
            self._counters["finished"] += len(finished)
        return finished

    @staticmethod
    def _stop_filter(s: _Seq, text: str) -> tuple[str, bool]:
        """The part of ``text`` that can be sent: cut before a stop string (-> True), and hold
        back a tail that could still become one."""
        stops = s.params.stop
        if not stops:
            return text, False
        buf = s.held + text
        cut = min((i for i in (buf.find(st) for st in stops) if i >= 0), default=-1)
        if cut >= 0:
            s.held = ""
            return buf[:cut], True
        longest = max(len(st) for st in stops)
        start = max(0, len(buf) - longest + 1)
        for i in range(start, len(buf)):
            tail = buf[i:]
            if any(st.startswith(tail) for st in stops):
                s.held = tail
                return buf[:i], False
        s.held = ""
        return buf, False

    def _release(self, s: _Seq) -> None:
        self._reserved -= s.reserve
        s.reserve = 0
        s.kv = None

    def _fail(self, s: _Seq, exc: MaasError, out: _Outbox) -> None:
        if s.done:
            return
        s.done = True
        self._release(s)
        out.put(s, exc)

    def _fail_pass(self, seqs: Sequence[_Seq], exc: Exception, out: _Outbox) -> None:
        logger.error("onnxruntime failed on a generation pass of %d sequences: %s", len(seqs), exc)
        self._counters["failed"] += len(seqs)
        for s in seqs:
            err = InferenceError(f"the model failed while generating: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
            self._fail(s, err, out)
