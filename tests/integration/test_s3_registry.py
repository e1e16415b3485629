"""The registry against a real S3-protocol server (moto) on loopback.

Everything goes over HTTP through pyarrow's S3 filesystem, the same code path
as ``MAAS_REGISTRY_ROOT=s3://bucket/prefix`` on a cluster. Needs ``moto[server]``
(in the ``dev`` extra); no AWS account, no network beyond 127.0.0.1.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import uuid

import numpy as np
import pyarrow.fs as pafs
import pytest

from maas_ray.errors import IntegrityError, ModelNotFoundError, VersionNotFoundError
from maas_ray.registry import ProcessorSpec, Registry
from maas_ray.registry.store import MODEL_FILE
from tests.helpers import linear_onnx
from tests.helpers.s3 import BUCKET, CREDENTIALS

pytestmark = pytest.mark.integration


@pytest.fixture
def root(s3_endpoint) -> str:
    """A fresh registry prefix per test, addressed the way a cluster config would."""
    return (
        f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/registry"
        f"?endpoint_override={s3_endpoint}&scheme=http"
    )


@pytest.fixture
def reg(root) -> Registry:
    return Registry(root)


def test_uri_query_parameters_reach_pyarrow(root, s3_endpoint):
    # ?endpoint_override=...&scheme=http in the root URI is all the configuration needed:
    # the object lands on the loopback server (fake credentials would fail on AWS).
    reg = Registry(root)
    assert reg._local is False and reg.list_models() == []
    reg.publish("lin", linear_onnx())
    direct = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http")
    info = direct.get_file_info(f"{reg._base}/lin/1/{MODEL_FILE}")
    assert info.type == pafs.FileType.File and info.size == len(linear_onnx())


def test_aws_endpoint_url_env_var_is_honoured(s3_endpoint, monkeypatch):
    # The AWS SDK's standard variable: a plain s3:// root then works unchanged.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{s3_endpoint}")
    reg = Registry(f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/via-env")
    assert reg.publish("lin", linear_onnx()).version == 1
    assert reg.list_models() == ["lin"]
    assert reg.load("lin").model_bytes == linear_onnx()


def test_publish_list_resolve_alias_load(reg):
    import onnxruntime as ort

    m1 = reg.publish("lin", linear_onnx(seed=0), metrics={"acc": 0.5})
    m2 = reg.publish(
        "lin", linear_onnx(seed=1), postprocessor=ProcessorSpec(name="classification")
    )
    reg.publish("other", linear_onnx(8, 2))
    assert (m1.version, m2.version) == (1, 2)
    assert [(t.name, t.datatype, t.shape) for t in m1.inputs] == [("input", "FP32", [-1, 4])]

    assert reg.list_models() == ["lin", "other"]
    assert reg.list_versions("lin") == [1, 2]
    assert reg.resolve("lin") == reg.resolve("lin", "latest") == 2
    assert reg.resolve("lin", "1") == 1
    assert reg.describe("lin", 2).postprocessor.name == "classification"

    assert reg.set_alias("lin", "production", 1) == 1
    assert reg.aliases("lin") == {"production": 1}
    assert reg.resolve("lin", "production") == 1
    reg.set_alias("lin", "production", "latest")  # moving an alias overwrites one object
    assert reg.aliases("lin") == {"production": 2}

    loaded = reg.load("lin", "production")
    assert loaded.manifest.version == 2 and loaded.model_bytes == linear_onnx(seed=1)
    session = ort.InferenceSession(loaded.model_bytes, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": np.ones((3, 4), np.float32)})  # (B=3, 3)
    assert logits.shape == (3, 3)

    with pytest.raises(ModelNotFoundError):
        reg.resolve("nope")
    with pytest.raises(VersionNotFoundError, match="no version or alias 'staging'"):
        reg.resolve("lin", "staging")


def test_publish_leaves_no_staging_objects(reg):
    reg.publish("lin", linear_onnx())
    listing = reg._fs.get_file_info(pafs.FileSelector(reg._path("lin"), recursive=True))
    paths = {info.path[len(reg._path("lin")) + 1 :] for info in listing}
    assert {"1/model.onnx", "1/manifest.json"} <= paths
    assert not [p for p in paths if p.startswith("_staging/")], paths  # uploads cleaned up


@pytest.mark.parametrize("damage", ["truncate", "flip_last_byte"])
def test_corrupted_object_raises_integrity_error(reg, damage):
    manifest = reg.publish("lin", linear_onnx())
    path = reg._path("lin", 1, MODEL_FILE)
    good = linear_onnx()
    bad = good[: len(good) // 2] if damage == "truncate" else good[:-1] + bytes([good[-1] ^ 0xFF])
    with reg._fs.open_output_stream(path) as f:  # overwrite the object in place
        f.write(bad)
    with pytest.raises(IntegrityError, match="refusing to load"):
        reg.load("lin", 1)
    with pytest.raises(IntegrityError, match=manifest.sha256[:12]):
        reg.load("lin")
    assert reg.describe("lin", 1).sha256 == manifest.sha256  # metadata still readable


def test_withdrawn_claim_does_not_burn_a_version(reg):
    """Two publishers that collide on v and both withdraw leave v free for the next one.

    A withdrawal deletes the claim object; pyarrow then writes a directory marker
    ``_claims/<v>/``; only claim objects (files) may count as taken.
    """
    reg.publish("lin", linear_onnx())
    rival = reg._path("lin", "_claims", 2, "rival-token")
    with reg._fs.open_output_stream(rival) as f:
        f.write(b"")
    reg._fs.delete_file(rival)  # what a rival does after seeing another claim
    assert reg.publish("lin", linear_onnx(seed=1)).version == 2


def _publish_many(root: str, env: dict, barrier, n: int, proc: int, out) -> None:
    os.environ.update(env)  # spawn children inherit it anyway; be explicit
    reg = Registry(root)
    barrier.wait(timeout=120)  # start together so claims really collide
    published = []
    for i in range(n):
        model = linear_onnx(seed=100 * proc + i)
        manifest = reg.publish("race", model, description=f"p{proc}-{i}")
        published.append((manifest.version, manifest.description, manifest.sha256))
    out.put(published)


def test_concurrent_publish_from_processes_loses_nothing(root):
    n_procs, n_each = 3, 3
    ctx = mp.get_context("spawn")
    out, barrier = ctx.Queue(), ctx.Barrier(n_procs)
    env = {k: os.environ[k] for k in CREDENTIALS}
    procs = [
        ctx.Process(target=_publish_many, args=(root, env, barrier, n_each, p, out))
        for p in range(n_procs)
    ]
    for p in procs:
        p.start()
    try:
        results = [row for _ in procs for row in out.get(timeout=240)]
    finally:
        for p in procs:
            p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * n_procs

    versions = sorted(v for v, _, _ in results)
    assert len(set(versions)) == n_procs * n_each, versions  # no version handed out twice
    reg = Registry(root)
    assert reg.list_versions("race") == versions  # every publish is visible
    for version, description, sha in results:  # and holds its own publisher's artifact
        loaded = reg.load("race", version)
        assert (loaded.manifest.description, loaded.manifest.sha256) == (description, sha)
    for p in range(n_procs):  # a publisher's later model always gets a later version
        own = [v for v, d, _ in results if d.startswith(f"p{p}-")]
        assert own == sorted(own), own
    # Not asserted: versions == 1..9. Colliding claimants both withdraw, and a third
    # publisher may meanwhile take v+1, so gaps are possible by design (see
    # test_withdrawn_claim_does_not_burn_a_version for the avoidable, common case).


def test_extra_files_on_s3_are_copied_with_the_version_and_checked(reg):
    """Object stores have no rename: every extra file is copied before the manifest."""
    from maas_ray.registry import ExtraFile

    reg.publish("lin", linear_onnx(), files={"tokenizer.json": ExtraFile(b"{}", "tokenizer"), "weights.safetensors": b"w" * 64})
    assert reg.load("lin", 1).files == {"tokenizer.json": b"{}", "weights.safetensors": b"w" * 64}
    with reg._fs.open_output_stream(reg._path("lin", 1, "weights.safetensors")) as f:
        f.write(b"w" * 63)
    with pytest.raises(IntegrityError, match="weights.safetensors has 63 bytes"):
        reg.load("lin", 1)
    assert reg.load("lin", 1, skip_roles=("",)).files == {"tokenizer.json": b"{}"}  # b"..." files have role ""
