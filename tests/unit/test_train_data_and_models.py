"""Data loading and splitting, model specs, and the checks that run before any worker starts."""

import json
import os

import numpy as np
import pytest

from maas_ray.errors import ConfigError, IntegrityError
from maas_ray.registry import ExtraFile, Registry
from maas_ray.train import TrainConfig
from maas_ray.train.data import encode, load_splits, split_indices, text_order_dataset
from maas_ray.train.model import build_model

pytestmark = pytest.mark.unit


def test_splits_are_deterministic_disjoint_and_cover_every_row():
    a = split_indices(1000, 0.1, 0.2, seed=3)
    b = split_indices(1000, 0.1, 0.2, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    train, val, test = a
    assert (len(train), len(val), len(test)) == (700, 100, 200)
    assert sorted(np.concatenate(a).tolist()) == list(range(1000))
    assert not np.array_equal(split_indices(1000, 0.1, 0.2, seed=4)[2], test)


def test_digits_splits_and_identity():
    s = load_splits("digits", val_fraction=0.1, test_fraction=0.2, seed=0)
    assert s.spec.input_shape == (64,) and s.spec.num_classes == 10 and s.is_digits
    assert s.identity["rows"] == {"train": 1258, "validation": 180, "test": 359}
    again = load_splits("digits", val_fraction=0.1, test_fraction=0.2, seed=0)
    assert again.identity["sha256"] == s.identity["sha256"]
    assert load_splits("digits", val_fraction=0.1, test_fraction=0.2, seed=1).identity["sha256"] != s.identity["sha256"]
    img = load_splits("digits-images", val_fraction=0.1, test_fraction=0.2, seed=0)
    assert img.spec.input_shape == (1, 8, 8) and img.spec.kind == "image"
    assert np.array_equal(img.x_test.reshape(len(img.x_test), -1), s.x_test)


def test_text_order_needs_word_order():
    texts, y = text_order_dataset()
    assert sorted(set(y)) == ["cat", "dog", "fox", "owl"]
    # A bag of words (any linear model on word counts) cannot tell subject from object.
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    x = CountVectorizer().fit_transform(texts)
    bow = LogisticRegression(max_iter=2000).fit(x[:2400], y[:2400]).score(x[2400:], y[2400:])
    assert 0.35 < bow < 0.62, bow
    # ...while the first animal named is always the label.
    animals = {"cat", "dog", "fox", "owl"}
    assert all(next(w for w in t.split() if w in animals) == label for t, label in zip(texts, y))


def test_text_is_tokenized_with_a_padded_tokenizer():
    s = load_splits("text-order", val_fraction=0.1, test_fraction=0.2, seed=0, vocab_size=100, max_seq_len=12)
    assert s.spec.kind == "text" and s.spec.input_dtype == "int64" and s.spec.input_shape == (12,)
    assert s.x_train.shape[1] == 12 and s.x_train.dtype == np.int64
    ids = encode(s.tokenizer_json, ["The FOX chased the zebra"])[0]
    assert ids[0] == ids[3] and ids[4] == 1 and ids[5:].tolist() == [0] * 7  # lower-cased; [UNK]=1; [PAD]=0
    # fine-tuning reuses the parent's tokenizer: the same ids
    again = load_splits("text-order", val_fraction=0.1, test_fraction=0.2, seed=0, tokenizer_json=s.tokenizer_json)
    assert np.array_equal(again.x_val, s.x_val)


def test_files_folders_and_loaders(tmp_path):
    from PIL import Image

    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    y = np.array(["a", "b"] * 25)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    s = load_splits(str(tmp_path / "d.npz"), val_fraction=0.2, test_fraction=0.2, seed=0)
    assert s.class_labels == ["a", "b"] and s.spec.input_shape == (4,) and sum(s.identity["rows"].values()) == 50

    import pandas as pd

    pd.DataFrame({"text": ["good movie", "bad movie"] * 10, "label": ["pos", "neg"] * 10}).to_csv(tmp_path / "t.csv", index=False)
    t = load_splits(str(tmp_path / "t.csv"), val_fraction=0.2, test_fraction=0.2, seed=0, max_seq_len=4)
    assert t.spec.kind == "text" and t.class_labels == ["neg", "pos"]

    for cls, value in (("zero", 0), ("one", 255)):
        os.makedirs(tmp_path / "imgs" / cls)
        for i in range(5):
            Image.fromarray(np.full((6, 5), value, np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    f = load_splits(str(tmp_path / "imgs"), val_fraction=0.2, test_fraction=0.2, seed=0)
    assert f.spec.input_shape == (1, 6, 5) and f.class_labels == ["one", "zero"]
    assert f.x_train.max() == 1.0 and f.identity["source"] == str(tmp_path / "imgs")

    b = load_splits("tests.factories:blobs", val_fraction=0.1, test_fraction=0.2, seed=0)
    assert b.identity["rows"] == {"train": 210, "validation": 30, "test": 60}
    p = load_splits("tests.factories:presplit", val_fraction=0.1, test_fraction=0.2, seed=0)
    assert p.identity["rows"] == {"train": 200, "validation": 50, "test": 50}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: np.savez(d / "x.npz", x=np.zeros((4, 2))), "has no labels: an .npz needs arrays 'x' and 'y', found ['x']"),
        (lambda d: __import__("pandas").DataFrame({"a": [1, 2], "b": [3, 4]}).to_parquet(d / "x.parquet"),
         "has no labels: it needs a 'label' column, found columns ['a', 'b']"),
    ],
)
def test_data_without_labels_is_one_clear_line(tmp_path, make, message):
    make(tmp_path)
    path = next(p for p in tmp_path.iterdir())
    with pytest.raises(ConfigError) as info:
        load_splits(str(path), val_fraction=0.1, test_fraction=0.2, seed=0)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("no_such_pkg.models:net", "model factory 'no_such_pkg.models:net': cannot import module 'no_such_pkg.models'"),
        ("tests.factories:nope", "module 'tests.factories' has no attribute 'nope'"),
        ("tests.factories:raises", "failed to build: RuntimeError: out of coffee"),
        ("tests.factories:not_a_module", "returned str, not a torch.nn.Module"),
        ("tests.factories:wrong_classes", "outputs [2, 3] for a batch of shape [2, 64]; the data needs logits of shape [2, 10] (10 classes)"),
        ("cnn", "cnn needs images (channels, height, width), the data has items of shape [64]"),
    ],
)
def test_bad_model_specs_fail_on_the_driver_before_ray_starts(tmp_path, model, message):
    import ray

    cfg = TrainConfig.load(None, model=model, model_args={}, storage_path=str(tmp_path / "runs"))
    reg = Registry(str(tmp_path / "reg"))
    from maas_ray.train import train_and_publish

    ray_was_up = ray.is_initialized()  # a full run shares one Ray instance with the integration tests
    with pytest.raises(ConfigError) as info:
        train_and_publish(cfg, reg)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert ray.is_initialized() == ray_was_up and reg.list_models() == []


