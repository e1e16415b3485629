"""``maas quickstart [--model digits|cnn|text|lm]``: train, publish two versions (the second
fine-tuned from the first), serve them 90/10, answer requests; for ``lm``, train and publish a
language model, serve it and stream a completion and a chat answer."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from typing import Optional

import numpy as np
import yaml

from maas_ray.registry import Registry, default_root

logger = logging.getLogger(__name__)
# The YAMLs ship as package data (maas_ray/examples/, links to the repository's deployments/):
# found from a wheel too, not only from a source checkout.
EXAMPLES = resources.files("maas_ray.examples")


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


@dataclass(frozen=True)
class Demo:
    """One quickstart model: its training YAML, its app YAML, how to fine-tune and query it."""

    name: str  # registry model and Serve app
    title: str
    train_config: str
    app_config: str
    finetune: dict = field(default_factory=dict)


DEMOS = {
    "digits": Demo("digits", "digits", "digits.yaml", "digits-cpu.yaml", {"epochs": 8, "lr": 1e-3}),
    "cnn": Demo("digits-cnn", "a CNN on digit images", "cnn.yaml", "cnn-cpu.yaml", {"epochs": 4, "lr": 3e-4}),
    "text": Demo("text-order", "a text transformer on raw text", "text.yaml", "text-cpu.yaml", {"epochs": 3, "lr": 2e-4}),
}
TEXTS = ["the fox chased the owl near the barn", "owl saw cat", "the dog helped the big cat in the park"]


def _query_digits(base: str) -> None:
    from sklearn.datasets import load_digits

    from maas_ray.serving import MaasClient

    x, y = load_digits(return_X_y=True)
    body = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [3],
                        "data": [digit_png(x[i]) for i in (-1, -2, -3)]}]}
    res, headers = _post(f"{base}/v2/models/digits/infer", body)
    labels = next(o["data"] for o in res["outputs"] if o["name"] == "label")
    print(f"[4/4] POST /v2/models/digits/infer (3 PNG digits) -> labels {labels} "
          f"(true {[int(y[i]) for i in (-1, -2, -3)]}), served by version {headers.get('x-model-version')}")
    res, _ = _post(f"{base}/v1/models/digits:predict", {"instances": x[:2].tolist()})
    print(f"      POST /v1/models/digits:predict (2 pixel arrays) -> {[p['label'] for p in res['predictions']]}"
          f" (true {y[:2].tolist()})")
    with MaasClient("digits") as client:
        res = client.infer("digits", {"input": x[:1].astype(np.float32)}, version="candidate")
    print(f"      Python handle, pinned to candidate -> label {MaasClient.output(res, 'label').tolist()} "
          f"from version {res['model_version']}")


def _query_cnn(base: str) -> None:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    idx = (-1, -2, -3)
    # 8x8 PNGs: the CNN learned crisp 8x8 digits; a 32x32 PNG shrunk back by the preprocessor
    # is blurred, which it misreads more often than the MLP does (seen: an 8 read as 1).
    body = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [3], "data": [digit_png(x[i], size=8) for i in idx]}]}
    res, headers = _post(f"{base}/v2/models/digits-cnn/infer", body)
    labels = next(o["data"] for o in res["outputs"] if o["name"] == "label")
    print(f"[4/4] POST /v2/models/digits-cnn/infer (3 PNG digits) -> labels {labels} "
          f"(true {[int(y[i]) for i in idx]}), served by version {headers.get('x-model-version')}")
    res, headers = _post(f"{base}/v1/models/digits-cnn/versions/candidate:predict", {"instances": [{"b64": digit_png(x[0], size=8)}]})
    print(f"      POST /v1/models/digits-cnn/versions/candidate:predict (1 PNG) -> {[p['label'] for p in res['predictions']]}"
          f" (true {[int(y[0])]}), served by version {headers.get('x-model-version')}")


def _query_text(base: str) -> None:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]}
    res, headers = _post(f"{base}/v2/models/text-order/infer", body)
    labels = next(o["data"] for o in res["outputs"] if o["name"] == "label")
    print(f"[4/4] POST /v2/models/text-order/infer {TEXTS} -> labels {labels} "
          f"(true ['fox', 'owl', 'dog']), served by version {headers.get('x-model-version')}")
    res, headers = _post(f"{base}/v1/models/text-order/versions/candidate:predict", {"instances": ["a cat followed the dog"]})
    print(f"      POST /v1/models/text-order/versions/candidate:predict ['a cat followed the dog'] -> "
          f"{[p['label'] for p in res['predictions']]} (true ['cat']), served by version {headers.get('x-model-version')}")


QUERIES = {"digits": _query_digits, "cnn": _query_cnn, "text": _query_text}
LM_PROMPT = "the small cat"
LM_QUESTION = "what is the plural of mouse?"


def _stream(url: str, body: dict):
    """POST ``body`` and yield each server-sent event's JSON as it arrives (until ``[DONE]``)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        for raw in r:  # chunked: each event arrives as the engine makes its tokens
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return
            yield json.loads(line[len("data: "):])


def _query_lm(base: str) -> None:
    print(f"[4/4] POST /v1/completions (stream: true) {LM_PROMPT!r} -> ", end="", flush=True)
    t0, first, tokens, model = time.perf_counter(), None, 0, ""
    for event in _stream(f"{base}/v1/completions",
                         {"model": "lm", "prompt": LM_PROMPT, "max_tokens": 24, "temperature": 0, "stream": True}):
        text = event["choices"][0]["text"]
        if text:
            first = first or time.perf_counter() - t0
            tokens += 1
            print(text, end="", flush=True)
        model = event.get("model", model)
    print(f"\n      {tokens} chunks streamed by {model}, first after {1000 * (first or 0):.0f} ms")
    answer, _ = _post(f"{base}/v1/chat/completions", {
        "model": "lm", "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": LM_QUESTION}]})
    print(f"      POST /v1/chat/completions {LM_QUESTION!r} -> {answer['choices'][0]['message']['content']!r}")
    res, _ = _post(f"{base}/v2/models/lm/generate", {"text_input": "two old farmers", "max_tokens": 16, "temperature": 0})
    print(f"      POST /v2/models/lm/generate 'two old farmers' -> {res['text_output']!r} "
          f"(version {res['model_version']})")


