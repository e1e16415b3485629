"""Any architecture end to end on real Ray: a user's own model (factory by import path), the
CNN and the text transformer train with 2 DDP workers, export, pass parity, publish with their
weights (and tokenizer), are served over HTTP from PNG and raw text, and fine-tune from their
published weights."""

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from maas_ray.registry import Registry
from maas_ray.serving.deploy import deploy
from maas_ray.train import TrainConfig, train_and_publish
from tests.helpers import HTTP_PORT, digit_png

pytestmark = [pytest.mark.integration, pytest.mark.slow]
URL = f"http://127.0.0.1:{HTTP_PORT}"
TEXTS = ["the fox chased the owl near the barn", "owl saw cat", "dog helped the big cat in the park", "a cat watched the fox"]


@pytest.fixture(scope="module")
def reg_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models-registry"))


@pytest.fixture(scope="module")
def trained(ray_cluster, reg_root, tmp_path_factory):
    runs = str(tmp_path_factory.mktemp("runs"))
    reg = Registry(reg_root)

    def train(config, **kw):
        return train_and_publish(TrainConfig.load(config, storage_path=runs, cpus_per_worker=0.5, **kw), reg)

    out = {
        "mine": train(None, model_name="mine", model="tests.factories:tiny_mlp", model_args={"width": 48}, grad_accum_steps=2,
                      num_workers=2, epochs=20, batch_size=32, lr=0.01, min_test_accuracy=0.9),
        "cnn": train("deployments/train/cnn.yaml", epochs=6, min_test_accuracy=0.95),
        "text": train("deployments/train/text.yaml", epochs=4, patience=None, min_test_accuracy=0.9),
    }
    # Fine-tune with a learning rate too small to learn anything in one epoch: the first
    # validation accuracy shows where the weights started.
    out["cnn-ft"] = train("deployments/train/cnn.yaml", parent="digits-cnn:1", epochs=1, lr=1e-7, warmup_fraction=0.0)
    out["text-ft"] = train("deployments/train/text.yaml", parent="text-order:1", epochs=1, lr=1e-7, warmup_fraction=0.0)
    return out


def test_each_model_publishes_onnx_weights_spec_and_dataset(trained, reg_root):
    mine, cnn, text = trained["mine"], trained["cnn"], trained["text"]
    assert mine.manifest.model_spec == {"model": "tests.factories:tiny_mlp", "model_args": {"width": 48}}
    assert mine.manifest.inputs[0].shape == [-1, 64]
    assert cnn.manifest.inputs[0].shape == [-1, 1, 8, 8] and cnn.manifest.preprocessor.name == "image"
    assert text.manifest.inputs[0].datatype == "INT64" and text.manifest.inputs[0].shape == [-1, -1]  # batch, sequence
    assert text.manifest.preprocessor.name == "text" and "tokenizer.json" in text.manifest.files
    for report in (mine, cnn, text):
        m = report.manifest
        assert {"weights.safetensors", "model_spec.json"} <= set(m.files)
        assert report.parity_max_abs_diff <= 1e-4
        assert m.metrics["test_accuracy"] == report.test_accuracy and m.metrics["val_accuracy"] == report.val_accuracy
        assert report.val_accuracy == max(h["val_accuracy"] for h in report.history)  # best on validation
        assert sum(m.dataset["rows"].values()) > 0 and len(m.dataset["sha256"]) == 64
        assert report.history[0]["samples_per_s"] > 0
    assert cnn.test_accuracy >= 0.95 and text.test_accuracy >= 0.9  # text: a bag of words gets ~0.5


def test_fine_tuning_starts_from_the_parents_weights(trained):
    for parent, child, chance in ((trained["cnn"], trained["cnn-ft"], 0.1), (trained["text"], trained["text-ft"], 0.25)):
        m = child.manifest
        assert (m.parent.model, m.parent.version) == (parent.manifest.model, parent.manifest.version)
        assert m.model_spec == parent.manifest.model_spec
        first = child.history[0]["val_accuracy"]
        # a fresh model at lr 1e-7 would sit near chance; the child starts where the parent ended
        assert abs(first - parent.val_accuracy) <= 0.02 and first > chance + 0.5, (first, parent.val_accuracy)
    assert trained["text-ft"].manifest.files["tokenizer.json"].sha256 == trained["text"].manifest.files["tokenizer.json"].sha256


def _app(reg_root):
    models = [
        {"name": "mine", "placement": "ingress", "versions": [{"version": 1}]},
        {"name": "digits-cnn", "placement": "ingress", "versions": [{"version": 1}, {"version": 2, "weight": 0}]},
        {"name": "text-order", "placement": "ingress", "versions": [{"version": 1}, {"version": 2, "weight": 0}]},
    ]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
        "applications": [{
            "name": "models", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app",
            "args": {"registry_root": reg_root, "models": models, "ingress": {"ray_actor_options": {"num_cpus": 0.5}}},
        }],
    }


