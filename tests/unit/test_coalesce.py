"""Coalescer: batches form from what queued while a batch ran, within max_items and concurrency."""

from __future__ import annotations

import asyncio

import pytest

from maas_ray.errors import InvalidInputError
from maas_ray.serving.coalesce import Coalescer


class Recorder:
    """A batch function that records its batches and takes ``delay_s`` (a handle call, a run)."""

    def __init__(self, delay_s: float = 0.01) -> None:
        self.batches: list[list] = []
        self.delay_s = delay_s
        self.running = 0
        self.most_running = 0

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        await asyncio.sleep(self.delay_s)
        self.running -= 1
        return [InvalidInputError(f"bad {i}") if i == "bad" else i * 10 for i in items]


def test_requests_arriving_during_a_batch_form_the_next_one():
    async def go():
        run = Recorder()
        c = Coalescer(run, max_items=64)
        first = asyncio.ensure_future(c.submit(1))
        await asyncio.sleep(0.001)  # the first batch (of one: nothing else queued) is running
        rest = [asyncio.ensure_future(c.submit(i)) for i in range(2, 12)]
        return await asyncio.gather(first, *rest), run.batches

    results, batches = asyncio.run(go())
    assert results == [i * 10 for i in range(1, 12)]
    assert batches == [[1], list(range(2, 12))]


def test_max_items_counts_rows_and_an_oversized_item_still_runs_alone():
    async def go():
        run = Recorder()
        c = Coalescer(run, max_items=4, size=len)
        items = [(1, 2), (3,), (4, 5), (6, 7, 8, 9, 10), (11,)]
        await asyncio.gather(*(c.submit(i) for i in items))
        return run.batches

    batches = asyncio.run(go())
    assert batches == [[(1, 2), (3,)], [(4, 5)], [(6, 7, 8, 9, 10)], [(11,)]]
    assert all(sum(map(len, b)) <= 4 or len(b) == 1 for b in batches)


def test_concurrency_bounds_batches_in_flight():
    async def go(concurrency: int):
        run = Recorder(delay_s=0.02)
        c = Coalescer(run, max_items=2, concurrency=concurrency)
        await asyncio.gather(*(c.submit(i) for i in range(12)))
        return run

    one, three = asyncio.run(go(1)), asyncio.run(go(3))
    assert one.most_running == 1 and three.most_running == 3
    assert sorted(x for b in three.batches for x in b) == list(range(12))


def test_an_item_error_is_that_items_and_a_batch_error_is_everyones():
    async def go():
        c = Coalescer(Recorder(), max_items=8)
        per_item = await asyncio.gather(c.submit(1), c.submit("bad"), c.submit(3), return_exceptions=True)

        async def broken(items: list) -> list:
            raise RuntimeError("replica gone")

        b = Coalescer(broken, max_items=8)
        whole = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
        return per_item, whole

    per_item, whole = asyncio.run(go())
    assert per_item[0] == 10 and per_item[2] == 30 and isinstance(per_item[1], InvalidInputError)
    assert all(isinstance(e, RuntimeError) and "replica gone" in str(e) for e in whole)


def test_a_cancelled_caller_is_dropped_and_the_queue_keeps_going():
    async def go():
        run = Recorder()
        c = Coalescer(run, max_items=8)
        first = asyncio.ensure_future(c.submit(1))
        await asyncio.sleep(0.001)
        gone = asyncio.ensure_future(c.submit(2))
        kept = asyncio.ensure_future(c.submit(3))
        await asyncio.sleep(0)
        gone.cancel()
        return await first, await kept, run.batches

    first, kept, batches = asyncio.run(go())
    assert (first, kept) == (10, 30)
    assert batches == [[1], [3]]


def test_an_item_whose_size_cannot_be_read_fails_alone_and_the_queue_keeps_going():
    def size(item):
        if item == "scalar":
            raise IndexError("tuple index out of range")  # a 0-d array's shape[0]
        return 1

    async def go():
        run = Recorder()
        c = Coalescer(run, max_items=8, size=size)
        first = asyncio.ensure_future(c.submit(1))
        await asyncio.sleep(0.001)  # 1 runs; the next three queue behind it
        others = [asyncio.ensure_future(c.submit(i)) for i in (2, "scalar", 3)]
        results = await asyncio.gather(first, *others, return_exceptions=True)
        later = await c.submit(4)  # the queue still drains afterwards
        return results, later, run.batches

    results, later, batches = asyncio.run(go())
    assert results[:2] == [10, 20] and results[3] == 30
    assert isinstance(results[2], IndexError)
    assert later == 40
    assert batches == [[1], [2, 3], [4]]


def test_wait_s_lets_a_batch_fill():
    async def go(wait_s: float):
        run = Recorder(delay_s=0.0)
        c = Coalescer(run, max_items=8, wait_s=wait_s)

        async def late(i: int) -> int:
            await asyncio.sleep(0.005)
            return await c.submit(i)

        await asyncio.gather(c.submit(0), late(1), late(2))
        return run.batches

    assert asyncio.run(go(0.05)) == [[0, 1, 2]]
    assert asyncio.run(go(0.0))[0] == [0]


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="max_items"):
        Coalescer(Recorder(), max_items=0)


def test_a_full_queue_refuses_at_once():
    async def go():
        c = Coalescer(Recorder(delay_s=0.05), max_items=1, max_queued=2, overflow=lambda: OverflowError("full"))
        burst = await asyncio.gather(*(c.submit(i) for i in range(6)), return_exceptions=True)
        return burst, await c.submit(7)

    burst, later = asyncio.run(go())
    # two queued at once, the other four refused without waiting; the drained queue takes more
    assert burst[:2] == [0, 10] and all(isinstance(r, OverflowError) for r in burst[2:])
    assert later == 70
