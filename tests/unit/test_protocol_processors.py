import asyncio
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from maas_ray.errors import ConfigError, InferenceError, InvalidInputError
from maas_ray.registry.manifest import Manifest, ProcessorSpec, TensorSpec
from maas_ray.serving.codecs.v1 import decode_v1, encode_v1
from maas_ray.serving.codecs.v2 import decode_v2, encode_v2
from maas_ray.serving.config import Limits
from maas_ray.serving.processors import make_postprocessor, make_preprocessor
from maas_ray.serving.runner import OnnxRunner, rows, run_batch
from maas_ray.serving.traffic import TrafficRouter
from maas_ray.serving.types import InferRequest, RequestSchema

pytestmark = pytest.mark.unit


def manifest(shape=(-1, 4), pre="tensor", pre_params=None, post="tensor", post_params=None, dtype="FP32"):
    return Manifest(
        model="m", version=1, sha256="0" * 64, size_bytes=1,
        inputs=[TensorSpec(name="input", datatype=dtype, shape=list(shape))],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 3])],
        preprocessor=ProcessorSpec(name=pre, params=pre_params or {}),
        postprocessor=ProcessorSpec(name=post, params=post_params or {}),
    )


LIMITS = Limits()
SCHEMA = RequestSchema({"input": frozenset({"FP32"}), "ids": frozenset({"INT64"})}, ("logits",))


def test_decode_v2_json_and_binary_extension():
    body = {"id": "r1", "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
                                   {"name": "ids", "datatype": "INT64", "shape": [1], "data": [7]}],
            "outputs": [{"name": "logits"}]}
    req = decode_v2(json.dumps(body).encode(), None, SCHEMA, LIMITS)
    assert req.tensors["input"].dtype == np.float32 and req.tensors["input"].tolist() == [[1, 2], [3, 4]]
    assert (req.id, req.outputs, req.binary_outputs, req.parameters) == ("r1", ["logits"], frozenset(), {})

    raw = np.arange(6, dtype=np.int64)
    header = json.dumps({"inputs": [{"name": "ids", "datatype": "INT64", "shape": [2, 3],
                                     "parameters": {"binary_data_size": raw.nbytes}},
                                    {"name": "input", "datatype": "FP32", "shape": [1], "data": [0.5]}],
                         "parameters": {"binary_data_output": True}}).encode()
    req = decode_v2(header + raw.tobytes(), str(len(header)), SCHEMA, LIMITS)
    assert req.tensors["ids"].shape == (2, 3) and req.tensors["ids"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert req.outputs is None and req.binary_outputs == {"logits"}


def _one(**item):
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2], "data": [1, 2], **item}]}).encode()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "request body is not valid JSON"),
        (b"[]", "request: expected a JSON object, got a list"),
        (_one(datatype="FLOAT"), 'inputs[0].datatype: expected one of [\'FP32\'] for input \'input\', got "FLOAT"'),
        (_one(data=[1]), "inputs[0].data: shape [2] needs 2 values, got 1"),
        (_one(shape=[True, 2]), "inputs[0].shape[0]: expected a non-negative integer, got true"),
        (_one(shape=[-1]), "inputs[0].shape[0]: expected a non-negative integer, got -1"),
        (_one(data=[1, "2"]), 'inputs[0].data[1]: expected a number for FP32, got "2"'),
        (_one(data=[1, None]), "inputs[0].data[1]: expected a number for FP32, got null"),
        (_one(data=[[1], [2]]), "inputs[0].data[0]: expected a number for FP32, got a list"),
        (_one(name="x"), """inputs[0].name: unknown input "x"; this model takes ['input']"""),
    ],
)
def test_decode_v2_rejects_bad_bodies(body, message):
    with pytest.raises(InvalidInputError) as info:
        decode_v2(body, None, RequestSchema({"input": frozenset({"FP32"})}, ("logits",)), LIMITS)
    assert str(info.value).startswith(message), str(info.value)


