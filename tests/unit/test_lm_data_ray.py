"""Which decoder-lm data sources go through Ray Data, decided without Ray: folders and object-store
prefixes of .parquet/.jsonl files do; one local table file, text files and loaders do not."""

import pandas as pd
import pytest

from maas_ray.errors import ConfigError
from maas_ray.train.lm.config import LMTrainConfig
from maas_ray.train.lm.data import read_documents, table_source

pytestmark = pytest.mark.unit


def test_a_folder_of_tables_is_a_ray_data_source(tmp_path):
    for i in range(2):
        pd.DataFrame({"text": [f"doc {i}"]}).to_parquet(tmp_path / f"part-{i}.parquet")
    (tmp_path / "_SUCCESS").write_text("")  # a marker file is ignored
    assert table_source(str(tmp_path)) == ".parquet"
    nested = tmp_path / "jsonl" / "2024"
    nested.mkdir(parents=True)
    (nested / "a.jsonl").write_text('{"text": "one"}\n')
    assert table_source(str(tmp_path / "jsonl")) == ".jsonl"


def test_text_folders_single_local_tables_and_loaders_are_not(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    pd.DataFrame({"text": ["x"]}).to_parquet(tmp_path / "b.parquet")
    assert table_source(str(tmp_path)) is None  # any text file keeps the folder a text folder
    assert table_source(str(tmp_path / "b.parquet")) is None  # one local table: pandas
    assert table_source(str(tmp_path / "a.txt")) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert table_source(str(empty)) is None  # reported by the text-folder reader
    with pytest.raises(ConfigError, match="no .txt/.md/.text files"):
        read_documents(LMTrainConfig.load(None, data=str(empty)))


def test_remote_files_are_ray_data_sources_by_suffix():
    assert table_source("s3://bucket/corpus/part-0.parquet?endpoint_override=localhost:9000") == ".parquet"
    assert table_source("gs://bucket/corpus.jsonl") == ".jsonl"


def test_config_keeps_object_store_uris_and_resolves_folders(tmp_path, monkeypatch):
    uri = "s3://bucket/corpus/?endpoint_override=127.0.0.1:9000&scheme=http"
    assert LMTrainConfig.load(None, data=uri).data == uri
    monkeypatch.chdir(tmp_path)
    assert LMTrainConfig.load(None, data="corpus").data == str(tmp_path / "corpus")


def test_one_local_parquet_is_still_read_in_memory(tmp_path):
    pd.DataFrame({"text": ["first doc", " ", "second doc"], "id": [1, 2, 3]}).to_parquet(tmp_path / "c.parquet")
    assert read_documents(LMTrainConfig.load(None, data=str(tmp_path / "c.parquet"))) == ["first doc", "second doc"]
