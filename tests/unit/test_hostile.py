"""Every case of the hostile corpus (tests/hostile.py) gets its exact 400/413 from the decode +
preprocess boundary, with an {"error"} message; the valid requests still decode and answer."""

import pickle

import numpy as np
import pytest

from maas_ray.errors import InvalidInputError
from maas_ray.registry.manifest import Manifest, ProcessorSpec, TensorSpec
from maas_ray.serving import protocol
from maas_ray.serving.config import Limits
from maas_ray.serving.processors import make_postprocessor, make_preprocessor
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
SCHEMA = protocol.RequestSchema.of(PRE, POST)


def serve(case):
    """What the ingress does before inference: version ref, decode, preprocess."""
    if case.version is not None:
        protocol.parse_version_ref(case.version)
    if case.route == "v2":
        request = protocol.decode_v2(case.body, case.headers.get(HEADER), SCHEMA, LIMITS)
        return request, PRE(request.tensors, strict_dtypes=True)
    return None, PRE(protocol.decode_v1(case.body, SCHEMA, LIMITS), strict_dtypes=False)


def test_corpus_is_large_and_names_are_unique():
    assert len(CASES) >= 80
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.expect for c in CASES} == {400, 413}


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
        body, header_length = protocol.encode_v2("digits", 1, outputs, request)
        assert isinstance(body, bytes)
    else:
        assert b"predictions" in protocol.encode_v1(outputs, 1)
