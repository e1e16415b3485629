"""A versioned model registry on any ``pyarrow.fs`` filesystem (local, s3://, gs://).

Layout, as in Triton and TF Serving::

    <root>/<model>/<version>/model.onnx
    <root>/<model>/<version>/<extra files>     (weights, model spec, tokenizer, ONNX external data)
    <root>/<model>/<version>/manifest.json     (written last: its presence = visible)
    <root>/<model>/<version>/manifest.sig      (Ed25519 signature, when a signing key is set)
    <root>/<model>/_aliases/<alias>.json
    <root>/<model>/_claims/<version>/<token>   (who owns a version number)
    <root>/<model>/_staging/<token>/           (uploads in flight)
    <root>/_audit/<yyyy-mm-dd>/<time>-<uuid>.json  (audit events, one object each: audit.py)

Encrypted versions (crypto.py) store every file as AES-256-GCM ciphertext and are decrypted in
memory on load; signed ones (signing.py) are checked against trusted keys where configured.

Publishing never shows a half-written version: artifacts are uploaded to a
staging prefix, a version number is claimed, then the staging directory is
renamed into place (local) or copied with the manifest last (object stores,
which have no rename). Claims use "write, then list": a writer owns version
``v`` only if its claim is the only one under ``_claims/v``; if two writers see
each other both withdraw and retry. With linearizable writes and listings
(POSIX, S3 since 2020, GCS) at most one writer can see itself alone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import random
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping, Optional, Sequence, Union

import pyarrow.fs as pafs
from pyarrow import ArrowException
from pydantic import ValidationError

from maas_ray.errors import (
    ConfigError,
    IntegrityError,
    MaasError,
    ModelNotFoundError,
    PublishConflictError,
    RegistryError,
    VersionInUseError,
    VersionNotFoundError,
)
from maas_ray.registry import crypto, signing
from maas_ray.registry.audit import AuditLog
from maas_ray.registry.manifest import (
    GenerationSpec,
    NUMPY_TO_OIP,
    EncryptionInfo,
    FileEntry,
    Manifest,
    ParentRef,
    ProcessorSpec,
    TensorSpec,
    check_file_name,
    check_name,
)

logger = logging.getLogger(__name__)

REGISTRY_ENV = "MAAS_REGISTRY_ROOT"
DEFAULT_ROOT = "~/.maas_ray/registry"
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
ONNX_EXTERNAL_DATA = "onnx_external_data"  # role of an ONNX external-data file (weights > 2 GB)
_MAX_PUBLISH_ATTEMPTS = 50


@contextmanager
def _fs_errors(
    action: str, path: str, *, missing: Optional[Callable[[OSError], MaasError]] = None
) -> Iterator[None]:
    """Turn a filesystem failure inside the block into a RegistryError naming ``path``.

    pyarrow raises OSError (FileNotFoundError, PermissionError, S3/GCS I/O errors) and its own
    ArrowException types (ArrowInvalid for a bad path); none of them may leave the registry.
    ``missing`` builds the error for a path that is not there, where that has a meaning of its
    own (a damaged version, an alias deleted meanwhile); otherwise it is a RegistryError too.
    """
    try:
        yield
    except FileNotFoundError as exc:
        if missing is not None:
            raise missing(exc) from exc
        raise RegistryError(f"cannot {action} {path!r}: {exc}") from exc
    except (OSError, ArrowException) as exc:
        raise RegistryError(f"cannot {action} {path!r}: {exc}") from exc


def default_root() -> str:
    """The registry root from ``$MAAS_REGISTRY_ROOT``, else ``~/.maas_ray/registry``."""
    return os.environ.get(REGISTRY_ENV) or DEFAULT_ROOT


def schema_from_onnx(
    model_bytes: bytes, *, external: bool = False
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Read input/output names, datatypes and shapes from an ONNX graph.

    ``external``: the weights live in an external data file (not given here), so the
    checker cannot look at them; the graph structure is still read.
    """
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    try:
        proto = onnx.load_model_from_string(model_bytes)
        if not external:
            onnx.checker.check_model(proto)
    except Exception as exc:  # onnx raises several unrelated types
        raise ConfigError(f"not a valid ONNX model: {exc}") from exc
    initializers = {init.name for init in proto.graph.initializer}
    output_names = {v.name for v in proto.graph.output}

    def spec(value_info: Any) -> TensorSpec:
        kind = value_info.type.WhichOneof("value")
        if kind != "tensor_type":  # e.g. skl2onnx's default ZipMap output: a sequence of maps
            hint = (
                "; export with options={id(model): {\"zipmap\": False}} (skl2onnx) so probabilities are a tensor"
                if kind in ("sequence_type", "map_type") else ""
            )
            raise ConfigError(
                f"ONNX {'output' if value_info.name in output_names else 'input'} {value_info.name!r} is a "
                f"{(kind or 'untyped').replace('_type', '')}, not a tensor: only tensors can be served{hint}"
            )
        ttype = value_info.type.tensor_type
        dtype = tensor_dtype_to_np_dtype(ttype.elem_type)
        if dtype not in NUMPY_TO_OIP:
            raise ConfigError(f"tensor {value_info.name!r} has unsupported dtype {dtype}")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
        return TensorSpec(name=value_info.name, datatype=NUMPY_TO_OIP[dtype], shape=dims)

    inputs = [spec(v) for v in proto.graph.input if v.name not in initializers]
    outputs = [spec(v) for v in proto.graph.output]
    return inputs, outputs


