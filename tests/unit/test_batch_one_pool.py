"""The pieces that let one actor pool score a whole batch job: rows tagged with their unit,
the tag carried through the scorer whatever columns the plan passes on, and a scored table
split back into its units."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from maas_ray.batch.job import _Tag, split_by_unit
from maas_ray.batch.scorer import UNIT_COLUMN, VersionScorer
from maas_ray.errors import ConfigError
from maas_ray.registry import Registry
from tests.helpers.tabular_models import publish_tabular, random_rows

pytestmark = pytest.mark.unit


def test_tag_adds_the_unit_key_to_every_row_and_refuses_the_reserved_name():
    t = _Tag("a-123")(pa.table({"x": [1, 2, 3]}))
    assert t.column(UNIT_COLUMN).to_pylist() == ["a-123"] * 3 and t.column("x").to_pylist() == [1, 2, 3]
    assert _Tag("k")(pa.table({"x": pa.array([], pa.int64())})).num_rows == 0
    with pytest.raises(ConfigError, match=UNIT_COLUMN):
        _Tag("k")(pa.table({UNIT_COLUMN: ["x"]}))


def test_split_by_unit_keeps_each_units_rows_in_order_without_the_tag():
    t = pa.table({"id": [0, 1, 2, 3, 4], UNIT_COLUMN: ["b", "a", "b", "a", "b"]})
    parts = split_by_unit(t)
    assert {k: v.column("id").to_pylist() for k, v in parts.items()} == {"b": [0, 2, 4], "a": [1, 3]}
    assert all(v.column_names == ["id"] for v in parts.values())
    only = split_by_unit(pa.table({"id": [7, 8], UNIT_COLUMN: ["u", "u"]}))
    assert list(only) == ["u"] and only["u"].column("id").to_pylist() == [7, 8]


def _rows_table(n: int) -> pa.Table:
    rows = random_rows(n, seed=3, missing_ages=False)
    return pa.table({"id": np.arange(n), **{k: pa.array(v) for k, v in rows.items()}})


def test_the_scorer_carries_the_unit_column_and_scores_as_without_it(tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    m = publish_tabular(reg, "churn-tag", "classifier")
    scorer = VersionScorer(reg.root, "churn-tag", m.version, "parquet", "cpu", 1)
    table = _rows_table(50)
    plain = scorer(table)
    tagged = scorer(_Tag("unit-1")(table))
    assert tagged.column(UNIT_COLUMN).to_pylist() == ["unit-1"] * 50
    assert tagged.drop_columns([UNIT_COLUMN]).equals(plain)
    assert UNIT_COLUMN not in plain.column_names


def test_tag_by_path_maps_ray_datas_path_column_to_the_unit_key():
    from maas_ray.batch.job import _TagByPath

    tag = _TagByPath({"/in/a.parquet": "a-1", "/in/b.parquet": "b-2"})
    t = tag(pa.table({"x": [1, 2, 3], "path": ["/in/a.parquet", "/in/b.parquet", "/in/a.parquet"]}))
    assert t.column_names == ["x", UNIT_COLUMN] and t.column(UNIT_COLUMN).to_pylist() == ["a-1", "b-2", "a-1"]
    assert tag(pa.table({"x": [1], "path": ["/in/b.parquet"]})).column(UNIT_COLUMN).to_pylist() == ["b-2"]
    with pytest.raises(ConfigError, match="none of the job's inputs"):
        tag(pa.table({"x": [1], "path": ["/elsewhere.parquet"]}))


def test_schema_groups_keep_files_of_one_schema_together_in_order(tmp_path):
    import pyarrow.parquet as pq

    from maas_ray.batch.job import _schema_groups
    from maas_ray.batch.sources import list_units

    for name, table in (("a", pa.table({"x": [1.0]})), ("b", pa.table({"y": ["s"]})), ("c", pa.table({"x": [2.0]}))):
        pq.write_table(table, tmp_path / f"{name}.parquet")
    units = list_units(str(tmp_path), "parquet")
    assert [[u.key[0] for u in g] for g in _schema_groups(units, "parquet")] == [["a", "c"], ["b"]]
    (tmp_path / "csv").mkdir()
    for name, text in (("a", "x,y\n1,2\n"), ("b", "x,z\n1,2\n"), ("c", "x,y\n3,4\n")):
        (tmp_path / "csv" / f"{name}.csv").write_text(text)
    units = list_units(str(tmp_path / "csv"), "csv")
    assert [[u.key[0] for u in g] for g in _schema_groups(units, "csv")] == [["a", "c"], ["b"]]
