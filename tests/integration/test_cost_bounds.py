"""A request's work is bounded, not only its bytes: the most expensive valid request of each model
kind (flat MLP input, CNN images, raw text) is answered 504 at the request timeout instead of
holding the replica, too many items (or characters) get 413 naming the limit, and the replica
answers the next request.

Each model costs ~0.1 s per item on one core, so the largest valid request (1024 items, the
default limits.max_items) is ~100 s of work: unbounded, it would outlast the client's own
60 s timeout.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest

from maas_ray.registry import Registry
from maas_ray.registry.manifest import ProcessorSpec
from maas_ray.serving.deploy import deploy
from tests.helpers import HTTP_PORT, wait_until
from tests.helpers.costly import slow_cnn_onnx, slow_mlp_onnx, slow_text_onnx, word_tokenizer_json

pytestmark = [pytest.mark.integration]
URL = f"http://127.0.0.1:{HTTP_PORT}"
TIMEOUT_S = 2.0
MAX_ITEMS = 1024  # limits.max_items' default
MAX_TEXT_CHARS = 1024 * 64
SIDE = 128  # limits.max_image_pixels = SIDE * SIDE


@pytest.fixture(scope="module")
def app(ray_cluster, registry_root):
    from ray import serve

    reg = Registry(registry_root)
    reg.publish("cost-mlp", slow_mlp_onnx())
    reg.publish("cost-cnn", slow_cnn_onnx(),
                preprocessor=ProcessorSpec(name="image", params={"height": 8, "width": 8, "channels": 1}))
    reg.publish("cost-text", slow_text_onnx(), files={"tokenizer.json": word_tokenizer_json()},
                preprocessor=ProcessorSpec(name="text", params={"max_seq_len": 16}))
    model = {"placement": "ingress", "intra_op_threads": 1, "versions": [{"version": "latest"}],
             "batching": {"max_batch_size": 8}}
    deploy({
        "http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
        "applications": [{
            "name": "costapp", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app",
            "args": {
                "registry_root": registry_root,
                "limits": {"request_timeout_s": TIMEOUT_S, "max_image_pixels": SIDE * SIDE},
                "models": [{"name": "cost-mlp", **model}, {"name": "cost-cnn", **model},
                           {"name": "cost-text", **model, "max_text_chars": MAX_TEXT_CHARS}],
                "ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
            },
        }],
    })
    client = httpx.Client(base_url=URL, timeout=60)  # the client's own, generous timeout
    wait_until(lambda: client.get("/v2/health/ready").status_code == 200, timeout_s=90)
    yield client
    client.close()
    serve.shutdown()


def _png(seed: int) -> str:
    from PIL import Image

    pixels = (np.add.outer(np.arange(SIDE), np.arange(SIDE)) * (seed + 1) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _body(kind: str, items: int, chars_per_text: int = MAX_TEXT_CHARS // MAX_ITEMS) -> dict:
    if kind == "cost-mlp":
        return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [items, 4],
                            "data": np.ones(items * 4).tolist()}]}
    if kind == "cost-cnn":
        image = _png(0)  # one image at the pixel limit, items times
        return {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [items], "data": [image] * items}]}
    sentence = ("the owl saw a dog " * chars_per_text)[:chars_per_text]
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [items], "data": [sentence] * items}]}


@pytest.mark.parametrize("kind", ["cost-mlp", "cost-cnn", "cost-text"])
def test_the_most_expensive_valid_request_answers_504_and_the_replica_goes_on(app, kind):
    r = app.post(f"/v2/models/{kind}/infer", json=_body(kind, MAX_ITEMS))
    assert r.status_code == 504, r.text[:300]
    assert f"request_timeout_s={TIMEOUT_S}" in r.json()["error"]
    r = app.post(f"/v2/models/{kind}/infer", json=_body(kind, 1))
    assert r.status_code == 200, r.text[:300]
    assert r.json()["outputs"][0]["shape"][0] == 1


@pytest.mark.parametrize("kind", ["cost-mlp", "cost-cnn", "cost-text"])
def test_one_item_too_many_is_413_naming_the_limit(app, kind):
    r = app.post(f"/v2/models/{kind}/infer", json=_body(kind, MAX_ITEMS + 1, chars_per_text=1))
    assert r.status_code == 413, r.text[:300]
    assert f"{MAX_ITEMS + 1} items, over the limit of {MAX_ITEMS}" in r.json()["error"]
    assert "limits.max_items" in r.json()["error"]


def test_too_much_text_is_413_naming_the_limit(app):
    r = app.post("/v1/models/cost-text:predict", json={"instances": ["the owl " * (MAX_TEXT_CHARS // 8 + 1)]})
    assert r.status_code == 413 and "limits.max_text_chars" in r.json()["error"], r.text[:300]
    assert f"over the limit of {MAX_TEXT_CHARS}" in r.json()["error"]


def test_a_request_of_a_few_batches_is_answered_whole(app):
    """More items than max_batch_size (8) but within the timeout: run a batch at a time, joined."""
    x = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [12, 4], "data": x.ravel().tolist()}]}
    whole = app.post("/v2/models/cost-mlp/infer", json=body)
    assert whole.status_code == 200, whole.text[:300]
    out = np.asarray(whole.json()["outputs"][0]["data"]).reshape(whole.json()["outputs"][0]["shape"])
    single = body | {"inputs": [{**body["inputs"][0], "shape": [1, 4], "data": x[5].tolist()}]}
    one = app.post("/v2/models/cost-mlp/infer", json=single).json()["outputs"][0]["data"]
    assert out.shape == (12, 3)
    np.testing.assert_allclose(out[5], one, rtol=1e-5)
