"""Signed manifests: valid, unsigned, untrusted, edited, and replayed signatures."""

import json
import shutil
from pathlib import Path

import pytest

from maas_ray.errors import ConfigError, IntegrityError
from maas_ray.registry import Registry
from maas_ray.registry.crypto import new_kek
from maas_ray.registry.signing import SIGNATURE_FILE, generate_signing_key, key_id, load_public_key
from maas_ray.registry.store import MANIFEST_FILE
from tests.helpers import linear_onnx

pytestmark = pytest.mark.unit


@pytest.fixture
def keys(tmp_path):
    path = str(tmp_path / "signer.pem")
    kid = generate_signing_key(path)
    return path, kid


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "registry")


def test_a_signed_version_verifies_and_names_its_signer(root, keys):
    path, kid = keys
    Registry(root, signing_key=f"file://{path}").publish("m", linear_onnx())
    sig = json.loads((Path(root) / "m" / "1" / SIGNATURE_FILE).read_text())
    assert sig["algorithm"] == "ed25519" and sig["key_id"] == kid == key_id(load_public_key(path + ".pub"))
    trusting = Registry(root, trusted_signing_keys=[path + ".pub"])
    assert trusting.load("m", 1).model_bytes == linear_onnx()
    assert trusting.audit.events(action="publish")[-1].after["signed_by"] == kid


def test_the_signing_key_comes_from_the_environment(root, keys, monkeypatch):
    monkeypatch.setenv("MAAS_SIGNING_KEY", f"file://{keys[0]}")
    Registry(root).publish("m", linear_onnx())
    assert Registry(root, trusted_signing_keys=[Path(keys[0] + ".pub").read_text()]).load("m", 1)  # PEM text


def test_unsigned_and_untrusted_versions_are_refused(root, keys, tmp_path):
    Registry(root).publish("m", linear_onnx())
    other = str(tmp_path / "other.pem")
    generate_signing_key(other)
    Registry(root, signing_key=other).publish("m", linear_onnx(seed=1))
    trusting = Registry(root, trusted_signing_keys=[keys[0] + ".pub"])
    with pytest.raises(IntegrityError, match=r"m:1 is not signed, and this app only serves versions signed by"):
        trusting.load("m", 1)
    with pytest.raises(IntegrityError, match=r"m:2 is signed by key \w+, which is not trusted"):
        trusting.load("m", 2)
    assert Registry(root).load("m", 1)  # without trusted keys nothing is checked


def test_an_edited_manifest_with_its_old_signature_is_refused(root, keys):
    path, _ = keys
    Registry(root, signing_key=path).publish("m", linear_onnx(), metrics={"test_accuracy": 0.5})
    manifest = Path(root) / "m" / "1" / MANIFEST_FILE
    body = json.loads(manifest.read_text())
    body["metrics"]["test_accuracy"] = 0.99
    manifest.write_text(json.dumps(body))
    with pytest.raises(IntegrityError, match="m:1: the signature by key .* does not match the manifest"):
        Registry(root, trusted_signing_keys=[path + ".pub"]).load("m", 1)


def test_a_replayed_signature_is_refused(root, keys):
    path, _ = keys
    reg = Registry(root, signing_key=path)
    reg.publish("m", linear_onnx(seed=0))
    reg.publish("m", linear_onnx(seed=1))
    Registry(root).publish("m", linear_onnx(seed=2))  # unsigned
    v = Path(root) / "m"
    trusting = Registry(root, trusted_signing_keys=[path + ".pub"])
    # version 1's signature next to version 3's manifest
    shutil.copy(v / "1" / SIGNATURE_FILE, v / "3" / SIGNATURE_FILE)
    with pytest.raises(IntegrityError, match="m:3: the signature .* does not match"):
        trusting.load("m", 3)
    # version 1's manifest and signature copied over version 2 (its model.onnx swapped too)
    for name in (MANIFEST_FILE, SIGNATURE_FILE, "model.onnx"):
        shutil.copy(v / "1" / name, v / "2" / name)
    with pytest.raises(IntegrityError, match="stored as m:2 describes m:1"):
        trusting.load("m", 2)


def test_signed_and_encrypted_survives_kek_rotation(root, keys, tmp_path):
    path, _ = keys
    old, new = tmp_path / "old.key", tmp_path / "new.key"
    old.write_text(new_kek())
    new.write_text(new_kek())
    Registry(root, signing_key=path, kek_uri=f"file://{old}").publish("m", linear_onnx(), encrypt=True)
    Registry(root, kek_uri=f"file://{old}").rekey(f"file://{new}")
    reader = Registry(root, kek_uri=f"file://{new}", trusted_signing_keys=[path + ".pub"])
    assert reader.load("m", 1).model_bytes == linear_onnx()


def test_bad_key_files(tmp_path, keys):
    with pytest.raises(ConfigError, match="exists; not overwriting"):
        generate_signing_key(keys[0])
    with pytest.raises(ConfigError, match="cannot read public key"):
        Registry(str(tmp_path), trusted_signing_keys=[str(tmp_path / "missing.pub")])
    with pytest.raises(ConfigError, match="is not an unencrypted PEM private key"):
        Registry(str(tmp_path), signing_key=keys[0] + ".pub").publish("m", linear_onnx())
