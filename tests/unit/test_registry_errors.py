"""A failing filesystem never leaks out of the registry: every call maps pyarrow's OSError /
ArrowException to RegistryError naming the path; the deliberate not-found answers stay."""

import logging
import os
import pickle

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from maas_ray.errors import ConfigError, IntegrityError, MaasError, RegistryError, VersionNotFoundError
from maas_ray.registry import Registry
from maas_ray.registry.store import MANIFEST_FILE, MODEL_FILE, LoadedModel
from tests.helpers import linear_onnx

pytestmark = pytest.mark.unit


class FailingFS:
    """A real pyarrow filesystem whose chosen calls fail like a broken disk or bucket.

    ``fails(method, args)`` picks the calls; they raise ``error`` (an OSError by default).
    """

    def __init__(self, fs, fails, error=None):
        self._fs, self._fails = fs, fails
        self._error = error or (lambda method: OSError(5, f"simulated I/O error in {method}"))
        self.failed = []

    def __getattr__(self, method):
        real = getattr(self._fs, method)

        def call(*args, **kwargs):
            if self._fails(method, args):
                self.failed.append((method, args))
                raise self._error(method)
            return real(*args, **kwargs)

        return call


def _on(method, contains=None, *, paths_only=False):
    """fails() for ``method`` calls whose first path argument contains ``contains``."""
    def fails(name, args):
        if name != method or not args:
            return False
        target = args[0]
        if isinstance(target, pafs.FileSelector):
            if paths_only:
                return False
            target = target.base_dir
        return contains is None or contains in str(target)
    return fails


@pytest.fixture
def reg(tmp_path):
    r = Registry(str(tmp_path / "registry"))
    r.publish("m", linear_onnx())
    r.set_alias("m", "prod", 1)
    return r


def _break(reg, fails, error=None):
    reg._fs = FailingFS(reg._fs, fails, error)
    return reg._fs


def _raises_naming(path_part, call, *args, cause=(OSError, pa.ArrowException), **kwargs):
    with pytest.raises(RegistryError) as info:
        call(*args, **kwargs)
    assert type(info.value) is RegistryError, info.value  # not a NotFound / Integrity subclass
    assert path_part in str(info.value), str(info.value)
    assert isinstance(info.value.__cause__, cause)  # raise ... from exc
    return info.value


def test_exists_maps_a_failed_lookup(reg):
    _break(reg, _on("get_file_info", MANIFEST_FILE, paths_only=True))
    err = _raises_naming(f"m/1/{MANIFEST_FILE}", reg.list_versions, "m")
    assert str(err).startswith("cannot look up ") and "simulated I/O error" in str(err)
    reg._fs = reg._fs._fs
    _break(reg, _on("get_file_info", "_rollout", paths_only=True))
    _raises_naming("_rollout/r1.json", reg.read_record, "m", "rollout", "r1")


def test_listing_maps_arrow_errors_too(reg):
    _break(reg, _on("get_file_info", "/m"), error=lambda method: pa.ArrowInvalid("bad path"))
    _raises_naming("/m", reg.list_versions, "m")


def test_aliases_maps_a_failed_read(reg):
    _break(reg, _on("open_input_stream", "_aliases/prod.json"))
    _raises_naming("_aliases/prod.json", reg.aliases, "m")
    _raises_naming("_aliases/prod.json", reg.resolve, "m", "prod")


def test_a_corrupt_alias_file_is_a_registry_error(reg):
    with open(os.path.join(reg.root, "m", "_aliases", "prod.json"), "w") as f:
        f.write("{not json")
    _raises_naming("_aliases/prod.json", reg.aliases, "m", cause=ValueError)


@pytest.mark.parametrize("method", ["create_dir", "open_output_stream", "move"])
def test_set_alias_maps_a_failed_write(reg, method):
    _break(reg, _on(method, "_aliases"))
    _raises_naming("_aliases/canary.json", reg.set_alias, "m", "canary", 1)
    reg._fs = reg._fs._fs
    assert reg.aliases("m") == {"prod": 1}  # nothing half-written


