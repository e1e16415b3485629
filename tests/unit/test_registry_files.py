"""Extra files per version: published atomically with model.onnx, checksummed, refused when
damaged; ONNX external data (weights > 2 GB) travels as one of them."""

import os

import numpy as np
import pytest

from maas_ray.errors import ConfigError, IntegrityError, VersionNotFoundError
from maas_ray.registry import ONNX_EXTERNAL_DATA, ExtraFile, Registry
from tests.helpers import linear_onnx

pytestmark = pytest.mark.unit


@pytest.fixture
def reg(tmp_path):
    return Registry(str(tmp_path / "registry"))


def test_extra_files_are_published_checksummed_and_loaded(reg):
    m = reg.publish("lin", linear_onnx(), files={"tokenizer.json": ExtraFile(b'{"v": 1}', "tokenizer"), "notes.txt": b"hi"})
    assert sorted(m.files) == ["notes.txt", "tokenizer.json"]
    assert m.files["tokenizer.json"].role == "tokenizer" and m.files["notes.txt"].size_bytes == 2
    loaded = reg.load("lin", 1)
    assert loaded.files == {"tokenizer.json": b'{"v": 1}', "notes.txt": b"hi"}
    assert loaded.file_for("tokenizer") == "tokenizer.json"
    assert reg.load("lin", 1, files=["notes.txt"]).files == {"notes.txt": b"hi"}
    assert reg.load("lin", 1, skip_roles=("tokenizer",)).files == {"notes.txt": b"hi"}
    assert reg.read_file("lin", 1, "notes.txt") == b"hi"
    with pytest.raises(VersionNotFoundError, match="lin:1 has no file 'nope'"):
        reg.read_file("lin", 1, "nope")
    assert sorted(os.listdir(os.path.join(reg.root, "lin", "1"))) == ["manifest.json", "model.onnx", "notes.txt", "tokenizer.json"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_extra_file_is_refused(reg, damage):
    reg.publish("lin", linear_onnx(), files={"weights.safetensors": ExtraFile(b"x" * 100, "weights")})
    path = os.path.join(reg.root, "lin", "1", "weights.safetensors")
    if damage == "delete":
        os.remove(path)
    else:
        with open(path, "wb") as f:
            f.write(b"y" * 100 if damage == "flip" else b"x" * 50)
    with pytest.raises(IntegrityError, match="lin:1 failed its integrity check: weights.safetensors"):
        reg.load("lin", 1)
    assert reg.load("lin", 1, skip_roles=("weights",)).files == {}  # serving does not read weights


@pytest.mark.parametrize("name", ["model.onnx", "manifest.json", "../escape", "a/b", ""])
def test_extra_file_names_are_plain(reg, name):
    with pytest.raises(ValueError, match="invalid extra file name"):
        reg.publish("lin", linear_onnx(), files={name: b"x"})
    assert reg.list_models() == []


def test_onnx_external_data_round_trip(reg, tmp_path):
    """A model over the threshold is exported as model.onnx + model.onnx.data; the registry
    keeps both, checks both, and onnxruntime runs them from a directory."""
    import onnxruntime as ort
    import torch

    from maas_ray.train.data import DataSpec
    from maas_ray.train.export import EXTERNAL_DATA_FILE, export_onnx, parity_check

    spec = DataSpec((16,), "float32", 3, "features")
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    exported = export_onnx(model, spec, external_data_threshold_bytes=1024)  # ~2.6 KB of weights
    assert exported.external_data is not None and len(exported.model_bytes) < 1024
    x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    assert parity_check(model, exported, x, 1e-5) <= 1e-5
    m = reg.publish("ext", exported.model_bytes,
                    files={EXTERNAL_DATA_FILE: ExtraFile(exported.external_data, ONNX_EXTERNAL_DATA)})
    assert m.inputs[0].shape == [-1, 16] and m.files[EXTERNAL_DATA_FILE].role == ONNX_EXTERNAL_DATA
    loaded = reg.load("ext", 1)
    out = tmp_path / "materialised"
    out.mkdir()
    (out / "model.onnx").write_bytes(loaded.model_bytes)
    for name, data in loaded.files.items():
        (out / name).write_bytes(data)
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), atol=1e-5)
    with open(os.path.join(reg.root, "ext", "1", EXTERNAL_DATA_FILE), "r+b") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(IntegrityError, match="model.onnx.data"):
        reg.load("ext", 1)


