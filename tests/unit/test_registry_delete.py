"""Registry.delete_version: refused while an alias or a serving app points at the version; the
manifest goes first, so readers never see a half-deleted version; audited; numbers never reused."""

import pickle

import pytest

import maas_ray
from maas_ray.errors import (
    ConfigError,
    ModelNotFoundError,
    RegistryError,
    VersionInUseError,
    VersionNotFoundError,
)
from maas_ray.registry import Registry
from maas_ray.registry.store import MANIFEST_FILE, MODEL_FILE
from tests.helpers import linear_onnx

pytestmark = pytest.mark.unit


@pytest.fixture
def reg(tmp_path):
    r = Registry(str(tmp_path / "registry"), actor="tester")
    for seed in range(3):
        r.publish("lin", linear_onnx(seed=seed))
    return r


def test_delete_removes_the_version_and_its_directory(reg):
    reg.delete_version("lin", 2)
    assert reg.list_versions("lin") == [1, 3]
    assert not reg._exists(reg._path("lin", 2))
    with pytest.raises(VersionNotFoundError, match="no version 2"):
        reg.describe("lin", 2)
    assert reg.load("lin", 3).manifest.version == 3  # the others are untouched


def test_a_deleted_number_is_never_published_again(reg):
    reg.delete_version("lin", 3)
    assert reg.publish("lin", linear_onnx(seed=9)).version == 4


def test_a_registry_without_claims_still_never_reuses_the_number(reg):
    reg._fs.delete_dir(reg._path("lin", "_claims"))  # e.g. versions copied in from elsewhere
    reg.delete_version("lin", 3)
    assert reg.publish("lin", linear_onnx(seed=9)).version == 4


def test_deleting_the_last_version_drops_the_model_from_list_models(reg):
    reg.publish("other", linear_onnx())
    for v in (1, 2, 3):
        reg.delete_version("lin", v)
    assert reg.list_models() == ["other"]
    with pytest.raises(ModelNotFoundError):
        reg.list_versions("lin")
    assert reg.publish("lin", linear_onnx()).version == 4  # republishing: no number reused
    assert reg.list_models() == ["lin", "other"]


def test_refused_while_an_alias_names_it(reg):
    reg.set_alias("lin", "production", 2)
    reg.set_alias("lin", "canary", 2)
    with pytest.raises(VersionInUseError) as info:
        reg.delete_version("lin", 2)
    msg = str(info.value)
    assert "lin:2: aliases canary, production name it (move them first: `maas models alias lin" in msg
    assert info.value.status_code == 409 and info.value.grpc_code == "FAILED_PRECONDITION"
    assert reg.list_versions("lin") == [1, 2, 3]
    reg.set_alias("lin", "production", 3)
    reg.delete_alias("lin", "canary")
    reg.delete_version("lin", 2)  # nothing names it any more
    assert reg.list_versions("lin") == [1, 3]


def test_refused_while_a_serving_app_serves_it(reg):
    with pytest.raises(VersionInUseError, match=r"serving app digits-app serves it"):
        reg.delete_version("lin", 1, serving={("lin", 1): ["digits-app"]})
    with pytest.raises(VersionInUseError, match=r"serving apps a, b serve it"):
        reg.delete_version("lin", 1, serving={("lin", 1): ["b", "a"]})
    with pytest.raises(VersionInUseError, match="a serving app serves it"):
        reg.delete_version("lin", 1, serving=[("lin", 1)])  # pairs without app names
    assert reg.list_versions("lin") == [1, 2, 3]
    reg.delete_version("lin", 1, serving={("lin", 2): ["digits-app"], ("other", 1): ["x"]})
    assert reg.list_versions("lin") == [2, 3]


def test_both_reasons_are_named(reg):
    reg.set_alias("lin", "production", 1)
    with pytest.raises(VersionInUseError) as info:
        reg.check_delete("lin", 1, serving={("lin", 1): ["app"]})
    assert "production" in str(info.value) and "serving app app" in str(info.value)