def framework_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for dist in ("maas-ray", "onnx", "onnxruntime", "onnxruntime-gpu", "torch"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


@dataclass(frozen=True)
class ExtraFile:
    """A file to publish beside model.onnx, with what it is for (recorded in the manifest)."""

    data: bytes
    role: str = ""


@dataclass(frozen=True)
class LoadedModel:
    """A verified artifact: the manifest, the ONNX bytes and the extra files it describes."""

    manifest: Manifest
    model_bytes: bytes
    files: Mapping[str, bytes] = field(default_factory=dict)  # only those asked for in load()

    def file_for(self, role: str) -> Optional[str]:
        """The name of the (first) extra file with this role, or None."""
        return next((n for n, e in self.manifest.files.items() if e.role == role), None)

    def external_data(self) -> dict[str, bytes]:
        """The loaded ONNX external data files (name -> bytes), for onnxruntime to read from
        memory: a decrypted version's weights are then never written to disk in the clear."""
        return {n: self.files[n] for n, e in self.manifest.files.items()
                if e.role == ONNX_EXTERNAL_DATA and n in self.files}

    def write_to(self, directory: str) -> str:
        """Write model.onnx and the loaded extra files into ``directory``; returns the
        model.onnx path. A graph with external data must be opened from a path: its
        initializers name their file relative to the graph's own."""
        for name, data in {MODEL_FILE: self.model_bytes, **self.files}.items():
            path = os.path.join(directory, name)
            with _fs_errors("write", path), open(path, "wb") as f:
                f.write(data)
        return os.path.join(directory, MODEL_FILE)


def _verify(what: str, name: str, data: bytes, size: int, sha256: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != size or digest != sha256:
        raise IntegrityError(
            f"{what} failed its integrity check: {name} has {len(data)} bytes with sha256 "
            f"{digest[:12]}..., the manifest expects {size} bytes with sha256 {sha256[:12]}...; "
            "refusing to load"
        )


class Registry:
    """Publish, list, resolve and load immutable model versions.

    Args:
        root: a local directory or a ``pyarrow.fs`` URI (``s3://bucket/prefix``,
            ``gs://...``; query parameters such as ``?endpoint_override=`` pass
            through to pyarrow). Defaults to ``$MAAS_REGISTRY_ROOT``.
        kek_uri: the key-encryption key(s) for encrypted versions (``file:///path``, ``env:NAME``,
            comma-separated); default ``$MAAS_KEK_URI``, read when first needed.
        encrypt: publish encrypted by default (``publish(encrypt=...)`` overrides).
        signing_key: sign published manifests with this Ed25519 key (``file:///path``); default
            ``$MAAS_SIGNING_KEY``, unsigned when neither is set.
        trusted_signing_keys: public keys (paths or PEM); when non-empty, :meth:`load` and
            :meth:`read_file` refuse versions not signed by one of them.
        actor: who the audit trail names for changes made through this object (an API key id);
            default ``$MAAS_ACTOR`` or the OS user.
    """

    def __init__(
        self,
        root: Optional[str] = None,
        *,
        kek_uri: Optional[str] = None,
        encrypt: bool = False,
        signing_key: Optional[str] = None,
        trusted_signing_keys: Optional[Sequence[str]] = None,
        actor: Optional[str] = None,
    ) -> None:
        root = root or default_root()
        self.root = root
        self.encrypt = encrypt
        self.actor = actor
        self._kek_uri = kek_uri
        self._keys: Optional[crypto.KeyProvider] = None
        self._signing_key = signing_key
        self._trusted = signing.trusted_keys(trusted_signing_keys) if trusted_signing_keys else None
        self.audit = AuditLog(self)
        try:
            if "://" in root:
                self._fs, base = pafs.FileSystem.from_uri(root)
            else:
                self._fs, base = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError
            raise ConfigError(f"cannot open registry root {root!r}: {exc}") from exc
        self._base = base.rstrip("/")
        self._local = isinstance(self._fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Registry({self.root!r})"

    # ---- paths and small I/O helpers -------------------------------------------------
    def _path(self, *parts: Union[str, int]) -> str:
        return "/".join([self._base, *(str(p) for p in parts)])

    def _children(self, path: str, *, recursive: bool = False) -> list[pafs.FileInfo]:
        with _fs_errors("list", path):
            return self._fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))

    def _exists(self, path: str) -> bool:
        with _fs_errors("look up", path):
            return self._fs.get_file_info(path).type != pafs.FileType.NotFound

    def _read(self, path: str, *, missing: Optional[Callable[[OSError], MaasError]] = None) -> bytes:
        with _fs_errors("read", path, missing=missing), self._fs.open_input_stream(path) as f:
            return f.read()

    def _read_json(self, path: str) -> Any:
        data = self._read(path)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise RegistryError(f"cannot read {path!r}: not JSON: {exc}") from exc

    def _alias_version(self, path: str) -> int:
        body = self._read_json(path)
        try:
            return int(body["version"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryError(f"cannot read {path!r}: no version number in {body!r}") from exc

    def _write(self, path: str, data: bytes, *, atomic: bool = False) -> None:
        with _fs_errors("write", path):
            self._fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            if atomic and self._local:
                tmp = f"{path}.tmp-{uuid.uuid4().hex}"
                with self._fs.open_output_stream(tmp) as f:
                    f.write(data)
                self._fs.move(tmp, path)  # rename(2): readers see old or new, never half
            else:  # a single PUT on object stores is atomic already
                with self._fs.open_output_stream(path) as f:
                    f.write(data)

    def _delete_file(self, path: str, *, missing: Optional[Callable[[OSError], MaasError]] = None) -> None:
        with _fs_errors("delete", path, missing=missing):
            self._fs.delete_file(path)

    # ---- listing and resolving ---------------------------------------------------------
    def list_models(self) -> list[str]:
        """Names of models with at least one published version."""
        names = [
            i.base_name
            for i in self._children(self._base)
            if i.type == pafs.FileType.Directory and not i.base_name.startswith((".", "_"))
        ]
        return sorted(n for n in names if self.list_versions(n, must_exist=False))

    def list_versions(self, model: str, *, must_exist: bool = True) -> list[int]:
        """Published versions of ``model``, ascending."""
        check_name("model", model)
        versions = [
            int(i.base_name)
            for i in self._children(self._path(model))
            if i.type == pafs.FileType.Directory and i.base_name.isdigit()
        ]
        visible = sorted(v for v in versions if self._exists(self._path(model, v, MANIFEST_FILE)))
        if must_exist and not visible:
            raise ModelNotFoundError(f"model {model!r} does not exist in registry {self.root!r}")
        return visible

    def aliases(self, model: str) -> dict[str, int]:
        """Alias name -> version for ``model``."""
        out = {}
        for info in self._children(self._path(model, "_aliases")):
            if info.base_name.endswith(".json"):
                out[info.base_name[: -len(".json")]] = self._alias_version(info.path)
        return dict(sorted(out.items()))

    def resolve(self, model: str, ref: Union[int, str, None] = None) -> int:
        """Turn a version number, ``"latest"``/None, or an alias into a version number."""
        versions = self.list_versions(model)
        if ref is None or ref == "latest":
            return versions[-1]
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            version = int(ref)
        else:
            alias_path = self._path(model, "_aliases", f"{check_name('alias', ref)}.json")
            if not self._exists(alias_path):
                raise VersionNotFoundError(
                    f"model {model!r} has no version or alias {ref!r}; "
                    f"versions {versions}, aliases {sorted(self.aliases(model))}"
                )
            version = self._alias_version(alias_path)
        if version not in versions:
            raise VersionNotFoundError(
                f"model {model!r} has no version {version}; versions are {versions}"
            )
        return version

    def describe(self, model: str, ref: Union[int, str, None] = None) -> Manifest:
        """The manifest of one version (no checksum check: use :meth:`load` to serve)."""
        version = self.resolve(model, ref)
        raw = self._read(self._path(model, version, MANIFEST_FILE))
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValidationError as exc:
            raise IntegrityError(f"manifest of {model}:{version} is invalid: {exc}") from exc
        if (manifest.model, manifest.version) != (model, version):  # a manifest copied from elsewhere
            raise IntegrityError(f"the manifest stored as {model}:{version} describes "
                                 f"{manifest.model}:{manifest.version}; refusing it")
        return manifest

    def load(
        self,
        model: str,
        ref: Union[int, str, None] = None,
        *,
        files: Optional[Collection[str]] = None,
        skip_roles: Collection[str] = (),
    ) -> LoadedModel:
        """Read a version and verify the size and sha256 of every file read; raise rather
        than serve a bad file.

        Args:
            files: extra files to read as well (names from ``manifest.files``); default all.
            skip_roles: leave out extra files with these roles (serving skips ``weights``).
        """
        manifest = self._checked_manifest(model, ref)
        dek = self._data_key(manifest)
        data = self._read_plain(manifest, MODEL_FILE, dek)
        _verify(f"{model}:{manifest.version}", MODEL_FILE, data, manifest.size_bytes, manifest.sha256)
        names = [
            n for n in (manifest.files if files is None else files)
            if n not in manifest.files or manifest.files[n].role not in skip_roles
        ]
        return LoadedModel(
            manifest=manifest,
            model_bytes=data,
            files={name: self._read_verified(manifest, name, dek) for name in names},
        )

    def read_file(self, model: str, ref: Union[int, str, None], name: str) -> bytes:
        """One extra file of a version, checksum verified (and decrypted, signature checked)."""
        manifest = self._checked_manifest(model, ref)
        return self._read_verified(manifest, name, self._data_key(manifest))

    def _read_verified(self, manifest: Manifest, name: str, dek: Optional[bytes] = None) -> bytes:
        entry = manifest.files.get(name)
        if entry is None:
            raise VersionNotFoundError(
                f"{manifest.model}:{manifest.version} has no file {name!r}; files: {sorted(manifest.files)}"
            )
        data = self._read_plain(manifest, name, dek)
        _verify(f"{manifest.model}:{manifest.version}", name, data, entry.size_bytes, entry.sha256)
        return data

    def _read_plain(self, manifest: Manifest, name: str, dek: Optional[bytes]) -> bytes:
        """A file's bytes, decrypted in memory when the version is encrypted."""
        # listed in the manifest but gone: the version is damaged
        data = self._read(self._path(manifest.model, manifest.version, name), missing=lambda exc: IntegrityError(
            f"{manifest.model}:{manifest.version} failed its integrity check: {name} is missing ({exc})"
        ))
        if manifest.encryption is None or name not in manifest.encryption.files:
            return data
        assert dek is not None, "an encrypted version is read with its data key"
        return crypto.decrypt_file(dek, manifest.model, manifest.version, name, data)

    # ---- encryption and signatures -------------------------------------------------------
    def _key_provider(self, why: str) -> crypto.KeyProvider:
        if self._keys is None:
            uri = self._kek_uri or os.environ.get(crypto.KEK_ENV)
            if not uri:
                raise ConfigError(f"{why} needs a key-encryption key: set ${crypto.KEK_ENV} "
                                  "(file:///path/kek.key or env:NAME) or pass --kek")
            self._keys = crypto.key_provider(uri)
        return self._keys

    def _data_key(self, manifest: Manifest) -> Optional[bytes]:
        enc = manifest.encryption
        if enc is None:
            return None
        label = f"{manifest.model}:{manifest.version}"
        try:
            wrapped = base64.b64decode(enc.wrapped_dek, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise IntegrityError(f"{label}: the wrapped data key is not base64; refusing to load") from exc
        try:
            return self._key_provider(f"{label} is encrypted and").unwrap(enc.kek_id, wrapped)
        except IntegrityError as exc:
            raise IntegrityError(f"{label} cannot be decrypted: {exc}") from exc

    def _checked_manifest(self, model: str, ref: Union[int, str, None]) -> Manifest:
        """describe(), plus the signature check when trusted keys are configured."""
        manifest = self.describe(model, ref)
        if self._trusted is not None:
            sig_path = self._path(model, manifest.version, signing.SIGNATURE_FILE)
            sig = self._read(sig_path) if self._exists(sig_path) else None
            signing.verify_manifest(manifest, sig, self._trusted)
        return manifest

    def rekey(self, new_kek_uri: str, models: Optional[Collection[str]] = None) -> list[tuple[str, int]]:
        """Re-wrap the data key of every encrypted version (of ``models``, default all) under
        ``new_kek_uri``; the files are not touched, only manifest.json is rewritten (its
        signature does not cover the wrapped key). Returns the versions re-wrapped.
        Readers then need the new KEK (or both, comma-separated, while replicas roll)."""
        new = crypto.key_provider(new_kek_uri)
        done = []
        for model in models if models is not None else self.list_models():
            for version in self.list_versions(model):
                manifest = self.describe(model, version)
                if manifest.encryption is None:
                    continue
                dek = self._data_key(manifest)
                assert dek is not None
                kek_id, wrapped = new.wrap(dek)
                before = manifest.encryption.kek_id
                updated = manifest.model_copy(update={"encryption": manifest.encryption.model_copy(
                    update={"kek_id": kek_id, "wrapped_dek": base64.b64encode(wrapped).decode()})})
                self._write(self._path(model, version, MANIFEST_FILE),
                            updated.model_dump_json(indent=2).encode(), atomic=True)
                self.audit.append("kek.rotate", f"{model}:{version}", model=model, actor=self.actor,
                                  before={"kek_id": before}, after={"kek_id": kek_id})
                done.append((model, version))
        logger.info("re-wrapped %d data keys under %s", len(done), getattr(new, "kek_id", "the new KEK"))
        return done

    def record_event(self, action: str, target: str, *, model: Optional[str] = None, before: Any = None,
                     after: Any = None, actor: Optional[str] = None) -> None:
        """Append an audit event for a change made outside the registry's own methods (rollout
        decisions, API keys); see :mod:`maas_ray.registry.audit`."""
        self.audit.append(action, target, model=model, before=before, after=after, actor=actor or self.actor)

    # ---- aliases -------------------------------------------------------------------------
    def set_alias(self, model: str, alias: str, ref: Union[int, str]) -> int:
        """Point ``alias`` (e.g. ``production``) at a version; returns the version."""
        check_name("alias", alias)
        if alias.isdigit() or alias == "latest":
            raise ConfigError(f"alias {alias!r} would shadow a version reference")
        version = self.resolve(model, ref)
        path = self._path(model, "_aliases", f"{alias}.json")
        before = self._alias_version(path) if self._exists(path) else None
        body = {"version": version, "updated_at": datetime.now(timezone.utc).isoformat()}
        self._write(path, json.dumps(body).encode(), atomic=True)
        logger.info("alias %s:%s -> version %d", model, alias, version)
        self.audit.append("alias.set", f"{model}@{alias}", model=model, actor=self.actor,
                          before=None if before is None else {"version": before}, after={"version": version})
        return version

    # ---- records beside the versions (rollout decisions and their evidence) --------------
    def write_record(self, model: str, kind: str, name: str, body: dict[str, Any]) -> str:
        """Write ``<model>/_<kind>/<name>.json`` atomically (a rollout's state and evidence, next to
        the versions it moves); returns its path. Versions themselves stay immutable."""
        check_name(kind, kind)
        check_name(f"{kind} record", name)
        path = self._path(model, f"_{kind}", f"{name}.json")
        self._write(path, json.dumps(body, indent=1, default=str).encode(), atomic=True)
        return path

    def read_record(self, model: str, kind: str, name: str) -> Optional[dict[str, Any]]:
        """The record written by :meth:`write_record`, or None if there is none."""
        path = self._path(model, f"_{kind}", f"{check_name(f'{kind} record', name)}.json")
        if not self._exists(path):
            return None
        return self._read_json(path)

    def list_records(self, model: str, kind: str) -> list[str]:
        return sorted(i.base_name[:-5] for i in self._children(self._path(model, f"_{kind}"))
                      if i.base_name.endswith(".json"))

    def delete_alias(self, model: str, alias: str) -> None:
        path = self._path(model, "_aliases", f"{check_name('alias', alias)}.json")
        gone = VersionNotFoundError(f"model {model!r} has no alias {alias!r}")
        if not self._exists(path):
            raise gone
        before = self._alias_version(path)
        self._delete_file(path, missing=lambda exc: gone)  # deleted meanwhile: as if never there
        self.audit.append("alias.delete", f"{model}@{alias}", model=model, actor=self.actor,
                          before={"version": before}, after=None)

    # ---- deleting versions ---------------------------------------------------------------
    def check_delete(self, model: str, version: Union[int, str], *,
                     serving: Collection[tuple[str, int]] = ()) -> int:
        """Raise what :meth:`delete_version` would refuse with, without deleting; returns the
        version number. ``serving``: see :meth:`delete_version`."""
        if isinstance(version, bool) or not str(version).isdigit():
            raise ConfigError(f"delete takes a version number, not {version!r}; `maas models describe "
                              f"{model} {version}` shows which version an alias names")
        version = self.resolve(model, int(version))  # ModelNotFoundError / VersionNotFoundError
        reasons = []
        named_by = sorted(a for a, v in self.aliases(model).items() if v == version)
        if named_by:
            several = len(named_by) > 1
            reasons.append(f"alias{'es' * several} {', '.join(named_by)} name{'s' * (not several)} it (move "
                           f"{'them' if several else 'it'} first: `maas models alias {model} ALIAS VERSION`)")
        if (model, version) in serving:
            apps = serving.get((model, version)) if isinstance(serving, Mapping) else None
            names = [apps] if isinstance(apps, str) else sorted(apps or [])
            plural = len(names) > 1
            reasons.append(f"serving app{'s' * plural} {', '.join(names)} serve{'s' * (not plural)} it "
                           "(`serve status`; redeploy without it or move its alias first)"
                           if names else "a serving app serves it")
        if reasons:
            raise VersionInUseError(f"cannot delete {model}:{version}: {'; and '.join(reasons)}")
        return version

    def delete_version(self, model: str, version: Union[int, str], *,
                       serving: Collection[tuple[str, int]] = ()) -> None:
        """Remove a version from the registry; refused while an alias names it or an app serves it.

        Args:
            version: a version number (not an alias: deleting is explicit).
            serving: the ``(model, version)`` pairs running apps serve (``maas models delete`` reads
                them from Serve: :mod:`maas_ray.cli.serving_apps`); a mapping from those pairs to
                app names makes the refusal name the apps.

        Raises:
            VersionInUseError: (409) an alias names the version, or it is in ``serving``.
            ModelNotFoundError, VersionNotFoundError: (404) no such model or version.

        The manifest goes first, so the version vanishes from :meth:`list_versions` (and
        :meth:`resolve`, :meth:`load`) at once; the rest of its directory is removed after. A
        failure there leaves invisible files behind (logged), never a half-visible version. The
        version's claim stays (a tombstone is written if none is left), so its number is never
        published again: replica caches and the audit trail keep meaning one artifact per
        number. Deleting the last version drops the model from :meth:`list_models`; its
        ``_aliases``/``_claims`` stay. The alias check and the delete are not one transaction:
        an alias set to this version in between would name a deleted version.
        """
        version = self.check_delete(model, version, serving=serving)
        directory = self._path(model, version)
        try:
            before: dict[str, Any] = {"version": version, "sha256": self.describe(model, version).sha256}
        except IntegrityError:  # a damaged version can be deleted too
            before = {"version": version}
        claims = self._path(model, "_claims", version)
        if not any(i.type == pafs.FileType.File for i in self._children(claims, recursive=True)):
            self._write(f"{claims}/deleted", b"")  # the number stays taken (a registry copied without _claims)
        self._delete_file(f"{directory}/{MANIFEST_FILE}",  # the version is invisible from here on
                          missing=lambda exc: VersionNotFoundError(f"{model}:{version} was deleted meanwhile"))
        try:
            self._fs.delete_dir(directory)
        except FileNotFoundError:
            pass
        except (OSError, ArrowException) as exc:
            logger.warning("deleted %s:%d, but could not remove the rest of %r (invisible, never read): %s",
                           model, version, directory, exc)
        logger.info("deleted %s:%d", model, version)
        self.audit.append("delete", f"{model}:{version}", model=model, actor=self.actor, before=before, after=None)

    # ---- publishing ----------------------------------------------------------------------
    def publish(
        self,
        model: str,
        onnx_model: Union[bytes, str, Path],
        *,
        preprocessor: Optional[ProcessorSpec] = None,
        postprocessor: Optional[ProcessorSpec] = None,
        metrics: Optional[dict[str, float]] = None,
        training_config: Optional[dict[str, Any]] = None,
        parent: Optional[ParentRef] = None,
        description: str = "",
        files: Optional[Mapping[str, Union[bytes, ExtraFile]]] = None,
        model_spec: Optional[dict[str, Any]] = None,
        dataset: Optional[dict[str, Any]] = None,
        encrypt: Optional[bool] = None,
        generation: Optional[GenerationSpec] = None,
    ) -> Manifest:
        """Publish an ONNX model (bytes or a path) as the next version of ``model``.

        The schema is read from the graph, so any ONNX file can be published. ``files``
        are published beside model.onnx in the same atomic step (name -> bytes, or
        :class:`ExtraFile` with a role), each with its sha256 in the manifest.

        ``encrypt`` (default: the registry's ``encrypt``; always when ``parent`` is encrypted):
        every file is stored as AES-256-GCM ciphertext under a new data key wrapped by the KEK.
        The manifest is signed when a signing key is configured.
        """
        check_name("model", model)
        if isinstance(onnx_model, bytes):
            data = onnx_model
        else:
            try:
                data = Path(onnx_model).read_bytes()
            except OSError as exc:  # the caller's file, not the registry's
                raise ConfigError(f"cannot read ONNX file {str(onnx_model)!r}: {exc}") from exc
        extras = {
            check_file_name(name): f if isinstance(f, ExtraFile) else ExtraFile(bytes(f))
            for name, f in (files or {}).items()
        }
        inputs, outputs = schema_from_onnx(data, external=any(f.role == ONNX_EXTERNAL_DATA for f in extras.values()))
        if parent is not None:
            self.resolve(parent.model, parent.version)  # the parent must exist
            if self.describe(parent.model, parent.version).encryption is not None:
                encrypt = True  # a child of an encrypted version is encrypted too
        keys = self._key_provider(f"publishing {model} encrypted") if (
            self.encrypt if encrypt is None else encrypt) else None
        signing_uri = self._signing_key or os.environ.get(signing.SIGNING_KEY_ENV)
        signer = signing.load_private_key(signing_uri) if signing_uri else None
        fields = dict(
            model=model,
            inputs=inputs,
            outputs=outputs,
            preprocessor=preprocessor or ProcessorSpec(),
            postprocessor=postprocessor or ProcessorSpec(),
            metrics=metrics or {},
            training_config=training_config,
            parent=parent,
            frameworks=framework_versions(),
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            files={
                name: FileEntry(sha256=hashlib.sha256(f.data).hexdigest(), size_bytes=len(f.data), role=f.role)
                for name, f in extras.items()
            },
            model_spec=model_spec,
            dataset=dataset,
            generation=generation,
            description=description,
        )
        token = f"{time.time_ns():020d}-{uuid.uuid4().hex}"
        staging = self._path(model, "_staging", token)
        contents = {MODEL_FILE: data, **{name: f.data for name, f in extras.items()}}
        encryption = None
        if keys is not None:  # wrapped before the claim: a KEK failure burns no version number
            dek = crypto.new_dek()
            kek_id, wrapped = keys.wrap(dek)
            encryption = EncryptionInfo(kek_id=kek_id, wrapped_dek=base64.b64encode(wrapped).decode(),
                                        files=list(contents))
        try:
            if encryption is None:
                for name, blob in contents.items():
                    self._write(f"{staging}/{name}", blob)
            version = self._claim_version(model, token)
            if encryption is not None:  # the ciphertext is bound to the version number: after the claim
                for name, blob in contents.items():
                    self._write(f"{staging}/{name}", crypto.encrypt_file(dek, model, version, name, blob))
            manifest = Manifest(version=version, encryption=encryption, **fields)
            self._write(f"{staging}/{MANIFEST_FILE}", manifest.model_dump_json(indent=2).encode())
            if signer is not None:
                self._write(f"{staging}/{signing.SIGNATURE_FILE}", signing.sign_manifest(manifest, signer))
            self._commit(staging, self._path(model, version),
                         [*extras, *([signing.SIGNATURE_FILE] if signer is not None else [])])
        except BaseException:
            self._remove_staging(staging)
            raise
        if not self._local:  # a local commit renamed the staging directory away
            self._remove_staging(staging)
        logger.info("published %s:%d (sha256 %s)", model, version, manifest.sha256[:12])
        self.audit.append("publish", f"{model}:{version}", model=model, actor=self.actor, before=None, after={
            "version": version, "sha256": manifest.sha256, "encrypted": encryption is not None,
            "kek_id": None if encryption is None else encryption.kek_id,
            "signed_by": None if signer is None else signing.key_id(signer.public_key())})
        return manifest

    def _remove_staging(self, staging: str) -> None:
        """Best effort: a failed cleanup must neither hide the error being raised nor fail a
        version that is already visible; a leftover staging directory is never read."""
        try:
            self._fs.delete_dir(staging)
        except FileNotFoundError:
            pass
        except (OSError, ArrowException) as exc:
            logger.warning("publish could not remove its staging directory %r: %s", staging, exc)

    def _claim_version(self, model: str, token: str) -> int:
        claims = self._path(model, "_claims")
        for attempt in range(_MAX_PUBLISH_ATTEMPTS):
            taken = self._claimed_versions(claims)
            taken += self.list_versions(model, must_exist=False)
            version = max(taken, default=0) + 1
            mine = f"{claims}/{version}/{token}"
            self._write(mine, b"")
            rivals = [i.base_name for i in self._children(f"{claims}/{version}")]
            if rivals == [token]:
                return version
            self._delete_file(mine)  # we saw a rival: withdraw and retry after jitter
            time.sleep(random.uniform(0, 0.02 * (attempt + 1)))
        raise PublishConflictError(
            f"could not claim a version of {model!r} after {_MAX_PUBLISH_ATTEMPTS} attempts"
        )

    def _claimed_versions(self, claims: str) -> list[int]:
        """Versions with at least one claim object under ``_claims/<v>/``.

        A withdrawn claim leaves its directory behind (an empty dir locally, a
        directory marker written by pyarrow on S3); it must not burn the number.
        """
        out = set()
        for info in self._children(claims, recursive=True):
            if info.type == pafs.FileType.File:
                head = info.path[len(claims) + 1 :].split("/", 1)[0]
                if head.isdigit():
                    out.add(int(head))
        return sorted(out)

    def _commit(self, staging: str, final: str, extra_names: list[str]) -> None:
        with _fs_errors(f"commit {staging!r} to", final):
            if self._local:
                self._fs.move(staging, final)  # rename(2) of the directory: all or nothing
                return
            # Object stores have no rename; the manifest goes last and marks the version visible.
            for name in [MODEL_FILE, *extra_names, MANIFEST_FILE]:
                self._fs.copy_file(f"{staging}/{name}", f"{final}/{name}")
