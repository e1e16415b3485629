import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Serve's HTTP port in integration tests; set MAAS_TEST_HTTP_PORT to run two suites side by side.
HTTP_PORT = int(os.environ.get("MAAS_TEST_HTTP_PORT", "8000"))

# Shorten Ray's reaction times for tests (env vars are read when Ray starts; replicas and
# Train workers inherit them). Serve's autoscaler pushes metrics every 10 s by default.
TEST_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_DEDUP_LOGS": "1",
    # Ray exports metrics every 10 s by default (floored at 1 s); metrics tests poll for them.
    "RAY_metrics_report_interval_ms": "1000",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath)
        if "/tests/unit/" in path and not item.get_closest_marker("unit"):
            item.add_marker(pytest.mark.unit)
        if "/tests/integration/" in path and not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("gpu"):
            try:
                import torch

                has_gpu = torch.cuda.is_available()
            except ImportError:
                has_gpu = False
            if not has_gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
