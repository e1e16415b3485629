"""The payload logger: events as KServe sends them, redaction, sampling, rotation, bounded queue;
and the per-request work limits (check_work)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from pydantic import ValidationError

from maas_ray.errors import PayloadTooLargeError
from maas_ray.serving.config import AppArgs
from maas_ray.serving.limits import check_work
from maas_ray.serving.payload_log import REQUEST_TYPE, RESPONSE_TYPE, PayloadLogConfig, PayloadLogger

pytestmark = pytest.mark.unit

TEXTS = np.array(["call me at 555-0100", "my card is 4111 1111 1111 1111"], dtype=object)


def _read(directory) -> list[dict]:
    return [json.loads(line) for path in sorted(directory.glob("*.jsonl*")) for line in path.read_text().splitlines()]


def test_file_sink_writes_cloudevents_with_redaction(tmp_path):
    cfg = PayloadLogConfig(sink=f"file://{tmp_path}", redact={
        "drop": ["secret"], "mask": ["label"], "patterns": [r"\d{4} \d{4} \d{4} \d{4}", r"\d{3}-\d{4}"]})
    plog = PayloadLogger("text-order", cfg, app="app")
    plog.log("req-1", 2, "http_v2", {"text": TEXTS, "secret": np.array([1.0])},
             {"label": np.array(["owl", "dog"], dtype=object), "probabilities": np.array([[0.9, 0.1], [0.2, 0.8]])})
    plog.close()
    request, response = _read(tmp_path)
    assert request["type"] == REQUEST_TYPE and response["type"] == RESPONSE_TYPE
    for event in (request, response):
        assert event["specversion"] == "1.0" and event["id"] == "req-1" and event["inferenceservicename"] == "text-order"
        assert event["time"].endswith("Z") and event["datacontenttype"] == "application/json"
        assert event["data"]["parameters"] == {"protocol": "http_v2", "status": 200}
    inputs = request["data"]["inputs"]
    assert [t["name"] for t in inputs] == ["text"]  # dropped: secret
    assert inputs[0] == {"name": "text", "datatype": "BYTES", "shape": [2],
                         "data": ["call me at ***", "my card is ***"]}
    outputs = {t["name"]: t for t in response["data"]["outputs"]}
    assert outputs["label"]["data"] == "***" and outputs["label"]["shape"] == [2]
    assert outputs["probabilities"]["data"] == [0.9, 0.1, 0.2, 0.8] and outputs["probabilities"]["datatype"] == "FP64"
    assert response["data"]["model_version"] == "2"


@pytest.mark.parametrize(("mode", "types"), [("request", [REQUEST_TYPE]), ("response", [RESPONSE_TYPE])])
def test_mode_picks_the_events(tmp_path, mode, types):
    plog = PayloadLogger("m", PayloadLogConfig(sink=f"file://{tmp_path}", mode=mode))
    plog.log("r", 1, "grpc", {"x": np.zeros((1, 2), np.float32)}, {"y": np.ones((1,), np.int64)})
    plog.close()
    assert [e["type"] for e in _read(tmp_path)] == types


def test_sample_rate_zero_logs_nothing_and_starts_no_thread(tmp_path):
    plog = PayloadLogger("m", PayloadLogConfig(sink=f"file://{tmp_path}", sample_rate=0.0))
    for _ in range(100):
        plog.log("r", 1, "grpc", {"x": np.zeros(1)}, {"y": np.zeros(1)})
    assert plog._thread is None and len(plog.queue) == 0


def test_files_rotate_by_size_and_keep_backups(tmp_path):
    plog = PayloadLogger("m", PayloadLogConfig(sink=f"file://{tmp_path}", max_bytes=2048, backups=2, mode="request"))
    for i in range(60):
        plog.log(f"r{i}", 1, "http_v2", {"x": np.arange(16, dtype=np.float32)}, None)
    plog.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3 and all(p.stat().st_size <= 2048 for p in tmp_path.iterdir()), files
    assert files[0].endswith(".jsonl") and files[1].endswith(".jsonl.1") and files[2].endswith(".jsonl.2")
    newest = [json.loads(line)["id"] for line in (tmp_path / files[0]).read_text().splitlines()]
    assert newest[-1] == "r59"


class _SlowSink:
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.events: list = []

    def write(self, events):
        self.gate.wait(10)
        self.events.extend(events)

    def close(self):
        pass


def test_a_full_queue_drops_and_counts_without_blocking():
    drops = []
    sink = _SlowSink()
    plog = PayloadLogger("m", PayloadLogConfig(sink="file:///unused", queue_size=4, mode="request"),
                         on_drop=drops.append, sink=sink)
    for i in range(20):
        plog.log(f"r{i}", 1, "http_v2", {"x": np.zeros(1)}, None)  # the sink holds the thread meanwhile
    sink.gate.set()
    plog.close()
    assert plog.dropped == sum(drops) >= 20 - 4 - 1  # queue_size waiting + one in the sink
    assert len(sink.events) == 20 - plog.dropped


class _Collector(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        _Collector.received.append(({k.lower(): v for k, v in self.headers.items()}, json.loads(body)))
        self.send_response(202)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_http_sink_posts_binary_mode_cloudevents_as_kserve():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/events"
        plog = PayloadLogger("digits", PayloadLogConfig(sink=url), app="digits-app")
        plog.log("abc", 1, "grpc", {"input": np.zeros((1, 2), np.float32)}, {"label": np.array(["3"], object)})
        plog.close()
    finally:
        server.shutdown()
    (req_headers, req_body), (resp_headers, resp_body) = _Collector.received
    assert req_headers["ce-type"] == REQUEST_TYPE and resp_headers["ce-type"] == RESPONSE_TYPE
    for headers in (req_headers, resp_headers):
        assert headers["ce-specversion"] == "1.0" and headers["ce-id"] == "abc"
        assert headers["ce-inferenceservicename"] == "digits" and headers["ce-endpoint"] == "digits-app"
        assert headers["content-type"] == "application/json" and "ce-time" in headers and "ce-source" in headers
    assert req_body["inputs"][0]["shape"] == [1, 2] and resp_body["outputs"][0]["data"] == ["3"]


def test_a_failing_http_sink_counts_drops():
    drops = []
    plog = PayloadLogger("m", PayloadLogConfig(sink="http://127.0.0.1:9/nothing", timeout_s=1), on_drop=drops.append)
    plog.log("r", 1, "http_v2", {"x": np.zeros(1)}, {"y": np.zeros(1)})
    plog.close()
    assert sum(drops) == 2 and plog.written == 0


@pytest.mark.parametrize(("entry", "needle"), [
    ({"sink": "s3://bucket/x"}, "'s3://bucket/x'"),
    ({"sink": "file://relative/dir"}, "'file://relative/dir'"),
    ({"sink": "file:///tmp", "sample_rate": 1.5}, "sample_rate"),
    ({"sink": "file:///tmp", "mode": "both"}, "mode"),
    ({"sink": "file:///tmp", "redact": {"patterns": ["(unclosed"]}}, "'(unclosed'"),
])
def test_config_errors_quote_the_value(entry, needle):
    with pytest.raises(ValidationError, match=__import__("re").escape(needle)):
        AppArgs.model_validate({"models": [{"name": "m", "versions": [{"version": 1}], "payload_log": entry}]})


# ---- work limits ------------------------------------------------------------------------
def test_check_work_counts_items_and_characters():
    assert check_work("m", {"x": np.zeros((5, 4))}, 5, 10) == 5
    assert check_work("m", {"text": TEXTS}, 2, 100) == 2
    with pytest.raises(PayloadTooLargeError, match=r"6 items, over the limit of 5 for model 'm' \(limits.max_items"):
        check_work("m", {"x": np.zeros((6, 4))}, 5, 10)
    with pytest.raises(PayloadTooLargeError, match=r"49 characters of text, over the limit of 40"):
        check_work("m", {"text": TEXTS}, 2, 40)
    assert check_work("m", {"x": np.float32(1.0)}, 1, 1) == 1  # a scalar is one item


def test_model_limits_override_the_apps():
    args = AppArgs.model_validate({"limits": {"max_items": 100}, "models": [
        {"name": "a", "versions": [{"version": 1}]},
        {"name": "b", "versions": [{"version": 1}], "max_items": 7, "max_text_chars": 99}]})
    assert args.limits.max_items == 100 and args.models[0].max_items is None
    assert (args.models[1].max_items, args.models[1].max_text_chars) == (7, 99)