def test_v1_decode_and_encode():
    one = RequestSchema({"input": frozenset({"BYTES", "FP32"})}, ("y",))
    t = decode_v1(b'{"instances": [[1, 2], [3, 4]]}', one, LIMITS)
    assert t["input"].shape == (2, 2) and t["input"].dtype == np.int64
    t = decode_v1(json.dumps({"instances": [{"b64": base64.b64encode(b"png").decode()}]}).encode(), one, LIMITS)
    assert t["input"].dtype == object and t["input"][0] == b"png"
    two = RequestSchema({"a": frozenset({"INT64"}), "b": frozenset({"FP32"})}, ("y",))
    t = decode_v1(b'{"instances": [{"a": 1, "b": [1, 2]}, {"a": 2, "b": [3, 4.5]}]}', two, LIMITS)
    assert t["a"].tolist() == [1, 2] and t["b"].shape == (2, 2) and t["b"].dtype == np.float64
    with pytest.raises(InvalidInputError, match=r"instances\[0\]: expected the keys \['a', 'b'\], got \['a'\]"):
        decode_v1(b'{"instances": [{"a": 1}]}', two, LIMITS)
    out = encode_v1({"label": np.array(["a", "b"], dtype=object), "p": np.array([[0.5], [0.25]], np.float32)}, 3)
    assert json.loads(out) == {"predictions": [{"label": "a", "p": [0.5]}, {"label": "b", "p": [0.25]}],
                               "model_version": "3"}
    assert json.loads(encode_v1({"y": np.array([[1.0], [2.0]])}, 1))["predictions"] == [[1.0], [2.0]]


def test_encode_v2_datatypes():
    req = InferRequest({}, "id1", None, frozenset(), {})
    body, length = encode_v2(
        "m", 3, {"y": np.zeros((2, 2), np.float32), "l": np.array([b"x", "y"], dtype=object)}, req
    )
    body = json.loads(body)
    assert length is None and body["model_version"] == "3" and body["id"] == "id1"
    assert body["outputs"][0] == {"name": "y", "datatype": "FP32", "shape": [2, 2], "data": [0.0] * 4}
    assert body["outputs"][1]["data"] == ["x", "y"] and body["outputs"][1]["datatype"] == "BYTES"


def test_tensor_preprocessor_validates_against_schema():
    pre = make_preprocessor(manifest())
    x = np.ones((3, 4), np.float32)
    assert pre({"input": x}, strict_dtypes=True)["input"] is x
    with pytest.raises(InvalidInputError, match=r"expected datatype FP32, got FP64"):
        pre({"input": x.astype(np.float64)}, strict_dtypes=True)
    assert pre({"input": x.astype(np.float64)}, strict_dtypes=False)["input"].dtype == np.float32
    with pytest.raises(InvalidInputError, match=r"expected shape \[-1, 4\] \(-1 = any\), got \[3, 5\]"):
        pre({"input": np.ones((3, 5), np.float32)}, strict_dtypes=True)
    with pytest.raises(InvalidInputError, match=r"unknown input\(s\) \['extra'\]"):
        pre({"input": x, "extra": x}, strict_dtypes=True)
    ints = make_preprocessor(manifest(dtype="INT64"))
    with pytest.raises(InvalidInputError, match="fractional"):
        ints({"input": np.full((1, 4), 0.5)}, strict_dtypes=False)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


