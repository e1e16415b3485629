"""Per-request sampling over a batch of logits: greedy, temperature, top-k, top-p, and seeds
that reproduce a request's tokens whatever else is in the batch."""

from __future__ import annotations

import numpy as np
import pytest

from maas_ray.serving.generate.sampling import (
    TOP_P_CANDIDATES,
    SamplingBatch,
    make_generator,
    sample,
)
from maas_ray.serving.types import SamplingParams

pytestmark = pytest.mark.unit


def batch_of(*params: SamplingParams, seeds=None) -> SamplingBatch:
    seeds = seeds or [p.seed for p in params]
    return SamplingBatch(list(params), [make_generator(s) if p.temperature > 0 else None for p, s in zip(params, seeds)])


def draws(logits: np.ndarray, params: SamplingParams, n: int) -> np.ndarray:
    """n samples of one row's distribution: 10 steps of a batch of n / 10 rows seeded apart."""
    rows = max(1, n // 10)
    b = batch_of(*[params] * rows, seeds=list(range(rows)))
    stacked = np.broadcast_to(logits, (rows, len(logits)))
    return np.concatenate([sample(stacked, b) for _ in range(10)])


def test_temperature_zero_is_argmax_per_row():
    logits = np.random.default_rng(0).normal(size=(5, 50)).astype(np.float32)
    b = batch_of(*[SamplingParams(temperature=0)] * 5)
    assert sample(logits, b).tolist() == logits.argmax(axis=1).tolist()


def test_a_seed_reproduces_a_row_whatever_else_is_in_the_batch():
    rng = np.random.default_rng(1)
    steps = [rng.normal(size=(4, 100)).astype(np.float32) for _ in range(20)]
    mine = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=42)
    alone = batch_of(mine)
    crowd = batch_of(SamplingParams(temperature=1.5, seed=1), SamplingParams(temperature=0), mine,
                     SamplingParams(temperature=0.7, top_p=0.5, seed=3))
    got_alone = [int(sample(s[2:3], alone)[0]) for s in steps]
    got_crowd = [int(sample(s, crowd)[2]) for s in steps]
    assert got_alone == got_crowd
    other_seed = batch_of(SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=43))
    assert [int(sample(s[2:3], other_seed)[0]) for s in steps] != got_alone


def test_temperature_sampling_follows_the_softmax():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    got = np.bincount(draws(logits, SamplingParams(temperature=1.0), 20000), minlength=4) / 20000
    assert np.allclose(got, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    hot = np.bincount(draws(logits, SamplingParams(temperature=2.0), 20000), minlength=4) / 20000
    want = np.sqrt([0.5, 0.3, 0.15, 0.05])
    assert np.allclose(hot, want / want.sum(), atol=0.015)


def test_top_k_keeps_the_k_best_tokens():
    logits = np.random.default_rng(2).normal(size=200).astype(np.float32)
    logits *= 0.1  # nearly flat: every kept token is drawn
    got = set(draws(logits, SamplingParams(temperature=2.0, top_k=3), 3000).tolist())
    assert got == set(np.argsort(-logits)[:3].tolist())
    assert set(draws(logits, SamplingParams(temperature=2.0, top_k=1), 50).tolist()) == {int(logits.argmax())}


def test_top_p_keeps_the_smallest_set_reaching_p_after_top_k():
    probs = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    logits = np.log(probs)
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.65), 3000).tolist()) == {0, 1}
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.7), 3000).tolist()) == {0, 1}
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.71), 3000).tolist()) == {0, 1, 2}
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.01), 100).tolist()) == {0}
    # top-p of what top-k kept: of {0.4, 0.3} renormalized, 0.5 needs only the first
    assert set(draws(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.5), 500).tolist()) == {0}


def test_top_p_beyond_the_candidate_window_sorts_the_whole_row():
    vocab = 4 * TOP_P_CANDIDATES
    logits = np.zeros(vocab, np.float32)  # uniform: top_p 0.9 keeps ~90 % of the vocabulary
    got = draws(logits, SamplingParams(temperature=1.0, top_p=0.9), 4000)
    assert got.min() >= 0 and got.max() < vocab
    assert len(set(got.tolist())) > 2 * TOP_P_CANDIDATES


def test_the_batch_rejects_mismatched_rows():
    b = batch_of(SamplingParams(temperature=0))
    with pytest.raises(ValueError, match="rows"):
        sample(np.zeros((2, 5), np.float32), b)
    with pytest.raises(ValueError, match="no generator"):
        SamplingBatch([SamplingParams(temperature=1.0)], [None])
