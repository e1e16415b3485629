"""The per-worker training loop that Ray Train runs on every DDP worker."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from maas_ray.train.config import TrainConfig
from maas_ray.train.data import DataSpec, _import
from maas_ray.train.model import build_model

logger = logging.getLogger(__name__)
STATE_FILE = "state.pt"


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Share of correct argmax predictions, in batches (the validation set may be large)."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i : i + batch_size]).argmax(dim=1) == y[i : i + batch_size]).sum().item()
    return correct / max(1, len(x))


def load_state(path: str) -> dict[str, Any]:
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """None (full fp32), bf16 or fp16: mixed precision only on CUDA."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warm-up to the peak LR, then cosine decay to 0 (per optimizer step)."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


@dataclass(frozen=True)
class Task:
    """What the loop trains: how to build the model from the spec, the loss, and the validation
    metric that selects checkpoints. The loop config names it by import path (``"task"``)."""

    config_cls: type  # the pydantic config the loop config's "train_config" validates as
    build: Callable[[dict[str, Any]], nn.Module]  # model_spec -> model
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (model output, targets) -> mean loss
    metric: str  # reported, checkpointed and selected on
    higher_is_better: bool
    # (model, x_val, y_val, rank, world) -> {metric: value, ...}; the same value on every worker
    evaluate: Callable[[nn.Module, torch.Tensor, torch.Tensor, int, int], dict[str, float]]
    # Ray Data shards: (model, this worker's validation batches (x, y) on device, device, world) ->
    # the same metrics as evaluate, from sums over the shard all-reduced; None: in-memory data only
    evaluate_stream: Optional[Callable[[nn.Module, Iterable[tuple[torch.Tensor, torch.Tensor]], torch.device, int], dict[str, float]]] = None
    eval_batch_size: int = 1024  # validation rows per forward pass on a shard


def _build_classifier(spec: dict[str, Any]) -> nn.Module:
    return build_model(spec["model"], spec["model_args"], DataSpec.from_dict(spec["data"]), probe=False)


def _evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int, world: int) -> dict[str, float]:
    return {"val_accuracy": accuracy(model, x, y)}  # every worker: the same value, the same stop


@torch.no_grad()
def _evaluate_classifier_stream(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                                device: torch.device, world: int) -> dict[str, float]:
    model.eval()
    counts = torch.zeros(2, device=device)  # (correct, seen) on this worker's shard
    for x, y in batches:
        counts += torch.stack([(model(x).argmax(1) == y).sum().float(), torch.tensor(float(len(y)), device=device)])
    if world > 1:
        torch.distributed.all_reduce(counts)
    return {"val_accuracy": (counts[0] / counts[1].clamp(min=1)).item()}


CLASSIFY = Task(TrainConfig, _build_classifier, nn.CrossEntropyLoss(), "val_accuracy", True, _evaluate_classifier,
                _evaluate_classifier_stream)