def test_image_preprocessor_pixels_and_encoded_images():
    params = {"height": 2, "width": 2, "channels": 1, "pixel_max": 16.0, "invert_encoded": True}
    pre = make_preprocessor(manifest(shape=(-1, 4), pre="image", pre_params=params))
    out = pre({"x": np.array([[[0, 16], [8, 4]]])}, strict_dtypes=True)["input"]
    np.testing.assert_allclose(out, [[0, 1, 0.5, 0.25]])
    png = _png(np.array([[255, 0], [127, 191]]))
    enc = pre({"x": np.array([png, base64.b64encode(png).decode()], dtype=object)}, strict_dtypes=True)["input"]
    np.testing.assert_allclose(enc, [[0, 1, 128 / 255, 64 / 255]] * 2, atol=1e-6)
    with pytest.raises(InvalidInputError, match="image 0: not a PNG or JPEG image"):
        pre({"x": np.array([b"garbage"], dtype=object)}, strict_dtypes=True)
    with pytest.raises(InvalidInputError, match=r"each image needs 2x2x1 = 4 pixels, got shape \[3\]"):
        pre({"x": np.ones((1, 3))}, strict_dtypes=True)
    cnn = make_preprocessor(manifest(shape=(-1, 1, 2, 2), pre="image", pre_params=params))
    assert cnn({"x": np.zeros((5, 2, 2))}, strict_dtypes=True)["input"].shape == (5, 1, 2, 2)
    with pytest.raises(ConfigError, match="needs integer 'height' and 'width'"):
        make_preprocessor(manifest(pre="image"))


def test_classification_postprocessor():
    post = make_postprocessor(manifest(post="classification", post_params={"labels": ["a", "b", "c"], "top_k": 2}))
    out = post({"logits": np.array([[0.0, 2.0, 1.0]], np.float32)})
    assert out["label"].tolist() == ["b"] and out["top_k_labels"].tolist() == [["b", "c"]]
    assert np.isclose(out["probabilities"].sum(), 1) and out["top_k_scores"][0, 0] == out["probabilities"].max()
    with pytest.raises(ConfigError, match="unknown postprocessor 'nope'"):
        make_postprocessor(manifest(post="nope"))


def test_router_weights_sticky_keys_and_zero_weight():
    r = TrafficRouter({1: 90, 2: 10, 3: 0})
    picks = [r.choose() for _ in range(20000)]
    assert 3 not in picks and abs(picks.count(2) / len(picks) - 0.1) < 0.01
    assert len({r.choose("user-42") for _ in range(50)}) == 1
    keyed = [r.choose(f"k{i}") for i in range(5000)]
    assert abs(keyed.count(2) / len(keyed) - 0.1) < 0.02
    with pytest.raises(ConfigError, match=r"got \{1: 0\}"):
        TrafficRouter({1: 0})


class FakeSession:
    """Echo x + 1 unless any value is negative (a runtime failure)."""

    def __init__(self):
        self.batches = []

    def get_providers(self):
        return ["CPUExecutionProvider"]

    def run(self, names, feeds):
        x = feeds["input"]
        self.batches.append(x.shape[0])
        if (x < 0).any():
            raise RuntimeError("onnxruntime: bad value")
        return [x[:, :3] + 1]


def test_run_batch_concatenates_splits_and_isolates_failures():
    session = FakeSession()
    runner = OnnxRunner(manifest(), b"", session_factory=lambda *a, **k: session)
    reqs = [np.full((n, 4), i, np.float32) for i, n in enumerate([1, 3, 2])]
    out = run_batch(runner, [{"input": r} for r in reqs])
    assert session.batches == [6]
    for r, o in zip(reqs, out):
        np.testing.assert_array_equal(o["logits"], r[:, :3] + 1)
    session.batches.clear()
    out = run_batch(runner, [{"input": reqs[0]}, {"input": -np.ones((2, 4), np.float32)}, {"input": reqs[2]}])
    assert isinstance(out[1], InferenceError) and "bad value" in str(out[1])
    np.testing.assert_array_equal(out[2]["logits"], reqs[2][:, :3] + 1)
    assert session.batches == [5, 1, 2, 2]  # the failed batch is retried request by request


