"""Real Ray Train DDP (2 CPU workers) on a decoder-lm: train on the reference corpus, publish a
kind: generative version, and check what serving relies on: the manifest, the checksummed
tokenizer, and onnxruntime's greedy continuation (KV cache) equal to torch's from the weights.
And a user's own causal LM by import path (a GRU, served by recompute): trained with DDP,
fine-tuned from its published weights, served by Serve and streamed by the stock openai client."""

import hashlib
import math

import httpx
import pytest

from maas_ray.registry import Registry
from maas_ray.runtime import create_session
from maas_ray.train.lm import tokenizer as tk
from maas_ray.train.lm.config import LMTrainConfig
from maas_ray.train.lm.export import GreedyRunner
from maas_ray.train.lm.pipeline import train_and_publish_lm
from maas_ray.train.lm.publish import load_published_lm
from tests.helpers import HTTP_PORT, wait_until
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


@pytest.fixture(scope="module")
def gru(ray_cluster, tmp_path_factory):
    """gru:1 from a factory by import path (2 epochs), gru:2 fine-tuned from it, both served."""
    from ray import serve

    from maas_ray.serving.deploy import deploy

    root = tmp_path_factory.mktemp("gru")
    reg = Registry(str(root / "registry"))
    common = {**TINY, "model": "tests.factories:gru_lm", "model_args": {"context_length": 32, "dim": 48},
              "model_name": "gru", "kind": "generative", "score_prompts": 0,
              "storage_path": str(root / "runs"), "corpus_dir": str(root / "corpus")}
    first = train_and_publish_lm(LMTrainConfig.load(None, run_name="gru-v1", **common), reg)
    second = train_and_publish_lm(LMTrainConfig.load(None, run_name="gru-v2", parent="gru:1", **{**common, "epochs": 1}), reg)
    deploy({"http_options": {"host": "127.0.0.1", "port": HTTP_PORT}, "applications": [{
        "name": "gru", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app",
        "logging_config": {"enable_access_log": False},
        "args": {"registry_root": str(root / "registry"), "ingress": {"ray_actor_options": {"num_cpus": 0.25}},
                 "models": [{"name": "gru", "placement": "ingress", "versions": [{"version": 1}, {"version": 2}]}]},
    }]})
    url = f"http://127.0.0.1:{HTTP_PORT}"
    wait_until(lambda: httpx.get(f"{url}/v2/models/gru/versions/2/ready", timeout=5).status_code == 200, 120)
    yield reg, first, second, url
    serve.shutdown()


def test_own_factory_trains_fine_tunes_and_streams_through_openai(gru):
    from openai import OpenAI

    from maas_ray.serving.generate.tokenizer import LMTokenizer

    reg, first, second, url = gru
    m = first.manifest
    assert m.kind == "generative" and m.model_spec["model"] == "tests.factories:gru_lm"
    assert m.model_spec["cache"] == "recompute" and m.generation.num_layers == 1 and not m.generation.has_position_ids
    assert first.history[1]["val_loss"] < first.history[0]["val_loss"] and m.metrics["parity_max_abs_diff"] <= 1e-3
    assert first.test_perplexity < 300  # it learned something: below a uniform guess over the vocabulary
    # fine-tuning rebuilt the factory's model from the published weights and started there
    assert second.manifest.parent.version == 1 and second.history[0]["val_loss"] < first.history[0]["val_loss"]

    oa = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    for version in (1, 2):
        tokenizer = LMTokenizer.from_bytes(reg.read_file("gru", version, "tokenizer.json"), reg.describe("gru", version).generation)
        ids = torch_greedy(reg, "gru", version, tokenizer.encode("the small cat"), 12)
        eos = tokenizer.eos_token_id
        want = tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids)
        stream = oa.completions.create(model=f"gru:{version}", prompt="the small cat", max_tokens=12, temperature=0,
                                       stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == want
