"""Payload logging: a model's requests and/or responses, redacted, written off the request path.

Opt-in per model (``models[].payload_log``). The request path only samples and appends a
reference to the tensors to a bounded deque (no copy, no serialisation, no lock, no thread
wake-up: about a microsecond); one daemon thread per logger drains it every ``flush_interval_s``,
redacts, serialises and writes the events in one batch. A full queue or a failing sink
drops events and counts them (``maas_payload_log_dropped``); it never slows or fails a request.

What an event holds: the tensors (inputs or outputs, OIP v2 JSON form), the model, version,
request id, protocol and status. Never headers, so never an API key.

Events are CloudEvents 1.0, as KServe's payload logger sends them: type
``org.kubeflow.serving.inference.request`` / ``.response``, ``id`` = the request id (the
request and its response share it), ``source``, ``time``, and the extensions
``inferenceservicename`` (the model), ``component``, ``endpoint`` (the app). Sinks:

- ``file:///dir``: structured-mode JSON, one event per line, in ``dir/<model>-<pid>.jsonl``
  (one file per replica process), rotated at ``max_bytes`` keeping ``backups`` old files;
- ``http(s)://endpoint``: binary-mode HTTP POSTs (``ce-*`` headers, the data as the JSON
  body), what KServe's logger, Knative brokers and KServe-compatible log consumers expect.
"""

from __future__ import annotations

import base64
import datetime as _dt
import logging
import os
import random
import re
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable, Literal, Optional
from urllib.parse import urlparse

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

logger = logging.getLogger(__name__)

__all__ = ["PayloadLogConfig", "RedactConfig", "PayloadLogger", "REQUEST_TYPE", "RESPONSE_TYPE"]

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
MASK = "***"
_MIB = 1 << 20


class RedactConfig(BaseModel):
    """Field-level redaction, applied in the logger's thread before anything is written."""

    model_config = ConfigDict(extra="forbid")

    drop: list[str] = Field(default_factory=list, description="Input/output names left out of the event.")
    mask: list[str] = Field(
        default_factory=list, description="Input/output names whose values are replaced by \"***\" (shape kept).")
    patterns: list[str] = Field(
        default_factory=list,
        description="Regular expressions over string values (BYTES tensors): every match becomes \"***\".",
    )

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"redact.patterns: {pattern!r} is not a regular expression: {exc}") from exc
        return v


class PayloadLogConfig(BaseModel):
    """``models[].payload_log``: what to log, how much, and where."""

    model_config = ConfigDict(extra="forbid")

    sink: str = Field(
        description="file:///dir (JSONL, rotated by size) or http(s)://endpoint (CloudEvents POSTs).")
    mode: Literal["all", "request", "response"] = Field(
        default="all", description="all: the request and its response; request or response: only that one.")
    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0, description="Share of requests logged, 0..1.")
    redact: RedactConfig = Field(default_factory=RedactConfig, description="Fields to drop or mask.")
    max_bytes: int = Field(default=64 * _MIB, ge=1024, description="file sink: rotate a file past this size.")
    backups: int = Field(default=5, ge=0, description="file sink: rotated files kept (<file>.1 .. .N).")
    queue_size: int = Field(
        default=10_000, ge=1, description="Requests waiting to be written; beyond it events are dropped (counted).")
    timeout_s: float = Field(default=5.0, gt=0, description="http sink: per-POST timeout.")
    flush_interval_s: float = Field(
        default=0.1, gt=0, le=60, description="How often the logger's thread writes what is queued.")

    @field_validator("sink")
    @classmethod
    def _sink(cls, v: str) -> str:
        parsed = urlparse(v)
        if parsed.scheme == "file":
            if not parsed.path or parsed.netloc:
                raise ValueError(f"sink {v!r}: write file:///absolute/dir (three slashes)")
        elif parsed.scheme in ("http", "https"):
            if not parsed.netloc:
                raise ValueError(f"sink {v!r}: no host")
        else:
            raise ValueError(f"sink {v!r}: expected file:///dir or http(s)://endpoint")
        return v


