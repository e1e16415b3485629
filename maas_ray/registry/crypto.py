"""Envelope encryption of a version's files, and the key-encryption-key (KEK) providers.

Each encrypted version has its own random 256-bit data key (DEK). Every file of the version
(model.onnx, ONNX external data, tokenizer, extras) is stored as::

    nonce (12 bytes) || AES-256-GCM ciphertext || GCM tag (16 bytes)

with associated data ``maas-ray/v1 <model> <version> <file name>``: a ciphertext moved to
another version or renamed to another file fails its tag. The DEK itself is stored in the
manifest wrapped (encrypted) by a KEK from a :class:`KeyProvider`, so rotating the KEK re-wraps
one small value per version and never rewrites the files.

KEK URIs (``MAAS_KEK_URI``, ``maas models publish --encrypt --kek URI``):

- ``file:///path/kek.key``: a file holding 32 random bytes, base64 (``maas keys gen-kek``);
- ``env:NAME``: the same base64 text in environment variable ``NAME``;
- several, comma-separated: the first wraps new data keys, all of them unwrap (rotation).

A cloud KMS is an extension point, not shipped: implement :class:`KeyProvider` (``wrap`` calls
the KMS's Encrypt with the DEK as plaintext and returns the key's ARN as ``kek_id``; ``unwrap``
calls Decrypt) and register a scheme with :func:`register_key_provider` (docs/security.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from typing import Callable, Optional, Protocol, runtime_checkable

from maas_ray.errors import ConfigError, IntegrityError

KEK_ENV = "MAAS_KEK_URI"
ALGORITHM = "AES-256-GCM"
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
_DEK_AAD = b"maas-ray/v1 dek"


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps and unwraps data keys with a key-encryption key the registry never stores."""

    def wrap(self, dek: bytes) -> tuple[str, bytes]:
        """Encrypt ``dek``; returns (the id of the KEK used, the wrapped key)."""
        ...

    def unwrap(self, kek_id: str, wrapped: bytes) -> bytes:
        """The DEK back; raise :class:`~maas_ray.errors.IntegrityError` if this provider does not
        hold ``kek_id`` or the wrapped key does not open."""
        ...


def _aesgcm(key: bytes):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def key_id(kek: bytes) -> str:
    """A KEK's public name: a hash prefix, which identifies the key without revealing it."""
    return "sha256:" + hashlib.sha256(b"maas-ray kek id\0" + kek).hexdigest()[:16]


class LocalKeyProvider:
    """A 256-bit KEK held in this process (read from a file or an environment variable)."""

    def __init__(self, kek: bytes, source: str) -> None:
        if len(kek) != KEY_BYTES:
            raise ConfigError(f"KEK {source!r} is {len(kek)} bytes; expected {KEY_BYTES} (base64 of 32 random bytes)")
        self._kek = kek
        self.source = source
        self.kek_id = key_id(kek)

    def __repr__(self) -> str:  # never the key
        return f"LocalKeyProvider({self.source!r}, kek_id={self.kek_id!r})"

    def wrap(self, dek: bytes) -> tuple[str, bytes]:
        nonce = os.urandom(NONCE_BYTES)
        return self.kek_id, nonce + _aesgcm(self._kek).encrypt(nonce, dek, _DEK_AAD)

    def unwrap(self, kek_id: str, wrapped: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        if kek_id != self.kek_id:
            raise IntegrityError(f"data key is wrapped by KEK {kek_id}, but {self.source!r} holds KEK {self.kek_id}")
        try:
            return _aesgcm(self._kek).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _DEK_AAD)
        except InvalidTag as exc:
            raise IntegrityError(f"wrapped data key does not open with KEK {self.kek_id} ({self.source!r})") from exc