def test_delete_alias_maps_a_failed_delete_and_keeps_not_found(reg):
    broken = _break(reg, _on("delete_file", "_aliases/prod.json"))
    _raises_naming("_aliases/prod.json", reg.delete_alias, "m", "prod")
    assert broken.failed
    # deleted by someone else between the check and the delete: as if it never existed
    _break(reg, _on("delete_file", "_aliases/prod.json"),
           error=lambda method: FileNotFoundError(2, "No such file or directory"))
    with pytest.raises(VersionNotFoundError, match="has no alias 'prod'"):
        reg.delete_alias("m", "prod")
    with pytest.raises(VersionNotFoundError, match="has no alias 'nope'"):
        reg.delete_alias("m", "nope")


def _staging_left(reg):
    staging = os.path.join(reg.root, "m", "_staging")
    return os.listdir(staging) if os.path.isdir(staging) else []


def test_publish_maps_a_failed_staging_upload_and_cleans_up(reg):
    _break(reg, _on("open_output_stream", "_staging"))
    _raises_naming("/m/_staging/", reg.publish, "m", linear_onnx(seed=1))
    reg._fs = reg._fs._fs
    assert reg.list_versions("m") == [1] and _staging_left(reg) == []


def test_publish_maps_a_failed_commit_and_cleans_up(reg, caplog):
    # the rename of the staging directory fails, and so does the cleanup after it
    def fails(method, args):
        return (method == "move" and "_staging" in str(args[0])) or method == "delete_dir"

    _break(reg, fails)
    with caplog.at_level(logging.WARNING, logger="maas_ray.registry.store"):
        err = _raises_naming(os.path.join(reg.root, "m", "2"), reg.publish, "m", linear_onnx(seed=1))
    assert str(err).startswith("cannot commit ")  # the commit's error, not the cleanup's
    assert "could not remove its staging directory" in caplog.text
    reg._fs = reg._fs._fs
    assert reg.list_versions("m") == [1]


def test_a_file_where_a_directory_belongs_is_a_registry_error(tmp_path):
    """A real OS-level failure (no permissions needed: this also bites as root)."""
    root = tmp_path / "registry"
    root.mkdir()
    (root / "m").write_text("not a directory")
    reg = Registry(str(root))
    _raises_naming(str(root / "m"), reg.publish, "m", linear_onnx())
    _raises_naming(str(root / "m"), reg.write_record, "m", "rollout", "r1", {})


def test_a_missing_artifact_is_still_an_integrity_error_and_other_read_errors_are_not(reg):
    os.remove(os.path.join(reg.root, "m", "1", MODEL_FILE))
    with pytest.raises(IntegrityError, match=f"m:1 failed its integrity check: {MODEL_FILE} is missing"):
        reg.load("m", 1)
    _break(reg, _on("open_input_stream", MANIFEST_FILE))
    _raises_naming(f"m/1/{MANIFEST_FILE}", reg.describe, "m", 1)


def test_publish_from_a_missing_file_names_it(reg):
    with pytest.raises(ConfigError, match="cannot read ONNX file '/nonexistent/x.onnx'"):
        reg.publish("m", "/nonexistent/x.onnx")


def test_write_to_maps_a_failed_local_write(reg, tmp_path):
    loaded = reg.load("m", 1)
    assert isinstance(loaded, LoadedModel)
    _raises_naming(str(tmp_path / "missing-dir" / MODEL_FILE), loaded.write_to, str(tmp_path / "missing-dir"))


def test_registry_errors_survive_pickling(reg):
    _break(reg, _on("open_input_stream", "_aliases/prod.json"))
    err = _raises_naming("_aliases/prod.json", reg.aliases, "m")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, MaasError) and str(back) == str(err)
