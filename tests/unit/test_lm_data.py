"""decoder-lm training side without Ray: the reference corpus and its rules, the tokenizer,
LMTrainConfig's validation, reading and windowing documents, the model's layout."""

import json
import random

import numpy as np
import pytest

from maas_ray.errors import ConfigError
from maas_ray.train.lm import corpus
from maas_ray.train.lm import tokenizer as tk
from maas_ray.train.lm.config import LMTrainConfig, is_lm_config

pytestmark = pytest.mark.unit


def test_corpus_is_deterministic_and_obeys_its_rules():
    assert corpus.documents(50, seed=3) == corpus.documents(50, seed=3) != corpus.documents(50, seed=4)
    rng = random.Random(0)
    assert all(corpus.is_grammatical(corpus.sentence(rng)[0]) for _ in range(500))
    for bad in ("the cats sleeps.", "a dogs run.", "two fox sees the cat.", "the cat chases.", "the cat sleeps the dog.", "the cat sleeps"):
        assert not corpus.is_grammatical(bad), bad
    assert corpus.is_grammatical("many clever mice watch a red bird near the river.")


def test_dialogs_answer_from_their_fact():
    rng = random.Random(1)
    kinds = set()
    for _ in range(200):
        messages, answer, kind = corpus.dialog(rng)
        kinds.add(kind)
        question = messages[-1]["content"]
        assert answer.endswith(".") and question.endswith("?")
        if kind == "context":
            fact = messages[0]["content"]
            assert answer[:-1] in fact and corpus.is_grammatical(fact)
        else:
            word = question.split()[-1][:-1]
            assert {word, answer[:-1]} in ({s, p} for s, p in corpus.NOUNS.items())
    assert kinds == {"lexicon", "context"}
    starts, dialogs = corpus.eval_prompts(5, seed=0)
    assert len(starts) == len(dialogs) == 5 and corpus.eval_prompts(5, seed=0) == (starts, dialogs)


def test_tokenizer_special_tokens_chat_and_bytes():
    tj = tk.train_tokenizer(corpus.documents(200, seed=0), vocab_size=300)
    assert tk.special_token_ids(tj) == {"<|endoftext|>": 0, "<|system|>": 1, "<|user|>": 2, "<|assistant|>": 3}
    chat = tk.render_chat([{"role": "user", "content": "who?"}], add_generation_prompt=True)
    assert chat == "<|user|>who?<|endoftext|><|assistant|>"
    import jinja2

    assert jinja2.Template(tk.CHAT_TEMPLATE).render(messages=[{"role": "user", "content": "who?"}], add_generation_prompt=True) == chat
    ids = tk.load(tj).encode(chat, add_special_tokens=False).ids
    assert ids[0] == 2 and 0 in ids and ids[-1] == 3
    text = "naïve 日本 ✓ emoji 🙂"  # bytes never seen in training still round-trip
    assert tk.decode(tj, tk.load(tj).encode(text, add_special_tokens=False).ids) == text
    stream = tk.encode_documents(tj, ["a b", "c"])
    assert stream[0] == 0 and stream[-1] == 0 and (stream == 0).sum() == 3


def test_config_defaults_validation_and_dispatch(tmp_path):
    cfg = LMTrainConfig.load(None, model_args='{"dim": 32, "heads": 2}')
    assert cfg.model == "decoder-lm" and cfg.data == "reference" and cfg.model_args["dim"] == 32
    assert "vocab_size" not in cfg.model_args  # the tokenizer's
    LMTrainConfig.model_validate(cfg.model_dump())  # round-trips (the workers re-validate it)
    with pytest.raises(ConfigError, match=r"heads \(3\) must divide dim \(32\)"):
        LMTrainConfig.load(None, model_args={"dim": 32, "heads": 3})
    with pytest.raises(ConfigError, match="class_labels"):
        LMTrainConfig.load(None, class_labels=["a"])
    with pytest.raises(ConfigError, match="'mlp'"):
        LMTrainConfig.load(None, model="mlp")
    with pytest.raises(ConfigError, match="model:version"):
        LMTrainConfig.load(None, parent="lm")
    y = tmp_path / "lm.yaml"
    y.write_text("model: decoder-lm\n")
    assert is_lm_config(str(y)) and is_lm_config(None, "decoder-lm")
    assert not is_lm_config(None, "mlp") and not is_lm_config("deployments/train/digits.yaml")
    assert is_lm_config("maas_ray/examples/train/lm.yaml")
    LMTrainConfig.load("maas_ray/examples/train/lm.yaml")


