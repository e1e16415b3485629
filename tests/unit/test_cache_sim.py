"""benchmarks/cache_sim.py on a tiny cluster: its numbers move the way they must (more budget,
more hits; the count bound overshoots a byte budget on mixed sizes, the byte bound never does)."""

from __future__ import annotations

import pytest

from benchmarks.cache_sim import GB, SimConfig, main, model_sizes, simulate

pytestmark = pytest.mark.unit
TINY = {"models": 300, "replicas": 8, "requests": 6000, "rate": 400.0, "fallback": "pow2"}


def run(**kw):
    return simulate(SimConfig(**{**TINY, **kw}))


def test_model_sizes_are_the_mixed_distribution_and_seeded():
    sizes = model_sizes(2000, seed=3)
    small = [s for s in sizes if s <= 20_000_000]
    assert all(5_000_000 <= s <= 20_000_000 or 100_000_000 <= s <= 400_000_000 for s in sizes)
    assert 0.75 < len(small) / len(sizes) < 0.85
    assert model_sizes(2000, seed=3) == sizes != model_sizes(2000, seed=4)


def test_hit_rate_rises_with_budget_and_skew():
    small, large = run(budget_bytes=GB // 4, skew=1.0), run(budget_bytes=2 * GB, skew=1.0)
    assert small.hit_rate < large.hit_rate
    assert small.loads_per_s > large.loads_per_s and small.evictions > large.evictions
    assert run(budget_bytes=GB // 4, skew=0.6).hit_rate < run(budget_bytes=GB // 4, skew=1.4).hit_rate
    assert 0 < small.hit_rate < 1 and small.p50_ms <= small.p99_ms and small.p50_ms >= 10.0  # >= service time
    assert small.refused > 0 and large.refused == 0  # 100-400 MB versions: some are over 0.25 GB


def test_byte_budget_is_never_exceeded_and_the_count_bound_overshoots_it():
    by_bytes, by_count = run(budget_bytes=GB // 2, policy="bytes"), run(budget_bytes=GB // 2, policy="count")
    assert by_bytes.peak_bytes <= GB // 2 and by_bytes.replicas_over_budget == 0
    assert by_bytes.max_entries is None and by_count.max_entries >= 1
    assert by_count.peak_bytes > GB // 2 and by_count.replicas_over_budget > 0 and by_count.loads_over_budget > 0
    assert (by_bytes.hit_rate, by_bytes.loads_per_s) != (by_count.hit_rate, by_count.loads_per_s)


def test_same_seed_same_result():
    a, b = run(budget_bytes=GB // 2), run(budget_bytes=GB // 2)
    assert (a.hit_rate, a.p99_ms, a.evictions) == (b.hit_rate, b.p99_ms, b.evictions)


def test_cli_writes_the_markdown_table(tmp_path):
    out = tmp_path / "sim.md"
    main(["--models", "200", "--replicas", "4", "--requests", "2000", "--rate", "200",
          "--budgets-gb", "0.5", "--skews", "1.0", "--no-hot-table", "--out", str(out)])
    text = out.read_text()
    assert "python -m benchmarks.cache_sim --models 200" in text
    assert text.count("| 0.5 GB | 1 |") == 3  # bytes (two routings) and count
