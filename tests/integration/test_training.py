"""Real Ray Train DDP on CPU: train, export, parity, publish; fine-tune; survive a killed worker."""

import json
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

from maas_ray.registry import Registry
from maas_ray.runtime import create_session
from maas_ray.train import TrainConfig, train_and_publish
from maas_ray.train.data import load_splits

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_ddp_training_exports_passes_parity_and_publishes(trained, registry_root):
    first, second = trained
    assert first.test_accuracy >= 0.97, first
    assert first.parity_max_abs_diff <= 1e-4
    m = first.manifest
    assert (m.model, m.version) == ("digits", 1)
    assert [(t.name, t.datatype, t.shape) for t in m.inputs] == [("input", "FP32", [-1, 64])]
    assert m.preprocessor.name == "image" and m.postprocessor.params["labels"] == [str(i) for i in range(10)]
    assert m.training_config["num_workers"] == 2 and m.metrics["test_accuracy"] == first.test_accuracy

    # the published artifact itself classifies the held-out split as reported
    loaded = Registry(registry_root).load("digits", 1)
    ds = load_splits("digits", val_fraction=0.1, test_fraction=0.2, seed=0)
    session = create_session(loaded.model_bytes, device="cpu")
    logits = session.run(None, {"input": ds.x_test})[0]
    assert np.isclose((logits.argmax(1) == ds.y_test).mean(), first.test_accuracy, atol=1e-6)
    # the chosen checkpoint is the best on validation, and the manifest records the data
    assert first.val_accuracy == max(h["val_accuracy"] for h in first.history)
    assert m.dataset["rows"] == {"train": 1258, "validation": 180, "test": 359}
    assert sorted(m.files) == ["model_spec.json", "weights.safetensors"]


def test_fine_tune_records_parent(trained):
    _, second = trained
    assert second.manifest.version == 2
    assert second.manifest.parent is not None and second.manifest.parent.version == 1
    assert second.test_accuracy >= 0.97


def _train_workers() -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any("RayTrainWorker" in part for part in p.info["cmdline"] or []):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return procs


def _registered_checkpoints(run_dir) -> int:
    try:
        return len(json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return 0


def test_killed_worker_is_replaced_and_training_resumes_from_checkpoint(ray_cluster, tmp_path):
    runs = tmp_path / "runs"
    cfg = TrainConfig.load(
        "deployments/train/digits.yaml",
        model_name="digits-ft", storage_path=str(runs), run_name="killed", epochs=40, checkpoint_every=2,
    )
    reg = Registry(str(tmp_path / "registry"))
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(report=train_and_publish(cfg, reg)), daemon=True)
    thread.start()

    deadline = time.monotonic() + 180
    killed = None
    while time.monotonic() < deadline and thread.is_alive():
        # The controller lists every checkpoint it has registered in this snapshot file;
        # checkpoint directories on disk alone may not be registered yet.
        registered = _registered_checkpoints(runs / "killed") >= 2
        workers = _train_workers()
        if registered and len(workers) >= 2:
            killed = workers[-1].pid
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.1)
    assert killed is not None, "training finished or stalled before a worker could be killed"
    thread.join(timeout=300)
    report = outcome["report"]
    assert report.resumed_from_epoch > 0, "the replacement workers did not resume from a checkpoint"
    assert report.epochs_run == cfg.epochs - report.resumed_from_epoch
    assert report.test_accuracy >= 0.97
    assert reg.list_versions("digits-ft") == [1]


def test_training_on_users_own_npz_data(ray_cluster, tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=4.0, size=(3, 8))
    y = rng.integers(0, 3, size=600)
    x = centers[y] + rng.normal(size=(600, 8))
    labels = np.array(["cat", "dog", "eel"])[y]
    np.savez(tmp_path / "blobs.npz", x=x.astype(np.float32), y=labels)
    cfg = TrainConfig.load(
        None, model_name="blobs", data=str(tmp_path / "blobs.npz"), num_workers=1, cpus_per_worker=0.5,
        epochs=5, checkpoint_every=5, storage_path=str(tmp_path / "runs"),
    )
    report = train_and_publish(cfg, Registry(str(tmp_path / "reg")))
    m = report.manifest
    assert report.test_accuracy >= 0.9
    assert m.inputs[0].shape == [-1, 8] and m.preprocessor.name == "tensor"
    assert m.postprocessor.params["labels"] == ["cat", "dog", "eel"]
