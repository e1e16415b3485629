import multiprocessing as mp
import traceback

import pytest

from maas_ray.errors import ConfigError, IntegrityError, ModelNotFoundError, VersionNotFoundError
from maas_ray.registry import ProcessorSpec, Registry, schema_from_onnx
from maas_ray.registry.store import MODEL_FILE
from tests.helpers import linear_onnx

pytestmark = pytest.mark.unit


@pytest.fixture
def reg(tmp_path):
    return Registry(str(tmp_path / "registry"))


def test_publish_reads_schema_from_graph_and_assigns_versions(reg):
    m1 = reg.publish("lin", linear_onnx(), metrics={"acc": 0.5})
    m2 = reg.publish("lin", linear_onnx(seed=1), postprocessor=ProcessorSpec(name="classification"))
    assert (m1.version, m2.version) == (1, 2)
    assert [(t.name, t.datatype, t.shape) for t in m1.inputs] == [("input", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, t.shape) for t in m1.outputs] == [("logits", "FP32", [-1, 3])]
    assert reg.list_models() == ["lin"]
    assert reg.list_versions("lin") == [1, 2]
    assert reg.describe("lin", 2).postprocessor.name == "classification"
    assert reg.describe("lin").version == 2  # latest
    assert "onnx" in m1.frameworks and len(m1.sha256) == 64


def test_publish_from_path(reg, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(linear_onnx())
    assert reg.publish("fromfile", str(path)).version == 1


def test_aliases_resolve_and_move(reg):
    for seed in range(3):
        reg.publish("lin", linear_onnx(seed=seed))
    reg.set_alias("lin", "production", 1)
    reg.set_alias("lin", "candidate", "latest")
    assert reg.resolve("lin", "production") == 1
    assert reg.resolve("lin", "candidate") == 3
    reg.set_alias("lin", "production", "candidate")  # alias to alias resolves to a number
    assert reg.aliases("lin") == {"candidate": 3, "production": 3}
    reg.delete_alias("lin", "candidate")
    assert reg.aliases("lin") == {"production": 3}


def test_unknown_model_version_alias(reg):
    reg.publish("lin", linear_onnx())
    with pytest.raises(ModelNotFoundError, match="model 'nope' does not exist"):
        reg.resolve("nope")
    with pytest.raises(VersionNotFoundError, match="has no version 7; versions are \\[1\\]"):
        reg.load("lin", 7)
    with pytest.raises(VersionNotFoundError, match="no version or alias 'staging'"):
        reg.resolve("lin", "staging")
    with pytest.raises(ConfigError, match="would shadow"):
        reg.set_alias("lin", "42", 1)
    with pytest.raises(ValueError, match="invalid model name '../etc'"):
        reg.publish("../etc", linear_onnx())


def test_load_verifies_checksum_and_refuses_corrupt_or_truncated(reg, tmp_path):
    m = reg.publish("lin", linear_onnx())
    assert reg.load("lin", 1).model_bytes == linear_onnx()
    path = tmp_path / "registry" / "lin" / "1" / MODEL_FILE
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(IntegrityError, match="failed its integrity check.*refusing to load"):
        reg.load("lin", 1)
    flipped = bytearray(good)
    flipped[-1] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(IntegrityError, match=m.sha256[:12]):
        reg.load("lin", 1)


def test_crash_mid_publish_leaves_no_visible_version(reg, monkeypatch):
    reg.publish("lin", linear_onnx())

    def crash(*_):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(reg, "_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        reg.publish("lin", linear_onnx(seed=1))
    monkeypatch.undo()
    assert reg.list_versions("lin") == [1]
    assert reg.publish("lin", linear_onnx(seed=2)).version == 3  # the crashed claim is never reused


def test_invalid_onnx_is_rejected(reg):
    with pytest.raises(ConfigError, match="not a valid ONNX model"):
        reg.publish("lin", b"not onnx at all")


def test_schema_from_onnx_marks_dynamic_dims():
    inputs, outputs = schema_from_onnx(linear_onnx(8, 2))
    assert inputs[0].shape == [-1, 8] and outputs[0].shape == [-1, 2]


def _publish_many(root: str, n: int, seed: int, out) -> None:
    try:
        reg = Registry(root)
        out.put([reg.publish("race", linear_onnx(seed=seed + i)).version for i in range(n)])
    except BaseException:  # report it: a silent child would only show as the parent's timeout
        out.put(traceback.format_exc())
        raise


def test_concurrent_publish_from_real_processes(tmp_path):
    root = str(tmp_path / "registry")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_publish_many, args=(root, 4, 100 * p, out)) for p in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    failures = [r for r in results if isinstance(r, str)]
    assert not failures, failures[0]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    versions = sorted(v for r in results for v in r)
    # distinct and nothing lost; a collision can leave a gap in the numbering, never a duplicate
    assert len(set(versions)) == 16 and versions[0] == 1, versions
    reg = Registry(root)
    assert reg.list_versions("race") == versions
    shas = {reg.load("race", v).manifest.sha256 for v in versions}
    assert len(shas) == 16  # each process's own artifact landed in its own version
