"""maas optimize on generative versions (no Ray): the tiny decoder LM of tests/helpers/lm.py,
quantized to dynamic INT8 by real onnxruntime, measured on held-out text (--eval-text) and
published; its refusals; a parent with ONNX external data; onnxruntime's perplexity against
torch's on the same windows."""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from maas_ray.errors import ConfigError
from maas_ray.optimize import (
    GenerativeOptimizeReport,
    OptimizeConfig,
    optimize_and_publish,
)
from maas_ray.optimize.generative import (
    EXTERNAL_DATA_FILE,
    _interface_diff,
    graph_interface,
    perplexity,
)
from maas_ray.registry import ONNX_EXTERNAL_DATA, ExtraFile, Registry
from maas_ray.runtime import create_session
from maas_ray.serving.generate.kv import GraphRunner
from tests.helpers.lm import publish_tiny_lm

pytestmark = pytest.mark.unit
FAST = {"timing_seconds": 0.05, "decode_tokens": 8, "max_perplexity_increase": 0.05}


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """tiny-lm:1 (trained a little, no recorded training data) and a held-out text file."""
    from maas_ray.train.lm import corpus

    root = tmp_path_factory.mktemp("registry")
    reg = Registry(str(root))
    publish_tiny_lm(reg, "tiny-lm", dim=64, context_length=32, train_steps=30)
    text = root.parent / "held-out.txt"
    text.write_text("\n\n".join(corpus.documents(40, seed=7)) + "\n", encoding="utf-8")
    return reg, str(text)


