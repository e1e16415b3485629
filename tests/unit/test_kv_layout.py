"""Publishing a generative ONNX exported elsewhere: the KV-cache layout read from the graph, the
special tokens from its tokenizer.json, through ``maas models publish --tokenizer`` (no Ray)."""

from __future__ import annotations

import pytest

from maas_ray.cli import main
from maas_ray.errors import ConfigError
from maas_ray.registry import Registry
from maas_ray.registry.kv_layout import generation_spec_from_graph, read_kv_layout
from tests.helpers import linear_onnx
from tests.helpers.lm import publish_tiny_lm

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A decoder LM exported by maas (optimum's layout), as files on disk, and its manifest."""
    root = tmp_path_factory.mktemp("kv-src")
    reg = Registry(str(root))
    manifest = publish_tiny_lm(reg, "src-lm", seed=3, layers=3, heads=2, dim=32)
    loaded = reg.load("src-lm", manifest.version)
    graph, tokenizer = root / "model.onnx", root / "tokenizer.json"
    graph.write_bytes(loaded.model_bytes)
    tokenizer.write_bytes(loaded.files["tokenizer.json"])
    return graph, tokenizer, manifest


def test_the_layout_is_read_from_the_graph(exported):
    graph, _, manifest = exported
    layout = read_kv_layout(graph.read_bytes())
    spec = manifest.generation
    assert layout == {
        "num_layers": 3, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "vocab_size": spec.vocab_size,
        "kv_dtype": "FP32", "has_position_ids": True,
        "past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value",
        "present_key": "present.{i}.key", "present_value": "present.{i}.value",
    }


def test_maas_models_publish_with_a_tokenizer_publishes_a_generative_version(exported, tmp_path, capsys):
    graph, tokenizer, source = exported
    template = tmp_path / "chat.jinja"
    template.write_text(source.generation.chat_template)
    rc = main(["models", "publish", "lm", str(graph), "--registry", str(tmp_path / "reg"),
               "--tokenizer", str(tokenizer), "--context-length", str(source.generation.context_length),
               "--bos-token", "<|endoftext|>", "--chat-template", str(template)])
    assert rc == 0, capsys.readouterr()
    m = Registry(str(tmp_path / "reg")).describe("lm", 1)
    assert m.kind == "generative" and m.files["tokenizer.json"].role == "tokenizer"
    # Everything the maas export recorded, recovered from the graph and the tokenizer alone.
    assert m.generation == source.generation


def test_what_cannot_be_published_as_generative_is_refused_in_one_line(exported, tmp_path, capsys):
    graph, tokenizer, _ = exported
    with pytest.raises(ConfigError, match="lacks.*input_ids"):
        generation_spec_from_graph(linear_onnx(4, 3), tokenizer.read_bytes(), context_length=64)
    with pytest.raises(ConfigError, match="not a special token"):
        generation_spec_from_graph(graph.read_bytes(), tokenizer.read_bytes(), context_length=64, eos_token="</s>")
    with pytest.raises(ConfigError, match="not a Hugging Face tokenizer.json"):
        generation_spec_from_graph(graph.read_bytes(), b"[1, 2]", context_length=64)
    with pytest.raises(ConfigError, match="context_length"):
        generation_spec_from_graph(graph.read_bytes(), tokenizer.read_bytes(), context_length=1)
    rc = main(["models", "publish", "lm", str(graph), "--registry", str(tmp_path / "r"), "--tokenizer", str(tokenizer)])
    assert rc == 1 and "--context-length" in capsys.readouterr().err
