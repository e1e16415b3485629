"""Batch scoring's storage pieces, without Ray: the s3:// filesystem that carries the driver's
endpoint and credentials to Ray's other processes (checked against a moto server on
loopback), and the reading of an input's columns (a ``path`` column changes how it is read)."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from maas_ray.batch import BatchConfig
from maas_ray.batch.sources import (
    S3_ENV,
    Unit,
    columns,
    list_units,
    ray_read_args,
    s3_filesystem,
)
from maas_ray.errors import ConfigError
from tests.helpers.s3 import BUCKET, CREDENTIALS, moto_s3

pytestmark = pytest.mark.unit


def test_the_s3_filesystem_works_in_a_process_without_the_aws_variables(monkeypatch):
    with moto_s3() as endpoint:
        env = {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{endpoint}"}
        fs, path = s3_filesystem(f"s3://{BUCKET}/batch/in/", env)
        assert path == f"{BUCKET}/batch/in"
        shipped = pickle.dumps(fs)  # what Ray hands a read task, an actor or a write task
        for name in S3_ENV + ("AWS_PROFILE",):
            monkeypatch.delenv(name, raising=False)  # that process's environment: none of them
        remote = pickle.loads(shipped)
        pq.write_table(pa.table({"x": [1, 2]}), f"{path}/a.parquet", filesystem=remote)
        assert pq.read_table(f"{path}/a.parquet", filesystem=remote).column("x").to_pylist() == [1, 2]
        # the object really is on that server
        direct = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http",
                                   access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                   secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        assert direct.get_file_info(f"{path}/a.parquet").type == pafs.FileType.File


def test_endpoint_forms_and_refusals():
    fs, path = s3_filesystem("s3://b/p", {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_ENDPOINT_URL": "x"})
    assert isinstance(fs, pafs.S3FileSystem) and path == "b/p" and fs.region == "us-east-1"
    fs, _ = s3_filesystem("s3://b/p", {"AWS_ENDPOINT_URL": "127.0.0.1:9", "AWS_REGION": "eu-west-1"})
    assert fs.region == "eu-west-1"
    with pytest.raises(ConfigError, match="'ftp://h:1'"):
        s3_filesystem("s3://b/p", {"AWS_ENDPOINT_URL": "ftp://h:1"})
    with pytest.raises(ConfigError, match="query parameters"):
        s3_filesystem("s3://b/p?endpoint_override=h:1", {})
    with pytest.raises(ValidationError, match="query parameters"):
        BatchConfig(model="m", input="s3://b/in?scheme=http", output="/tmp/o")
    assert ray_read_args("/local/path") == {}


def test_columns_of_parquet_and_csv_units(tmp_path):
    pq.write_table(pa.table({"id": [1], "path": ["a/b"], "x": [0.5]}), tmp_path / "a.parquet")
    (tmp_path / "c.csv").write_text('id,"path",x\r\n1,a/b,0.5\n')
    (tmp_path / "t.txt").write_text("hello\n")
    [pq_unit] = list_units(str(tmp_path / "a.parquet"), "parquet")
    [csv_unit] = list_units(str(tmp_path / "c.csv"), "csv")
    assert columns(pq_unit, "parquet") == ["id", "path", "x"]
    assert columns(csv_unit, "csv") == ["id", "path", "x"]
    assert columns(Unit(str(tmp_path / "t.txt"), str(tmp_path / "t.txt"), "t"), "text") == []


class _Reads:
    """Stands in for the ``ray.data`` module: records each read and what it is mapped with."""

    def __init__(self) -> None:
        self.reads: list[tuple[object, dict]] = []

    def read_parquet(self, paths, **kwargs):
        self.reads.append((paths, kwargs))
        return _Dataset([])

    read_csv = read_text = read_parquet


class _Dataset:
    def __init__(self, maps: list) -> None:
        self.maps, self.unioned = maps, []

    def map_batches(self, fn, **_):
        return _Dataset([*self.maps, fn])

    def union(self, *others):
        self.unioned = list(others)
        return self


def test_a_path_column_of_the_users_own_is_read_file_by_file_and_kept(tmp_path):
    from maas_ray.batch.job import _read_group, _Tag, _TagByPath
    from maas_ray.batch.scorer import UNIT_COLUMN

    (tmp_path / "plain").mkdir()
    (tmp_path / "own").mkdir()
    for i in range(2):
        pq.write_table(pa.table({"x": [1.0]}), tmp_path / "plain" / f"{i}.parquet")
        pq.write_table(pa.table({"x": [1.0], "path": ["mine"]}), tmp_path / "own" / f"{i}.parquet")

    ray_data = _Reads()
    ds = _read_group(list_units(str(tmp_path / "plain"), "parquet"), "parquet", ray_data)
    assert [kw for _, kw in ray_data.reads] == [{"include_paths": True}] and isinstance(ds.maps[0], _TagByPath)

    ray_data = _Reads()
    units = list_units(str(tmp_path / "own"), "parquet")
    ds = _read_group(units, "parquet", ray_data)
    assert [(p, kw) for p, kw in ray_data.reads] == [(u.uri, {}) for u in units]  # no include_paths
    assert [d.maps[0].key for d in [ds, *ds.unioned]] == [u.key for u in units]
    tagged = ds.maps[0](pa.table({"x": [1.0], "path": ["mine"]}))
    assert isinstance(ds.maps[0], _Tag) and tagged.column("path").to_pylist() == ["mine"]
    assert tagged.column(UNIT_COLUMN).to_pylist() == [units[0].key]
