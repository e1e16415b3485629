"""The generation engine in process (no Ray, no HTTP): what continuous batching over onnxruntime
delivers, and the choices inside it, measured on this machine's cores.

    PYTHONPATH=. .venv/bin/python -m benchmarks.engine                  # all three parts
    PYTHONPATH=. .venv/bin/python -m benchmarks.engine --parts load --concurrency 1,8,32
    PYTHONPATH=. .venv/bin/python -m benchmarks.engine --registry /tmp/reg --model lm   # a published version

The model is a published generative version (``--registry``/``--model``), or by default a
random ``decoder-lm`` of ``--dim``/``--layers``/``--heads``/``--context`` published to a temporary
registry (random weights rarely emit EOS, so outputs run to ``--output-tokens``). Parts:

- ``load``: closed loop at each concurrency c: c clients each keep one greedy request
  (``--prompt-tokens`` of prompt, ``max_tokens`` uniform in ``--output-tokens`` x (1 +- ``--output-spread``),
  so sequences finish and join at different steps) in flight for ``--requests`` requests in all. Output tokens/s; TTFT p50/p99; inter-token latency p50/p99; engine steps.
  The engine thread's own time per output token outside ``session.run`` (step wall time minus
  onnxruntime wall time: Python, numpy copies, waits for the GIL) is ``engine_outside_ort_us_per_token``.
  Beside it, the **static-batch limit**: the same c prompts prefilled together and decoded
  together by a bare loop over the session (argmax, no engine): engine / limit is the ratio. Both
  also per CPU second of this process (``time.process_time``), which other load on the machine
  disturbs far less than wall time.
  ``--compact-after-steps 0,16`` compares copying the cache at every leave and join (0) with
  keeping freed rows for joiners (16, the default).
- ``layout``: one decode step of B sequences of mixed lengths with the cache kept as batched
  arrays (present -> past as is, the engine's layout) vs re-padded from per-sequence caches
  every step (pad + concatenate in, split out).
- ``sampler``: :func:`maas_ray.serving.generate.sampling.sample` over (B, vocab) logits vs a
  loop over rows, for greedy, temperature, and top-k + top-p rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time

import numpy as np


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _load_version(args):
    from maas_ray.registry import Registry

    if args.registry:
        reg = Registry(args.registry)
        version = int(args.version) if args.version and args.version.isdigit() else args.version
        loaded = reg.load(args.model, version, files=["tokenizer.json"])
    else:
        from tests.helpers.lm import publish_tiny_lm

        reg = Registry(tempfile.mkdtemp(prefix="engine-bench-"))
        m = publish_tiny_lm(reg, "bench-lm", dim=args.dim, layers=args.layers, heads=args.heads,
                            context_length=args.context)
        loaded = reg.load("bench-lm", m.version, files=["tokenizer.json"])
    return loaded


def _session(loaded, threads):
    from maas_ray.runtime import create_session

    return create_session(loaded.model_bytes, device="cpu", intra_op_threads=threads)


def _prompts(spec, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    low = len(spec.special_tokens)  # ordinary tokens only
    return [rng.integers(low, spec.vocab_size, length).tolist() for _ in range(n)]


async def _closed_loop(engine, prompts: list[list[int]], concurrency: int, output_tokens: list[int]):
    from maas_ray.serving.types import SamplingParams

    todo = list(zip(prompts, output_tokens))
    ttft, itl, tokens = [], [], 0

    async def client():
        nonlocal tokens
        while todo:
            prompt, n = todo.pop()
            t0 = last = time.perf_counter()
            first = True
            async for chunk in engine.generate(prompt, SamplingParams(max_tokens=n, temperature=0)):
                now = time.perf_counter()
                (ttft if first else itl).append(now - last if not first else now - t0)
                first, last = False, now
                tokens += len(chunk.token_ids)

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    return time.perf_counter() - t0, time.process_time() - c0, tokens, ttft, itl


def _static_limit(runner, spec, prompts: list[list[int]], output_tokens: int) -> tuple[float, float]:
    """Output tokens per second and per CPU second (this process) of one static batch: prefill all
    prompts together, decode together."""
    n, length = len(prompts), len(prompts[0])
    ids = np.asarray(prompts, np.int64)
    mask = np.ones((n, length), np.int64)
    pos = np.broadcast_to(np.arange(length), (n, length)).astype(np.int64)
    t0, c0 = time.perf_counter(), time.process_time()
    logits, kv = runner.run(ids, mask, pos, runner.empty(n))
    for step in range(output_tokens - 1):
        nxt = logits.argmax(axis=1)[:, None]
        mask = np.concatenate([mask, np.ones((n, 1), np.int64)], axis=1)
        logits, kv = runner.run(nxt, mask, np.full((n, 1), length + step, np.int64), kv)
    return n * output_tokens / (time.perf_counter() - t0), n * output_tokens / (time.process_time() - c0)


def _time_steps(engine) -> dict:
    """Wall time of the engine's steps and of its onnxruntime passes inside them (wraps the
    instance's methods; read after the run)."""
    timing = {"step": 0.0, "ort": 0.0}
    run, step = engine.runner.run, engine._step

    def timed_run(*a):
        t = time.perf_counter()
        try:
            return run(*a)
        finally:
            timing["ort"] += time.perf_counter() - t

    def timed_step():
        t = time.perf_counter()
        try:
            step()
        finally:
            timing["step"] += time.perf_counter() - t

    engine.runner.run, engine._step = timed_run, timed_step
    return timing