@pytest.mark.parametrize(
    ("provider", "threads", "cores", "batch1_s", "inline"),
    [
        ("CPUExecutionProvider", 2, 4, 10e-6, True),  # tiny model: the thread hop costs more than the run
        ("CPUExecutionProvider", 1, 1, 20e-3, True),  # one-thread session: no spare core to overlap with
        ("CPUExecutionProvider", 2, 2, 20e-3, True),  # the session's threads take the replica's cores
        ("CPUExecutionProvider", 2, 4, 20e-3, False),  # two cores to spare: the loop works beside the run
        ("CPUExecutionProvider", None, 2, 20e-3, False),  # onnxruntime's default: all of the machine's cores
        ("CUDAExecutionProvider", 1, 1, 20e-3, False),  # the loop keeps feeding the GPU
    ],
)
def test_which_models_run_on_the_event_loop(provider, threads, cores, batch1_s, inline):
    from maas_ray.serving.runner import runs_inline

    session = FakeSession()
    session.get_providers = lambda: [provider]
    runner = OnnxRunner(manifest(), b"", intra_op_threads=threads, session_factory=lambda *a, **k: session)
    runner.batch1_seconds = batch1_s
    assert runs_inline(runner, cores) is inline


@pytest.mark.parametrize("cores", [1, 8])  # on the event loop, and in a worker thread
def test_infer_many_runs_a_coalesced_call_as_one_batch_with_what_is_queued(cores):
    """The requests of one handle call enter the queue as one entry: a call of 3 requests and a
    lone request that queued behind the running batch form one onnxruntime call together."""
    from maas_ray.serving.config import BatchingConfig
    from maas_ray.serving.runner import BatchedRunner

    session = FakeSession()
    runner = OnnxRunner(manifest(), b"", intra_op_threads=2, session_factory=lambda *a, **k: session)
    runner.batch1_seconds = 1e-3
    batched = BatchedRunner(runner, BatchingConfig(max_batch_size=8), cores=cores)
    assert batched.inline is (cores == 1)
    x = [np.full((n, 4), i, np.float32) for i, n in enumerate((1, 2, 1, 3, 1))]

    async def go():
        first = asyncio.ensure_future(batched.infer({"input": x[0]}))
        await asyncio.sleep(0)  # x[0] runs alone; what follows queues behind it
        call = asyncio.ensure_future(batched.infer_many([{"input": x[1]}, {"input": x[2]}, {"input": x[3]}]))
        lone = asyncio.ensure_future(batched.infer({"input": x[4]}))
        return await first, await call, await lone

    first, call, lone = asyncio.run(go())
    assert session.batches == [1, 7]
    np.testing.assert_array_equal(first[0]["logits"], x[0][:, :3] + 1)
    for (out, _), xi in zip(call, x[1:4]):
        np.testing.assert_array_equal(out["logits"], xi[:, :3] + 1)
    np.testing.assert_array_equal(lone[0]["logits"], x[4][:, :3] + 1)
    # every request reports the run time of the onnxruntime call that served it: one batch, one time
    batch_s = {run_s for _, run_s in call} | {lone[1]}
    assert len(batch_s) == 1 and 0 < min(batch_s) < 60, batch_s


def test_infer_many_honours_batching_off_and_max_batch_size():
    from maas_ray.serving.config import BatchingConfig
    from maas_ray.serving.runner import BatchedRunner

    session = FakeSession()
    runner = OnnxRunner(manifest(), b"", intra_op_threads=1, session_factory=lambda *a, **k: session)
    runner.batch1_seconds = 1e-3
    batched = BatchedRunner(runner, BatchingConfig(max_batch_size=4, enabled=False))
    feeds = [{"input": np.ones((n, 4), np.float32)} for n in (2, 3, 1)]
    assert len(asyncio.run(batched.infer_many(feeds))) == 3
    assert session.batches == [2, 3, 1]  # batching off: one run per request
    session.batches.clear()
    batched.set_batching(BatchingConfig(max_batch_size=4))
    results = asyncio.run(batched.infer_many(feeds))  # 6 rows > 4: no single batch holds them
    assert [out["logits"].shape[0] for out, _ in results] == [2, 3, 1]
    assert session.batches == [2, 4]  # one entry per request: the first runs, the other two fill a batch


def test_rows_counts_the_batch_dimension_and_never_raises():
    assert rows({"x": np.zeros((3, 4), np.float32)}) == 3
    assert rows({}) == 1
    assert rows({"x": np.asarray(5.0)}) == 1  # a scalar: the preprocessor refuses it, not the queue
