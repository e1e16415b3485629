"""The KV-cache graph, run once per engine step, and the running batch's cache arrays.

:class:`GraphRunner` feeds the graph (the contract of
:class:`~maas_ray.registry.manifest.GenerationSpec`): numpy in and out on the CPU provider; on
CUDA it keeps the cache on the device with IO binding (``session.io_binding()``; the cache moves
to the host only when the batch's rows change: a join or a leave). The CUDA path cannot be tested
on a machine without a GPU: it is kept to the few lines of :meth:`GraphRunner._run_cuda`, which
the unit tests run with IO binding to host memory (``device = "cpu"``) to check everything but CUDA.

:class:`DecodeBatch` is the running batch: per layer (B, heads, L, head_dim) arrays with rows
left-padded to a common width L, an attention mask (B, L) of 1 = real, 0 = padding, and explicit
positions per row. Each decode step feeds the previous step's ``present.*`` as
``past_key_values.*`` unchanged (no copy on our side). A sequence that leaves frees its **slot**
(row) without a copy; one that joins takes a free slot in place when its cache fits the width.
The arrays are rebuilt (:func:`select` + :func:`merge`: one copy) only when a joiner is wider than
the batch or finds no free slot, when a slot stays free for ``compact_after_steps`` steps, or
when an eighth of the columns (at least :data:`TRIM_MIN_COLUMNS`) are padding in every live row
(each step copies and attends over every column: a decode pass of 32 rows costs about 7 ms of
CPU at width 64 and 11 ms at width 128 for the benchmark model). Measured (``benchmarks/engine.py``): copying
the cache at every join and leave cost about a third of the step time with staggered output
lengths at 32 sequences; re-padding at every step costs more still (``--parts layout``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np

from maas_ray.errors import ConfigError
from maas_ray.registry.manifest import GenerationSpec
from maas_ray.serving.generate.sampling import FREE_ROW, SamplingBatch

logger = logging.getLogger(__name__)

TRIM_MIN_COLUMNS = 16  # padding columns worth a copy of the cache to drop


CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_KV_DTYPES = {"FP32": np.float32, "FP16": np.float16}


class GraphRunner:
    """One onnxruntime session of a generative version: ``run`` a prefill chunk or a decode step."""

    def __init__(self, session: Any, spec: GenerationSpec) -> None:
        self.session, self.spec = session, spec
        self.past_names = [p.format(i=i) for i in range(spec.num_layers) for p in (spec.past_key, spec.past_value)]
        self.present_names = [p.format(i=i) for i in range(spec.num_layers)
                              for p in (spec.present_key, spec.present_value)]
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        need_in = {"input_ids", "attention_mask", *self.past_names} | ({"position_ids"} if spec.has_position_ids else set())
        missing = sorted(need_in - inputs) + sorted({"logits", *self.present_names} - outputs)
        if missing:
            raise ConfigError(f"the ONNX graph does not match its generation spec: missing {missing[:6]}")
        if spec.kv_dtype not in _KV_DTYPES:
            raise ConfigError(f"the generation engine runs FP32 or FP16 KV caches, got kv_dtype {spec.kv_dtype!r}")
        self.dtype = _KV_DTYPES[spec.kv_dtype]
        self.output_names = ["logits", *self.present_names]
        self.providers = list(session.get_providers())
        self.on_device = self.providers[0] == CUDA
        # A CPU-only session is run through its C binding: ``Session.run``'s Python wrapper
        # re-checks every feed at every call (names, OrtValue ownership, WebGPU graph capture:
        # about 30 us, ~5% of a batch-1 decode step on 2 cores) and falls back from a failed GPU
        # provider; none of it applies to the numpy feeds built here with the names checked above.
        binding = getattr(session, "_sess", None)
        self._sess_run = binding.run if self.providers == [CPU] and hasattr(binding, "run") else None
        self.device, self.device_id = "cuda", 0  # where IO binding keeps the cache (tests bind "cpu")
        if self.on_device:
            self.device_id = int(session.get_provider_options().get(CUDA, {}).get("device_id", 0))
        logger.info("generation engine session providers: %s (KV cache on %s)", self.providers,
                    f"cuda:{self.device_id}" if self.on_device else "the host")

    def empty(self, batch: int) -> list:
        """The cache of a prompt pass: per layer (B, heads, 0, head_dim) key and value."""
        z = np.zeros((batch, self.spec.num_kv_heads, 0, self.spec.head_dim), self.dtype)
        return [z] * len(self.past_names)  # host arrays on CUDA too: nothing to keep on the device

    def run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Sequence) -> tuple[np.ndarray, list]:
        """ids (B, S), mask (B, P+S), positions (B, S), past per layer (B, heads, P, head_dim)
        -> the last position's logits (B, vocab) and the new cache (B, heads, P+S, head_dim)."""
        if self.on_device:
            return self._run_cuda(ids, mask, positions, past)
        feeds = dict(zip(self.past_names, past))
        feeds["input_ids"], feeds["attention_mask"] = ids, mask
        if self.spec.has_position_ids:
            feeds["position_ids"] = positions
        if self._sess_run is not None:
            out = self._sess_run(self.output_names, feeds, None)
        else:
            out = self.session.run(self.output_names, feeds)
        return out[0][:, -1, :], out[1:]

    def _run_cuda(self, ids, mask, positions, past):
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        if self.spec.has_position_ids:
            binding.bind_cpu_input("position_ids", positions)
        for name, value in zip(self.past_names, past):
            if isinstance(value, np.ndarray):  # an empty prompt-pass cache
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits")  # to the host: sampling runs in numpy
        for name in self.present_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        out = binding.get_outputs()
        return out[0].numpy()[:, -1, :], list(out[1:])

    def to_host(self, kv: Sequence) -> list[np.ndarray]:
        return [v if isinstance(v, np.ndarray) else v.numpy() for v in kv]

    def to_device(self, kv: Sequence[np.ndarray]) -> list:
        if not self.on_device:
            return list(kv)
        from onnxruntime import OrtValue

        return [OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, self.device_id) for a in kv]


