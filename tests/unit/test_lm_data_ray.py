"""Which decoder-lm data sources go through Ray Data, decided without Ray: folders and object-store
prefixes of .parquet/.jsonl files do; one local table file, text files and loaders do not. The
streamed path's pure parts: which runs stream, the split hash, the driver's survey pass, the
per-batch tokenize-and-window functions, and the validation metric over shard batches."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from maas_ray.errors import ConfigError
from maas_ray.train.lm import corpus
from maas_ray.train.lm import tokenizer as tk
from maas_ray.train.lm.config import LMTrainConfig
from maas_ray.train.lm.data import (
    _SplitTexts,
    _Windows,
    load_lm_splits,
    read_documents,
    split_of,
    streamed_source,
    survey_documents,
    table_source,
    window_batch,
    windows,
)

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


# ---- the streamed path's pure parts (data_loading: ray_data) ----------------------------------

DOCS = corpus.documents(2000, seed=3)


def test_split_of_is_a_stable_hash_of_the_text():
    labels = split_of(DOCS, 0.1, 0.2, seed=7)
    assert labels.dtype == np.int8 and set(np.unique(labels)) == {0, 1, 2}
    shares = np.bincount(labels, minlength=3) / len(DOCS)
    assert abs(shares[0] - 0.7) < 0.04 and abs(shares[1] - 0.1) < 0.03 and abs(shares[2] - 0.2) < 0.03
    # per document: the same in any batching, order and process; duplicates share a split
    assert (np.concatenate([split_of(DOCS[:333], 0.1, 0.2, 7), split_of(DOCS[333:], 0.1, 0.2, 7)]) == labels).all()
    assert (split_of(DOCS[::-1], 0.1, 0.2, 7) == labels[::-1]).all()
    assert split_of([DOCS[5], DOCS[5]], 0.1, 0.2, 7).tolist() == [labels[5]] * 2
    assert (split_of(DOCS, 0.1, 0.2, seed=8) != labels).mean() > 0.2  # the seed reshuffles
    assert len(split_of([], 0.1, 0.2, 7)) == 0


@pytest.fixture(scope="module")
def tokenizer_json():
    return tk.train_tokenizer(DOCS[:500], vocab_size=300)


def test_window_batch_is_the_in_memory_stream_of_its_documents(tokenizer_json):
    batch = DOCS[:40]
    out = window_batch(batch, tokenizer_json, 16)
    x, y = windows(tk.encode_documents(tokenizer_json, batch), 16)  # EOS doc EOS doc ... EOS
    assert out["x"].dtype == out["y"].dtype == np.int64 and out["x"].shape == x.shape and len(x) > 5
    assert (out["x"] == x).all() and (out["y"] == y).all()
    assert (out["x"][:, 1:] == out["y"][:, :-1]).all() and (out["x"][1:, 0] == out["y"][:-1, -1]).all()
    eos = tk.special_token_ids(tokenizer_json)[tk.EOS]
    assert out["x"][0, 0] == eos
    short = window_batch(["a"], tokenizer_json, 16)  # EOS a EOS: fewer than 17 tokens
    assert short["x"].shape == (0, 16) and short["y"].shape == (0, 16)
    assert window_batch([], tokenizer_json, 16)["x"].shape == (0, 16)


def test_the_map_batches_functions_select_a_split_then_window_it(tokenizer_json):
    table = pa.table({"text": [*DOCS[:60], None, "  "]})
    labels = split_of(DOCS[:60], 0.2, 0.2, 1)
    for k in range(3):
        picked = _SplitTexts(k, 0.2, 0.2, 1)(table)
        assert picked.column("text").to_pylist() == [d for d, s in zip(DOCS[:60], labels) if s == k]
        out = _Windows(tokenizer_json, 8)({"text": np.array(picked.column("text").to_pylist(), dtype=object)})
        assert (out["x"] == window_batch(picked.column("text").to_pylist(), tokenizer_json, 8)["x"]).all()
    assert _SplitTexts(0, 0.2, 0.2, 1)(pa.table({"text": pa.array([], pa.string())})).num_rows == 0


def test_the_survey_hashes_counts_and_samples_in_one_bounded_pass(tmp_path):
    pd.DataFrame({"text": [*DOCS[:300], " "]}).to_parquet(tmp_path / "c.parquet")
    in_memory = load_lm_splits(LMTrainConfig.load(None, data=str(tmp_path / "c.parquet"), vocab_size=300,
                                                  model_args={"context_length": 8}))
    batches = [DOCS[i:min(i + 64, 300)] for i in range(0, 300, 64)] + [["", None]]
    s = survey_documents(batches, 0.1, 0.1, seed=2, sample_size=50)
    assert s.content_sha256 == in_memory.identity["content_sha256"]  # the manifest's hash, unchanged
    labels = split_of(DOCS[:300], 0.1, 0.1, 2)
    assert s.documents == {"train": int((labels == 0).sum()), "validation": int((labels == 1).sum()), "test": int((labels == 2).sum())}
    train_docs = [d for d, k in zip(DOCS[:300], labels) if k == 0]
    assert len(s.tokenizer_sample) == 50 and set(s.tokenizer_sample) <= set(train_docs)
    assert s.tokenizer_sample != train_docs[:50]  # a reservoir over all of them, not the first 50
    assert s.val_documents == [d for d, k in zip(DOCS[:300], labels) if k == 1][:8]
    again = survey_documents([DOCS[:300]], 0.1, 0.1, seed=2, sample_size=50)  # another batching
    assert (again.content_sha256, again.tokenizer_sample) == (s.content_sha256, s.tokenizer_sample)
    assert survey_documents(batches, 0.1, 0.1, seed=2, sample_size=0).tokenizer_sample == []  # fine-tuning


def test_which_runs_stream(tmp_path):
    folder = tmp_path / "tables"
    folder.mkdir()
    pd.DataFrame({"text": DOCS[:50]}).to_parquet(folder / "p.parquet")
    size = (folder / "p.parquet").stat().st_size

    def load(**kw):
        return LMTrainConfig.load(None, data=str(folder), **kw)

    assert streamed_source(load()) is None  # auto, small: today's in-memory path
    assert streamed_source(load(ray_data_threshold_bytes=size - 1)) == ".parquet"
    assert streamed_source(load(data_loading="ray_data")) == ".parquet"
    assert streamed_source(load(data_loading="memory", ray_data_threshold_bytes=0)) is None
    assert streamed_source(LMTrainConfig.load(None, ray_data_threshold_bytes=0)) is None  # reference corpus
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("one\n\ntwo\n")
    assert streamed_source(LMTrainConfig.load(None, data=str(text), ray_data_threshold_bytes=0)) is None
    with pytest.raises(ConfigError, match=r"data_loading 'ray_data' needs a folder.*" + str(text)):
        streamed_source(LMTrainConfig.load(None, data=str(text), data_loading="ray_data"))
    with pytest.raises(ConfigError, match=r"data_loading 'ray_data' needs .*got data 'reference'"):
        LMTrainConfig.load(None, data_loading="ray_data")
    with pytest.raises(ConfigError, match="tokenizer_sample_documents"):
        LMTrainConfig.load(None, tokenizer_sample_documents=5)


def test_evaluate_stream_is_evaluate_over_batches():
    import torch

    from maas_ray.train.lm.task import LM_TASK, build, evaluate, model_spec

    torch.manual_seed(0)
    model = build(model_spec("decoder-lm", {"context_length": 8, "dim": 16, "heads": 2, "layers": 1, "dropout": 0.0}, 300))
    x = torch.randint(0, 300, (10, 8))
    y = torch.randint(0, 300, (10, 8))
    whole = evaluate(model, x, y, 0, 1)
    streamed = LM_TASK.evaluate_stream(model, ((x[i:i + 3], y[i:i + 3]) for i in range(0, 10, 3)), torch.device("cpu"), 1)
    assert streamed.keys() == whole.keys() == {"val_loss", "val_perplexity"}
    assert streamed["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-9) and whole["val_loss"] > 1.0
