"""Ed25519 signatures of manifests: who published a version, and that nobody changed it since.

``manifest.sig`` beside ``manifest.json`` holds ``{"algorithm": "ed25519", "key_id": ..., "signature":
base64}``. The signed payload is the manifest in canonical JSON (sorted keys, no spaces) behind a
header naming the model and version, so a signature copied next to another version's manifest, or
kept under an edited manifest, does not verify. The manifest lists every file's sha256, so the
files are covered too. Two fields are left out: ``encryption.kek_id`` and ``encryption.wrapped_dek``,
which KEK rotation rewrites without the signing key; a wrong wrapped key cannot serve other bytes,
it only fails to decrypt (GCM).

Keys: ``maas keys gen-signing-key PATH`` writes ``PATH`` (private, PKCS#8 PEM, mode 0600) and
``PATH.pub`` (public, SubjectPublicKeyInfo PEM). Publishers set ``MAAS_SIGNING_KEY=file:///PATH``
(or ``--sign-key``); apps list the ``.pub`` files in ``security.trusted_signing_keys``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from typing import Any, Iterable, Optional

from maas_ray.errors import ConfigError, IntegrityError
from maas_ray.registry.manifest import Manifest

SIGNING_KEY_ENV = "MAAS_SIGNING_KEY"
SIGNATURE_FILE = "manifest.sig"
ALGORITHM = "ed25519"
_HEADER = b"maas-ray signed manifest v1\n"


def _path(uri: str) -> str:
    return os.path.expanduser(uri[len("file://"):] if uri.startswith("file://") else uri)


def _pem(path_or_pem: str, what: str) -> bytes:
    if path_or_pem.lstrip().startswith("-----BEGIN"):
        return path_or_pem.encode()
    path = _path(path_or_pem)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path!r}: {exc}") from exc


def key_id(public_key: Any) -> str:
    """A public key's short name: the first 16 hex digits of the sha256 of its raw bytes."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(uri: str) -> Any:
    """An Ed25519 private key from ``file:///path``, a plain path, or PEM text."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(_pem(uri, "signing key"), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"signing key {uri!r} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {uri!r} is a {type(key).__name__}, not Ed25519")
    return key


def load_public_key(path_or_pem: str) -> Any:
    """An Ed25519 public key from a path (or ``file://``) or PEM text."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(_pem(path_or_pem, "public key"))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"trusted key {path_or_pem!r} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"trusted key {path_or_pem!r} is a {type(key).__name__}, not Ed25519")
    return key


def trusted_keys(sources: Iterable[str]) -> dict[str, Any]:
    """key id -> public key, for every trusted key source."""
    keys = [load_public_key(s) for s in sources]
    return {key_id(k): k for k in keys}


def generate_signing_key(path: str) -> str:
    """Write a new keypair to ``path`` (private, 0600) and ``path.pub``; returns the key id.
    Refuses to overwrite an existing private key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    path = _path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private)
        with open(path + ".pub", "wb") as f:
            f.write(public)
    except FileExistsError as exc:
        raise ConfigError(f"{path!r} exists; not overwriting a signing key") from exc
    except OSError as exc:
        raise ConfigError(f"cannot write signing key {path!r}: {exc}") from exc
    return key_id(key.public_key())


def signed_payload(manifest: Manifest) -> bytes:
    """What a signature covers: a header with the model and version, then the canonical manifest
    (without the re-wrappable data-key fields)."""
    body = manifest.model_dump(mode="json")
    if body.get("encryption"):
        body["encryption"] = {k: v for k, v in body["encryption"].items() if k not in ("kek_id", "wrapped_dek")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return _HEADER + f"{manifest.model}\n{manifest.version}\n".encode() + canonical


def sign_manifest(manifest: Manifest, private_key: Any) -> bytes:
    """The ``manifest.sig`` file for ``manifest``."""
    signature = private_key.sign(signed_payload(manifest))
    return json.dumps({
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(signature).decode(),
    }, indent=1).encode()


def verify_manifest(manifest: Manifest, sig_file: Optional[bytes], trusted: dict[str, Any]) -> str:
    """Check ``sig_file`` against ``manifest`` and the trusted keys; returns the signer's key id.
    IntegrityError naming the version when it is unsigned, signed by an unknown key, or the
    signature does not match (an edited manifest, or a signature of another version)."""
    from cryptography.exceptions import InvalidSignature

    label = f"{manifest.model}:{manifest.version}"
    if sig_file is None:
        raise IntegrityError(f"{label} is not signed, and this app only serves versions signed by "
                             f"trusted keys {sorted(trusted)}; refusing to load")
    try:
        body = json.loads(sig_file)
        kid, signature = str(body["key_id"]), base64.b64decode(body["signature"], validate=True)
        if body.get("algorithm") != ALGORITHM:
            raise ValueError(f"algorithm {body.get('algorithm')!r}, expected {ALGORITHM!r}")
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise IntegrityError(f"{label}: {SIGNATURE_FILE} is unreadable ({exc}); refusing to load") from exc
    key = trusted.get(kid)
    if key is None:
        raise IntegrityError(f"{label} is signed by key {kid}, which is not trusted "
                             f"(trusted: {sorted(trusted)}); refusing to load")
    try:
        key.verify(signature, signed_payload(manifest))
    except InvalidSignature as exc:
        raise IntegrityError(f"{label}: the signature by key {kid} does not match the manifest (edited, "
                             "or a signature of another version); refusing to load") from exc
    return kid
