"""Encrypted artifacts: round trips, wrong keys, tampered / truncated / swapped ciphertext, KEK
rotation without rewriting a file, and no plaintext byte of a model anywhere under the root."""

import base64
import json
import os
from pathlib import Path

import pytest

from maas_ray.errors import ConfigError, IntegrityError
from maas_ray.registry import ExtraFile, KeyProvider, ParentRef, Registry, register_key_provider
from maas_ray.registry import crypto
from maas_ray.registry.crypto import KeyRing, key_provider, new_kek
from maas_ray.registry.store import MANIFEST_FILE, MODEL_FILE
from tests.helpers import linear_onnx

pytestmark = pytest.mark.unit

TOKENIZER = b'{"a tokenizer": "with a recognisable plaintext marker 0123456789"}'


def _kek_file(path: Path) -> str:
    path.write_text(new_kek() + "\n")
    return f"file://{path}"


@pytest.fixture
def kek(tmp_path):
    return _kek_file(tmp_path / "kek.key")


@pytest.fixture
def reg(tmp_path, kek):
    return Registry(str(tmp_path / "registry"), kek_uri=kek)


def _publish(reg, model="secret", seed=0, **kw):
    return reg.publish(model, linear_onnx(seed=seed), encrypt=True,
                       files={"tokenizer.json": ExtraFile(TOKENIZER, "tokenizer")}, **kw)


def test_round_trip_decrypts_in_memory(reg):
    m = _publish(reg)
    assert m.encryption is not None and sorted(m.encryption.files) == [MODEL_FILE, "tokenizer.json"]
    loaded = reg.load("secret", 1)
    assert loaded.model_bytes == linear_onnx() and loaded.files == {"tokenizer.json": TOKENIZER}
    assert reg.read_file("secret", 1, "tokenizer.json") == TOKENIZER
    # the manifest stays readable plaintext (describe needs no key)
    assert Registry(reg.root).describe("secret", 1).encryption.kek_id == m.encryption.kek_id


def test_no_plaintext_byte_of_the_model_is_stored(reg):
    _publish(reg)
    plain = linear_onnx()
    needles = [plain[i:i + 16] for i in range(0, len(plain) - 16, 16)] + [TOKENIZER[:24]]
    files = [p for p in Path(reg.root).rglob("*") if p.is_file()]
    assert any(p.name == MODEL_FILE for p in files)
    for path in files:
        data = path.read_bytes()
        assert not any(n in data for n in needles), f"plaintext found in {path}"


def test_plain_and_encrypted_versions_live_side_by_side(reg):
    reg.publish("secret", linear_onnx(seed=5))
    _publish(reg)
    assert Registry(reg.root).load("secret", 1).model_bytes == linear_onnx(seed=5)  # no key needed
    assert reg.load("secret", 2).model_bytes == linear_onnx()


def test_a_wrong_or_missing_key_is_refused_naming_the_version(reg, tmp_path, monkeypatch):
    _publish(reg)
    other = Registry(reg.root, kek_uri=_kek_file(tmp_path / "other.key"))
    with pytest.raises(IntegrityError, match=r"secret:1 cannot be decrypted: data key is wrapped by KEK sha256:"):
        other.load("secret", 1)
    monkeypatch.delenv("MAAS_KEK_URI", raising=False)
    with pytest.raises(ConfigError, match="secret:1 is encrypted and needs a key-encryption key"):
        Registry(reg.root).load("secret", 1)


@pytest.mark.parametrize("damage", ["flip", "truncate", "short"])
def test_tampered_ciphertext_is_refused(reg, damage):
    _publish(reg)
    path = Path(reg.root) / "secret" / "1" / MODEL_FILE
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 1
    elif damage == "truncate":
        del blob[-10:]
    else:
        del blob[20:]
    path.write_bytes(bytes(blob))
    match = "is truncated" if damage == "short" else "model.onnx does not decrypt"
    with pytest.raises(IntegrityError, match=rf"secret:1 failed its integrity check: .*{match}"):
        reg.load("secret", 1)


def test_a_file_swapped_between_versions_or_names_is_refused(reg):
    _publish(reg, seed=0)
    _publish(reg, seed=1)
    root = Path(reg.root) / "secret"
    # same KEK, different version: even with the data key of version 2, version 1's bytes fail
    (root / "2" / MODEL_FILE).write_bytes((root / "1" / MODEL_FILE).read_bytes())
    with pytest.raises(IntegrityError, match="secret:2 failed its integrity check: model.onnx does not decrypt"):
        reg.load("secret", 2)
    # the wrapped data key of version 1 copied into version 2's manifest: the data key opens,
    # yet the associated data binds each file to its version
    m1 = json.loads((root / "1" / MANIFEST_FILE).read_text())
    m2 = json.loads((root / "2" / MANIFEST_FILE).read_text())
    m2["encryption"] = m1["encryption"]
    (root / "2" / MANIFEST_FILE).write_text(json.dumps(m2))
    with pytest.raises(IntegrityError, match="secret:2 failed its integrity check: model.onnx does not decrypt"):
        reg.load("secret", 2)
    # within one version: the tokenizer's ciphertext under model.onnx's name
    (root / "1" / MODEL_FILE).write_bytes((root / "1" / "tokenizer.json").read_bytes())
    with pytest.raises(IntegrityError, match="secret:1 failed its integrity check: model.onnx does not decrypt"):
        reg.load("secret", 1)