class KeyRing:
    """Several providers: the first wraps, whichever holds the KEK id unwraps (KEK rotation)."""

    def __init__(self, providers: list[KeyProvider]) -> None:
        if not providers:
            raise ConfigError("a key ring needs at least one KEK")
        self.providers = providers

    def __repr__(self) -> str:
        return f"KeyRing({self.providers!r})"

    def wrap(self, dek: bytes) -> tuple[str, bytes]:
        return self.providers[0].wrap(dek)

    def unwrap(self, kek_id: str, wrapped: bytes) -> bytes:
        held = [getattr(p, "kek_id", None) for p in self.providers]
        for provider in self.providers:
            if getattr(provider, "kek_id", kek_id) == kek_id:
                return provider.unwrap(kek_id, wrapped)
        raise IntegrityError(f"data key is wrapped by KEK {kek_id}; the configured KEKs are {held}")


def _decode_kek(text: str, source: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"KEK {source!r} is not base64: {exc}") from exc


def _file_provider(uri: str) -> KeyProvider:
    path = uri[len("file://"):]
    try:
        with open(os.path.expanduser(path), encoding="ascii") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read KEK file {path!r}: {exc}") from exc
    return LocalKeyProvider(_decode_kek(text, uri), uri)


def _env_provider(uri: str) -> KeyProvider:
    name = uri[len("env:"):]
    text = os.environ.get(name)
    if not text:
        raise ConfigError(f"KEK {uri!r}: environment variable {name!r} is not set")
    return LocalKeyProvider(_decode_kek(text, uri), uri)


_SCHEMES: dict[str, Callable[[str], KeyProvider]] = {"file://": _file_provider, "env:": _env_provider}


def register_key_provider(prefix: str, factory: Callable[[str], KeyProvider]) -> None:
    """Make KEK URIs starting with ``prefix`` (e.g. ``"aws-kms://"``) build a provider with
    ``factory(uri)``: the extension point for a cloud KMS (see docs/security.md)."""
    _SCHEMES[prefix] = factory


def key_provider(uri: str) -> KeyProvider:
    """The provider for a KEK URI, or a :class:`KeyRing` for a comma-separated list."""
    parts = [u.strip() for u in uri.split(",") if u.strip()]
    if not parts:
        raise ConfigError(f"empty KEK URI {uri!r}")
    providers = []
    for part in parts:
        factory = next((f for prefix, f in _SCHEMES.items() if part.startswith(prefix)), None)
        if factory is None:
            raise ConfigError(f"unsupported KEK URI {part!r}: expected one of {[p + '...' for p in _SCHEMES]}")
        providers.append(factory(part))
    return providers[0] if len(providers) == 1 else KeyRing(providers)


def default_key_provider() -> Optional[KeyProvider]:
    """The provider ``$MAAS_KEK_URI`` names, or None when it is not set."""
    uri = os.environ.get(KEK_ENV)
    return key_provider(uri) if uri else None


def new_kek() -> str:
    """A fresh KEK as the base64 text a ``file://`` or ``env:`` KEK holds."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def new_dek() -> bytes:
    return os.urandom(KEY_BYTES)


def _aad(model: str, version: int, name: str) -> bytes:
    return f"maas-ray/v1 {model} {version} {name}".encode()


def encrypt_file(dek: bytes, model: str, version: int, name: str, data: bytes) -> bytes:
    """``nonce || ciphertext || tag`` of one file, bound to its model, version and name."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + _aesgcm(dek).encrypt(nonce, data, _aad(model, version, name))


def decrypt_file(dek: bytes, model: str, version: int, name: str, blob: bytes) -> bytes:
    """The plaintext of :func:`encrypt_file`'s output; IntegrityError naming the version and
    file when it is truncated, altered, or belongs to another version or file."""
    from cryptography.exceptions import InvalidTag

    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise IntegrityError(
            f"{model}:{version} failed its integrity check: {name} is truncated "
            f"({len(blob)} bytes, shorter than a nonce and a tag); refusing to load")
    try:
        return _aesgcm(dek).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(model, version, name))
    except InvalidTag as exc:
        raise IntegrityError(
            f"{model}:{version} failed its integrity check: {name} does not decrypt (altered, truncated, "
            "or taken from another version or file); refusing to load") from exc