# ---- serialisation (the logger's thread only) ------------------------------------------
def _datatype(arr: np.ndarray) -> str:
    from maas_ray.registry.manifest import NUMPY_TO_OIP

    return "BYTES" if arr.dtype.kind in "OSU" else NUMPY_TO_OIP.get(arr.dtype, arr.dtype.name.upper())


def _text(item: Any) -> Any:
    if isinstance(item, (bytes, bytearray, memoryview)):
        raw = bytes(item)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(raw).decode()}
    return item


def tensor_json(name: str, arr: Any, redact: RedactConfig, patterns: list[re.Pattern]) -> Optional[dict[str, Any]]:
    """One tensor in OIP v2 JSON form, redacted; None if dropped."""
    if name in redact.drop:
        return None
    arr = np.asarray(arr)
    out: dict[str, Any] = {"name": name, "datatype": _datatype(arr), "shape": list(arr.shape)}
    if name in redact.mask:
        out["data"] = MASK
        return out
    if arr.dtype.kind in "OSU":
        data = [_text(x) for x in arr.reshape(-1).tolist()]
        if patterns:
            for pattern in patterns:
                data = [pattern.sub(MASK, x) if isinstance(x, str) else x for x in data]
    else:
        data = arr.reshape(-1).tolist()
    out["data"] = data
    return out


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# ---- sinks -----------------------------------------------------------------------------
class FileSink:
    """JSONL in ``dir/<name>.jsonl``, rotated by size like logging's RotatingFileHandler."""

    def __init__(self, directory: str, name: str, max_bytes: int, backups: int) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{name}.jsonl"
        self.max_bytes, self.backups = max_bytes, backups
        self._file = open(self.path, "ab")  # noqa: SIM115 - kept open for the logger's life
        self._size = self._file.tell()

    def write(self, events: list[dict[str, Any]]) -> None:
        import orjson

        for event in events:
            line = orjson.dumps(event) + b"\n"
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            self._file.write(line)
            self._size += len(line)
        self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._size = 0

    def close(self) -> None:
        self._file.close()


class HttpSink:
    """CloudEvents in binary mode: ``ce-*`` headers, the event's data as a JSON body."""

    def __init__(self, url: str, timeout_s: float) -> None:
        import httpx

        self.url = url
        self.client = httpx.Client(timeout=timeout_s)

    def write(self, events: list[dict[str, Any]]) -> None:
        import orjson

        for event in events:
            headers = {f"ce-{k}": str(v) for k, v in event.items() if k not in ("data", "datacontenttype")}
            headers["content-type"] = event["datacontenttype"]
            response = self.client.post(self.url, content=orjson.dumps(event["data"]), headers=headers)
            response.raise_for_status()

    def close(self) -> None:
        self.client.close()