def test_rotation_rewraps_without_rewriting_files(reg, tmp_path):
    _publish(reg, seed=0)
    _publish(reg, seed=1)
    reg.publish("plain", linear_onnx())
    files = {p: p.read_bytes() for p in Path(reg.root).rglob("*") if p.is_file() and p.name != MANIFEST_FILE
             and "_audit" not in p.parts}
    new = _kek_file(tmp_path / "new.key")
    assert reg.rekey(new) == [("secret", 1), ("secret", 2)]
    assert {p: p.read_bytes() for p in files} == files  # ciphertext untouched
    rotated = Registry(reg.root, kek_uri=new)
    assert rotated.load("secret", 2).model_bytes == linear_onnx(seed=1)
    with pytest.raises(IntegrityError, match="secret:1 cannot be decrypted"):
        Registry(reg.root, kek_uri=reg._kek_uri).load("secret", 1)  # the old KEK no longer opens it
    # both KEKs, comma-separated (replicas rolling over): either wraps are read
    both = key_provider(f"{new},{reg._kek_uri}")
    assert isinstance(both, KeyRing)
    assert Registry(reg.root, kek_uri=f"{reg._kek_uri},{new}").load("secret", 1).model_bytes == linear_onnx()
    events = rotated.audit.events(action="kek")
    assert [(e.target, e.before["kek_id"] != e.after["kek_id"]) for e in events] == [
        ("secret:1", True), ("secret:2", True)]


def test_env_kek_and_bad_uris(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_KEK", new_kek())
    monkeypatch.setenv("MAAS_KEK_URI", "env:TEST_KEK")
    reg = Registry(str(tmp_path / "r"), encrypt=True)  # encrypt by default, KEK from the environment
    assert reg.publish("m", linear_onnx()).encryption is not None
    assert Registry(str(tmp_path / "r")).load("m", 1).model_bytes == linear_onnx()
    monkeypatch.setenv("SHORT", base64.b64encode(b"x" * 16).decode())
    with pytest.raises(ConfigError, match="is 16 bytes; expected 32"):
        key_provider("env:SHORT")
    with pytest.raises(ConfigError, match="'env:NOPE_NOT_SET': environment variable 'NOPE_NOT_SET' is not set"):
        key_provider("env:NOPE_NOT_SET")
    with pytest.raises(ConfigError, match="unsupported KEK URI 'vault:x'"):
        key_provider("vault:x")
    with pytest.raises(ConfigError, match="cannot read KEK file"):
        key_provider(f"file://{tmp_path}/missing.key")


def test_a_failed_kek_burns_no_version(tmp_path, monkeypatch):
    monkeypatch.delenv("MAAS_KEK_URI", raising=False)
    reg = Registry(str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="needs a key-encryption key"):
        reg.publish("m", linear_onnx(), encrypt=True)
    assert reg.publish("m", linear_onnx()).version == 1


def test_children_of_encrypted_parents_are_encrypted(reg):
    _publish(reg)
    child = reg.publish("secret", linear_onnx(seed=3), parent=ParentRef(model="secret", version=1))
    assert child.encryption is not None and reg.load("secret", 2).model_bytes == linear_onnx(seed=3)


def test_a_registered_provider_is_the_kms_extension_point(tmp_path, monkeypatch):
    monkeypatch.setattr(crypto, "_SCHEMES", dict(crypto._SCHEMES))  # the toy scheme ends with the test
    class Reversing:  # a toy wrap: the interface is all a KMS provider implements
        def wrap(self, dek):
            return "toy:1", dek[::-1]

        def unwrap(self, kek_id, wrapped):
            return wrapped[::-1]

    register_key_provider("toy://", lambda uri: Reversing())
    assert isinstance(key_provider("toy://x"), KeyProvider)
    reg = Registry(str(tmp_path / "r"), kek_uri="toy://x")
    assert reg.publish("m", linear_onnx(), encrypt=True).encryption.kek_id == "toy:1"
    assert reg.load("m", 1).model_bytes == linear_onnx()


def test_key_material_never_shows_in_reprs(kek):
    provider = key_provider(kek)
    secret = base64.b64decode(Path(kek[len("file://"):]).read_text())
    assert secret.hex() not in repr(provider) and base64.b64encode(secret).decode() not in repr(provider)
    assert os.stat(kek[len("file://"):]).st_size > 0


def test_publishing_commands_take_the_encrypt_and_sign_flags(kek, tmp_path):
    from maas_ray.cli import _registry, build_parser

    for argv in (["train", "--config", "x.yaml"], ["models", "publish", "m", "m.onnx"], ["optimize", "m:1", "--int8"]):
        args = build_parser().parse_args([*argv, "--encrypt", "--kek", kek, "--sign-key", "file:///k.pem",
                                          "--registry", str(tmp_path)])
        reg = _registry(args)
        assert (reg.encrypt, reg._kek_uri, reg._signing_key) == (True, kek, "file:///k.pem")
