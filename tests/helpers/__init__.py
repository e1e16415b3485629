"""What the tests share (never a test module: test modules import only from here, the
library, and their conftest fixtures).

- :mod:`tests.helpers.models`: small real ONNX graphs built with onnx.helper (no torch)
- :mod:`tests.helpers.images`: digit PNGs as a client sends them
- :mod:`tests.helpers.load`: client load threads that stop however a test ends
- :mod:`tests.helpers.live`: the test cluster's settings and probes of a live Ray/Serve
- :mod:`tests.helpers.s3`: the moto S3 server behind ``tests/integration/conftest.py:s3_endpoint``
- :mod:`tests.helpers.tabular`: a small frame with categories and gaps, its column schema, a ZipMap ONNX
- :mod:`tests.helpers.lm`: a tiny published language model (``publish_tiny_lm``) and torch's greedy reference
- :mod:`tests.helpers.hostile_generate`: hostile bodies for the generative routes, with the status each must get
- :mod:`tests.helpers.tls` / :mod:`tests.helpers.tls_front`: a throwaway CA; the ``maas tls-front`` process
"""

from tests.helpers.images import digit_png, digit_png_bytes
from tests.helpers.live import (
    HTTP_PORT,
    TEST_ENV,
    create_key,
    replica_pids,
    scrape,
    wait_until,
)
from tests.helpers.load import background
from tests.helpers.models import fails_on_batches_onnx, linear_onnx, slow_onnx

__all__ = [
    "HTTP_PORT", "TEST_ENV", "background", "create_key", "digit_png", "digit_png_bytes", "fails_on_batches_onnx",
    "linear_onnx", "replica_pids", "scrape", "slow_onnx", "wait_until",
]