# ---- the logger --------------------------------------------------------------------------
class PayloadLogger:
    """One model's payload logger: :meth:`log` on the request path, a thread for the rest.

    Args:
        model: the model name (the events' ``inferenceservicename``).
        config: what and where.
        app: the Serve app name (the events' ``endpoint`` extension).
        on_drop: called with a count when events are dropped (the metric).
        sink: a sink object (``write(events)``, ``close()``) instead of the configured one; tests.
    """

    def __init__(self, model: str, config: PayloadLogConfig, *, app: str = "", on_drop: Optional[Callable[[int], None]]
                 = None, sink: Any = None) -> None:
        self.model, self.config, self.app = model, config, app
        self.on_drop = on_drop
        self.log_request = config.mode in ("all", "request")
        self.log_response = config.mode in ("all", "response")
        self.sample_rate = config.sample_rate
        self.patterns = [re.compile(p) for p in config.redact.patterns]
        self.source = f"maas-ray/{app or '-'}/{model}"
        self.queue: deque = deque()  # append/popleft are atomic: no lock on the request path
        self.queue_size = config.queue_size
        self.dropped = 0
        self.written = 0
        self._sink = sink
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_warning = 0.0

    # ---- request path ------------------------------------------------------------------
    def log(self, request_id: Optional[str], version: Optional[int], protocol: Optional[str],
            inputs: Optional[dict[str, Any]], outputs: Optional[dict[str, Any]], status: int = 200) -> None:
        """Queue one request's event(s); never blocks, never raises. The tensors are not copied:
        callers pass arrays nothing writes to afterwards (decoded inputs, fresh outputs)."""
        if self.sample_rate < 1.0 and random.random() >= self.sample_rate:
            return
        if self._thread is None:
            self._start()
        if len(self.queue) >= self.queue_size:
            self._drop(1, "queue full")
            return
        # CloudEvents ids must be unique per source: handle calls carry no request id
        self.queue.append((request_id or uuid.uuid4().hex, version, protocol, inputs, outputs, status, time.time()))

    # ---- the logger's thread -------------------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name=f"maas-payload-log-{self.model}",
                                                daemon=True)
                self._thread.start()

    def _open_sink(self) -> Any:
        sink = self.config.sink
        if sink.startswith("file:"):
            return FileSink(urlparse(sink).path, f"{self.model}-{os.getpid()}", self.config.max_bytes,
                            self.config.backups)
        return HttpSink(sink, self.config.timeout_s)

    def _drain(self) -> None:
        stopping = False
        while not stopping:
            stopping = self._stop.wait(self.config.flush_interval_s)
            while self.queue:
                events: list[dict[str, Any]] = []
                while self.queue and len(events) < 1000:
                    events += self.events(*self.queue.popleft())
                self._write(events)
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def _write(self, events: list[dict[str, Any]]) -> None:
        try:
            if self._sink is None:
                self._sink = self._open_sink()
            self._sink.write(events)
            self.written += len(events)
        except Exception as exc:  # noqa: BLE001 - a failing sink drops events, never the replica
            self._drop(len(events), f"sink failed: {type(exc).__name__}: {exc}")

    def events(self, request_id: Optional[str], version: Optional[int], protocol: Optional[str],
               inputs: Optional[dict[str, Any]], outputs: Optional[dict[str, Any]], status: int,
               ts: float) -> list[dict[str, Any]]:
        """The CloudEvents (structured form) of one logged request."""
        base = {
            "specversion": "1.0",
            "source": self.source,
            "id": request_id or "-",
            "time": _iso(ts),
            "datacontenttype": "application/json",
            "inferenceservicename": self.model,
            "component": "predictor",
            "endpoint": self.app,
        }
        params = {"protocol": protocol or "-", "status": status}
        out = []
        redact, patterns = self.config.redact, self.patterns
        if self.log_request and inputs is not None:
            tensors = [t for n, a in inputs.items() if (t := tensor_json(n, a, redact, patterns)) is not None]
            out.append({**base, "type": REQUEST_TYPE,
                        "data": {"id": request_id, "parameters": params, "inputs": tensors}})
        if self.log_response and outputs is not None:
            tensors = [t for n, a in outputs.items() if (t := tensor_json(n, a, redact, patterns)) is not None]
            out.append({**base, "type": RESPONSE_TYPE,
                        "data": {"id": request_id, "model_name": self.model,
                                 "model_version": None if version is None else str(version),
                                 "parameters": params, "outputs": tensors}})
        return out

    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        if self.on_drop is not None:
            try:
                self.on_drop(n)
            except Exception:  # noqa: BLE001 - counting must not fail the caller
                pass
        now = time.monotonic()
        if now - self._last_warning > 10.0:
            self._last_warning = now
            logger.warning("payload log of %s: dropped %d event(s) (%s); %d dropped so far",
                           self.model, n, why, self.dropped)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then stop the thread (tests and replica shutdown)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout_s)
        self._thread = None
        self._stop = threading.Event()