def part_load(args, loaded, out: dict) -> None:
    from maas_ray.serving.generate import EngineConfig, GenerationEngine, LMTokenizer
    from maas_ray.serving.generate.kv import GraphRunner

    spec = loaded.manifest.generation
    tok = LMTokenizer.from_bytes(loaded.files["tokenizer.json"], spec)
    session = _session(loaded, args.threads)
    runner = GraphRunner(session, spec)
    rows = []
    for c, compact in [(c, k) for c in args.concurrency for k in args.compact_after_steps]:
        config = EngineConfig(max_num_seqs=max(c, 1), prefill_chunk_tokens=args.prefill_chunk_tokens,
                              compact_after_steps=compact)
        engine = GenerationEngine(session, spec, tok, config)
        timing = _time_steps(engine)
        engine.start()
        n = max(args.requests, 2 * c)
        prompts = _prompts(spec, n, args.prompt_tokens, seed=c)
        spread = int(args.output_tokens * args.output_spread)
        lengths = np.random.default_rng(c).integers(args.output_tokens - spread, args.output_tokens + spread + 1, n)
        asyncio.run(_closed_loop(engine, prompts[: min(c, 4)], c, [4] * 4))  # warm-up
        before = engine.stats()
        timing.update(step=0.0, ort=0.0)
        wall, cpu, tokens, ttft, itl = asyncio.run(_closed_loop(engine, prompts, c, lengths.tolist()))
        st = engine.stats()
        engine.stop()
        limits = [_static_limit(runner, spec, prompts[:c], args.output_tokens) for _ in range(3)]
        limit, limit_cpu = max(x[0] for x in limits), max(x[1] for x in limits)
        row = {
            "concurrency": c, "compact_after_steps": compact, "requests": n, "output_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1e3 * _percentile(ttft, 50), 2), "ttft_p99_ms": round(1e3 * _percentile(ttft, 99), 2),
            "itl_p50_ms": round(1e3 * _percentile(itl, 50), 2), "itl_p99_ms": round(1e3 * _percentile(itl, 99), 2),
            "steps": st["steps"] - before["steps"], "prefill_chunks": st["prefill_chunks"] - before["prefill_chunks"],
            "joined_running": st["joined_running"] - before["joined_running"], "max_running": st["max_running"],
            "joins_in_place": st["joins_in_place"] - before["joins_in_place"],
            "batch_rebuilds": st["batch_rebuilds"] - before["batch_rebuilds"],
            "tokens_per_cpu_s": round(tokens / cpu, 1),
            "engine_outside_ort_us_per_token": round(1e6 * (timing["step"] - timing["ort"]) / tokens, 1),
            "engine_ort_us_per_token": round(1e6 * timing["ort"] / tokens, 1),
            "static_batch_limit_tokens_per_s": round(limit, 1), "engine_over_limit": round(tokens / wall / limit, 3),
            "static_batch_limit_tokens_per_cpu_s": round(limit_cpu, 1),
            "engine_over_limit_cpu": round(tokens / cpu / limit_cpu, 3),
        }
        rows.append(row)
        print(f"c={c:3d} compact_after={compact:2d}  {row['tokens_per_s']:8.1f} tok/s  (static-batch limit {row['static_batch_limit_tokens_per_s']:8.1f},"
              f" ratio {row['engine_over_limit']:.2f}; per CPU-s {row['tokens_per_cpu_s']:.0f} vs "
              f"{row['static_batch_limit_tokens_per_cpu_s']:.0f}, ratio {row['engine_over_limit_cpu']:.2f})  TTFT p50/p99 {row['ttft_p50_ms']:.1f}/{row['ttft_p99_ms']:.1f} ms"
              f"  ITL p50/p99 {row['itl_p50_ms']:.2f}/{row['itl_p99_ms']:.2f} ms  steps {row['steps']}"
              f"  cache rebuilds {row['batch_rebuilds']}, joins in place {row['joins_in_place']}"
              f"  engine thread per token: {row['engine_outside_ort_us_per_token']:.1f} us outside session.run,"
              f" {row['engine_ort_us_per_token']:.1f} us in it", flush=True)
    out["load"] = rows