def test_served_over_http_from_pixels_png_and_raw_text(trained, reg_root, serve_cleanup):
    deploy(_app(reg_root))
    x, y = load_digits(return_X_y=True)
    idx = [-1, -2, -3, -4, -5]
    with httpx.Client(base_url=URL, timeout=60) as http:
        # the user's own model, from pixel arrays (v1)
        r = http.post("/v1/models/mine:predict", json={"instances": x[idx].tolist()})  # raw 0..16 pixels, as the digits preprocessor expects
        assert r.status_code == 200, r.text
        assert [p["label"] for p in r.json()["predictions"]] == [str(int(v)) for v in y[idx]]
        # the CNN, from PNG files (v2 BYTES of base64), and the fine-tuned version pinned
        body = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [5], "data": [digit_png(x[i], size=8) for i in idx]}]}  # lossless 8x8 PNGs
        for path in ("/v2/models/digits-cnn/infer", "/v2/models/digits-cnn/versions/2/infer"):
            r = http.post(path, json=body)
            assert r.status_code == 200, r.text
            labels = next(o["data"] for o in r.json()["outputs"] if o["name"] == "label")
            assert labels == [str(int(v)) for v in y[idx]]
        assert r.headers["x-model-version"] == "2"
        # the transformer, from raw UTF-8 text: v2 BYTES and v1 instances
        r = http.post("/v2/models/text-order/infer",
                      json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [4], "data": TEXTS}]})
        assert r.status_code == 200, r.text
        assert next(o["data"] for o in r.json()["outputs"] if o["name"] == "label") == ["fox", "owl", "dog", "cat"]
        r = http.post("/v1/models/text-order/versions/2:predict", json={"instances": ["the owl scared the dog"]})
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "owl", r.text
        r = http.post("/v1/models/text-order:predict", json={"instances": [[1, 2, 3]]})
        assert r.status_code == 400 and "input 'text' takes ['BYTES'], got numbers" in r.json()["error"], r.text


def test_large_data_streams_through_ray_data_shards(ray_cluster, tmp_path):
    """data_loading=ray_data: a .parquet read as a Ray Dataset, split by a seeded row hash,
    sharded to 2 DDP workers with get_dataset_shard; test accuracy computed batch by batch."""
    import pandas as pd

    rng = np.random.default_rng(0)
    centers = rng.normal(scale=4.0, size=(3, 8))
    y = rng.integers(0, 3, size=3000)
    df = pd.DataFrame(centers[y] + rng.normal(size=(3000, 8)), columns=[f"f{i}" for i in range(8)])
    df["label"] = np.array(["a", "b", "c"])[y]
    df.to_parquet(tmp_path / "big.parquet")
    cfg = TrainConfig.load(None, model_name="streamed", data=str(tmp_path / "big.parquet"), data_loading="ray_data",
                           num_workers=2, cpus_per_worker=0.5, epochs=3, storage_path=str(tmp_path / "runs"))
    report = train_and_publish(cfg, Registry(str(tmp_path / "reg")))
    m = report.manifest
    assert m.dataset["loading"] == "ray_data" and sum(m.dataset["rows"].values()) == 3000
    assert 1800 < m.dataset["rows"]["train"] < 2400  # 70 % in expectation
    assert report.test_accuracy >= 0.9 and m.inputs[0].shape == [-1, 8]
    assert m.postprocessor.params["labels"] == ["a", "b", "c"]


def test_cnn_from_a_folder_of_pngs_answers_pngs(ray_cluster, tmp_path):
    """data = a folder with one sub-folder of PNGs per class; the published version's image
    preprocessor reads PNG bytes the same way training read the files."""
    import asyncio
    import base64

    from PIL import Image

    from maas_ray.serving.config import ModelConfig
    from maas_ray.serving.replicas import LocalPipeline

    x, y = load_digits(return_X_y=True)
    for i in range(900):
        (tmp_path / "pngs" / str(y[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i].reshape(8, 8) * 255 / 16).astype(np.uint8), "L").save(tmp_path / "pngs" / str(y[i]) / f"{i}.png")
    report = train_and_publish(
        TrainConfig.load("deployments/train/cnn.yaml", data=str(tmp_path / "pngs"), model_name="png-cnn", epochs=8,
                         num_workers=1, min_test_accuracy=0.85, storage_path=str(tmp_path / "runs")),
        Registry(str(tmp_path / "reg")),
    )
    m = report.manifest
    assert m.dataset["source"] == str(tmp_path / "pngs") and m.inputs[0].shape == [-1, 1, 8, 8]
    assert m.preprocessor.params == {"height": 8, "width": 8, "channels": 1, "pixel_max": 1.0}
    pipeline = LocalPipeline(str(tmp_path / "reg"), ModelConfig.model_validate({"name": "png-cnn", "versions": [{"version": 1}]}), 1)
    files = sorted((tmp_path / "pngs").glob("*/*.png"))[::30]
    pngs = np.array([base64.b64encode(f.read_bytes()).decode() for f in files], dtype=object)
    labels = asyncio.run(pipeline.infer({"input": pngs}, True))[0]["label"]
    assert np.mean(labels == np.array([f.parent.name for f in files])) >= 0.85
