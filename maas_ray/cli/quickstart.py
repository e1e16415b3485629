"""``maas quickstart``: train digits, publish two versions, serve them 90/10, answer requests."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import time
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np

from maas_ray.registry import Registry, default_root

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
TRAIN_CONFIG = REPO / "deployments" / "train" / "digits.yaml"
APP_CONFIG = REPO / "deployments" / "digits-cpu.yaml"


def _post(url: str, body: dict) -> tuple[dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read()), dict(r.headers)


def digit_png(pixels_0_16: np.ndarray, size: int = 32) -> str:
    """A scikit-learn digit (8x8, 0..16) as a base64 PNG of dark ink on white paper, size x size."""
    from PIL import Image

    grey = (255 - np.asarray(pixels_0_16).reshape(8, 8) * 255 / 16).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey, "L").resize((size, size), Image.NEAREST).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def run_quickstart(registry_root: Optional[str] = None, epochs: int = 30) -> int:
    import ray
    from ray import serve
    from sklearn.datasets import load_digits

    from maas_ray.serving import MaasClient
    from maas_ray.serving.deploy import deploy
    from maas_ray.train import TrainConfig, train_and_publish

    root = registry_root or default_root()
    os.environ["MAAS_REGISTRY_ROOT"] = root  # replicas inherit it: the app config names no root
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # per-epoch reports cost <=0.25 s
    reg = Registry(root)
    t0 = time.perf_counter()
    ray.init(logging_level=logging.WARNING)
    try:
        print(f"[1/4] training digits with Ray Train DDP (2 CPU workers, {epochs} epochs); registry {root}")
        first = train_and_publish(TrainConfig.load(str(TRAIN_CONFIG), epochs=epochs), reg)
        reg.set_alias("digits", "production", first.manifest.version)
        print(f"      published digits:{first.manifest.version} test_accuracy={first.test_accuracy:.4f} "
              f"parity_max_abs_diff={first.parity_max_abs_diff:.2e} -> alias production")
        print("[2/4] fine-tuning a candidate from it (8 epochs)")
        second = train_and_publish(
            TrainConfig.load(str(TRAIN_CONFIG), epochs=8, lr=1e-3, parent=f"digits:{first.manifest.version}"), reg
        )
        reg.set_alias("digits", "candidate", second.manifest.version)
        print(f"      published digits:{second.manifest.version} (parent {first.manifest.version}) "
              f"test_accuracy={second.test_accuracy:.4f} -> alias candidate")

        print(f"[3/4] serving {APP_CONFIG.relative_to(REPO)}: production 90% / candidate 10%")
        deploy(APP_CONFIG)
        x, y = load_digits(return_X_y=True)
        base = "http://127.0.0.1:8000"
        body = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [3],
                            "data": [digit_png(x[i]) for i in (-1, -2, -3)]}]}
        res, headers = _post(f"{base}/v2/models/digits/infer", body)
        labels = next(o["data"] for o in res["outputs"] if o["name"] == "label")
        print(f"[4/4] POST /v2/models/digits/infer (3 PNG digits) -> labels {labels} "
              f"(true {[int(y[i]) for i in (-1, -2, -3)]}), served by version {headers.get('x-model-version')}")
        res, _ = _post(f"{base}/v1/models/digits:predict", {"instances": x[:2].tolist()})
        print(f"      POST /v1/models/digits:predict (2 pixel arrays) -> {[p['label'] for p in res['predictions']]}"
              f" (true {y[:2].tolist()})")
        res = MaasClient("digits").infer("digits", {"input": x[:1].astype(np.float32)}, version="candidate")
        print(f"      Python handle, pinned to candidate -> label {MaasClient.output(res, 'label').tolist()} "
              f"from version {res['model_version']}")
        print(f"done in {time.perf_counter() - t0:.0f}s. Keep it running with: serve run {APP_CONFIG.relative_to(REPO)}")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
