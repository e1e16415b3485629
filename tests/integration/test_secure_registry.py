"""Encrypted and signed artifacts against the real components: an s3:// registry (moto) holds only
ciphertext, and a served app with a KEK and trusted keys serves the good version while a version
under a KEK it lacks and an unsigned one are ``failed`` with their reasons; no torch in serving."""

import uuid
from pathlib import Path

import httpx
import numpy as np
import pyarrow.fs as pafs
import pytest

from maas_ray.registry import ExtraFile, Registry
from maas_ray.registry.crypto import new_kek
from maas_ray.registry.signing import generate_signing_key
from maas_ray.serving.deploy import deploy
from tests.helpers import HTTP_PORT, linear_onnx
from tests.helpers.s3 import BUCKET

pytestmark = [pytest.mark.integration]
URL = f"http://127.0.0.1:{HTTP_PORT}"
TOKENIZER = b'{"plaintext marker": "abcdefghijklmnopqrstuvwxyz0123456789"}'


@pytest.fixture(scope="module")
def secrets(tmp_path_factory):
    d = tmp_path_factory.mktemp("secrets")
    (d / "a.key").write_text(new_kek())
    (d / "b.key").write_text(new_kek())
    generate_signing_key(str(d / "signer.pem"))
    return {"kek": f"file://{d / 'a.key'}", "other_kek": f"file://{d / 'b.key'}",
            "sign": f"file://{d / 'signer.pem'}", "pub": str(d / "signer.pem.pub")}


def _needles(*plain: bytes) -> list[bytes]:
    return [p[i:i + 16] for p in plain for i in range(0, len(p) - 16, 16)]


def test_an_s3_registry_holds_only_ciphertext(s3_endpoint, secrets, tmp_path):
    root = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/registry?endpoint_override={s3_endpoint}&scheme=http"
    reg = Registry(root, kek_uri=secrets["kek"], signing_key=secrets["sign"])
    m = reg.publish("lin", linear_onnx(), encrypt=True, files={"tokenizer.json": ExtraFile(TOKENIZER, "tokenizer")})
    assert m.encryption is not None
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http")
    objects = [i.path for i in fs.get_file_info(pafs.FileSelector(reg._base, recursive=True))
               if i.type == pafs.FileType.File]
    assert any(p.endswith("/lin/1/model.onnx") for p in objects) and any(p.endswith("manifest.sig") for p in objects)
    needles = _needles(linear_onnx(), TOKENIZER)
    for path in objects:
        with fs.open_input_stream(path) as f:
            data = f.read()
        assert not any(n in data for n in needles), f"plaintext in s3://{path}"
    reader = Registry(root, kek_uri=secrets["kek"], trusted_signing_keys=[secrets["pub"]])
    assert reader.load("lin", 1).files["tokenizer.json"] == TOKENIZER
    # rotation on an object store: the ciphertext objects stay byte for byte
    before = {p: fs.open_input_stream(p).read() for p in objects if not p.endswith("manifest.json")
              and "/_audit/" not in p}
    assert reg.rekey(secrets["other_kek"]) == [("lin", 1)]
    assert {p: fs.open_input_stream(p).read() for p in before} == before
    assert Registry(root, kek_uri=secrets["other_kek"]).load("lin", 1).model_bytes == linear_onnx()


def test_an_app_serves_the_good_version_and_fails_the_others_with_reasons(
        ray_cluster, registry_root, serve_cleanup, secrets):
    from ray import serve

    good = Registry(registry_root, kek_uri=secrets["kek"], signing_key=secrets["sign"])
    foreign = Registry(registry_root, kek_uri=secrets["other_kek"], signing_key=secrets["sign"])
    unsigned = Registry(registry_root, kek_uri=secrets["kek"])
    served = {}
    notes = {"notes.txt": b"read by the split pre/post stages too"}
    for model in ("sealed", "sealed_local"):  # split replicas, and the ingress's own pipeline
        served[model] = [good.publish(model, linear_onnx(seed=1), encrypt=True, files=notes).version,
                         foreign.publish(model, linear_onnx(seed=2), encrypt=True, files=notes).version,
                         unsigned.publish(model, linear_onnx(seed=3), encrypt=True, files=notes).version]
    assert served["sealed"] == [1, 2, 3]
    deploy({
        "http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
        "applications": [{"name": "sealed", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app",
                          "args": {
                              "registry_root": registry_root,
                              "security": {"kek_uri": secrets["kek"], "trusted_signing_keys": [secrets["pub"]]},
                              "models": [
                                  {"name": "sealed", "placement": "split",
                                   "versions": [{"version": v} for v in (1, 2, 3)],
                                   "inference": {"ray_actor_options": {"num_cpus": 0.25}}},
                                  {"name": "sealed_local", "placement": "ingress",
                                   "versions": [{"version": v} for v in (1, 2, 3)]},
                              ],
                              "ingress": {"ray_actor_options": {"num_cpus": 0.25}}}}],
    })
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": np.ones(4).tolist()}]}
    with httpx.Client(base_url=URL, timeout=30) as c:
        for model in ("sealed", "sealed_local"):
            answered = {c.post(f"/v2/models/{model}/infer", json=body).headers["x-model-version"] for _ in range(12)}
            assert answered == {"1"}, f"{model}: only the good version may answer"
            pinned = c.post(f"/v2/models/{model}/versions/1/infer", json=body)
            assert pinned.status_code == 200
            reasons = {}
            for v, why in ((2, "cannot be decrypted: data key is wrapped by KEK"), (3, "is not signed")):
                meta = c.get(f"/v2/models/{model}/versions/{v}").json()
                assert meta["parameters"]["state"] == "failed", meta
                reasons[v] = meta["parameters"]["reason"]
                assert "IntegrityError" in reasons[v] and why in reasons[v], reasons[v]
                refused = c.post(f"/v2/models/{model}/versions/{v}/infer", json=body)
                assert refused.status_code == 503 and set(refused.json()) == {"error"}
    replicas = serve.get_app_handle("sealed").replicas.remote().result()
    assert replicas["torch_imported"] is False
    states = {m: {n: d.get("state") for n, d in vs.items()} for m, vs in replicas["models"].items()}
    assert states["sealed"] == {1: "ready", 2: "failed", 3: "failed"} == states["sealed_local"]
    # every publish is in the audit trail, with who signed it and under which KEK
    published = [e for e in Registry(registry_root).audit.events(action="publish") if e.model == "sealed"]
    assert [(e.after["encrypted"], e.after["signed_by"] is not None) for e in published] == [
        (True, True), (True, True), (True, False)]
    assert not any(n in p.read_bytes() for p in Path(registry_root, "sealed").rglob("model.onnx")
                   for n in _needles(linear_onnx(seed=1)))
