"""Per-request sampling over a batch of next-token logits, in numpy.

Each row of the batch has its own temperature (0 = greedy: argmax), top-k, top-p and random
generator (``numpy.random.Generator`` seeded from the request's ``seed``). A sampled row draws
exactly one uniform number per step from its own generator, so a seeded request produces the
same tokens whatever else shares the batch. The order is Hugging Face's and vLLM's: temperature,
then top-k, then top-p over what top-k kept.

The work is vectorized across rows: one argmax for all greedy rows, one softmax for all sampled
rows, one ``argpartition`` for the rows that filter (candidates: the top ``max(k)`` tokens, or
:data:`TOP_P_CANDIDATES` when top-p alone filters; a row whose candidates hold less than its
top-p mass falls back to a full sort). ``benchmarks/engine.py --sampler`` measures it against a
loop over rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from maas_ray.serving.types import SamplingParams

TOP_P_CANDIDATES = 256  # top-p alone: sort only the best 256 tokens (a full sort is the fallback)
FREE_ROW = SamplingParams(max_tokens=1, temperature=0)  # a batch row nobody uses: argmax, ignored


def make_generator(seed: Optional[int]) -> np.random.Generator:
    """A request's generator: reproducible from ``seed``, fresh entropy without one."""
    return np.random.default_rng(seed)


@dataclass
class SamplingBatch:
    """The sampling settings of the rows of a batch, in row order; build it when rows change
    (a sequence joins or leaves), not every step."""

    params: Sequence[SamplingParams]
    generators: Sequence[Optional[np.random.Generator]]
    temperature: np.ndarray = field(init=False)  # (B,) float32
    top_k: np.ndarray = field(init=False)  # (B,) int64, 0 = off
    top_p: np.ndarray = field(init=False)  # (B,) float32
    greedy_rows: np.ndarray = field(init=False)
    sampled_rows: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.temperature = np.array([p.temperature for p in self.params], np.float32)
        self.top_k = np.array([p.top_k for p in self.params], np.int64)
        self.top_p = np.array([p.top_p for p in self.params], np.float32)
        self.greedy_rows = np.flatnonzero(self.temperature == 0)
        self.sampled_rows = np.flatnonzero(self.temperature > 0)
        for r in self.sampled_rows:
            if self.generators[r] is None:
                raise ValueError(f"row {r} samples (temperature {self.temperature[r]}) but has no generator")

    def __len__(self) -> int:
        return len(self.params)


def sample(logits: np.ndarray, batch: SamplingBatch) -> np.ndarray:
    """Next token of every row: ``logits`` (B, vocab) float -> (B,) int64."""
    if logits.shape[0] != len(batch):
        raise ValueError(f"logits have {logits.shape[0]} rows, the sampling batch {len(batch)}")
    if not len(batch.sampled_rows):  # all greedy: one argmax, no gather
        return logits.argmax(axis=1)
    out = np.empty(len(batch), np.int64)
    if len(batch.greedy_rows):
        out[batch.greedy_rows] = logits[batch.greedy_rows].argmax(axis=1)
    rows = batch.sampled_rows
    if len(rows):
        u = np.array([batch.generators[r].random() for r in rows], np.float64)  # one draw per row per step
        out[rows] = _sample_rows(logits[rows], batch.temperature[rows], batch.top_k[rows], batch.top_p[rows], u)
    return out


def _sample_rows(logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
                 u: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling of (n, V) logits with per-row temperature, top-k, top-p and uniform ``u``."""
    n, vocab = logits.shape
    x = logits.astype(np.float32, copy=False) / temperature[:, None]
    x -= x.max(axis=1, keepdims=True)
    e = np.exp(x)  # (n, V) unnormalized probabilities
    out = np.empty(n, np.int64)
    k = np.where((top_k > 0) & (top_k < vocab), top_k, 0)
    filters = (k > 0) | (top_p < 1.0)
    plain = np.flatnonzero(~filters)
    if len(plain):  # the whole distribution
        c = np.cumsum(e[plain], axis=1, dtype=np.float64)
        out[plain] = _searchsorted_rows(c, u[plain] * c[:, -1])
    rows = np.flatnonzero(filters)
    if len(rows):
        out[rows] = _sample_filtered(e[rows], x[rows], k[rows], top_p[rows], u[rows])
    return out


def _sample_filtered(e: np.ndarray, x: np.ndarray, k: np.ndarray, top_p: np.ndarray, u: np.ndarray,
                     width: int = 0) -> np.ndarray:
    n, vocab = e.shape
    if not width:
        width = int(k.max()) if (k > 0).all() else max(int(k.max()), TOP_P_CANDIDATES)
    width = min(width, vocab)
    if width < vocab:
        cand = np.argpartition(-x, width - 1, axis=1)[:, :width]  # (n, width) best tokens, unordered
        ce = np.take_along_axis(e, cand, axis=1)
    else:
        cand, ce = np.broadcast_to(np.arange(vocab), (n, vocab)), e
    order = np.argsort(-ce, axis=1, kind="stable")
    cand = np.take_along_axis(cand, order, axis=1)  # (n, width) best first
    ce = np.take_along_axis(ce, order, axis=1)
    keep = np.arange(width)[None, :] < np.where(k > 0, k, width)[:, None]  # top-k
    w = ce * keep
    kept_mass = w.sum(axis=1, dtype=np.float64)
    total = np.where(k > 0, kept_mass, e.sum(axis=1, dtype=np.float64))  # top-p is of what top-k kept
    before = np.cumsum(w, axis=1, dtype=np.float64) - w  # mass of the better tokens
    keep &= before < (top_p * total)[:, None]  # the smallest set reaching top_p (the best token always)
    c = np.cumsum(ce * keep, axis=1, dtype=np.float64)
    out = cand[np.arange(n), _searchsorted_rows(c, u * c[:, -1])]
    short = np.flatnonzero((k == 0) & (kept_mass < top_p * total)) if width < vocab else []
    if len(short):  # the candidates hold less than top_p of the mass: sort those rows whole
        out[short] = _sample_filtered(e[short], x[short], k[short], top_p[short], u[short], width=vocab)
    return out


def _searchsorted_rows(c: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per row, the first index whose cumulative weight exceeds the target (clamped to the row)."""
    idx = (c <= targets[:, None]).sum(axis=1)
    return np.minimum(idx, c.shape[1] - 1)
