"""A user's causal LM by import path (maas_ray.train.lm.imported): the recompute cache gives every
row of a left-padded batch what the model gives that row alone, the ONNX export generates the same
greedy tokens as torch, a model with its own cache keeps it, bad factories are refused before
training, and a published version loads back for fine-tuning."""

import numpy as np
import pytest
import torch

from maas_ray.errors import ConfigError
from maas_ray.registry import Registry
from maas_ray.train.lm import corpus
from maas_ray.train.lm import tokenizer as tk
from maas_ray.train.lm.config import LMTrainConfig, is_lm_config
from maas_ray.train.lm.export import GreedyRunner, export_lm, parity_check_lm
from maas_ray.train.lm.imported import CACHED, RECOMPUTE, build_imported
from maas_ray.train.lm.publish import export_and_check, load_published_lm, publish_lm
from maas_ray.train.lm.task import build, model_spec

pytestmark = pytest.mark.unit
VOCAB, CTX = 50, 24
PROMPTS = [[3, 9, 4, 1, 7], [5], [8, 8, 2]]  # different lengths: the batch is left-padded


def _gru(seed=0):
    torch.manual_seed(seed)
    return build_imported("tests.factories:gru_lm", {"context_length": CTX, "dim": 16}, VOCAB).eval()


def _alone_greedy(module, prompt, n):
    """Greedy continuation by running the plain forward on the whole unpadded sequence each step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(module(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_recompute_batched_equals_each_sequence_alone():
    lm = _gru()
    assert lm.cache == RECOMPUTE and (lm.args.layers, lm.args.heads, lm.args.head_dim) == (1, 1, 1)
    logits, tokens = GreedyRunner(lm).generate(PROMPTS, 6)
    for row, prompt in enumerate(PROMPTS):
        assert tokens[row].tolist() == _alone_greedy(lm.module, prompt, 6)
    # the prompt pass's real positions are the model's logits for the prompt alone
    real = torch.cat([lm.module(torch.tensor([p]))[0] for p in PROMPTS]).detach().numpy()
    np.testing.assert_allclose(logits[0], real, atol=1e-5)


def test_recompute_exports_and_onnxruntime_generates_the_same_tokens():
    lm = _gru(seed=1)
    onnx_bytes = export_lm(lm)
    diff = parity_check_lm(lm, onnx_bytes, PROMPTS, decode_steps=8, tolerance=1e-4)
    assert diff <= 1e-4
    from maas_ray.registry.kv_layout import read_kv_layout

    layout = read_kv_layout(onnx_bytes)
    assert (layout["num_layers"], layout["num_kv_heads"], layout["head_dim"], layout["vocab_size"]) == (1, 1, 1, VOCAB)


def test_a_model_with_its_own_cache_is_served_cached():
    torch.manual_seed(0)
    lm = build_imported("tests.factories:cached_gpt", {"context_length": CTX, "dim": 16, "heads": 2, "layers": 2}, VOCAB)
    lm.eval()
    assert lm.cache == CACHED and (lm.args.layers, lm.args.heads, lm.args.head_dim) == (2, 2, 8)
    _, tokens = GreedyRunner(lm).generate(PROMPTS, 5)
    assert tokens.tolist() == GreedyRunner(lm.module).generate(PROMPTS, 5)[1].tolist()
    assert parity_check_lm(lm, export_lm(lm), PROMPTS, decode_steps=5) <= 1e-3


@pytest.mark.parametrize("factory, args, message", [
    ("tests.factories:peeking_lm", {}, "is not causal"),
    ("tests.factories:flat_lm", {}, "(batch, seq, vocab_size) logits"),
    ("tests.factories:broken_lm", {}, "failed to build: RuntimeError: out of coffee"),
    ("tests.factories:string_lm", {}, "returned str, not a torch.nn.Module"),
    ("tests.factories:gru_lm", {"width": 3}, "unexpected keyword argument 'width'"),
    ("tests.nowhere:lm", {}, "tests.nowhere"),
])
def test_a_bad_factory_is_refused_with_what_is_wrong(factory, args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_imported(factory, {"context_length": CTX, **args}, VOCAB)


def test_config_takes_an_import_path_with_its_own_args():
    cfg = LMTrainConfig.load(None, model="tests.factories:gru_lm", model_args={"context_length": 32, "dim": 8})
    assert cfg.kind == "generative" and cfg.context_length == 32 and cfg.model_args == {"context_length": 32, "dim": 8}
    assert model_spec(cfg.model, cfg.model_args, 300) == {
        "model": "tests.factories:gru_lm", "model_args": {"context_length": 32, "dim": 8}, "vocab_size": 300}
    assert build(model_spec(cfg.model, cfg.model_args, 300)).args.vocab_size == 300
    for bad, message in [({"dim": 8}, "need context_length"), ({"context_length": "32"}, "need context_length"),
                         ({"context_length": True}, "need context_length"),
                         ({"context_length": 32, "vocab_size": 9}, "must not set vocab_size")]:
        with pytest.raises(ConfigError, match=message):
            LMTrainConfig.load(None, model="tests.factories:gru_lm", model_args=bad)
    with pytest.raises(ConfigError, match="an import path"):
        LMTrainConfig.load(None, model="gru")
    with pytest.raises(ConfigError, match="kind"):
        LMTrainConfig.load(None, kind="tabular")


def test_kind_generative_selects_the_language_model_trainer(tmp_path):
    yaml_file = tmp_path / "lm.yaml"
    yaml_file.write_text("kind: generative\nmodel: tests.factories:gru_lm\nmodel_args: {context_length: 16}\n")
    assert is_lm_config(str(yaml_file))
    assert is_lm_config(None, "tests.factories:gru_lm", "generative")
    assert not is_lm_config(None, "tests.factories:tiny_mlp")  # a classifier factory
    assert is_lm_config(None, "decoder-lm")


def test_published_factory_version_loads_back_with_its_weights(tmp_path):
    docs = corpus.documents(200, seed=0)
    tokenizer_json = tk.train_tokenizer(docs, vocab_size=300)
    vocab = tk.load(tokenizer_json).get_vocab_size()
    torch.manual_seed(0)
    lm = build_imported("tests.factories:gru_lm", {"context_length": CTX, "dim": 16}, vocab).eval()
    exported = export_and_check(lm, tokenizer_json, ["the small cat", "two dogs"], decode_steps=4)
    reg = Registry(str(tmp_path / "reg"))
    m = publish_lm(reg, "gru", lm, tokenizer_json, exported)
    assert m.kind == "generative" and m.model_spec == {
        "model": "tests.factories:gru_lm", "model_args": {"context_length": CTX, "dim": 16}, "vocab_size": vocab,
        "cache": RECOMPUTE}
    assert (m.generation.num_layers, m.generation.num_kv_heads, m.generation.head_dim) == (1, 1, 1)
    back = load_published_lm(reg, "gru", 1)
    assert back.spec["model"] == "tests.factories:gru_lm"
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(back.model(x), lm(x))


def test_the_engine_serves_a_recompute_graph_with_continuous_batching(tmp_path):
    """The real generation engine over onnxruntime on a published factory version: concurrent
    greedy requests of different lengths (left-padded, joining and leaving the batch) each get
    the model's own continuation of their prompt alone."""
    import asyncio
    import time

    from maas_ray.runtime import create_session
    from maas_ray.serving.generate import EngineConfig, GenerationEngine, LMTokenizer
    from maas_ray.serving.types import SamplingParams

    docs = corpus.documents(200, seed=0)
    tokenizer_json = tk.train_tokenizer(docs, vocab_size=300)
    torch.manual_seed(2)
    lm = build_imported("tests.factories:gru_lm", {"context_length": 48, "dim": 16},
                        tk.load(tokenizer_json).get_vocab_size()).eval()
    reg = Registry(str(tmp_path / "reg"))
    publish_lm(reg, "gru", lm, tokenizer_json, export_and_check(lm, tokenizer_json, ["the cat"], decode_steps=4))
    loaded = reg.load("gru", 1, files=["tokenizer.json"])
    spec = loaded.manifest.generation
    assert not spec.has_position_ids
    tokenizer = LMTokenizer.from_bytes(loaded.files["tokenizer.json"], spec)
    engine = GenerationEngine(create_session(loaded.model_bytes, device="cpu", intra_op_threads=1), spec, tokenizer,
                              EngineConfig())
    run = engine.runner.run

    def slow_run(*args):  # slower passes, so the later requests join a running batch even on a fast box
        time.sleep(0.005)
        return run(*args)

    engine.runner.run = slow_run
    engine.start()
    prompts = [tokenizer.encode(p) for p in ["the small cat", "two dogs chase the ball in the park", "every", "a"]]
    lengths = [12, 5, 20, 9]  # rows leave at different steps

    async def one(ids, n, delay):
        await asyncio.sleep(delay)  # later ones join a running batch
        return [t async for c in engine.generate(ids, SamplingParams(max_tokens=n, temperature=0)) for t in c.token_ids]

    async def main():
        return await asyncio.gather(*[one(ids, n, 0.01 * i) for i, (ids, n) in enumerate(zip(prompts, lengths))])

    try:
        outputs = asyncio.run(main())
        assert engine.stats()["max_running"] > 1
    finally:
        engine.stop()
    eos = spec.eos_token_id
    for ids, n, got in zip(prompts, lengths, outputs):
        want = _alone_greedy(lm.module, ids, n)
        assert got == (want[: want.index(eos) + 1] if eos in want else want)


