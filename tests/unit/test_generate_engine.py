"""The generation engine against a real onnxruntime session of a tiny published ``decoder-lm``
(no Ray): greedy output equals torch's, continuous batching (joins, chunked prefill, leaves),
stop strings, lengths, seeds, cancellation, admission bounds, and step failures."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from pydantic import ValidationError

from maas_ray.errors import InferenceError, InvalidInputError, ModelNotReadyError
from maas_ray.registry import Registry
from maas_ray.runtime import create_session
from maas_ray.serving.generate import EngineConfig, GenerationEngine, LMTokenizer
from maas_ray.serving.generate.kv import GraphRunner
from maas_ray.serving.types import SamplingParams
from tests.helpers.lm import publish_tiny_lm

pytestmark = pytest.mark.unit

CONTEXT = 128
PROMPTS = ["the small cat", "two dogs chase the ball in the park", "every", "a"]


class LM:
    def __init__(self, root):
        self.registry = Registry(str(root))
        self.version = publish_tiny_lm(self.registry, "tiny-lm", context_length=CONTEXT).version
        loaded = self.registry.load("tiny-lm", self.version, files=["tokenizer.json"])
        self.spec = loaded.manifest.generation
        self.tokenizer = LMTokenizer.from_bytes(loaded.files["tokenizer.json"], self.spec)
        self.session = create_session(loaded.model_bytes, device="cpu", intra_op_threads=1)
        self._refs: dict = {}
        self._torch = None

    def reference(self, ids: list[int], n: int) -> list[int]:
        """torch's greedy continuation (tests/helpers/lm.py's torch_greedy with the model loaded
        once), cut after the first EOS (where the engine stops)."""
        from maas_ray.train.lm.export import greedy_torch

        key = (tuple(ids), n)
        if key not in self._refs:
            if self._torch is None:  # one model for every reference (the helper loads one per call)
                from maas_ray.train.lm.publish import load_published_lm

                self._torch = load_published_lm(self.registry, "tiny-lm", self.version).model
            ref = greedy_torch(self._torch, ids, n)
            eos = self.spec.eos_token_id
            self._refs[key] = ref[: ref.index(eos) + 1] if eos in ref else ref
        return self._refs[key]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return LM(tmp_path_factory.mktemp("lm-registry"))


@pytest.fixture
def engine(lm):
    engines = []

    def make(pass_delay_s: float = 0.0, **config):
        """An engine; ``pass_delay_s`` slows each onnxruntime pass, so a test that reacts to a
        running sequence sees it running even on a loaded machine (nothing asserts a duration)."""
        eng = GenerationEngine(lm.session, lm.spec, lm.tokenizer, EngineConfig(**config))
        if pass_delay_s:
            run = eng.runner.run

            def slow_run(*args):
                time.sleep(pass_delay_s)
                return run(*args)

            eng.runner.run = slow_run
        engines.append(eng.start())
        return eng

    yield make
    for e in engines:
        e.stop()


async def collect(engine, ids, params, **kw):
    """(token ids, text, chunks) of one request."""
    chunks = [c async for c in engine.generate(ids, params, **kw)]
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks), chunks


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


async def until(predicate, what: str, timeout_s: float = 30.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def test_greedy_output_of_concurrent_requests_equals_torch_run_alone(lm, engine):
    eng = engine()
    prompts = [lm.tokenizer.encode(p) for p in PROMPTS]

    async def main():
        return await asyncio.gather(*[collect(eng, ids, greedy(24)) for ids in prompts])

    results = asyncio.run(main())
    for ids, (tokens, text, chunks) in zip(prompts, results):
        assert tokens == lm.reference(ids, 24)
        assert text == lm.tokenizer.decode(tokens)
        assert chunks[-1].finish_reason in ("stop", "length")
        assert all(c.finish_reason is None for c in chunks[:-1])
        assert chunks[-1].prompt_tokens == len(ids) and chunks[-1].completion_tokens == len(tokens)
    st = eng.stats()
    assert st["finished"] == len(prompts) and st["running"] == 0 and st["kv_tokens"] == 0
    assert st["max_running"] > 1  # they shared the batch


def test_requests_arriving_mid_generation_join_the_running_batch(lm, engine):
    eng = engine(pass_delay_s=0.002)
    first = lm.tokenizer.encode("a long story begins")
    later = [lm.tokenizer.encode(p) for p in PROMPTS[:3]]

    async def main():
        results = {}
        joined = []

        async def long_one():
            out = []
            async for c in eng.generate(first, greedy(CONTEXT - len(first))):
                out += c.token_ids
                if len(out) == 2:  # the batch is decoding: now others arrive
                    joined.extend(asyncio.ensure_future(collect(eng, ids, greedy(16))) for ids in later)
            results["first"] = out

        await long_one()
        return results["first"], [r[0] for r in await asyncio.gather(*joined)]

    out_first, outs = asyncio.run(main())
    assert out_first == lm.reference(first, CONTEXT - len(first))
    for ids, out in zip(later, outs):
        assert out == lm.reference(ids, 16)
    assert eng.stats()["joined_running"] > 0


def test_a_sequence_joins_into_the_row_a_finished_one_freed(lm, engine):
    eng = engine(compact_after_steps=1_000_000, pass_delay_s=0.002)
    long_ids, short_ids, later = (lm.tokenizer.encode(p) for p in ("a long story begins", "two", "every"))

    async def main():
        first = asyncio.ensure_future(collect(eng, long_ids, greedy(CONTEXT - len(long_ids))))
        await until(lambda: eng.stats()["running"] == 1, "the long request to run")
        short = await collect(eng, short_ids, greedy(3))
        await until(lambda: eng.stats()["batch_rows"] > eng.stats()["running"], "a free row")
        joined = await collect(eng, later, greedy(12))
        return (await first)[0], short[0], joined[0]

    out_long, out_short, out_later = asyncio.run(main())
    assert out_long == lm.reference(long_ids, CONTEXT - len(long_ids))
    assert out_short == lm.reference(short_ids, 3)
    assert out_later == lm.reference(later, 12)
    assert eng.stats()["joins_in_place"] >= 1


@pytest.mark.parametrize("compact_after_steps", [1, 16])
def test_staggered_arrivals_and_finishes_keep_every_output_equal_to_its_solo_run(lm, engine, compact_after_steps):
    eng = engine(compact_after_steps=compact_after_steps, prefill_chunk_tokens=16)
    words = "the small cat and two dogs chase the ball in the park every day".split()
    jobs = [(lm.tokenizer.encode(" ".join(words[i % 5: i % 5 + 2 + (7 * i) % 11])), 4 + (13 * i) % 37)
            for i in range(12)]

    async def client(mine):
        return [(await collect(eng, ids, greedy(n)))[0] for ids, n in mine]

    async def main():
        return await asyncio.gather(*[client(jobs[i::4]) for i in range(4)])

    outs = asyncio.run(main())
    for i in range(4):
        for (ids, n), out in zip(jobs[i::4], outs[i]):
            assert out == lm.reference(ids, n)
    st = eng.stats()
    assert st["finished"] == len(jobs) and st["running"] == 0 and st["kv_tokens"] == 0


def test_the_io_binding_path_gives_the_same_tokens(lm):
    """The CUDA path (cache kept as OrtValues, IO binding, copies to the host only on join and
    leave) run with host memory: everything but the device itself."""
    eng = GenerationEngine(lm.session, lm.spec, lm.tokenizer, EngineConfig(prefill_chunk_tokens=8))
    eng.runner.on_device, eng.runner.device = True, "cpu"
    eng.start()
    prompts = [lm.tokenizer.encode(p) for p in PROMPTS]

    async def main():
        first = asyncio.ensure_future(collect(eng, prompts[1], greedy(30)))
        await until(lambda: eng.stats()["running"] == 1, "the first request to run")
        rest = asyncio.gather(*[collect(eng, ids, greedy(8 + 4 * i)) for i, ids in enumerate(prompts)])
        return [await first, *await rest]

    try:
        outs = asyncio.run(main())
    finally:
        eng.stop()
    assert outs[0][0] == lm.reference(prompts[1], 30)
    for i, (ids, out) in enumerate(zip(prompts, outs[1:])):
        assert out[0] == lm.reference(ids, 8 + 4 * i)


def test_a_cpu_session_is_run_through_its_binding_with_the_outputs_of_session_run(lm):
    class Wrapped:  # a session without onnxruntime's C binding: runs go through its run()
        _sess = None

        def __init__(self, session):
            self._session = session

        def __getattr__(self, name):
            return getattr(self._session, name)

    direct, wrapped = GraphRunner(lm.session, lm.spec), GraphRunner(Wrapped(lm.session), lm.spec)
    assert direct._sess_run is not None and wrapped._sess_run is None
    ids = np.array([lm.tokenizer.encode(PROMPTS[1])], np.int64)
    mask, positions = np.ones_like(ids), np.arange(ids.shape[1], dtype=np.int64)[None, :]
    steps = []
    for runner in (direct, wrapped):
        logits, kv = runner.run(ids, mask, positions, runner.empty(1))
        last, mask1 = logits.argmax(axis=1)[:, None], np.ones((1, ids.shape[1] + 1), np.int64)
        logits1, kv1 = runner.run(last, mask1, np.array([[ids.shape[1]]], np.int64), kv)
        steps.append([logits, *kv, logits1, *kv1])
    assert all(np.array_equal(a, b) for a, b in zip(*steps))


def test_a_long_prompt_is_prefilled_in_chunks_and_outputs_do_not_change(lm, engine):
    eng = engine(prefill_chunk_tokens=8)
    long_ids = lm.tokenizer.encode("the small cat and two dogs chase the ball in the park every day " * 2)[:70]
    short = lm.tokenizer.encode("every")
    assert len(long_ids) > 3 * 8

    async def main():
        return await asyncio.gather(collect(eng, short, greedy(30)), collect(eng, long_ids, greedy(20)))

    (out_short, _, _), (out_long, _, _) = asyncio.run(main())
    assert out_short == lm.reference(short, 30)
    assert out_long == lm.reference(long_ids, 20)
    assert eng.stats()["prefill_chunks"] >= -(-len(long_ids) // 8)


def _straddling_stop(lm, tokens: list[int]) -> str:
    """Two characters across the first boundary between two tokens that both have text."""
    pieces = [lm.tokenizer.decode([t]) for t in tokens]
    for a, b in zip(pieces, pieces[1:]):
        if a and b and "\ufffd" not in a + b:
            return a[-1] + b[0]
    pytest.skip("the model's output has no two adjacent text tokens")


def test_stop_strings_cut_the_text_before_them_even_across_tokens(lm, engine):
    eng = engine()
    ids = lm.tokenizer.encode("the small cat")

    async def main():
        tokens, full, _ = await collect(eng, ids, greedy(24))
        stop = _straddling_stop(lm, tokens)
        _, text, chunks = await collect(eng, ids, greedy(24, stop=[stop]))
        _, text_never, chunks_never = await collect(eng, ids, greedy(24, stop=["\u2603never\u2603"]))
        _, text_first, chunks_first = await collect(eng, ids, greedy(24, stop=["zzzz", full[:1]]))
        return full, stop, text, chunks, text_never, chunks_never, text_first, chunks_first

    full, stop, text, chunks, text_never, chunks_never, text_first, chunks_first = asyncio.run(main())
    assert text == full[: full.index(stop)] and chunks[-1].finish_reason == "stop"
    assert stop not in "".join(c.text for c in chunks)
    assert text_never == full and chunks_never[-1].finish_reason in ("stop", "length")
    assert text_first == "" and chunks_first[-1].finish_reason == "stop"


def test_max_tokens_and_a_full_context_finish_with_length(lm, engine):
    eng = engine()
    ids = lm.tokenizer.encode("two dogs")

    async def main():
        return await collect(eng, ids, greedy(5))

    tokens, _, chunks = asyncio.run(main())
    if lm.spec.eos_token_id not in tokens:
        assert len(tokens) == 5 and chunks[-1].finish_reason == "length"

    eng.check = lambda *a: None  # a caller that skipped the check: the engine still stops at the context
    long_ids = (ids * CONTEXT)[: CONTEXT - 3]

    async def overflow():
        return await collect(eng, long_ids, greedy(50))

    tokens, _, chunks = asyncio.run(overflow())
    ref = lm.reference(long_ids, 3)
    assert tokens == ref
    if lm.spec.eos_token_id not in tokens:
        assert chunks[-1].finish_reason == "length" and len(long_ids) + len(tokens) == CONTEXT


def test_a_seeded_request_samples_the_same_tokens_whatever_shares_the_batch(lm, engine):
    eng = engine()
    ids = lm.tokenizer.encode("the small cat")
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, top_k=100, seed=1234)

    async def main():
        alone = await collect(eng, ids, params)
        others = [collect(eng, lm.tokenizer.encode(p), SamplingParams(max_tokens=25, temperature=1.3, seed=i))
                  for i, p in enumerate(PROMPTS)]
        crowded = await asyncio.gather(*others[:2], collect(eng, ids, params), *others[2:])
        return alone[0], crowded[2][0]

    alone, crowded = asyncio.run(main())
    assert alone == crowded


def test_a_consumer_that_stops_frees_its_slot_and_kv(lm, engine):
    eng = engine(pass_delay_s=0.002)
    ids = lm.tokenizer.encode("a long story")

    async def main():
        agen = eng.generate(ids, greedy(CONTEXT - len(ids)))
        await agen.__anext__()
        await agen.__anext__()
        assert eng.stats()["kv_tokens"] > 0
        await agen.aclose()
        await until(lambda: eng.stats()["running"] == 0, "the closed stream's sequence to leave")

        async def consume():
            async for _ in eng.generate(ids, greedy(CONTEXT - len(ids))):
                await asyncio.sleep(0)

        task = asyncio.ensure_future(consume())
        await until(lambda: eng.stats()["running"] == 1, "the second stream to run")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: eng.stats()["running"] == 0, "the cancelled task's sequence to leave")

    asyncio.run(main())
    st = eng.stats()
    assert st["running"] == 0 and st["kv_tokens"] == 0 and st["cancelled"] == 2


def test_a_full_queue_answers_503_with_retry_after(lm, engine):
    eng = engine(max_num_seqs=1, max_waiting=1, retry_after_s=2.0, pass_delay_s=0.002)
    ids = lm.tokenizer.encode("a")

    async def main():
        running = eng.generate(ids, greedy(CONTEXT - len(ids)))
        await running.__anext__()  # admitted, decoding
        waiting = asyncio.ensure_future(collect(eng, ids, greedy(2)))
        await until(lambda: eng.stats()["waiting"] == 1, "the second request to queue")
        with pytest.raises(ModelNotReadyError) as err:
            await collect(eng, ids, greedy(2))
        await running.aclose()
        await waiting
        return err.value

    err = asyncio.run(main())
    assert err.status_code == 503 and err.retry_after_s == 2.0 and "max_waiting 1" in str(err)
    assert eng.stats()["rejected"] == 1


def test_the_kv_budget_admits_a_sequence_only_when_it_fits(lm, engine):
    ids = lm.tokenizer.encode("two dogs")
    eng = engine(kv_capacity_tokens=len(ids) + 10)

    async def main():
        return await asyncio.gather(*[collect(eng, ids, greedy(10)) for _ in range(3)])

    outs = asyncio.run(main())
    assert all(o[0] == lm.reference(ids, 10) for o in outs)
    st = eng.stats()
    assert st["max_running"] == 1 and st["finished"] == 3 and st["kv_tokens"] == 0
    with pytest.raises(InvalidInputError, match=f"kv_capacity_tokens {len(ids) + 10}"):
        eng.check(ids, greedy(11))


def test_invalid_prompts_are_400s_naming_the_limit(lm, engine):
    eng = engine()
    with pytest.raises(InvalidInputError, match=f"context_length {CONTEXT}"):
        eng.check([5] * 100, greedy(40))
    with pytest.raises(InvalidInputError, match="prompt alone is too long"):
        eng.check([5] * CONTEXT, greedy(1))
    with pytest.raises(InvalidInputError, match="empty"):
        eng.check([], greedy(1))
    with pytest.raises(InvalidInputError, match=f"0..{lm.spec.vocab_size - 1}"):
        eng.check([5, lm.spec.vocab_size], greedy(1))
    with pytest.raises(InvalidInputError, match="-1"):
        eng.check([-1], greedy(1))

    async def main():  # generate() raises the same at its first step
        with pytest.raises(InvalidInputError, match="context_length"):
            await collect(eng, [5] * 100, greedy(40))

    asyncio.run(main())
    assert eng.stats()["waiting"] == 0


def test_an_onnxruntime_failure_fails_only_the_requests_of_its_pass(lm, engine):
    eng = engine()
    good = lm.tokenizer.encode("the small cat")
    eng.check = lambda *a: None  # let an out-of-vocabulary id reach onnxruntime (its Gather fails)

    async def main():
        stream = eng.generate(good, greedy(40))
        tokens = list((await stream.__anext__()).token_ids)
        with pytest.raises(InferenceError, match="model failed"):
            await collect(eng, [0, lm.spec.vocab_size + 7], greedy(4))
        async for c in stream:
            tokens += c.token_ids
        after = await collect(eng, good, greedy(5))
        return tokens, after[0]

    tokens, after = asyncio.run(main())
    assert tokens == lm.reference(good, 40)
    assert after == lm.reference(good, 5)
    assert eng.stats()["failed"] == 1


def test_stop_fails_what_is_in_flight_and_refuses_new_requests(lm, engine):
    eng = engine(pass_delay_s=0.002)
    ids = lm.tokenizer.encode("a")

    async def main():
        stream = eng.generate(ids, greedy(CONTEXT - len(ids)))
        await stream.__anext__()
        eng.stop()  # right away, from the loop: the sequence is mid-generation
        with pytest.raises(ModelNotReadyError, match="stopped"):
            async for _ in stream:
                pass
        with pytest.raises(ModelNotReadyError, match="not running"):
            await collect(eng, ids, greedy(2))

    asyncio.run(main())


def test_engine_config_names_the_bad_value():
    with pytest.raises(ValidationError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValidationError, match="unknown"):
        EngineConfig(unknown=1)
    assert EngineConfig().max_num_seqs >= 1