def test_small_models_stay_in_one_file():
    import torch

    from maas_ray.train.data import DataSpec
    from maas_ray.train.export import export_onnx

    exported = export_onnx(torch.nn.Linear(4, 2), DataSpec((4,), "float32", 2, "features"))
    assert exported.external_data is None


def test_text_preprocessor_tokenizes_with_the_versions_tokenizer():
    from maas_ray.errors import InvalidInputError
    from maas_ray.registry import Manifest, TensorSpec
    from maas_ray.serving.processors import make_preprocessor
    from maas_ray.train.data import train_tokenizer

    tok = train_tokenizer(["the fox chased the owl", "a cat saw a dog"], vocab_size=50, max_seq_len=6)
    manifest = Manifest(
        model="t", version=1, sha256="0" * 64, size_bytes=1,
        inputs=[TensorSpec(name="input", datatype="INT64", shape=[-1, -1])],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 4])],
    )
    from maas_ray.registry import ProcessorSpec

    spec = ProcessorSpec(name="text", params={"tokenizer_file": "tokenizer.json", "max_seq_len": 4})
    pre = make_preprocessor(manifest, spec, files={"tokenizer.json": tok.encode()})
    v2 = pre({"text": np.array(["The fox", "owl chased the cat today"], dtype=object)}, strict_dtypes=True)["input"]
    assert v2.dtype == np.int64 and v2.shape == (2, 4)
    assert v2[0, 2:].tolist() == [0, 0] and v2[0, 0] == v2[1, 2]  # padded; "the" -> the same id
    v1 = pre({"input": np.array(["the fox"])}, strict_dtypes=False)["input"]  # v1 instances: a str array
    assert v1.tolist()[0] == v2.tolist()[0]
    with pytest.raises(InvalidInputError, match="text 0: expected a string, got int"):
        pre({"text": np.array([3], dtype=object)}, strict_dtypes=True)
    with pytest.raises(ConfigError, match="has no extra file 'tokenizer.json'"):
        make_preprocessor(manifest, spec, files={})


def test_a_version_with_external_data_is_served(reg, monkeypatch):
    """The serving loader hands the external data to onnxruntime from memory: no file is written
    (a decrypted version's weights never reach the disk in the clear). No Ray needed with
    intra_op_threads set."""
    import asyncio

    from maas_ray.registry import LoadedModel

    def no_disk(*args, **kwargs):
        raise AssertionError("the serving loader wrote the model to disk")

    monkeypatch.setattr(LoadedModel, "write_to", no_disk)

    import torch

    from maas_ray.serving.config import ModelConfig
    from maas_ray.serving.replicas import load_batched_runner
    from maas_ray.train.data import DataSpec
    from maas_ray.train.export import EXTERNAL_DATA_FILE, export_onnx

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    exported = export_onnx(model, DataSpec((16,), "float32", 3, "features"), external_data_threshold_bytes=1024)
    reg.publish("ext", exported.model_bytes, files={
        EXTERNAL_DATA_FILE: ExtraFile(exported.external_data, ONNX_EXTERNAL_DATA),
        "weights.safetensors": ExtraFile(b"not read by serving", "weights"),
    })
    cfg = ModelConfig.model_validate({"name": "ext", "versions": [{"version": 1}], "intra_op_threads": 1, "device": "cpu"})
    batched = load_batched_runner(reg.root, cfg, 1)
    x = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
    got = asyncio.run(batched.infer({"input": x}))[0]["logits"]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), atol=1e-5)
