"""A moto S3 server on loopback: the ``s3_endpoint`` fixture of tests/integration/conftest.py."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

BUCKET = "maas-test"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with one bucket (:data:`BUCKET`); yields ``host:port``.

    Sets fake credentials in the environment while it runs (pyarrow's ``from_uri`` reads them
    from there only) and restores it afterwards. Skips the test without ``moto[server]``.
    """
    import pyarrow.fs as pafs

    moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (dev extra)")
    with pytest.MonkeyPatch.context() as mp_env:
        for key, value in CREDENTIALS.items():
            mp_env.setenv(key, value)
        for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp_env.delenv(key, raising=False)  # a developer's real settings must not leak in
        port = _free_port()
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            endpoint = f"127.0.0.1:{port}"
            fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True)
            fs.create_dir(BUCKET)
            yield endpoint
        finally:
            server.stop()
