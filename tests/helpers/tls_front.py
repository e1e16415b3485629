"""``maas tls-front`` as a user runs it (the real CLI in a subprocess, the real HAProxy), and a
tiny HTTP backend that answers with the request headers it received, to see what the front
forwards."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def tls_front(*flags: str, ports: tuple[int, ...], timeout_s: float = 30.0) -> Iterator[subprocess.Popen]:
    """``python -m maas_ray.cli tls-front <flags>`` until every port in ``ports`` accepts; on exit
    SIGTERM, and check that the command exited 0 and left no HAProxy behind."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "maas_ray.cli", "tls-front", *flags])
    try:
        deadline = time.monotonic() + timeout_s
        while not all(_listening(p) for p in ports):
            assert proc.poll() is None, f"maas tls-front exited {proc.returncode}"
            assert time.monotonic() < deadline, f"maas tls-front did not listen on {ports} in {timeout_s}s"
            time.sleep(0.1)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert [c.name() for c in children] == ["haproxy"], children
        yield proc
    finally:
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            for p in [proc, *children]:
                p.kill()
            raise
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"HAProxy left behind: {alive}"
    assert rc == 0, f"maas tls-front exited {rc} after SIGTERM"


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps({k.lower(): self.headers.get_all(k) for k in set(self.headers.keys())}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # the front closing its keep-alive: expected
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextmanager
def header_echo() -> Iterator[int]:
    """An HTTP/1.1 server on 127.0.0.1 answering every GET with ``{header: [values]}`` as it
    received them; yields its port."""
    server = _QuietServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
