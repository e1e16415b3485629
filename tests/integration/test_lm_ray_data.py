"""decoder-lm data read through Ray Data (real Ray): a folder of parquet files trains and publishes
with the folder as the manifest's dataset identity; documents come back in file order, then row
order; a missing 'text' column is a ConfigError naming the source and the columns found. With
data_loading: ray_data the windows are made in Ray Data and reach two DDP workers as dataset shards."""

import math
import uuid

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from maas_ray.errors import ConfigError
from maas_ray.registry import Registry
from maas_ray.train.lm import corpus
from maas_ray.train.lm.config import LMTrainConfig
from maas_ray.train.lm.data import load_lm_splits, read_documents
from maas_ray.train.lm.pipeline import train_and_publish_lm
from tests.helpers.s3 import BUCKET

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TINY = {
    "vocab_size": 300, "epochs": 2, "batch_size": 16, "num_workers": 1, "score_prompts": 0, "sample_tokens": 4,
    "val_fraction": 0.1, "test_fraction": 0.1,
    "model_args": {"context_length": 32, "dim": 32, "heads": 2, "layers": 1, "dropout": 0.0},
}


def _write_parts(folder, docs, n_parts=3):
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(docs) // n_parts)
    for i in range(n_parts):  # written out of name order: the read order must not depend on it
        j = n_parts - 1 - i
        part = docs[j * size:(j + 1) * size]
        pd.DataFrame({"id": range(len(part)), "text": part}).to_parquet(folder / f"part-{j}.parquet")
    return [folder / f"part-{j}.parquet" for j in range(n_parts)]


def test_a_folder_of_parquet_files_trains_and_publishes(ray_cluster, tmp_path):
    docs = corpus.documents(600, seed=5)
    files = _write_parts(tmp_path / "corpus", docs)
    cfg = LMTrainConfig.load(None, model_name="lm-parquet", data=str(tmp_path / "corpus"), run_name="lm-parquet",
                             storage_path=str(tmp_path / "runs"), **TINY)
    assert read_documents(cfg) == [d for d in docs if d.strip()]  # file (name) order, then row order
    report = train_and_publish_lm(cfg, Registry(str(tmp_path / "registry")))
    m = report.manifest
    assert (m.model, m.version, m.kind) == ("lm-parquet", 1, "generative")
    ds = m.dataset
    assert ds["source"] == str(tmp_path / "corpus") and ds["loading"] == "ray_data"
    assert ds["file_count"] == 3 and ds["files"] == [str(f) for f in files]
    assert sum(ds["documents"].values()) == len(docs) and len(ds["content_sha256"]) == 64
    assert 1 < report.test_perplexity < 300
    assert not report.streamed and "streamed" not in ds  # small, data_loading auto: in memory as before
    assert all(h["data_streamed"] == 0.0 for h in report.history)


def test_a_folder_streamed_through_ray_data_trains_two_workers_on_shards(ray_cluster, tmp_path):
    docs = corpus.documents(600, seed=6)
    files = _write_parts(tmp_path / "corpus", docs)
    cfg = LMTrainConfig.load(None, model_name="lm-streamed", data=str(tmp_path / "corpus"), run_name="lm-streamed",
                             storage_path=str(tmp_path / "runs"), data_loading="ray_data", tokenizer_sample_documents=300,
                             **{**TINY, "num_workers": 2})
    report = train_and_publish_lm(cfg, Registry(str(tmp_path / "registry")))
    m, ds = report.manifest, report.manifest.dataset
    assert (m.model, m.version, m.kind) == ("lm-streamed", 1, "generative") and report.streamed
    assert ds["streamed"] is True and ds["loading"] == "ray_data" and ds["files"] == [str(f) for f in files]
    assert sum(ds["documents"].values()) == len(docs) and ds["tokenizer_sample_documents"] == 300
    assert all(n > 0 for n in ds["rows"].values())
    # the workers read their windows from equal dataset shards: rows // 2 each, every epoch
    assert [h["data_streamed"] for h in report.history] == [1.0, 1.0]
    assert [h["train_samples"] for h in report.history] == [2 * (ds["rows"]["train"] // 2)] * 2
    assert report.history[1]["val_loss"] < report.history[0]["val_loss"]
    assert math.isfinite(report.test_perplexity) and 1 < report.test_perplexity < 300
    # rebuilt in memory (as `maas optimize` replays a version's data): the same documents per
    # split, the same content hash
    again = load_lm_splits(cfg)
    assert again.identity["documents"] == ds["documents"] and again.identity["content_sha256"] == ds["content_sha256"]


def test_jsonl_folder_and_missing_text_column(ray_cluster, tmp_path):
    jl = tmp_path / "jsonl"
    jl.mkdir()
    (jl / "b.jsonl").write_text('{"text": "third"}\n{"text": "fourth"}\n')
    (jl / "a.jsonl").write_text('{"text": "first"}\n{"text": ""}\n{"text": "second"}\n')
    assert read_documents(LMTrainConfig.load(None, data=str(jl))) == ["first", "second", "third", "fourth"]

    bad = tmp_path / "bad"
    bad.mkdir()
    pd.DataFrame({"body": ["x"], "id": [1]}).to_parquet(bad / "p.parquet")
    with pytest.raises(ConfigError, match=r"has no 'text' column.*\['body', 'id'\]") as err:
        read_documents(LMTrainConfig.load(None, data=str(bad)))
    assert str(bad) in str(err.value)


def test_an_s3_prefix_is_read(ray_cluster, s3_endpoint):
    prefix = f"{BUCKET}/{uuid.uuid4().hex[:8]}/corpus"
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http")
    for name, texts in (("b.parquet", ["three"]), ("a.parquet", ["one", "two"])):
        with fs.open_output_stream(f"{prefix}/{name}") as f:
            pq.write_table(pa.table({"text": texts}), f)
    uri = f"s3://{prefix}?endpoint_override={s3_endpoint}&scheme=http"
    assert read_documents(LMTrainConfig.load(None, data=uri)) == ["one", "two", "three"]