def test_maas_optimize_int8_measures_a_factory_version_on_its_training_data(tmp_path, capsys):
    """`maas optimize --int8` reads the recorded LMTrainConfig of a factory's version (not only
    decoder-lm's) for its held-out perplexity."""
    from maas_ray.cli import main

    docs = corpus.documents(300, seed=0)
    text = tmp_path / "c.txt"
    text.write_text("\n\n".join(docs))
    cfg = LMTrainConfig.load(None, data=str(text), model="tests.factories:gru_lm",
                             model_args={"context_length": 32, "dim": 32}, vocab_size=300)
    tokenizer_json = tk.train_tokenizer(docs, vocab_size=300)
    torch.manual_seed(0)
    lm = build_imported(cfg.model, cfg.model_args, tk.load(tokenizer_json).get_vocab_size()).eval()
    reg = Registry(str(tmp_path / "reg"))
    publish_lm(reg, "gru", lm, tokenizer_json, export_and_check(lm, tokenizer_json, ["the cat"], decode_steps=4),
               training_config=cfg.model_dump(mode="json"))
    assert main(["optimize", "gru:1", "--int8", "--registry", reg.root, "--max-perplexity-increase", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("published gru:2 (int8 of gru:1)  perplexity ") and " on 1024 tokens " in out
    assert reg.describe("gru", 2).model_spec["cache"] == RECOMPUTE
