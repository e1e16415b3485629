"""Real Ray Train DDP (2 CPU workers) on a decoder-lm: train on the reference corpus, publish a
kind: generative version, and check what serving relies on: the manifest, the checksummed
tokenizer, and onnxruntime's greedy continuation (KV cache) equal to torch's from the weights."""

import hashlib
import math

import pytest

from maas_ray.registry import Registry
from maas_ray.runtime import create_session
from maas_ray.train.lm import tokenizer as tk
from maas_ray.train.lm.config import LMTrainConfig
from maas_ray.train.lm.export import GreedyRunner
from maas_ray.train.lm.pipeline import train_and_publish_lm
from maas_ray.train.lm.publish import load_published_lm
from tests.helpers.lm import torch_greedy

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TINY = {
    "corpus_documents": 1500, "vocab_size": 300, "epochs": 2, "batch_size": 16, "score_prompts": 8, "sample_tokens": 8,
    "model_args": {"context_length": 32, "dim": 32, "heads": 2, "layers": 2, "dropout": 0.0},
}


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    """lm:1 trained from scratch, lm:2 fine-tuned from it for one epoch."""
    root = tmp_path_factory.mktemp("lm")
    reg = Registry(str(root / "registry"))
    common = {**TINY, "storage_path": str(root / "runs"), "corpus_dir": str(root / "corpus")}
    epochs: list[dict] = []
    first = train_and_publish_lm(LMTrainConfig.load(None, run_name="lm-v1", **common), reg, on_epoch=epochs.append)
    second = train_and_publish_lm(LMTrainConfig.load(None, run_name="lm-v2", parent="lm:1", **{**common, "epochs": 1}), reg)
    return reg, first, second, epochs


def test_trains_publishes_generative_version(runs):
    reg, first, _, epochs = runs
    m = first.manifest
    assert (m.model, m.version, m.kind) == ("lm", 1, "generative")
    # perplexity per epoch reached the caller; the chosen checkpoint has the lowest validation loss
    assert [e["epoch"] for e in epochs] == [0, 1] and all(e["val_perplexity"] > 1 for e in epochs)
    assert first.history[1]["val_loss"] < first.history[0]["val_loss"]
    assert first.best_epoch == min(range(2), key=lambda i: first.history[i]["val_loss"])
    assert math.isclose(m.metrics["val_perplexity"], math.exp(first.history[first.best_epoch]["val_loss"]), rel_tol=1e-9)
    assert 1 < m.metrics["test_perplexity"] == first.test_perplexity < 300  # below a uniform guess over 300 tokens
    assert m.metrics["parity_max_abs_diff"] <= 1e-3 and "grammatical_rate" in m.metrics
    assert m.dataset["documents"]["train"] == 1350 and m.training_config["num_workers"] == 2
    g = m.generation
    assert (g.context_length, g.num_layers, g.num_kv_heads, g.head_dim, g.vocab_size) == (32, 2, 2, 16, 300)
    assert g.special_tokens == {"<|endoftext|>": 0, "<|system|>": 1, "<|user|>": 2, "<|assistant|>": 3}
    # the tokenizer is a checksummed extra, and it is the one the training split was encoded with
    loaded = reg.load("lm", 1)
    tokenizer = loaded.files["tokenizer.json"]
    assert m.files["tokenizer.json"].role == "tokenizer"
    assert m.files["tokenizer.json"].sha256 == hashlib.sha256(tokenizer).hexdigest()
    assert tk.load(tokenizer.decode()).get_vocab_size() == g.vocab_size
    assert set(first.samples) == {"the small cat", "two old farmers"}


def test_onnx_greedy_continuation_equals_torch(runs):
    reg, first, _, _ = runs
    loaded = reg.load("lm", 1)
    tok = tk.load(loaded.files["tokenizer.json"].decode())
    prompts = [[0, *tok.encode(t, add_special_tokens=False).ids] for t in ("the small cat", "every quiet mouse")]
    model = load_published_lm(reg, "lm", 1).model
    onnx_tokens = GreedyRunner(model, create_session(loaded.model_bytes, device="cpu")).generate(prompts, 12)[1]
    for prompt, got in zip(prompts, onnx_tokens.tolist()):
        assert got == torch_greedy(reg, "lm", 1, prompt, 12)


def test_fine_tune_from_parent_reuses_its_tokenizer(runs):
    reg, first, second, _ = runs
    m = second.manifest
    assert m.version == 2 and m.parent is not None and (m.parent.model, m.parent.version) == ("lm", 1)
    assert m.files["tokenizer.json"].sha256 == first.manifest.files["tokenizer.json"].sha256
    # it starts from the parent's weights: one more epoch does not undo two
    assert second.history[0]["val_loss"] < first.history[0]["val_loss"]