def resolve_task(path: Optional[str]) -> Task:
    """The task a loop config names ('package.module:NAME'); None = classification."""
    return CLASSIFY if path is None else _import(path, "training task")


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Train with DDP; select on the task's validation metric; checkpoint from rank 0; resume."""
    import ray
    import ray.train
    import ray.train.torch

    task = resolve_task(loop_config.get("task"))
    cfg = task.config_cls.model_validate(loop_config["train_config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Progress goes to the driver through this queue (one line per epoch there); worker
    # stdout reaches the console only in verbose runs (ray.init(log_to_driver=...)).
    progress = loop_config.get("progress")
    torch.manual_seed(cfg.seed)
    streamed = loop_config["splits"] is None  # Ray Data shards instead of in-memory arrays
    splits = None if streamed else ray.get(loop_config["splits"])  # the driver loaded the data once
    model = task.build(loop_config["model_spec"])
    if loop_config.get("init_state") is not None:  # fine-tuning from a published parent
        model.load_state_dict(ray.get(loop_config["init_state"]))

    start_epoch, saved = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            saved = load_state(path)
        model.load_state_dict(saved["model"])
        start_epoch = saved["epoch"] + 1
        logger.info("resuming from checkpoint after epoch %d", saved["epoch"])

    model = ray.train.torch.prepare_model(model)  # DDP across workers, moved to the device
    device = ray.train.torch.get_device()
    bare = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if streamed:
        if task.evaluate_stream is None:
            raise ValueError(f"task {loop_config.get('task')!r} has no evaluate_stream: it cannot read Ray Data shards")
        # streaming_split(equal=True) gives every worker rows // world rows (the remainder is
        # dropped), so every worker runs the same number of batches and DDP steps stay in lockstep
        rows_per_worker = loop_config["rows"]["train"] // world
        batches_per_epoch = math.ceil(rows_per_worker / cfg.batch_size)  # for the LR schedule only

        def train_batches(epoch: int):
            shard = ray.train.get_dataset_shard("train")
            for b in shard.iter_torch_batches(batch_size=cfg.batch_size, device=device, local_shuffle_buffer_size=4 * cfg.batch_size, local_shuffle_seed=cfg.seed + epoch):
                yield b["x"], b["y"]

        def val_metrics() -> dict[str, float]:
            shard = ray.train.get_dataset_shard("validation")
            batches = ((b["x"], b["y"]) for b in shard.iter_torch_batches(batch_size=task.eval_batch_size, device=device))
            return task.evaluate_stream(bare, batches, device, world)
    else:
        loader = DataLoader(
            # Object-store arrays are read-only; torch wants writable memory for its tensors.
            TensorDataset(torch.tensor(splits.x_train), torch.tensor(splits.y_train)),
            batch_size=cfg.batch_size,
            shuffle=True,
        )
        loader = ray.train.torch.prepare_data_loader(loader)  # adds a DistributedSampler
        batches_per_epoch = len(loader)
        x_val = torch.tensor(splits.x_val, device=device)
        y_val = torch.tensor(splits.y_val, device=device)

        def train_batches(epoch: int):
            if world > 1:
                loader.sampler.set_epoch(epoch)
            yield from loader

        def val_metrics() -> dict[str, float]:
            return task.evaluate(bare, x_val, y_val, rank, world)

    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum_steps)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, int(cfg.warmup_fraction * total_steps))
    )
    amp = autocast_dtype(cfg.mixed_precision, device)
    # fp16 needs loss scaling against underflow; bf16 has fp32's range and does not.
    scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)
    best_val, bad_epochs = (-1.0 if task.higher_is_better else math.inf), 0
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        best_val, bad_epochs = saved["best_val"], saved["bad_epochs"]
    loss_fn = task.loss

    history: list[dict[str, float]] = []
    t_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        # (samples/s below counts the training pass only, not validation)
        model.train()
        loss_sum = torch.zeros(2, device=device)  # (sum of losses, sample count)
        optimizer.zero_grad(set_to_none=True)
        for i, (xb, yb) in enumerate(train_batches(epoch)):
            last_micro = (i + 1) % cfg.grad_accum_steps == 0 or i + 1 == batches_per_epoch
            # DDP all-reduces gradients on every backward; skip it on the micro-steps
            # whose gradients are only accumulated.
            sync = contextlib.nullcontext() if last_micro or world == 1 else model.no_sync()
            with sync, torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = loss_fn(model(xb), yb)
                scaler.scale(loss / cfg.grad_accum_steps).backward()
            loss_sum += torch.stack([loss.detach().float() * len(yb), torch.tensor(float(len(yb)), device=device)])
            if last_micro:
                if cfg.grad_clip_norm is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
        if world > 1:
            torch.distributed.all_reduce(loss_sum)
        train_seconds = time.perf_counter() - t0
        val = val_metrics()
        val_acc = val[task.metric]
        improved = val_acc > best_val if task.higher_is_better else val_acc < best_val
        best_val, bad_epochs = (val_acc, 0) if improved else (best_val, bad_epochs + 1)
        stop = cfg.patience is not None and bad_epochs >= cfg.patience
        metrics = {
            "epoch": epoch,
            "train_loss": (loss_sum[0] / loss_sum[1]).item(),
            **val,
            "samples_per_s": loss_sum[1].item() / train_seconds,
            "train_samples": loss_sum[1].item(),  # all workers' rows this epoch
            "data_streamed": float(streamed),  # 1.0: the rows came from Ray Data shards
            "epoch_seconds": time.perf_counter() - t0,
            "resumed_from_epoch": start_epoch,
        }
        history.append(metrics)
        if rank == 0 and progress is not None:
            progress.put({**metrics, "epochs": cfg.epochs, "improved": improved, "elapsed_s": time.perf_counter() - t_start})
        save = improved or (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs or stop
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0 and save:
                torch.save(
                    {
                        "model": {k: v.cpu() for k, v in bare.state_dict().items()},
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "epoch": epoch,
                        task.metric: val_acc,
                        "best_val": best_val,
                        "bad_epochs": bad_epochs,
                    },
                    os.path.join(tmp, STATE_FILE),
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        if stop:
            logger.info("early stop: no better %s for %d epochs (best %.4f)", task.metric, bad_epochs, best_val)
            break
    return {"history": history, "start_epoch": start_epoch}
