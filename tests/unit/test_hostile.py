"""Every case of the hostile corpus (tests/hostile.py) gets its exact 400/413 from the decode +
preprocess boundary, with an {"error"} message; the valid requests still decode and answer."""

import copy
import pickle
import random

import numpy as np
import orjson
import pytest

from maas_ray.errors import InvalidInputError
from maas_ray.registry.manifest import Manifest, ProcessorSpec, TensorSpec
from maas_ray.serving.codecs.common import parse_version_ref
from maas_ray.serving.codecs.v1 import decode_v1, encode_v1
from maas_ray.serving.codecs.v2 import decode_v2, encode_v2
from maas_ray.serving.config import Limits
from maas_ray.serving.processors import make_postprocessor, make_preprocessor
from maas_ray.serving.types import RequestSchema
from tests.hostile import CASES, HEADER, VALID

pytestmark = pytest.mark.unit

DIGITS = Manifest(
    model="digits", version=1, sha256="0" * 64, size_bytes=1,
    inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 64])],
    outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
    preprocessor=ProcessorSpec(
        name="image", params={"height": 8, "width": 8, "channels": 1, "pixel_max": 16.0, "invert_encoded": True}
    ),
    postprocessor=ProcessorSpec(name="classification", params={"labels": [str(i) for i in range(10)], "top_k": 3}),
)
LIMITS = Limits()
PRE = make_preprocessor(DIGITS, limits=LIMITS)
POST = make_postprocessor(DIGITS)
SCHEMA = RequestSchema.of(PRE, POST)


def serve(case):
    """What the ingress does before inference: version ref, decode, preprocess."""
    if case.version is not None:
        parse_version_ref(case.version)
    if case.route == "v2":
        request = decode_v2(case.body, case.headers.get(HEADER), SCHEMA, LIMITS)
        return request, PRE(request.tensors, strict_dtypes=True)
    return None, PRE(decode_v1(case.body, SCHEMA, LIMITS), strict_dtypes=False)


def test_corpus_is_large_and_names_are_unique():
    assert len(CASES) >= 80
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.expect for c in CASES} == {400, 413}
    for c in [*CASES, *VALID]:  # sendable over HTTP as they are
        assert c.route in ("v2", "v1") and all(v.encode("latin-1") for v in c.headers.values())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_request_gets_its_status(case):
    with pytest.raises(InvalidInputError) as info:
        serve(case)
    err = info.value
    assert err.status_code == case.expect, str(err)
    body = err.to_dict()
    assert set(body) == {"error"} and body["error"] and len(body["error"]) < 600, body
    assert pickle.loads(pickle.dumps(err)).status_code == case.expect


@pytest.mark.parametrize("case", VALID, ids=[c.name for c in VALID])
def test_valid_requests_still_decode(case):
    request, feeds = serve(case)
    x = feeds["input"]
    assert x.dtype == np.float32 and x.shape[1:] == (64,) and x.shape[0] >= 1
    outputs = POST({"logits": x[:, :10]})
    if request is not None:
        body, header_length = encode_v2("digits", 1, outputs, request)
        assert isinstance(body, bytes)
    else:
        assert b"predictions" in encode_v1(outputs, 1)


HOSTILE_VALUES = [None, True, False, -1, 0, 2**63, 2**64 - 1, 1.5, 1e308, 3.5e38, 70000.0, "", "x", "FP32", "BYTES",
                  "input", "label", [], {}, [[]], [None], ["a"], {"b64": "AAAA"}, {"binary_data_size": -1},
                  {"binary_data": 1}, [[[[[[1]]]]]]]


def _mutate(obj, rnd):
    """Replace, drop or add one node of a JSON document with a hostile value."""
    paths, stack = [], [((), obj)]
    while stack:
        path, node = stack.pop()
        paths.append(path)
        children = node.items() if isinstance(node, dict) else enumerate(node[:4]) if isinstance(node, list) else ()
        stack.extend((path + (k,), v) for k, v in children)
    path = rnd.choice(paths)
    value = copy.deepcopy(rnd.choice(HOSTILE_VALUES))
    if not path:
        return value
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    if isinstance(parent, dict) and rnd.random() < 0.2:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


def test_mutated_valid_requests_get_400_or_an_answer():
    """~1500 structure-aware mutations of the valid requests: nothing but InvalidInputError escapes."""
    rnd = random.Random(0)
    escaped = []
    for _ in range(1500):
        case = rnd.choice(VALID)
        n = int(case.headers.get(HEADER, len(case.body)))
        doc = orjson.loads(case.body[:n])
        for _ in range(rnd.randint(1, 3)):
            doc = _mutate(doc, rnd)
        raw = orjson.dumps(doc)
        headers = {**case.headers, HEADER: str(len(raw))} if HEADER in case.headers else case.headers
        mutated = case._replace(body=raw + case.body[n:], headers=headers)
        try:
            serve(mutated)
        except InvalidInputError:
            pass
        except Exception as exc:  # noqa: BLE001 - the point of the test
            escaped.append(f"{type(exc).__name__}: {exc} <- {raw[:200]!r}")
    assert not escaped, escaped[:5]
