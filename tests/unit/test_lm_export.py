"""decoder-lm export: the KV-cache ONNX graph runs the prompt pass (P = 0), chunked prefill
(S > 1 after P > 0) and left-padded batches exactly as torch does; parity catches a wrong graph."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from maas_ray.errors import ParityError
from maas_ray.runtime import create_session
from maas_ray.train.lm.export import (
    export_lm,
    greedy_torch,
    parity_check_lm,
    past_names,
)
from maas_ray.train.lm.model import DecoderLM, DecoderLMArgs

pytestmark = pytest.mark.unit
ARGS = DecoderLMArgs(vocab_size=97, context_length=32, dim=16, heads=2, layers=2, dropout=0.0)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = DecoderLM(ARGS).eval()
    onnx_bytes = export_lm(model)
    return model, onnx_bytes, create_session(onnx_bytes, device="cpu")


def run(sess, ids, mask, pos, past):
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **dict(zip(past_names(ARGS.layers), past))}
    out = sess.run(None, feeds)
    return out[0], out[1:]


def empty(b):
    return [np.zeros((b, ARGS.heads, 0, ARGS.head_dim), np.float32) for _ in range(2 * ARGS.layers)]


def test_graph_names_and_prompt_pass_matches_training_forward(lm):
    model, _, sess = lm
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "position_ids", *past_names(2)]
    assert [o.name for o in sess.get_outputs()] == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    ids = np.random.default_rng(0).integers(0, ARGS.vocab_size, (3, 7))
    logits, present = run(sess, ids, np.ones((3, 7), np.int64), np.tile(np.arange(7), (3, 1)), empty(3))  # P = 0
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).numpy()
    assert logits.shape == (3, 7, ARGS.vocab_size)
    assert present[0].shape == (3, ARGS.heads, 7, ARGS.head_dim)
    np.testing.assert_allclose(logits, want, atol=1e-4)


def test_chunked_prefill_equals_one_pass(lm):
    _, _, sess = lm
    ids = np.random.default_rng(1).integers(0, ARGS.vocab_size, (2, 12))
    ones = np.ones((2, 12), np.int64)
    full, full_cache = run(sess, ids, ones, np.tile(np.arange(12), (2, 1)), empty(2))
    first, cache = run(sess, ids[:, :5], ones[:, :5], np.tile(np.arange(5), (2, 1)), empty(2))
    second, cache = run(sess, ids[:, 5:], ones, np.tile(np.arange(5, 12), (2, 1)), cache)  # S = 7 after P = 5
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), full, atol=1e-5)
    np.testing.assert_allclose(cache[3], full_cache[3], atol=1e-5)


def test_left_padding_gives_the_unpadded_rows_logits(lm):
    _, _, sess = lm
    rng = np.random.default_rng(2)
    short, long_ = rng.integers(0, ARGS.vocab_size, (1, 4)), rng.integers(0, ARGS.vocab_size, (1, 9))
    alone, _ = run(sess, short, np.ones((1, 4), np.int64), np.arange(4)[None], empty(1))
    ids = np.concatenate([np.concatenate([np.full((1, 5), 7), short], 1), long_])  # row 0 left-padded by 5
    mask = np.concatenate([np.concatenate([np.zeros((1, 5), np.int64), np.ones((1, 4), np.int64)], 1), np.ones((1, 9), np.int64)])
    pos = np.concatenate([np.concatenate([np.zeros((1, 5), np.int64), np.arange(4)[None]], 1), np.arange(9)[None]])
    batched, cache = run(sess, ids, mask, pos, empty(2))
    assert np.isfinite(batched).all()
    np.testing.assert_allclose(batched[0, 5:], alone[0], atol=1e-5)
    # one decode step after the padded prompt: the padded keys stay invisible
    nxt = batched[:, -1].argmax(-1)[:, None]
    step, _ = run(sess, nxt, np.concatenate([mask, np.ones((2, 1), np.int64)], 1), pos[:, -1:] + 1, cache)
    alone_step, _ = run(sess, np.concatenate([short, nxt[:1]], 1), np.ones((1, 5), np.int64), np.arange(5)[None], empty(1))
    np.testing.assert_allclose(step[0, 0], alone_step[0, -1], atol=1e-5)


def test_parity_and_greedy(lm):
    model, onnx_bytes, _ = lm
    diff = parity_check_lm(model, onnx_bytes, [[1, 2, 3, 4, 5], [6, 7], [8]], decode_steps=6)
    assert diff <= 1e-3
    tokens = greedy_torch(model, [1, 2, 3], 5)
    assert len(tokens) == 5 and all(0 <= t < ARGS.vocab_size for t in tokens)


def test_parity_rejects_another_models_graph(lm):
    model, _, _ = lm
    torch.manual_seed(1)
    other = export_lm(DecoderLM(ARGS).eval())
    with pytest.raises(ParityError, match="torch and onnxruntime|parity check failed"):
        parity_check_lm(model, other, [[1, 2, 3]], decode_steps=3)
