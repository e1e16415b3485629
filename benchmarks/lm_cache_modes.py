"""What recompute costs against a model's own KV cache (docs/generative.md, "Your own language
model"): the same ``decoder-lm`` weights exported both ways, one decode step timed through
onnxruntime at several sequence lengths and batch sizes (in process, one thread, no engine).

    PYTHONPATH=. .venv/bin/python -m benchmarks.lm_cache_modes [--dim 128 --layers 4 --context 256]

Writes a markdown table to stdout: ms per decode step for each mode and the ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _factory_of(model, cached: bool):
    """A factory's module around ``model``: its cache exposed or not."""
    from torch import nn

    class Plain(nn.Module):  # ids -> logits only: served by recompute
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids):
            return self.inner(ids)

    if not cached:
        return Plain()
    a = model.args
    model.cache_layout = {"layers": a.layers, "kv_heads": a.heads, "head_dim": a.head_dim}
    return model


def _step_ms(session, past_names, batch: int, length: int, vocab: int, past_shape, repeats: int,
             positions: bool) -> float:
    """Median ms of one decode step (S = 1) after ``length - 1`` cached positions."""
    p = length - 1
    feeds = {
        "input_ids": np.random.randint(0, vocab, (batch, 1)).astype(np.int64),
        "attention_mask": np.ones((batch, p + 1), np.int64),
        **{n: np.random.rand(batch, past_shape[0], p, past_shape[1]).astype(np.float32) for n in past_names},
    }
    if positions:
        feeds["position_ids"] = np.full((batch, 1), p, np.int64)
    else:  # recompute: the "cache" holds token ids
        for n in past_names:
            feeds[n] = np.random.randint(0, vocab, feeds[n].shape).astype(np.float32)
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--lengths", default="16,64,128,250")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()

    import torch

    from maas_ray.runtime import create_session
    from maas_ray.train.lm.export import export_lm, past_names
    from maas_ray.train.lm.imported import ImportedLM
    from maas_ray.train.lm.model import DecoderLM, DecoderLMArgs

    torch.manual_seed(0)
    base = DecoderLM(DecoderLMArgs(vocab_size=args.vocab, context_length=args.context, dim=args.dim,
                                   heads=args.heads, layers=args.layers, dropout=0.0)).eval()
    rows = []
    modes = {}
    for cached in (True, False):
        lm = ImportedLM(_factory_of(base, cached), args.vocab, args.context).eval()
        sess = create_session(export_lm(lm), device="cpu", intra_op_threads=1)
        modes[lm.cache] = (sess, past_names(lm.args.layers), (lm.args.heads, lm.args.head_dim), cached)
    for b in (int(x) for x in args.batches.split(",")):
        for length in (int(x) for x in args.lengths.split(",")):
            ms = {mode: _step_ms(s, names, b, length, args.vocab, shape, args.repeats, positions)
                  for mode, (s, names, shape, positions) in modes.items()}
            rows.append((b, length, ms["cached"], ms["recompute"]))
    print(f"decoder-lm dim {args.dim}, {args.layers} layers, {args.heads} heads, context {args.context}, "
          f"vocab {args.vocab}; onnxruntime CPU, 1 thread; median of {args.repeats} decode steps\n")
    print("| batch | sequence length | cached (ms/step) | recompute (ms/step) | recompute / cached |")
    print("|---|---|---|---|---|")
    for b, length, c, r in rows:
        print(f"| {b} | {length} | {c:.2f} | {r:.2f} | {r / c:.1f}x |")


if __name__ == "__main__":
    main()