def _run_lm(reg: Registry, root: str, epochs: Optional[int], port: int, t0: float) -> None:
    """Train and publish the reference language model, serve it, stream answers."""
    from maas_ray.serving.deploy import deploy
    from maas_ray.train.lm.config import LMTrainConfig
    from maas_ray.train.lm.pipeline import format_lm_epoch, train_and_publish_lm

    with resources.as_file(EXAMPLES / "train" / "lm.yaml") as path:
        cfg = LMTrainConfig.load(str(path), epochs=epochs)
    print(f"[1/4] training a GPT-2-style language model on the reference corpus with Ray Train DDP "
          f"({cfg.num_workers} CPU workers, {cfg.epochs} epochs); registry {root}")
    report = train_and_publish_lm(cfg, reg, on_epoch=lambda m: print(f"      {format_lm_epoch(m)}", flush=True))
    m = report.manifest
    reg.set_alias("lm", "production", m.version)
    print(f"      published lm:{m.version} (kind {m.kind}) test_perplexity={report.test_perplexity:.2f} "
          f"parity_max_abs_diff={report.parity_max_abs_diff:.2e} -> alias production")
    print("[2/4] greedy samples from the trained model:")
    for prompt, text in list(report.samples.items())[:2]:
        print(f"      {prompt!r} -> {text!r}")
    if report.scores:
        print("      held-out rules: " + "  ".join(f"{k}={v:.2f}" for k, v in report.scores.items()))
    print("[3/4] serving deployments/lm-cpu.yaml: continuous batching, OpenAI and OIP generate routes")
    app = yaml.safe_load((EXAMPLES / "lm-cpu.yaml").read_text())
    app["http_options"]["port"] = port
    deploy(app)
    _query_lm(f"http://127.0.0.1:{port}")
    print(f"done in {time.perf_counter() - t0:.0f}s. Keep it running with: serve run deployments/lm-cpu.yaml")


def _train_config(demo: Demo, **overrides):
    """The demo's training YAML (package data) as a TrainConfig, with ``overrides``."""
    from maas_ray.train import TrainConfig

    with resources.as_file(EXAMPLES / "train" / demo.train_config) as path:
        return TrainConfig.load(str(path), **overrides)


def run_quickstart(
    registry_root: Optional[str] = None,
    epochs: Optional[int] = None,
    model: str = "digits",
    verbose: bool = False,
    port: int = 8000,
) -> int:
    import ray
    from ray import serve

    from maas_ray.cli import ray_console_options
    from maas_ray.serving.deploy import deploy
    from maas_ray.train import train_and_publish
    from maas_ray.train.pipeline import format_epoch

    root = registry_root or default_root()
    os.environ["MAAS_REGISTRY_ROOT"] = root  # replicas inherit it: the app config names no root
    from maas_ray.runtime import quick_train_reports

    quick_train_reports()  # per-epoch reports cost <= 0.25 s; set before ray.init
    reg = Registry(root)
    t0 = time.perf_counter()
    ray.init(**ray_console_options(verbose))
    if not verbose:  # Serve's driver-side logger has its own handler: keep its INFO lines out
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    on_epoch = (lambda m: print(f"      {format_epoch(m)}", flush=True))
    try:
        if model == "lm":
            _run_lm(reg, root, epochs, port, t0)
            return 0
        demo = DEMOS[model]
        app_config = f"deployments/{demo.app_config}"  # what users `serve run` in a checkout (the same file)
        cfg = _train_config(demo, epochs=epochs)
        print(f"[1/4] training {demo.title} with Ray Train DDP ({cfg.num_workers} CPU workers, {cfg.epochs} epochs); "
              f"registry {root}")
        first = train_and_publish(cfg, reg, on_epoch=on_epoch)
        reg.set_alias(demo.name, "production", first.manifest.version)
        print(f"      published {demo.name}:{first.manifest.version} test_accuracy={first.test_accuracy:.4f} "
              f"parity_max_abs_diff={first.parity_max_abs_diff:.2e} -> alias production")
        print(f"[2/4] fine-tuning a candidate from it ({demo.finetune['epochs']} epochs)")
        second = train_and_publish(
            _train_config(demo, parent=f"{demo.name}:{first.manifest.version}", **demo.finetune),
            reg, on_epoch=on_epoch,
        )
        reg.set_alias(demo.name, "candidate", second.manifest.version)
        print(f"      published {demo.name}:{second.manifest.version} (parent {first.manifest.version}) "
              f"test_accuracy={second.test_accuracy:.4f} -> alias candidate")

        print(f"[3/4] serving {app_config}: production 90% / candidate 10%")
        app = yaml.safe_load((EXAMPLES / demo.app_config).read_text())
        app["http_options"]["port"] = port
        deploy(app)
        QUERIES[model](f"http://127.0.0.1:{port}")
        print(f"done in {time.perf_counter() - t0:.0f}s. Keep it running with: serve run {app_config}")
    finally:
        if os.environ.get("RAY_ADDRESS"):  # a cluster we joined: leave it without our app
            serve.shutdown()
        # A local Ray we started goes down whole; serve.shutdown() first would only add the
        # controller's shutdown-retry lines to the console.
        ray.shutdown()
    return 0
