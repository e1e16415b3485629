"""API keys: generation, the hash-only key file, and authentication at the ingress.

A key reads ``mk_<id>_<secret>``: ``id`` is 8 lower-case letters and digits (public: it
names the key in logs, errors and ``maas keys list``), ``secret`` is 32 random bytes
(``secrets.token_urlsafe``). The key file stores only the sha256 of the whole key::

    {"version": 1, "keys": [{"id": "k3x9a0qz", "sha256": "<64 hex>", "models": ["digits"],
                             "admin": false, "name": "alice", "created": "2026-11-24T15:00:00Z"}]}

The file lives on local disk or at an ``s3://`` / ``gs://`` URI (through ``pyarrow.fs``, as
the registry does), or its JSON sits in an environment variable (``auth.keys_env``).
Lookup is by id (a dict: O(1)), then the digests are compared with
``hmac.compare_digest``, so the time taken does not depend on how much of the secret
matched. Plaintext keys appear only once, on the stdout of ``maas keys create``; no log
line or error message here carries key material, only key ids.

Scopes: ``models`` (names, or ``["*"]`` for every model) for the inference routes, and
``admin`` for metadata and registry routes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import string
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from maas_ray.errors import ConfigError, PermissionDeniedError, UnauthenticatedError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from maas_ray.serving.config import AuthConfig

logger = logging.getLogger(__name__)

__all__ = [
    "ANONYMOUS",
    "KeyEntry",
    "KeyFile",
    "KeyStore",
    "Principal",
    "extract_key",
    "generate_key",
    "hash_key",
    "read_key_file",
    "resolve_auth",
    "write_key_file",
]

KEY_PREFIX = "mk"
_ID_ALPHABET = string.ascii_lowercase + string.digits  # no "_": the id must split cleanly
_ID_LEN = 8
_SECRET_BYTES = 32
ALL_MODELS = "*"

# Cluster configs turn auth on through the environment of `ray start`, as they pass the
# registry root (see resolve_auth and cluster/README.md).
AUTH_ENABLED_ENV = "MAAS_AUTH_ENABLED"
AUTH_KEYS_FILE_ENV = "MAAS_AUTH_KEYS_FILE"


# ---- principals --------------------------------------------------------------------------
@dataclass(frozen=True)
class Principal:
    """Who is calling: a key id and what it may do."""

    key_id: str
    models: frozenset[str]  # {"*"} = every model
    admin: bool

    def may_call(self, model: str) -> bool:
        return ALL_MODELS in self.models or model in self.models

    def check_model(self, model: str) -> None:
        if not self.may_call(model):
            raise PermissionDeniedError(f"API key {self.key_id!r} may not call model {model!r}")

    def check_admin(self) -> None:
        if not self.admin:
            raise PermissionDeniedError(f"API key {self.key_id!r} lacks the admin scope")


ANONYMOUS = Principal(key_id="anonymous", models=frozenset({ALL_MODELS}), admin=True)


def extract_key(headers: Mapping[str, str]) -> Optional[str]:
    """The presented key from lower-case headers: ``authorization: Bearer <key>`` or ``x-api-key``.

    A malformed header (another scheme, no token, spaces in the token) gives None, which
    authenticates as a missing key (401) rather than an error that could echo the header.
    """
    parts = headers.get("authorization", "").split()
    if len(parts) == 2 and parts[0].lower() == "bearer":
        return parts[1]
    # another scheme may come from a proxy in front (e.g. Basic): look for x-api-key then
    key = headers.get("x-api-key")
    if key is not None:
        key = key.strip()
        if key and len(key.split()) == 1:
            return key
    return None


# ---- keys and the key file ---------------------------------------------------------------
def hash_key(key: str) -> str:
    """Hex sha256 of the whole key. The secret is 256 random bits, so no salt or KDF is needed."""
    return hashlib.sha256(key.encode()).hexdigest()


def _split_key(key: str) -> Optional[tuple[str, str]]:
    """(id, secret) of a well-formed key, else None."""
    parts = key.split("_", 2)  # the secret may itself contain "_"
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != _ID_LEN or not parts[2]:
        return None
    return parts[1], parts[2]


def generate_key() -> tuple[str, str]:
    """A new (key id, plaintext key)."""
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LEN))
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"


class KeyEntry(BaseModel):
    """One key in the key file: its hash and scopes, never the key."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=rf"^[a-z0-9]{{{_ID_LEN}}}$", description="Public key id (in logs and errors).")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex sha256 of the whole key.")
    models: list[str] = Field(min_length=1, description='Models this key may call; ["*"] = all.')
    admin: bool = Field(default=False, description="May call metadata and registry routes.")
    name: str = Field(default="", description="Who or what holds the key.")
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        if ALL_MODELS in v and len(v) > 1:
            raise ValueError(f'"*" already means every model; got {v}')
        return v

    def principal(self) -> Principal:
        return Principal(key_id=self.id, models=frozenset(self.models), admin=self.admin)


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(default=1, ge=1, le=1, description="Key file format version.")
    keys: list[KeyEntry] = Field(default_factory=list)

    @field_validator("keys")
    @classmethod
    def _unique(cls, v: list[KeyEntry]) -> list[KeyEntry]:
        ids = [k.id for k in v]
        if len(set(ids)) != len(ids):
            raise ValueError(f"key ids listed twice: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
        return v

    @classmethod
    def parse(cls, raw: bytes | str, source: str) -> "KeyFile":
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            # Field path and reason only, never the values: a hand-edited file could hold a
            # plaintext key (e.g. in an unknown "key" field), and this message gets logged.
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"key file {source}: {problems}") from exc

    def dumps(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()


def _open_fs(uri: str) -> "tuple[pafs.FileSystem, str]":
    import pyarrow.fs as pafs

    try:
        if "://" in uri:
            return pafs.FileSystem.from_uri(uri)
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError
        raise ConfigError(f"cannot open key file location {_redact(uri)!r}: {exc}") from exc


def _redact(uri: str) -> str:
    """The URI without its query string, which may carry endpoint credentials."""
    return uri.split("?", 1)[0]


def read_key_file(uri: str, *, missing_ok: bool = False) -> KeyFile:
    """Read and validate a key file (local path or ``s3://`` / ``gs://`` URI)."""
    import pyarrow.fs as pafs

    fs, path = _open_fs(uri)
    try:
        if missing_ok and fs.get_file_info(path).type == pafs.FileType.NotFound:
            return KeyFile()
        with fs.open_input_stream(path) as f:
            raw = f.read()
    except (OSError, ValueError) as exc:  # pyarrow: OSError, or ArrowInvalid (a ValueError)
        raise ConfigError(f"cannot read key file {_redact(uri)!r}: {exc}") from exc
    return KeyFile.parse(raw, repr(_redact(uri)))


def write_key_file(uri: str, keys: KeyFile) -> None:
    """Write a key file; readers see the old or the new file, never half of one."""
    import pyarrow.fs as pafs

    fs, path = _open_fs(uri)
    data = keys.dumps()
    try:
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.create_dir(parent, recursive=True)
        if isinstance(fs, pafs.LocalFileSystem):
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            os.chmod(tmp, 0o600)  # hashes only, but nobody else needs to read who holds keys
            fs.move(tmp, path)  # rename(2)
        else:  # one PUT on an object store is atomic already
            with fs.open_output_stream(path) as f:
                f.write(data)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot write key file {_redact(uri)!r}: {exc}") from exc


def resolve_auth(auth: "AuthConfig", environ: Optional[Mapping[str, str]] = None) -> "AuthConfig":
    """Fill ``enabled`` and ``keys_file`` from ``$MAAS_AUTH_ENABLED`` / ``$MAAS_AUTH_KEYS_FILE``
    where the serve YAML leaves them unset.

    The cluster configs set both in the environment of ``ray start`` (as they set
    ``MAAS_REGISTRY_ROOT``), so every app deployed there requires keys without editing its
    YAML; a YAML that says ``enabled: false`` explicitly still wins.
    """
    env = os.environ if environ is None else environ
    updates: dict[str, object] = {}
    if "enabled" not in auth.model_fields_set and env.get(AUTH_ENABLED_ENV):
        value = env[AUTH_ENABLED_ENV].strip().lower()
        if value not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            raise ConfigError(f"${AUTH_ENABLED_ENV} must be true or false, got {env[AUTH_ENABLED_ENV]!r}")
        updates["enabled"] = value in {"1", "true", "yes", "on"}
    if auth.keys_file is None and env.get(AUTH_KEYS_FILE_ENV):
        updates["keys_file"] = env[AUTH_KEYS_FILE_ENV]
    if not updates:
        return auth
    return type(auth).model_validate({**auth.model_dump(exclude_unset=True), **updates})


# ---- the store ---------------------------------------------------------------------------
class KeyStore:
    """The keys a replica accepts, re-read periodically so revocations take effect.

    Args:
        auth: the app's ``auth`` block; with ``enabled: false`` every call is ANONYMOUS.
        keys: the parsed key file (``from_config`` reads it).
    """

    def __init__(self, auth: "AuthConfig", keys: KeyFile) -> None:
        self.auth = auth
        self._set(keys)
        self._reload_failing = False

    @classmethod
    def from_config(cls, auth: "AuthConfig") -> "KeyStore":
        """Read the keys named by ``auth`` (nothing when auth is off); ConfigError names a bad source."""
        if not auth.enabled:
            return cls(auth, KeyFile())
        return cls(auth, cls._read_source(auth))

    @staticmethod
    def _read_source(auth: "AuthConfig") -> KeyFile:
        if auth.keys_file:
            return read_key_file(auth.keys_file)
        raw = os.environ.get(auth.keys_env)
        if raw is None:
            raise ConfigError(
                f"auth is enabled but auth.keys_file is unset and ${auth.keys_env} is not in the environment"
            )
        return KeyFile.parse(raw, f"${auth.keys_env}")

    def _set(self, keys: KeyFile) -> None:
        # one reference swap: a request in flight sees the old dict or the new, never a mix
        self._by_id = {k.id: (bytes.fromhex(k.sha256), k.principal()) for k in keys.keys}

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._by_id)

    def authenticate(self, presented: Optional[str]) -> Principal:
        """The principal of a presented key; UnauthenticatedError if missing, malformed or unknown."""
        if not self.auth.enabled:
            return ANONYMOUS
        if not presented:
            raise UnauthenticatedError("missing API key: send 'authorization: Bearer <key>' or 'x-api-key: <key>'")
        split = _split_key(presented)
        entry = self._by_id.get(split[0]) if split else None
        digest = hashlib.sha256(presented.encode()).digest()
        # Compare even for an unknown id, so unknown and wrong keys take the same path.
        expected = entry[0] if entry else _DUMMY_DIGEST
        if not hmac.compare_digest(digest, expected) or entry is None:
            # the id is public; naming it helps find a revoked key, and a made-up one reveals nothing
            known = f" (key id {split[0]!r})" if entry is not None else ""
            raise UnauthenticatedError(f"invalid or revoked API key{known}")
        return entry[1]

    def reload(self) -> bool:
        """Re-read the source (blocking I/O); keep the old keys and return False on a read error."""
        try:
            keys = self._read_source(self.auth)
        except Exception as exc:  # any failure: a replica must keep serving with the keys it has
            if not self._reload_failing:  # once per failure streak, not every interval
                logger.error("keeping the %d current API keys: %s", len(self._by_id), exc)
            self._reload_failing = True
            return False
        before = set(self._by_id)
        self._set(keys)
        if self._reload_failing:
            logger.info("API key source readable again")
        self._reload_failing = False
        after = set(self._by_id)
        if before != after:
            logger.info("API keys reloaded: added %s, removed %s", sorted(after - before), sorted(before - after))
        return True

    async def refresh_forever(self) -> None:
        """Re-read the keys every ``auth.reload_interval_s``, off the event loop; runs until cancelled."""
        if not self.auth.enabled:
            return
        while True:
            await asyncio.sleep(self.auth.reload_interval_s)
            await asyncio.to_thread(self.reload)  # S3 reads block; requests keep flowing


_DUMMY_DIGEST = hashlib.sha256(b"maas-ray: no such key").digest()