def test_unknown_model_version_and_alias_refs(reg):
    with pytest.raises(ModelNotFoundError):
        reg.delete_version("nope", 1)
    with pytest.raises(VersionNotFoundError, match="no version 7"):
        reg.delete_version("lin", 7)
    reg.set_alias("lin", "production", 1)
    for ref in ("production", "latest", "1.0", True):
        with pytest.raises(ConfigError, match="version number"):
            reg.delete_version("lin", ref)
    reg.delete_version("lin", "3")  # a number given as text (the CLI's)
    with pytest.raises(VersionNotFoundError):
        reg.delete_version("lin", 3)


def test_check_delete_deletes_nothing(reg):
    assert reg.check_delete("lin", "2") == 2
    assert reg.list_versions("lin") == [1, 2, 3]


def test_audit_event_is_written(reg):
    sha = reg.describe("lin", 2).sha256
    reg.delete_version("lin", 2)
    (event,) = reg.audit.events(action="delete")
    assert (event.action, event.target, event.model, event.actor) == ("delete", "lin:2", "lin", "tester")
    assert event.before == {"version": 2, "sha256": sha} and event.after is None


def test_a_damaged_version_can_be_deleted(reg):
    reg._write(reg._path("lin", 2, MANIFEST_FILE), b"{not json")
    reg.delete_version("lin", 2)
    assert reg.list_versions("lin") == [1, 3]
    assert reg.audit.events(action="delete")[0].before == {"version": 2}


class _RecordingFS:
    """The registry's pyarrow filesystem, recording each delete and what a reader sees then."""

    def __init__(self, fs, reg, fail_delete_dir=False):
        self._inner, self._reg, self._fail = fs, reg, fail_delete_dir
        self.calls, self.seen = [], []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def delete_file(self, path):
        self.calls.append(("delete_file", path.rsplit("/", 2)[-2:]))
        self.seen.append(self._reg.list_versions("lin"))
        return self._inner.delete_file(path)

    def delete_dir(self, path):
        self.calls.append(("delete_dir", path.rsplit("/", 2)[-2:]))
        self.seen.append(self._reg.list_versions("lin"))  # the manifest is gone, the files are not
        if self._fail:
            raise OSError("permission denied (injected)")
        return self._inner.delete_dir(path)


def test_the_manifest_goes_first_so_readers_never_see_a_half_deleted_version(reg):
    fs = reg._fs = _RecordingFS(reg._fs, reg)
    reg.delete_version("lin", 2)
    assert fs.calls == [("delete_file", ["2", MANIFEST_FILE]), ("delete_dir", ["lin", "2"])]
    # before the manifest goes, the version is whole; once it has gone (its files still there),
    # readers no longer see the version
    assert fs.seen == [[1, 2, 3], [1, 3]]


def test_a_failure_after_the_manifest_leaves_invisible_files_only(reg, caplog):
    reg._fs = _RecordingFS(reg._fs, reg, fail_delete_dir=True)
    reg.delete_version("lin", 2)  # the version is deleted: raising would invite a retry that 404s
    assert reg._exists(reg._path("lin", 2, MODEL_FILE))  # left behind ...
    assert reg.list_versions("lin") == [1, 3]  # ... never read
    with pytest.raises(VersionNotFoundError):
        reg.load("lin", 2)
    assert "could not remove the rest" in caplog.text
    assert [e.target for e in reg.audit.events(action="delete")] == ["lin:2"]
    assert reg.publish("lin", linear_onnx()).version == 4


def test_an_unreadable_registry_is_a_registry_error(reg):
    class Broken(_RecordingFS):
        def delete_file(self, path):
            raise OSError("read-only file system (injected)")

    reg._fs = Broken(reg._fs, reg)
    with pytest.raises(RegistryError, match="cannot delete"):
        reg.delete_version("lin", 2)
    assert reg.list_versions("lin") == [1, 2, 3]


def test_the_error_pickles_and_is_public():
    err = VersionInUseError("cannot delete lin:2: alias production names it")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is VersionInUseError and back.message == err.message
    assert (back.status_code, back.grpc_code) == (409, "FAILED_PRECONDITION")
    assert isinstance(back, RegistryError) and maas_ray.VersionInUseError is VersionInUseError
    assert back.to_dict() == {"error": "cannot delete lin:2: alias production names it"}