def _docs(n):
    return [f"document {i} says the cat sleeps." for i in range(n)]


def loader():  # a 'package.module:loader' data source
    return _docs(60)


@pytest.mark.parametrize("source", ["txt", "folder", "jsonl", "parquet", "loader"])
def test_every_source_splits_by_document_and_windows(tmp_path, source):
    from maas_ray.train.lm.data import load_lm_splits, read_documents

    docs = _docs(60)
    if source == "txt":
        (tmp_path / "c.txt").write_text("\n\n".join(docs) + "\n")
        data = str(tmp_path / "c.txt")
    elif source == "folder":
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "a.txt").write_text("\n\n".join(docs[:30]))
        (tmp_path / "d" / "b.md").write_text("\n  \n".join(docs[30:]))
        (tmp_path / "d" / "skip.bin").write_bytes(b"\xff")
        data = str(tmp_path / "d")
    elif source in ("jsonl", "parquet"):
        import pandas as pd

        frame = pd.DataFrame({"text": docs, "other": 1})
        data = str(tmp_path / f"c.{source}")
        frame.to_json(data, orient="records", lines=True) if source == "jsonl" else frame.to_parquet(data)
    else:
        data = "tests.unit.test_lm_data:loader"
    cfg = LMTrainConfig.load(None, data=data, model_args={"context_length": 16}, vocab_size=300, val_fraction=0.2, test_fraction=0.2)
    assert read_documents(cfg) == docs
    splits = load_lm_splits(cfg)
    assert splits.x_train.shape[1] == 16 and splits.x_train.dtype == np.int64
    np.testing.assert_array_equal(splits.x_train[:, 1:], splits.y_train[:, :-1])  # targets: the next token
    np.testing.assert_array_equal(splits.x_train[1:, 0], splits.y_train[:-1, -1])  # windows follow one another
    assert splits.identity["documents"] == {"train": 36, "validation": 12, "test": 12}
    assert sum(splits.identity["documents"].values()) == 60
    assert json.loads(splits.tokenizer_json)["model"]["type"] == "BPE"


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_missing_and_blank_text_rows_are_no_documents(tmp_path, suffix):
    import pandas as pd

    from maas_ray.train.lm.data import read_documents

    frame = pd.DataFrame({"text": ["a cat", None, "  ", "a dog"]})
    data = str(tmp_path / f"c.{suffix}")
    frame.to_json(data, orient="records", lines=True) if suffix == "jsonl" else frame.to_parquet(data)
    assert read_documents(LMTrainConfig.load(None, data=data)) == ["a cat", "a dog"]


def test_bad_data_is_a_config_error(tmp_path):
    from maas_ray.train.lm.data import load_lm_splits

    (tmp_path / "t.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ConfigError, match="no 'text' column"):
        load_lm_splits(LMTrainConfig.load(None, data=str(tmp_path / "t.jsonl")))
    with pytest.raises(ConfigError, match="cannot read training text"):
        load_lm_splits(LMTrainConfig.load(None, data=str(tmp_path / "missing.txt")))
    (tmp_path / "few.txt").write_text("a\n\nb\n\nc\n\nd\n")
    with pytest.raises(ConfigError, match="fewer than context_length"):
        load_lm_splits(LMTrainConfig.load(None, data=str(tmp_path / "few.txt"), vocab_size=300))


def test_cli_train_flags_build_an_lm_config():
    from maas_ray.cli import _flag_values, build_parser

    args = build_parser().parse_args(["train", "--model", "decoder-lm", "--epochs", "2", "--corpus-documents", "500",
                                      "--sample-prompts", "the cat,two dogs", "--model-args", '{"dim": 32, "heads": 2}'])
    assert is_lm_config(args.config, args.model)
    cfg = LMTrainConfig.load(args.config, **_flag_values(args, LMTrainConfig))
    assert (cfg.epochs, cfg.corpus_documents, cfg.sample_prompts, cfg.model_args["dim"]) == (2, 500, ["the cat", "two dogs"], 32)