def test_int8_child_is_published_generative_with_its_measurements(lm):
    reg, text = lm
    parent = reg.describe("tiny-lm", 1)
    r = optimize_and_publish("tiny-lm", 1, OptimizeConfig(method="int8", eval_text=text, **FAST), reg)
    assert isinstance(r, GenerativeOptimizeReport)
    m = r.manifest
    assert (m.kind, m.parent.model, m.parent.version, m.description) == ("generative", "tiny-lm", 1, "int8 of tiny-lm:1")
    assert m.generation == parent.generation and m.model_spec == parent.model_spec
    # the KV-cache graph keeps its boundary; tokenizer and model spec carried with their checksums; torch weights dropped
    assert m.inputs == parent.inputs and m.outputs == parent.outputs
    assert set(m.files) == {"tokenizer.json", "model_spec.json"}
    assert all(m.files[n].sha256 == parent.files[n].sha256 for n in m.files)
    ops = {n.op_type for n in onnx.load_from_string(reg.load("tiny-lm", m.version).model_bytes).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    mt = m.metrics
    assert mt["parent_perplexity"] == r.parent.perplexity and mt["perplexity"] == r.child.perplexity
    assert mt["perplexity_delta"] == pytest.approx(mt["perplexity"] - mt["parent_perplexity"])
    assert mt["perplexity_increase"] == pytest.approx(r.perplexity_increase) and r.perplexity_increase <= 0.05
    assert 1 < mt["parent_perplexity"] < 320  # trained: below a uniform guess over the vocabulary
    assert mt["decode_tokens_per_s"] > 0 and mt["parent_decode_tokens_per_s"] > 0
    assert "test_perplexity" not in mt  # eval_text is not the test split
    assert mt["eval_tokens"] == r.eval_tokens > 0 and mt["size_bytes"] < 0.6 * mt["parent_size_bytes"]
    opt = m.training_config["optimization"]
    assert opt["method"] == "int8" and opt["parent"] == "tiny-lm:1" and opt["measured_on"].startswith("eval_text ")
    assert len(r.parent.greedy) == len(r.child.greedy) == FAST["decode_tokens"] + 1 and 0 <= r.greedy_match <= 1


def test_cli_prints_one_summary_line(lm, capsys):
    from maas_ray.cli import main

    reg, text = lm
    assert main(["optimize", "tiny-lm:1", "--int8", "--eval-text", text, "--registry", reg.root]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    v = reg.list_versions("tiny-lm")[-1]
    assert len(out) == 1 and out[0].startswith(f"published tiny-lm:{v} (int8 of tiny-lm:1)  perplexity ")
    assert " tokens/s (" in out[0] and " size 0." in out[0]


@pytest.mark.parametrize("argv, message", [
    (["--fp16"], "error: tiny-lm:1 is a generative version: --fp16 is not supported for it, only --int8"),
    (["--graph"], "error: tiny-lm:1 is a generative version: --graph is not supported for it, only --int8"),
    (["--int8", "--static"], "error: tiny-lm:1 is a generative version: --int8 --static is not supported for it"),
    (["--int8"], "error: tiny-lm:1 records no language-model training data (published outside `maas train`?): "
                 "pass --eval-text FILE"),
    (["--int8", "--eval-text", "/nonexistent.txt"], "error: optimize: eval_text: Value error, eval_text must be a "
                                                    "readable text file, got '/nonexistent.txt'"),
    (["--int8", "--max-perplexity-increase", "-2"], "error: optimize: max_perplexity_increase: Value error, "
                                                    "max_perplexity_increase is a relative increase in (-1, 100], got -2"),
    (["--int8", "--eval-text", "{text}", "--max-perplexity-increase", "-0.5"],
     "error: not published: int8 raises the perplexity of tiny-lm:1 from "),
])
def test_refusals_are_one_line_and_publish_nothing(lm, capsys, argv, message):
    from maas_ray.cli import main

    reg, text = lm
    before = reg.list_versions("tiny-lm")
    assert main(["optimize", "tiny-lm:1", *[a.format(text=text) for a in argv], "--registry", reg.root]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1, err
    assert reg.list_versions("tiny-lm") == before


def test_eval_text_is_refused_for_a_classifier(tmp_path, lm):
    from tests.helpers import linear_onnx

    _, text = lm
    reg = Registry(str(tmp_path))
    reg.publish("clf", linear_onnx(4, 3))
    with pytest.raises(ConfigError, match="eval_text applies to generative versions only; clf:1 is a classifier"):
        optimize_and_publish("clf", 1, OptimizeConfig(method="int8", eval_text=text), reg)


def test_a_parent_with_external_data_gets_a_self_contained_child(lm, tmp_path):
    src, text = lm
    first = src.load("tiny-lm", 1, skip_roles=("weights",))
    proto = onnx.load_from_string(first.model_bytes)
    onnx.save_model(proto, str(tmp_path / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    reg = Registry(str(tmp_path / "registry"))
    files = {n: ExtraFile(d, first.manifest.files[n].role) for n, d in first.files.items()}
    files["weights.bin"] = ExtraFile((tmp_path / "weights.bin").read_bytes(), role=ONNX_EXTERNAL_DATA)
    reg.publish("ext", (tmp_path / "model.onnx").read_bytes(), generation=first.manifest.generation,
                model_spec=first.manifest.model_spec, files=files)
    parent = reg.describe("ext", 1)
    assert parent.size_bytes < first.manifest.size_bytes / 5  # the weights are outside model.onnx
    r = optimize_and_publish("ext", 1, OptimizeConfig(method="int8", eval_text=text, **FAST), reg)
    m = r.manifest
    assert set(m.files) == {"tokenizer.json", "model_spec.json"} and EXTERNAL_DATA_FILE not in m.files
    assert m.metrics["parent_size_bytes"] == parent.size_bytes + parent.files["weights.bin"].size_bytes
    # the same weights either way: the parent's measured perplexity does not depend on where they are stored
    same = optimize_and_publish("tiny-lm", 1, OptimizeConfig(method="int8", eval_text=text, **FAST), src)
    assert r.parent.perplexity == pytest.approx(same.parent.perplexity, rel=1e-9)
    assert r.parent.greedy == same.parent.greedy


def test_onnxruntime_perplexity_equals_torchs_on_the_same_windows(lm):
    import torch

    from maas_ray.train.lm.publish import load_published_lm

    reg, _ = lm
    published = load_published_lm(reg, "tiny-lm", 1)
    rng = np.random.default_rng(0)
    stream = rng.integers(0, published.manifest.generation.vocab_size, 3 * 33 + 1)
    x = np.stack([stream[i * 33 : i * 33 + 32] for i in range(3)]).astype(np.int64)
    y = np.stack([stream[i * 33 + 1 : i * 33 + 33] for i in range(3)]).astype(np.int64)
    loaded = reg.load("tiny-lm", 1, skip_roles=("weights",))
    runner = GraphRunner(create_session(loaded.model_bytes, device="cpu"), loaded.manifest.generation)
    got = perplexity(runner, x, y, batch=2)  # batches of 2 and 1
    with torch.no_grad():
        logits = published.model(torch.from_numpy(x))
        want = math.exp(torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).flatten()).item())
    assert got == pytest.approx(want, rel=1e-4)


def test_an_interface_change_is_reported():
    def graph(out_name: str, dims: list) -> str:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
        y = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, dims)
        return helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], [out_name])], "g", [x], [y]))

    def interface(model) -> dict:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.onnx")
            onnx.save(model, path)
            return graph_interface(path)

    a = interface(graph("present.0.key", ["batch", 4]))
    assert a == {"x": ("input", TensorProto.FLOAT, ("batch", 4)), "present.0.key": ("output", TensorProto.FLOAT, ("batch", 4))}
    assert _interface_diff(a, a) == []
    assert _interface_diff(a, interface(graph("present.0.key", ["batch", "total"]))) == [
        "present.0.key: ('output', 1, ('batch', 4)) -> ('output', 1, ('batch', 'total'))"]
    assert len(_interface_diff(a, interface(graph("renamed", ["batch", 4])))) == 2


def test_optimizing_a_generative_version_never_imports_torch(lm):
    import subprocess
    import sys

    reg, text = lm
    code = ("import sys; from maas_ray.cli import main; "
            f"rc = main(['optimize', 'tiny-lm:1', '--int8', '--eval-text', {text!r}, '--registry', {reg.root!r}, "
            "'--max-perplexity-increase', '0.5']); print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "0 False"
