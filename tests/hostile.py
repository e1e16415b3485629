"""A corpus of hostile requests for the digits model, with the exact status each must get.

Shared by the unit tests (``tests/unit/test_hostile.py``: decode + the digits preprocessor)
and the live-HTTP test. The model is digits as ``maas quickstart`` publishes it: input
``input`` FP32 [-1, 64]; image preprocessor (height 8, width 8, pixel_max 16,
invert_encoded), so the input also takes BYTES (PNG/JPEG, raw or base64) and numeric
pixel datatypes; classification postprocessor over 10 classes (outputs ``label``,
``probabilities``, ``top_k_labels``, ``top_k_scores``). Limits are the defaults.

Each :class:`HostileCase` is POSTed to ``/v2/models/digits[/versions/<version>]/infer``
(route "v2") or ``/v1/models/digits[/versions/<version>]:predict`` (route "v1") with its
headers (every value encodes as latin-1, as HTTP header values must); ``version``
(URL-quote it) is set only by the cases about version references, and expects the server
to check it with ``parse_version_ref`` before looking the version up.
:data:`VALID` are requests of the same shapes that must still be answered 200.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import NamedTuple, Optional

import numpy as np
import orjson

from tests.helpers.images import digit_png_bytes

HEADER = "inference-header-content-length"
# One scikit-learn digit (a 0), 8x8 pixels in 0..16.
PIXELS = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
          0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]


class HostileCase(NamedTuple):
    name: str
    route: str  # "v2" | "v1"
    body: bytes
    headers: dict[str, str]
    expect: int  # the exact HTTP status: 400 or 413
    version: Optional[str] = None  # URL version reference, where the case is about it


class ValidCase(NamedTuple):
    name: str
    route: str
    body: bytes
    headers: dict[str, str]
    version: Optional[str] = None


# ---- builders ---------------------------------------------------------------------------
def _j(obj) -> bytes:
    return orjson.dumps(obj)


def _inp(data=None, shape=(1, 64), datatype="FP32", name="input", **extra) -> dict:
    item = {"name": name, "datatype": datatype, "shape": list(shape)}
    if data is not None:
        item["data"] = data
    item.update(extra)
    return item


def _v2(*inputs, **top) -> bytes:
    return _j({"inputs": list(inputs) or [_inp(PIXELS)], **top})


def _binary(inputs: list, payload: bytes, **top) -> tuple[bytes, dict[str, str]]:
    header = _j({"inputs": inputs, **top})
    return header + payload, {HEADER: str(len(header)), "content-type": "application/octet-stream"}


def _bytes_elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declared(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height greyscale pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _image(fmt: str, size: int = 8, noise: bool = False) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size, size), dtype=np.uint8) if noise else np.full((size, size), 200, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format=fmt)
    return buf.getvalue()


def digit_png() -> bytes:
    return digit_png_bytes(PIXELS, size=8)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _png_corrupt_crc() -> bytes:
    raw = bytearray(_image("PNG", 32, noise=True))
    idat = raw.index(b"IDAT")
    raw[idat + 10] ^= 0xFF  # a data byte: the chunk's CRC no longer matches
    return bytes(raw)


def _png_broken_ihdr() -> bytes:
    raw = bytearray(_image("PNG", 32, noise=True))
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 7] ^= 0x01  # the width changes, the IHDR CRC does not: a broken chunk
    return bytes(raw)


def _png_bad_filter() -> bytes:
    """A PNG with valid chunks and CRCs whose scanlines use filter type 9 (there are 0-4)."""
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x09" + b"\x80" * 8 for _ in range(8)))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _deep(levels: int, leaf: bytes = b"1") -> bytes:
    return b"[" * levels + leaf + b"]" * levels


def _images(*items: str, shape=None) -> bytes:
    return _v2(_inp(list(items), shape=shape or [len(items)], datatype="BYTES"))


def _cases() -> list[HostileCase]:
    c: list[HostileCase] = []

    def add(name, body, expect=400, route="v2", headers=None, version=None):
        c.append(HostileCase(name, route, body, headers or {"content-type": "application/json"}, expect, version))

    pix = PIXELS
    two_rows = pix + pix
    # -- JSON itself
    add("not_json", b'{"inputs": [')
    add("empty_body", b"")
    add("bad_utf8", b'{"inputs": [{"name": "\xff\xfe", "datatype": "FP32", "shape": [1, 64], "data": []}]}')
    add("json_array_root", b"[]")
    add("json_string_root", b'"inputs"')
    add("json_null_root", b"null")
    add("nan_literal", b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [NaN]}]}')
    add("infinity_literal", b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [Infinity]}]}')
    add("float_past_double", b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [1e400]}]}')
    add("nesting_past_parser_limit", b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": '
        + _deep(5000) + b"}]}")
    add("data_nested_1000_deep", b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": '
        + _deep(1000) + b"}]}")
    add("id_nested_300_deep", b'{"id": ' + _deep(300, b'"x"') + b', "inputs": ' + _j([_inp(pix)]) + b"}")
    add("parameters_nested_300_deep", b'{"parameters": {"p": ' + _deep(300) + b'}, "inputs": ' + _j([_inp(pix)]) + b"}")
    add("unknown_field_nested_300_deep", b'{"extra": ' + _deep(300) + b', "inputs": ' + _j([_inp(pix)]) + b"}")
    # -- top level
    add("unknown_top_level_key", _v2(model="digits"))
    add("inputs_missing", _j({"id": "x"}))
    add("inputs_empty", _j({"inputs": []}))
    add("inputs_object", _j({"inputs": _inp(pix)}))
    add("inputs_item_string", _j({"inputs": ["input"]}))
    add("inputs_item_null", _j({"inputs": [None]}))
    add("unknown_input_key", _v2(_inp(pix, dtype="float32")))
    # -- names
    add("name_missing", _j({"inputs": [{"datatype": "FP32", "shape": [1, 64], "data": pix}]}))
    add("name_number", _v2(_inp(pix, name=7)))
    add("name_unknown", _v2(_inp(pix, name="images")))
    add("name_given_twice", _v2(_inp(pix), _inp(pix)))
    # -- datatype
    add("datatype_list", _v2(_inp(pix, datatype=["FP32"])))
    add("datatype_missing", _j({"inputs": [{"name": "input", "shape": [1, 64], "data": pix}]}))
    add("datatype_unknown", _v2(_inp(pix, datatype="FLOAT")))
    add("datatype_lowercase", _v2(_inp(pix, datatype="fp32")))
    add("datatype_bool_not_accepted", _v2(_inp([True] * 64, datatype="BOOL")))
    add("datatype_null", _v2(_inp(pix, datatype=None)))
    # -- shape
    add("shape_missing", _j({"inputs": [{"name": "input", "datatype": "FP32", "data": pix}]}))
    add("shape_string", _v2(_inp(pix, shape="1,64")))
    add("shape_number", _j({"inputs": [{"name": "input", "datatype": "FP32", "shape": 64, "data": pix}]}))
    add("shape_bool_dim", _v2(_inp(pix, shape=[True, 64])))
    add("shape_negative_dim", _v2(_inp(pix, shape=[-1, 64])))
    add("shape_float_dim", _v2(_inp(pix, shape=[1.0, 64])))
    add("shape_null_dim", _v2(_inp(pix, shape=[None, 64])))
    add("shape_string_dims", _v2(_inp(pix, shape=["1", "64"])))
    add("shape_2e62_times_0", _v2(_inp([], shape=[2**62, 0])), 413)
    add("shape_dim_past_int64", _v2(_inp([], shape=[2**64 - 1, 0])), 413)
    add("shape_65_dims", _v2(_inp([1.0], shape=[1] * 65)))
    add("shape_17_dims", _v2(_inp(pix, shape=[1] * 15 + [8, 8])))
    add("shape_over_max_elements", _v2(_inp(pix, shape=[65537, 64])), 413)
    add("shape_wrong_for_model", _v2(_inp(pix + [0.0], shape=[1, 65])))
    # -- data vs shape
    add("data_short", _v2(_inp(pix[:63])))
    add("data_long", _v2(_inp(pix + [0])))
    add("data_missing", _v2(_inp(None)))
    add("data_null", _j({"inputs": [{**_inp(None), "data": None}]}))
    add("data_string", _v2(_inp("0,0,5,13")))
    add("data_object", _v2(_inp({"values": pix})))
    add("data_number", _v2(_inp(5, shape=[1])))
    add("data_nested_wrong_split", _v2(_inp([pix[:32], pix[32:]])))
    add("data_nested_ragged", _v2(_inp([pix, pix[:63]], shape=[2, 64])))
    add("data_nested_mixed_with_flat", _v2(_inp([pix] + pix[:1], shape=[2, 64])))
    add("data_list_in_flat", _v2(_inp([[0]] + pix[1:])))
    # -- data element types and ranges
    add("data_null_value", _v2(_inp(pix[:10] + [None] + pix[11:])))
    add("data_null_past_64", _v2(_inp(two_rows[:100] + [None] + two_rows[101:], shape=[2, 64])))
    add("data_string_past_64", _v2(_inp(two_rows[:100] + ["7"] + two_rows[101:], shape=[2, 64])))
    add("data_bool_in_fp32", _v2(_inp([True] + pix[1:])))
    add("data_object_value", _v2(_inp([{}] + pix[1:])))
    add("data_fp32_overflow", _v2(_inp([1e39] + pix[1:])))
    add("data_fp16_overflow", _v2(_inp([70000.0] + pix[1:], datatype="FP16")))
    add("data_int_fractional", _v2(_inp([1.5] + pix[1:], datatype="INT32")))
    add("data_int_past_uint64", b'{"inputs": [{"name": "input", "datatype": "INT64", "shape": [1, 1], "data": '
        b'[184467440737095516150000]}]}')
    add("data_int64_overflow", _v2(_inp([2**63] + pix[1:], datatype="INT64")))
    add("data_uint8_negative", _v2(_inp([-1] + pix[1:], datatype="UINT8")))
    add("data_uint8_overflow", _v2(_inp([256] + pix[1:], datatype="UINT8")))
    add("data_int8_bool", _v2(_inp([True] + pix[1:], datatype="INT8")))
    add("data_huge_int_fp32", b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": ['
        + b"9" * 5000 + b"]}]}")
    # -- id and parameters
    add("id_number", _v2(id=42))
    add("id_object", _v2(id={"a": 1}))
    add("id_list", _v2(id=["a"]))
    add("id_too_long", _v2(id="x" * 10000))
    add("parameters_string", _v2(parameters="binary_data_output"))
    add("parameters_list", _v2(parameters=[1]))
    add("parameters_value_object", _v2(parameters={"x": {"y": 1}}))
    add("parameters_value_null", _v2(parameters={"x": None}))
    add("parameters_binary_data_output_string", _v2(parameters={"binary_data_output": "yes"}))
    add("input_parameters_string", _v2(_inp(pix, parameters="x")))
    add("input_shared_memory", _v2(_inp(None, parameters={"shared_memory_region": "r", "shared_memory_byte_size": 256})))
    # -- outputs
    add("outputs_number", _v2(outputs=5))
    add("outputs_string", _v2(outputs="label"))
    add("outputs_item_string", _v2(outputs=["label"]))
    add("outputs_unknown_name", _v2(outputs=[{"name": "logits"}]))
    add("outputs_twice", _v2(outputs=[{"name": "label"}, {"name": "label"}]))
    add("outputs_unknown_key", _v2(outputs=[{"name": "label", "datatype": "BYTES"}]))
    add("outputs_name_missing", _v2(outputs=[{"parameters": {"binary_data": True}}]))
    add("outputs_binary_data_string", _v2(outputs=[{"name": "label", "parameters": {"binary_data": "true"}}]))
    add("outputs_classification_extension", _v2(outputs=[{"name": "label", "parameters": {"classification": 3}}]))
    # -- binary extension: header and sizes
    fp = np.asarray(PIXELS, np.float32).tobytes()
    bin_inp = [_inp(None, parameters={"binary_data_size": len(fp)})]
    body, h = _binary(bin_inp, fp)
    for name, value in [("header_letters", "abc"), ("header_unicode_digit", "\u00b2"), ("header_5000_digits", "9" * 5000),
                        ("header_negative", "-5"), ("header_zero", "0"), ("header_past_body", str(len(body) + 1)),
                        # inner space: HTTP servers strip the outer ones (optional whitespace, RFC 9110)
                        ("header_spaces", f"{h[HEADER][:1]} {h[HEADER][1:]}"),
                        # header values are latin-1 strings (as ASGI decodes them): UTF-8 bytes on the wire
                        ("header_arabic_digits", "\u0661\u0662".encode().decode("latin-1"))]:
        add(name, body, headers={**h, HEADER: value})
    add("binary_truncated", *_swap(_binary(bin_inp, fp[:100])))
    add("binary_trailing_bytes", *_swap(_binary(bin_inp, fp + b"\x00" * 8)))
    add("binary_without_header", _j({"inputs": bin_inp}))
    bad_size = [_inp(None, parameters={"binary_data_size": 252})]
    add("binary_size_not_shape", *_swap(_binary(bad_size, fp[:252])))
    add("binary_size_negative", *_swap(_binary([_inp(None, parameters={"binary_data_size": -256})], fp)))
    add("binary_size_string", *_swap(_binary([_inp(None, parameters={"binary_data_size": "256"})], fp)))
    add("binary_size_bool", *_swap(_binary([_inp(None, parameters={"binary_data_size": True})], fp[:1])))
    add("binary_size_and_data", *_swap(_binary([_inp(PIXELS, parameters={"binary_data_size": 256})], fp)))
    nan = np.full(64, np.nan, np.float32).tobytes()
    add("binary_fp32_nan", *_swap(_binary(bin_inp, nan)))
    png = digit_png()
    one_png = _bytes_elements(png)
    add("binary_bytes_short_element", *_swap(_binary(
        [_inp(None, shape=[1], datatype="BYTES", parameters={"binary_data_size": 20})],
        struct.pack("<I", 1000) + png[:16])))
    add("binary_bytes_truncated_prefix", *_swap(_binary(
        [_inp(None, shape=[1], datatype="BYTES", parameters={"binary_data_size": 2})], b"\x05\x00")))
    add("binary_bytes_count_mismatch", *_swap(_binary(
        [_inp(None, shape=[2], datatype="BYTES", parameters={"binary_data_size": len(one_png)})], one_png)))
    add("binary_bytes_not_an_image", *_swap(_binary(
        [_inp(None, shape=[1], datatype="BYTES", parameters={"binary_data_size": 11})], _bytes_elements(b"garbage"))))
    # -- BYTES / images
    add("bytes_holding_numbers", _v2(_inp([1, 2], shape=[2], datatype="BYTES")))
    add("bytes_holding_null", _v2(_inp([None], shape=[1], datatype="BYTES")))
    add("zero_images", _v2(_inp([], shape=[0], datatype="BYTES")))
    add("zero_batch_pixels", _v2(_inp([], shape=[0, 64])))
    add("image_base64_garbage", _images("!!!not base64!!!"))
    add("image_base64_of_garbage", _images(_b64(b"\x00garbage" * 10)))
    add("image_empty_string", _images(""))
    add("image_gif", _images(_b64(_image("GIF"))))
    add("image_bmp", _images(_b64(_image("BMP"))))
    add("image_tiff", _images(_b64(_image("TIFF"))))
    add("image_truncated_png", _images(_b64(_image("PNG", 32, noise=True)[:300])))
    add("image_png_corrupt_crc", _images(_b64(_png_corrupt_crc())))
    add("image_png_broken_ihdr", _images(_b64(_png_broken_ihdr())))
    add("image_png_bad_filter", _images(_b64(_png_bad_filter())))
    add("image_png_zlib_garbage", _images(_b64(png_declared(8, 8).replace(zlib.compress(b"\x00" * 64), b"x" * 11))))
    add("image_png_header_only", _images(_b64(png[:33])))
    add("image_png_25m_pixels", _images(_b64(png_declared(5000, 5000))), 413)
    add("image_png_bomb", _images(_b64(png_declared(100_000, 100_000))), 413)
    add("image_png_zero_size", _images(_b64(png_declared(0, 0))))
    add("image_one_good_one_bad", _images(_b64(png), "AAAA"))
    # -- URL version references (body is valid)
    add("version_unicode_digit", _v2(), version="\u00b2")
    add("version_5000_digits", _v2(), version="9" * 5000)
    add("version_bad_alias", _v2(), version="-candidate")
    add("version_fullwidth_digit", _v2(), version="\uff11")
    # -- v1
    add("v1_not_json", b"{", route="v1")
    add("v1_array_root", _j([pix]), route="v1")
    add("v1_no_instances", _j({"rows": [pix]}), route="v1")
    add("v1_instances_and_inputs", _j({"instances": [pix], "inputs": [pix]}), route="v1")
    add("v1_unknown_key", _j({"instances": [pix], "extra": 1}), route="v1")
    add("v1_instances_empty", _j({"instances": []}), route="v1")
    add("v1_instances_object", _j({"instances": {"input": pix}}), route="v1")
    add("v1_signature_other", _j({"instances": [pix], "signature_name": "predict"}), route="v1")
    add("v1_rows_with_null", _j({"instances": [pix, pix[:5] + [None] + pix[6:]]}), route="v1")
    add("v1_null_row", _j({"instances": [pix, None]}), route="v1")
    add("v1_numbers_then_b64", _j({"instances": [pix, {"b64": _b64(png)}]}), route="v1")
    add("v1_b64_then_numbers", _j({"instances": [{"b64": _b64(png)}, pix]}), route="v1")
    add("v1_strings_then_numbers", _j({"instances": [_b64(png), pix]}), route="v1")
    add("v1_ragged_rows", _j({"instances": [pix, pix[:63]]}), route="v1")
    add("v1_bool_rows", _j({"instances": [[True] * 64]}), route="v1")
    add("v1_bool_mixed_in_numbers", _j({"instances": [[True] + pix[1:]]}), route="v1")
    add("v1_b64_garbage", _j({"instances": [{"b64": "!!!"}]}), route="v1")
    add("v1_b64_number", _j({"instances": [{"b64": 5}]}), route="v1")
    add("v1_b64_extra_key", _j({"instances": [{"b64": _b64(png), "x": 1}]}), route="v1")
    add("v1_b64_not_an_image", _j({"instances": [{"b64": _b64(b"garbage")}]}), route="v1")
    add("v1_b64_gif", _j({"instances": [{"b64": _b64(_image("GIF"))}]}), route="v1")
    add("v1_b64_png_bomb", _j({"instances": [{"b64": _b64(png_declared(100_000, 100_000))}]}), 413, route="v1")
    add("v1_fp32_overflow", _j({"instances": [[1e39] + pix[1:]]}), route="v1")
    add("v1_int_past_int64", _j({"instances": [[2**64 - 1] + pix[1:]]}), route="v1")
    add("v1_nested_20_deep", b'{"instances": ' + _deep(20) + b"}", route="v1")
    add("v1_wrong_row_length", _j({"instances": [pix[:10]]}), route="v1")
    add("v1_named_row_unknown_key", _j({"instances": [{"images": pix}]}), route="v1")
    add("v1_columnar_unknown_name", _j({"inputs": {"images": [pix]}}), route="v1")
    add("v1_columnar_string", _j({"inputs": "x"}), route="v1")
    add("v1_zero_batch_nested", _j({"instances": [[]]}), route="v1")
    add("v1_version_unicode_digit", _j({"instances": [pix]}), route="v1", version="\u00b2")
    return c


def _swap(pair: tuple[bytes, dict[str, str]]) -> tuple:
    """(body, headers) -> the positional (body, expect, route, headers) of add()."""
    body, headers = pair
    return body, 400, "v2", headers


def _valid() -> list[ValidCase]:
    png = digit_png()
    fp = np.asarray(PIXELS, np.float32).tobytes()
    body, h = _binary([_inp(None, parameters={"binary_data_size": len(fp)})], fp)
    pb, ph = _binary([_inp(None, shape=[1], datatype="BYTES", parameters={"binary_data_size": len(png) + 4})],
                     _bytes_elements(png), outputs=[{"name": "label", "parameters": {"binary_data": True}}])
    js = {"content-type": "application/json"}
    return [
        ValidCase("v2_flat", "v2", _v2(), js),
        ValidCase("v2_nested", "v2", _v2(_inp([PIXELS, PIXELS], shape=[2, 64])), js),
        ValidCase("v2_pixels_8x8", "v2", _v2(_inp([[PIXELS[i:i + 8] for i in range(0, 64, 8)]], shape=[1, 8, 8])), js),
        ValidCase("v2_ints_uint8", "v2", _v2(_inp(PIXELS, datatype="UINT8")), js),
        ValidCase("v2_id_params_outputs", "v2", _v2(id="r-1", parameters={"priority": 1},
                                                    outputs=[{"name": "label"}, {"name": "top_k_scores"}]), js),
        ValidCase("v2_png_base64", "v2", _images(_b64(png), _b64(png)), js),
        ValidCase("v2_binary_fp32", "v2", body, h),
        ValidCase("v2_binary_png", "v2", pb, ph),
        ValidCase("v2_version_alias", "v2", _v2(), js, "production"),
        ValidCase("v1_rows", "v1", _j({"instances": [PIXELS, PIXELS]}), js),
        ValidCase("v1_b64", "v1", _j({"instances": [{"b64": _b64(png)}]}), js),
        ValidCase("v1_strings", "v1", _j({"instances": [_b64(png)]}), js),
        ValidCase("v1_named_rows", "v1", _j({"instances": [{"input": PIXELS}]}), js),
        ValidCase("v1_columnar", "v1", _j({"inputs": [PIXELS]}), js),
        ValidCase("v1_columnar_named", "v1", _j({"inputs": {"input": [PIXELS]}}), js),
    ]


CASES: list[HostileCase] = _cases()
VALID: list[ValidCase] = _valid()