def test_user_factory_builds_and_gets_model_args():
    s = load_splits("digits", val_fraction=0.1, test_fraction=0.2, seed=0)
    m = build_model("tests.factories:tiny_mlp", {"width": 7}, s.spec)
    assert m[1].out_features == 7


def test_corrupt_parent_weights_are_refused_before_training(tmp_path):
    """A published version's weights file damaged on disk: fine-tuning from it fails (IntegrityError)."""
    import ray

    from maas_ray.train import train_and_publish
    from maas_ray.train.export import export_onnx
    from maas_ray.train.pipeline import SPEC_FILE, WEIGHTS_FILE, state_to_bytes

    s = load_splits("digits", val_fraction=0.1, test_fraction=0.2, seed=0)
    model = build_model("mlp", {}, s.spec)
    reg = Registry(str(tmp_path / "reg"))
    spec = {"model": "mlp", "model_args": TrainConfig().model_args, "data": s.spec.as_dict(), "class_labels": s.class_labels}
    reg.publish("digits", export_onnx(model, s.spec).model_bytes, files={
        WEIGHTS_FILE: ExtraFile(state_to_bytes(model.state_dict()), "weights"),
        SPEC_FILE: ExtraFile(json.dumps(spec).encode(), "model_spec"),
    })
    weights = tmp_path / "reg" / "digits" / "1" / WEIGHTS_FILE
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    cfg = TrainConfig.load(None, parent="digits:1", storage_path=str(tmp_path / "runs"))
    ray_was_up = ray.is_initialized()
    with pytest.raises(IntegrityError, match="digits:1 failed its integrity check: weights.safetensors has"):
        train_and_publish(cfg, reg)
    assert ray.is_initialized() == ray_was_up and reg.list_versions("digits") == [1]


def test_lr_schedule_warms_up_then_decays_to_zero():
    from maas_ray.train.loop import lr_lambda

    f = lr_lambda(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert lr_lambda(10, 0)(0) == pytest.approx(1.0)


def test_mixed_precision_is_off_on_cpu():
    import torch

    from maas_ray.train.loop import autocast_dtype

    for mode in ("auto", "bf16", "fp16", "off"):
        assert autocast_dtype(mode, torch.device("cpu")) is None
    assert autocast_dtype("off", torch.device("cuda")) is None
    assert autocast_dtype("fp16", torch.device("cuda")) is torch.float16


def test_ray_data_is_picked_by_size_and_needs_parquet(tmp_path):
    from maas_ray.train.data import use_ray_data

    path = tmp_path / "d.parquet"
    path.write_bytes(b"x" * 1000)
    assert use_ray_data(str(path), "auto", threshold_bytes=999) and not use_ray_data(str(path), "auto", threshold_bytes=1000)
    assert not use_ray_data("digits", "auto", 0) and use_ray_data(str(path), "ray_data", 10**9)
    assert not use_ray_data(str(path), "memory", 0)
    with pytest.raises(ConfigError, match="data_loading 'ray_data' needs a .parquet file, got data 'digits'"):
        TrainConfig.load(None, data_loading="ray_data")
