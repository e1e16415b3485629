"""`maas optimize --int8` on a generative version whose held-out text is its recorded training
data: the tiny decoder LM of tests/helpers/lm.py published with the `maas train` config and
dataset identity of the reference corpus (and the test perplexity training measures with torch),
optimized through the CLI by real onnxruntime, and the child served by the real generation
engine. No Ray: optimize runs without it."""

from __future__ import annotations

import asyncio

import pytest

from maas_ray.registry import ExtraFile, Registry
from maas_ray.train.lm.config import LMTrainConfig
from maas_ray.train.lm.data import load_lm_splits
from tests.helpers.lm import publish_tiny_lm

pytestmark = pytest.mark.integration
CONTEXT = 32


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """lm:1: trained weights + the training config, data identity and test perplexity `maas train` records."""
    from maas_ray.train.lm.pipeline import perplexity
    from maas_ray.train.lm.publish import load_published_lm

    root = tmp_path_factory.mktemp("optimize-lm")
    reg = Registry(str(root / "registry"))
    publish_tiny_lm(reg, "src", dim=64, context_length=CONTEXT, train_steps=60)  # trained on reference n=300 seed=0
    src = reg.load("src", 1)
    cfg = LMTrainConfig(data="reference", corpus_documents=300, seed=0, val_fraction=0.1, test_fraction=0.1,
                        corpus_dir=str(root / "corpus"),
                        model_args={"context_length": CONTEXT, "dim": 64, "heads": 2, "layers": 2, "dropout": 0.0})
    splits = load_lm_splits(cfg, tokenizer_json=src.files["tokenizer.json"].decode())
    test_ppl = perplexity(load_published_lm(reg, "src", 1).model, splits)  # as train_and_publish_lm records it
    m = src.manifest
    reg.publish("lm", src.model_bytes, preprocessor=m.preprocessor, postprocessor=m.postprocessor,
                metrics={"test_perplexity": test_ppl}, training_config=cfg.model_dump(mode="json"),
                dataset=splits.identity, files={n: ExtraFile(d, m.files[n].role) for n, d in src.files.items()},
                model_spec=m.model_spec, generation=m.generation)
    return reg


async def _generate(reg: Registry, model: str, version: int, prompt: str) -> tuple[str, list]:
    from maas_ray.runtime import create_session
    from maas_ray.serving.generate import EngineConfig, GenerationEngine, LMTokenizer
    from maas_ray.serving.types import SamplingParams

    loaded = reg.load(model, version, skip_roles=("weights",))
    spec = loaded.manifest.generation
    tokenizer = LMTokenizer.from_bytes(loaded.files[spec.tokenizer_file], spec)
    engine = GenerationEngine(create_session(loaded.model_bytes, device="cpu"), spec, tokenizer,
                              EngineConfig(max_num_seqs=2)).start()
    try:
        chunks = [c async for c in engine.generate(tokenizer.encode(prompt), SamplingParams(max_tokens=12, temperature=0))]
    finally:
        engine.stop()
    return "".join(c.text for c in chunks), chunks


def test_int8_child_of_a_trained_lm_is_measured_on_its_test_split_and_serves(lm, capsys):
    from maas_ray.cli import main

    reg = lm
    parent = reg.describe("lm", 1)
    assert main(["optimize", "lm:1", "--int8", "--registry", reg.root]) == 0  # default max_perplexity_increase
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("published lm:2 (int8 of lm:1)  perplexity "), out
    m = reg.describe("lm", 2)
    assert (m.kind, m.parent.model, m.parent.version) == ("generative", "lm", 1)
    assert m.generation == parent.generation and m.inputs == parent.inputs and m.outputs == parent.outputs
    assert set(m.files) == {"tokenizer.json", "model_spec.json"}
    assert m.files["tokenizer.json"].sha256 == parent.files["tokenizer.json"].sha256
    assert m.dataset == parent.dataset
    mt = m.metrics
    # the same test split training scored: onnxruntime's parent perplexity is torch's recorded one
    assert mt["parent_perplexity"] == pytest.approx(parent.metrics["test_perplexity"], rel=1e-4)
    assert mt["test_perplexity"] == mt["perplexity"] and mt["perplexity_increase"] <= 0.02
    assert mt["perplexity_delta"] == pytest.approx(mt["perplexity"] - mt["parent_perplexity"])
    assert mt["decode_tokens_per_s"] > 0 and mt["parent_decode_tokens_per_s"] > 0
    assert mt["size_bytes"] < 0.6 * mt["parent_size_bytes"]
    assert m.training_config["optimization"]["measured_on"] == "the test split of reference (n=300, seed=0)"
    assert m.training_config["data"] == "reference"  # the parent's recorded config, carried

    # the child runs in the real generation engine (greedy), as a replica would run it
    text, chunks = asyncio.run(_generate(reg, "lm", 2, "the small cat"))
    assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].completion_tokens >= 1
    assert chunks[-1].completion_tokens == sum(len(c.token_ids) for c in chunks) and text.strip()


def test_changed_training_data_is_refused(lm):
    from maas_ray.errors import ConfigError
    from maas_ray.optimize import OptimizeConfig, optimize_and_publish

    reg = lm
    first = reg.load("lm", 1)
    m = first.manifest
    reg.publish("moved", first.model_bytes, training_config=m.training_config, model_spec=m.model_spec,
                dataset={**m.dataset, "content_sha256": "0" * 64}, generation=m.generation,
                files={n: ExtraFile(d, m.files[n].role) for n, d in first.files.items()})
    with pytest.raises(ConfigError, match=r"the data 'reference' changed since moved:1 was trained .* pass --eval-text FILE"):
        optimize_and_publish("moved", 1, OptimizeConfig(method="int8", timing_seconds=0.05), reg)
    assert reg.list_versions("moved") == [1]
