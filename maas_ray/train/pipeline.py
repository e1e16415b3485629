"""spec + data -> DDP training -> best checkpoint on validation -> test once -> ONNX export
-> parity check -> publish (ONNX, weights, model spec, tokenizer)."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from maas_ray.errors import ConfigError, IntegrityError, TrainingError
from maas_ray.registry import ONNX_EXTERNAL_DATA, ExtraFile, Manifest, ParentRef, ProcessorSpec, Registry
from maas_ray.train.config import TrainConfig
from maas_ray.train.data import load_splits, stream_splits, use_ray_data
from maas_ray.train.export import EXTERNAL_DATA_FILE, export_onnx, parity_check
from maas_ray.train.loop import accuracy, load_state, train_loop_per_worker
from maas_ray.train.model import build_model

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "model_spec.json"
TOKENIZER_FILE = "tokenizer.json"

# How sklearn's digits look to the served image preprocessor: 8x8 grey, ink bright,
# raw arrays in the dataset's 0..16 units; PNG/JPEG digits are dark ink on white.
DIGITS_PREPROCESSOR = ProcessorSpec(
    name="image",
    params={"height": 8, "width": 8, "channels": 1, "pixel_max": 16.0, "invert_encoded": True},
)


class TrainReport(BaseModel):
    """What a training run produced and measured."""

    model_config = ConfigDict(protected_namespaces=())

    manifest: Manifest = Field(description="The published version.")
    test_accuracy: float = Field(description="On the test split, once, with the chosen checkpoint.")
    val_accuracy: float = Field(description="Validation accuracy of the chosen checkpoint.")
    best_epoch: int = Field(description="Epoch (0-based) of the chosen checkpoint.")
    history: list[dict[str, float]] = Field(description="Per-epoch metrics of the final worker group.")
    parity_max_abs_diff: float
    epochs_run: int = Field(description="Epochs run by the final (possibly restarted) worker group.")
    resumed_from_epoch: int = Field(description="0, or the epoch a restarted run resumed at.")
    mean_epoch_seconds: float
    wall_seconds: float
    checkpoint_path: str


def _cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    # Cloned, contiguous tensors: safetensors refuses tensors that share storage (tied weights).
    return save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()})


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def _processors(splits: Any, labels: list[str]) -> tuple[ProcessorSpec, ProcessorSpec]:
    post = ProcessorSpec(name="classification", params={"labels": labels, "top_k": 3})
    spec = splits.spec
    if splits.is_digits:
        return DIGITS_PREPROCESSOR, post
    if spec.kind == "image":
        c, h, w = spec.input_shape
        # Folder images were scaled by 1/255 in data.py; raw arrays are already in [0, 1].
        return ProcessorSpec(name="image", params={"height": h, "width": w, "channels": c, "pixel_max": 1.0}), post
    if spec.kind == "text":
        return ProcessorSpec(name="text", params={"tokenizer_file": TOKENIZER_FILE, "max_seq_len": spec.input_shape[0]}), post
    return ProcessorSpec(name="tensor"), post


class _Parent:
    """A published version to fine-tune from: its ref, weights, spec and tokenizer."""

    def __init__(self, registry: Registry, ref: str) -> None:
        model, version = ref.split(":")
        manifest = registry.describe(model, version)
        if WEIGHTS_FILE not in manifest.files or SPEC_FILE not in manifest.files:
            raise ConfigError(
                f"cannot fine-tune from {model}:{manifest.version}: it has no {WEIGHTS_FILE}/{SPEC_FILE} "
                "(published by an older maas_ray or from a bare ONNX file)"
            )
        names = [WEIGHTS_FILE, SPEC_FILE] + ([TOKENIZER_FILE] if TOKENIZER_FILE in manifest.files else [])
        loaded = registry.load(model, manifest.version, files=names)  # checksums verified
        self.ref = ParentRef(model=model, version=manifest.version)
        self.spec = json.loads(loaded.files[SPEC_FILE])
        try:
            self.state = state_from_bytes(loaded.files[WEIGHTS_FILE])
        except Exception as exc:  # safetensors raises its own error types
            raise IntegrityError(f"{model}:{manifest.version}: cannot read {WEIGHTS_FILE}: {exc}") from exc
        self.tokenizer_json = loaded.files[TOKENIZER_FILE].decode() if TOKENIZER_FILE in loaded.files else None
        self.val_accuracy = manifest.metrics.get("val_accuracy")


def format_epoch(m: dict[str, Any]) -> str:
    """One console line per epoch: train loss, validation accuracy (* = best so far), speed, time."""
    return (
        f"epoch {m['epoch'] + 1:3d}/{m['epochs']}  train_loss {m['train_loss']:.4f}  "
        f"val_acc {m['val_accuracy']:.4f}{' *' if m['improved'] else '  '}  "
        f"{m['samples_per_s']:8.0f} samples/s  {m['elapsed_s']:6.1f}s"
    )


def _fit_with_progress(trainer: Any, on_epoch: Callable[[dict[str, Any]], None], progress: Any) -> Any:
    """trainer.fit() in a thread while this thread relays rank 0's per-epoch metrics."""
    out: dict[str, Any] = {}

    def fit() -> None:
        try:
            out["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=fit, name="maas-train-fit", daemon=True)
    thread.start()
    while thread.is_alive() or not progress.empty():
        try:
            on_epoch(progress.get(timeout=0.2))
        except Exception:  # queue.Empty, or the queue actor gone at shutdown
            if not thread.is_alive():
                break
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["result"]


def train_and_publish(
    cfg: TrainConfig,
    registry: Optional[Registry] = None,
    *,
    on_epoch: Optional[Callable[[dict[str, Any]], None]] = None,
    ray_init: Optional[dict[str, Any]] = None,
) -> TrainReport:
    """Run DDP training on the connected Ray cluster (started locally if none) and publish.

    ``on_epoch`` gets rank 0's metrics after every epoch (:func:`format_epoch` makes the
    console line); by default they are logged at INFO. ``ray_init``: ``ray.init`` options
    used if Ray is not initialized yet (it is started only once the spec and data are valid).

    Everything that can be wrong with the spec or the data (bad import path, a factory that
    raises or returns the wrong shape, a data file without labels, a corrupt parent) fails
    here, on the driver, before any worker starts.
    """
    import ray
    from ray.util.queue import Queue
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    registry = registry or Registry()
    parent = _Parent(registry, cfg.parent) if cfg.parent else None
    model_name, model_args = cfg.model, cfg.model_args
    if parent is not None:  # fine-tuning keeps the parent's architecture and tokenizer
        model_name, model_args = parent.spec["model"], parent.spec["model_args"]
        if (cfg.model, cfg.model_args) != (model_name, model_args):
            logger.warning("fine-tuning uses the parent's model %s %s, not %s %s", model_name, model_args, cfg.model, cfg.model_args)
    streamed = use_ray_data(cfg.data, cfg.data_loading, cfg.ray_data_threshold_bytes)
    if streamed:
        if parent is not None and parent.tokenizer_json:
            raise ConfigError("data_loading 'ray_data' reads feature columns; the parent is a text model")
        if not ray.is_initialized():
            ray.init(**(ray_init or {}))  # Ray Data needs Ray to read the file; no workers yet
        splits: Any = stream_splits(cfg.data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)
    else:
        splits = load_splits(
            cfg.data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed,
            vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len,
            tokenizer_json=parent.tokenizer_json if parent else None,
        )
    labels = cfg.class_labels or splits.class_labels
    if len(labels) != splits.spec.num_classes:
        raise ConfigError(f"class_labels has {len(labels)} names for {splits.spec.num_classes} classes")
    if parent is not None and parent.spec.get("class_labels") not in (None, labels):
        raise ConfigError(
            f"cannot fine-tune {parent.ref.model}:{parent.ref.version} on this data: its classes are "
            f"{parent.spec['class_labels']}, the data's are {labels}"
        )
    torch.manual_seed(cfg.seed)
    probe = build_model(model_name, model_args, splits.spec)  # fails here, before any worker
    if parent is not None:
        try:
            probe.load_state_dict(parent.state)
        except RuntimeError as exc:
            raise ConfigError(f"parent weights do not fit {model_name} {model_args}: {exc}") from exc
    spec_doc = {"model": model_name, "model_args": model_args, "data": splits.spec.as_dict(), "class_labels": labels}

    if not ray.is_initialized():
        ray.init(**(ray_init or {}))
    logger.info("data %s: %s", cfg.data, "streamed with Ray Data" if streamed else "in memory (object store)")
    use_gpu = _cluster_has_gpu() if cfg.use_gpu is None else cfg.use_gpu
    loop_config: dict[str, Any] = {
        "train_config": cfg.model_dump(),
        "model_spec": spec_doc,
        # small data: one copy in the object store, read by every worker; large: Ray Data shards
        "splits": None if streamed else ray.put(splits),
        "rows": splits.identity["rows"],
        "init_state": ray.put(parent.state) if parent else None,
        "progress": Queue(),
    }
    run_name = cfg.run_name or f"{cfg.model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        datasets={"train": splits.datasets["train"], "validation": splits.datasets["validation"]} if streamed else None,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute="val_accuracy",
                checkpoint_score_order="max",
            ),
            logging_config=LoggingConfig(log_level="WARNING"),  # our loop logs progress itself
        ),
    )
    logger.info(
        "training %s (%s): %d %s workers, run %s", cfg.model_name, model_name, cfg.num_workers,
        "GPU" if use_gpu else "CPU", run_name,
    )
    t0 = time.perf_counter()
    result = _fit_with_progress(
        trainer, on_epoch or (lambda m: logger.info("%s", format_epoch(m))), loop_config["progress"]
    )
    ray.kill(loop_config["progress"].actor)
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise TrainingError(f"training failed: {result.error}") from result.error
    best = result.get_best_checkpoint("val_accuracy", "max") or result.checkpoint
    if best is None:
        raise TrainingError("training produced no checkpoint")
    with best.as_directory() as path:
        state = load_state(path)

    model = build_model(model_name, model_args, splits.spec, probe=False)
    model.load_state_dict(state["model"])
    if streamed:  # batch by batch: the test split is never collected on the driver
        model.eval()
        correct = seen = 0
        with torch.no_grad():
            for b in splits.datasets["test"].iter_torch_batches(batch_size=1024):
                correct += int((model(b["x"]).argmax(1) == b["y"]).sum())
                seen += len(b["y"])
        test_acc = correct / max(1, seen)
        x_parity = splits.datasets["validation"].take_batch(512)["x"].astype(np.float32)
    else:
        test_acc = accuracy(model, torch.from_numpy(splits.x_test), torch.from_numpy(splits.y_test))  # once
        x_parity = splits.x_val
    if test_acc < cfg.min_test_accuracy:
        raise TrainingError(f"test accuracy {test_acc:.4f} is below min_test_accuracy {cfg.min_test_accuracy}")
    exported = export_onnx(model, splits.spec, external_data_threshold_bytes=cfg.external_data_threshold_bytes)
    diff = parity_check(model, exported, x_parity, cfg.parity_tolerance)

    files: dict[str, ExtraFile] = {
        WEIGHTS_FILE: ExtraFile(state_to_bytes(model.state_dict()), role="weights"),
        SPEC_FILE: ExtraFile(json.dumps(spec_doc, indent=2).encode(), role="model_spec"),
    }
    if getattr(splits, "tokenizer_json", None) is not None:
        files[TOKENIZER_FILE] = ExtraFile(splits.tokenizer_json.encode(), role="tokenizer")
    if exported.external_data is not None:
        files[EXTERNAL_DATA_FILE] = ExtraFile(exported.external_data, role=ONNX_EXTERNAL_DATA)
    pre, post = _processors(splits, labels)
    manifest = registry.publish(
        cfg.model_name,
        exported.model_bytes,
        preprocessor=pre,
        postprocessor=post,
        metrics={
            "test_accuracy": test_acc,
            "val_accuracy": float(state["val_accuracy"]),
            "parity_max_abs_diff": diff,
            "best_epoch": float(state["epoch"]),
        },
        training_config=cfg.model_dump(mode="json"),
        parent=parent.ref if parent else None,
        description=f"{model_name} {model_args} trained on {cfg.data}",
        files=files,
        model_spec={"model": model_name, "model_args": model_args},
        dataset=splits.identity,
    )
    ret = result.return_value or {}
    history = ret.get("history", [])
    epoch_seconds = [h["epoch_seconds"] for h in history] or [float("nan")]
    return TrainReport(
        manifest=manifest,
        test_accuracy=test_acc,
        val_accuracy=float(state["val_accuracy"]),
        best_epoch=int(state["epoch"]),
        history=history,
        parity_max_abs_diff=diff,
        epochs_run=len(history),
        resumed_from_epoch=int(ret.get("start_epoch", 0)),
        mean_epoch_seconds=float(np.mean(epoch_seconds)),
        wall_seconds=wall,
        checkpoint_path=best.path,
    )