def part_layout(args, loaded, out: dict) -> None:
    from maas_ray.serving.generate.kv import GraphRunner, merge

    spec = loaded.manifest.generation
    runner = GraphRunner(_session(loaded, args.threads), spec)
    rng = np.random.default_rng(0)
    rows = []
    for b in (1, 8, 32):
        lengths = rng.integers(args.prompt_tokens // 2, args.prompt_tokens + args.output_tokens // 2, b)
        caches = []  # per sequence: its own cache (1, heads, len, head_dim)
        for n in lengths:
            ids = rng.integers(4, spec.vocab_size, (1, int(n)))
            _, kv = runner.run(ids, np.ones_like(ids), np.arange(int(n))[None, :], runner.empty(1))
            caches.append((kv, np.ones((1, int(n)), np.int64)))
        kv, mask = caches[0]
        for k2, m2 in caches[1:]:
            kv, mask = merge(kv, mask, k2, m2)
        steps = args.layout_steps
        last = np.full((b, 1), 5, np.int64)

        def batched():
            pos = lengths.copy()
            k, m = kv, mask
            t0 = time.perf_counter()
            for _ in range(steps):
                m = np.concatenate([m, np.ones((b, 1), np.int64)], axis=1)
                _, k = runner.run(last, m, pos[:, None], k)
                pos += 1
            return (time.perf_counter() - t0) / steps

        def repadded():
            per = [(list(c[0]), int(n)) for c, n in zip(caches, lengths)]
            width0 = int(lengths.max())
            pos = lengths.copy()
            t0 = time.perf_counter()
            for s in range(steps):
                width = width0 + s
                m = np.zeros((b, width + 1), np.int64)
                past = []
                for layer in range(len(runner.past_names)):  # pad + concatenate in
                    a = np.zeros((b, spec.num_kv_heads, width, spec.head_dim), runner.dtype)
                    for r, (kvs, n) in enumerate(per):
                        a[r, :, width - kvs[layer].shape[2]:] = kvs[layer][0]
                    past.append(a)
                for r, (kvs, n) in enumerate(per):
                    m[r, width - kvs[0].shape[2]:] = 1
                _, present = runner.run(last, m, pos[:, None], past)
                per = [([p[r:r + 1, :, width - kvs[0].shape[2]:] for p in present], n)  # split out (views)
                       for r, (kvs, n) in enumerate(per)]
                pos += 1
            return (time.perf_counter() - t0) / steps

        t_b = min(batched() for _ in range(3))
        t_r = min(repadded() for _ in range(3))
        row = {"batch": b, "batched_step_ms": round(1e3 * t_b, 3), "repad_step_ms": round(1e3 * t_r, 3),
               "repad_over_batched": round(t_r / t_b, 2)}
        rows.append(row)
        print(f"layout B={b:2d}: batched {row['batched_step_ms']:.3f} ms/step, re-pad every step "
              f"{row['repad_step_ms']:.3f} ms/step ({row['repad_over_batched']:.2f}x)", flush=True)
    out["layout"] = rows


def part_sampler(args, loaded, out: dict) -> None:
    from maas_ray.serving.generate.sampling import (
        SamplingBatch,
        _sample_rows,
        make_generator,
        sample,
    )
    from maas_ray.serving.types import SamplingParams

    vocab = args.sampler_vocab or loaded.manifest.generation.vocab_size
    rng = np.random.default_rng(0)
    rows = []
    kinds = {"greedy": dict(temperature=0), "temperature": dict(temperature=0.8),
             "top_k+top_p": dict(temperature=0.8, top_k=50, top_p=0.9)}
    for name, kw in kinds.items():
        for b in (1, 8, 32):
            logits = rng.normal(size=(b, vocab)).astype(np.float32) * 3
            params = [SamplingParams(**kw) for _ in range(b)]
            batch = SamplingBatch(params, [make_generator(i) for i in range(b)])

            def vectorized():
                t0 = time.perf_counter()
                for _ in range(args.sampler_iters):
                    sample(logits, batch)
                return (time.perf_counter() - t0) / args.sampler_iters

            def per_row():
                t0 = time.perf_counter()
                for _ in range(args.sampler_iters):
                    for r in range(b):
                        one = logits[r:r + 1]
                        if batch.temperature[r] == 0:
                            int(np.argmax(one))
                        else:
                            _sample_rows(one, batch.temperature[r:r + 1], batch.top_k[r:r + 1], batch.top_p[r:r + 1],
                                         np.array([batch.generators[r].random()]))
                return (time.perf_counter() - t0) / args.sampler_iters

            t_v, t_l = min(vectorized() for _ in range(3)), min(per_row() for _ in range(3))
            row = {"kind": name, "batch": b, "vocab": vocab, "vectorized_us": round(1e6 * t_v, 1),
                   "per_row_us": round(1e6 * t_l, 1), "per_row_over_vectorized": round(t_l / t_v, 2)}
            rows.append(row)
            print(f"sampler {name:12s} B={b:2d} V={vocab}: vectorized {row['vectorized_us']:8.1f} us, "
                  f"per-row loop {row['per_row_us']:8.1f} us ({row['per_row_over_vectorized']:.2f}x)", flush=True)
    out["sampler"] = rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="load,layout,sampler", help="comma list of load, layout, sampler")
    ap.add_argument("--registry", help="registry root of a published generative version (default: publish a random one)")
    ap.add_argument("--model", default="lm")
    ap.add_argument("--version", default=None)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--concurrency", default="1,8,32", help="comma list")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level (at least 2c)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=64, help="mean max_tokens of a request")
    ap.add_argument("--output-spread", type=float, default=0.5,
                    help="max_tokens uniform in output-tokens x (1 +- spread): staggered finishes")
    ap.add_argument("--prefill-chunk-tokens", type=int, default=256)
    ap.add_argument("--compact-after-steps", default="16",
                    help="comma list; 0 = copy the cache at every leave and join, to compare with free rows (16)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="onnxruntime intra-op threads")
    ap.add_argument("--layout-steps", type=int, default=30)
    ap.add_argument("--sampler-iters", type=int, default=200)
    ap.add_argument("--sampler-vocab", type=int, default=0, help="vocabulary of the sampler part (default: the model's)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.compact_after_steps = [int(c) for c in args.compact_after_steps.split(",")]
    loaded = _load_version(args)
    g = loaded.manifest.generation
    print(f"model: {loaded.manifest.model} v{loaded.manifest.version}: {g.num_layers} layers, {g.num_kv_heads} heads x "
          f"{g.head_dim}, vocab {g.vocab_size}, context {g.context_length}; {args.threads} intra-op threads, "
          f"{os.cpu_count()} cores", flush=True)
    out = {"args": {k: v for k, v in vars(args).items() if k != "json"}}
    parts = {"load": part_load, "layout": part_layout, "sampler": part_sampler}
    for name in args.parts.split(","):
        parts[name](args, loaded, out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