def merge(kv_a: Sequence[np.ndarray], mask_a: np.ndarray, kv_b: Sequence[np.ndarray],
          mask_b: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Rows of two left-padded caches in one: the shorter is padded on the left to the longer."""
    (na, la), (nb, lb) = mask_a.shape, mask_b.shape
    width = max(la, lb)
    mask = np.zeros((na + nb, width), mask_a.dtype)
    mask[:na, width - la:] = mask_a
    mask[na:, width - lb:] = mask_b
    out = []
    for a, b in zip(kv_a, kv_b):
        m = np.empty((na + nb, a.shape[1], width, a.shape[3]), a.dtype)  # (B, heads, L, head_dim)
        m[:na, :, :width - la] = 0  # padding: never attended, but must be finite (0 x NaN is NaN)
        m[na:, :, :width - lb] = 0
        m[:na, :, width - la:] = a
        m[na:, :, width - lb:] = b
        out.append(m)
    return out, mask


def select(kv: Sequence[np.ndarray], mask: np.ndarray, rows: np.ndarray,
           start: Optional[int] = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Only ``rows`` of a cache, from column ``start`` (default: the first that is not padding in
    all of them)."""
    everyone = len(rows) == mask.shape[0]
    mask = mask if everyone else mask[rows]
    if start is None:
        real = mask.any(axis=0)
        start = int(np.argmax(real)) if real.any() else mask.shape[1]
    if everyone and start == 0:
        return list(kv), mask  # nothing to drop: no copy
    return [a[rows, :, start:] for a in kv], np.ascontiguousarray(mask[:, start:])


class DecodeBatch:
    """The running batch's slots and cache. ``seqs[i]`` is the sequence in row i, or None for a
    free row (fed token 0 at position 0: computed and ignored). Items need ``params`` and
    ``generator`` (for :class:`~.sampling.SamplingBatch`)."""

    def __init__(self, runner: GraphRunner, compact_after_steps: int = 16) -> None:
        self.runner = runner
        self.compact_after_steps = compact_after_steps  # a row free this long is dropped (it costs compute)
        self.joins_in_place = self.rebuilds = 0  # counters: joins without a copy, copies of the cache
        self.clear()

    def clear(self) -> None:
        self.seqs: list[Optional[Any]] = []
        self.kv: list = []
        self.mask = np.zeros((0, 0), np.int64)
        self.positions = np.zeros(0, np.int64)  # per row: tokens in its cache = position of the next feed
        self.last = np.zeros(0, np.int64)  # per row: the token fed next
        self.free_since: dict[int, int] = {}  # free row -> the step it was freed
        self.left = False  # a row left since the last compaction check
        self.sampling = None

    @property
    def live(self) -> int:
        return len(self.seqs) - len(self.free_since)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def live_seqs(self) -> list:
        return [s for s in self.seqs if s is not None]

    def advance(self, present: list, mask: np.ndarray, tokens: np.ndarray) -> None:
        """After a decode pass: its cache and mask are the batch's; each row feeds its token next."""
        self.kv, self.mask, self.last = present, mask, tokens
        self.positions += 1  # the batch's own array (join and compaction make new ones)
        if self.free_since:
            free = list(self.free_since)
            self.positions[free] = 0  # a free row never walks past the position table
            self.last[free] = 0

    def join(self, seqs: list, kv: list[np.ndarray], mask: np.ndarray, positions: np.ndarray,
             last: np.ndarray) -> None:
        """Add sequences whose host cache is ``kv`` (n, heads, Lg, head_dim), left-padded by ``mask``."""
        n, width = mask.shape
        free = sorted(self.free_since)[:n]
        if len(free) == n and width <= self.width and not self.runner.on_device:
            start = self.width - width
            for j, row in enumerate(free):  # in place: stale columns left of the mask are never attended
                for a, b in zip(self.kv, kv):
                    a[row, :, start:] = b[j]
                self.mask[row] = 0
                self.mask[row, start:] = mask[j]
                self.seqs[row] = seqs[j]
                del self.free_since[row]
            self.positions[free], self.last[free] = positions, last
            self.joins_in_place += 1
        elif not self.seqs:
            self.kv, self.mask = self.runner.to_device(kv), mask
            self.seqs, self.positions, self.last = list(seqs), positions, last
        else:
            live = [i for i, s in enumerate(self.seqs) if s is not None]
            old, old_mask = select(self.runner.to_host(self.kv), self.mask, np.asarray(live, np.int64))
            merged, self.mask = merge(old, old_mask, kv, mask)
            self.kv = self.runner.to_device(merged)
            self.seqs = [self.seqs[i] for i in live] + list(seqs)
            self.positions = np.concatenate([self.positions[live], positions])
            self.last = np.concatenate([self.last[live], last])
            self.free_since = {}
            self.rebuilds += 1
        self._resample()

    def leave(self, rows: Sequence[int], step: int) -> None:
        """Free rows (no copy); the batch is empty once no row is live."""
        self.left = True
        for r in rows:
            self.seqs[r] = None
            self.free_since[r] = step
            self.positions[r] = self.last[r] = 0
        if not self.live:
            self.clear()
        else:
            self._resample()

    def maybe_compact(self, step: int) -> None:
        """Drop long-free rows and the padding columns no live row needs (one copy), when it pays."""
        if not self.seqs:
            return
        old = bool(self.free_since) and min(self.free_since.values()) <= step - self.compact_after_steps
        first = 0
        if self.left and self.width >= 2 * TRIM_MIN_COLUMNS:  # only a leave frees leading columns
            self.left = False
            live = np.fromiter((s is not None for s in self.seqs), bool, len(self.seqs))
            first = int(np.argmax(self.mask[live].any(axis=0)))
            # Every step copies and attends over all columns: a copy that drops an eighth of them
            # pays for itself within a few steps.
            if first < max(TRIM_MIN_COLUMNS, self.width // 8):
                first = 0
        if old or first:
            # Trimming alone keeps the free rows for joiners; dropping them trims too.
            rows = [i for i, s in enumerate(self.seqs) if s is not None] if old else list(range(len(self.seqs)))
            keep = np.asarray(rows, np.int64)
            kv, self.mask = select(self.runner.to_host(self.kv), self.mask, keep, None if old else first)
            self.kv = self.runner.to_device(kv)
            self.seqs = [self.seqs[i] for i in rows]
            self.positions, self.last = self.positions[keep], self.last[keep]
            self.free_since = {} if old else self.free_since
            self.rebuilds += 1
            self._resample()

    def _resample(self) -> None:
        self.sampling = SamplingBatch([FREE_ROW if s is None else s.params for s in self.seqs],
                                      [None if s is None else s.generator for s in self.seqs])
