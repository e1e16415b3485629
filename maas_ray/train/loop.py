"""The per-worker training loop that Ray Train runs on every DDP worker."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from maas_ray.train.config import TrainConfig
from maas_ray.train.data import load_dataset
from maas_ray.train.model import MLPClassifier

logger = logging.getLogger(__name__)
STATE_FILE = "state.pt"


def _progress_logger() -> logging.Logger:
    # Worker processes are entrypoints of their own: give progress lines a handler
    # so they reach the driver through Ray's log forwarding.
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def load_state(path: str) -> dict[str, Any]:
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Train with DDP; checkpoint every epoch from rank 0; resume from the last checkpoint."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(loop_config["train_config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    log = _progress_logger()
    torch.manual_seed(cfg.seed)
    ds = load_dataset(cfg.data, test_fraction=cfg.test_fraction, seed=cfg.seed)
    model_args = dict(
        num_features=ds.num_features,
        num_classes=len(ds.class_labels),
        hidden_sizes=cfg.hidden_sizes,
        dropout=cfg.dropout,
    )
    model = MLPClassifier(**model_args)
    if loop_config.get("init_state") is not None:  # fine-tuning from a published parent
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in loop_config["init_state"].items()})

    start_epoch, opt_state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            state = load_state(path)
        model.load_state_dict(state["model"])
        opt_state, start_epoch = state["optimizer"], state["epoch"] + 1
        if rank == 0:
            log.info("resuming from checkpoint after epoch %d", state["epoch"])

    model = ray.train.torch.prepare_model(model)  # DDP across workers, moved to the device
    device = ray.train.torch.get_device()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    # Cosine decay to 0 over the whole run; derived from the epoch so resuming needs no state.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + np.cos(np.pi * min(step, cfg.epochs) / cfg.epochs))
    )
    for _ in range(start_epoch):
        schedule.step()
    loader = DataLoader(
        TensorDataset(torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)),
        batch_size=cfg.batch_size,
        shuffle=True,
    )
    loader = ray.train.torch.prepare_data_loader(loader)  # adds a DistributedSampler
    x_test = torch.from_numpy(ds.x_test).to(device)
    y_test = torch.from_numpy(ds.y_test).to(device)
    loss_fn = nn.CrossEntropyLoss()
    bare = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    epoch_seconds = []
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        if world > 1:
            loader.sampler.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros(2, device=device)  # (sum of losses, sample count)
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            loss_sum += torch.stack([loss.detach() * len(yb), torch.tensor(float(len(yb)), device=device)])
        schedule.step()
        if world > 1:
            torch.distributed.all_reduce(loss_sum)
        metrics = {
            "epoch": epoch,
            "train_loss": (loss_sum[0] / loss_sum[1]).item(),
            "test_accuracy": accuracy(bare, x_test, y_test),
            "epoch_seconds": time.perf_counter() - t0,
            "resumed_from_epoch": start_epoch,
        }
        epoch_seconds.append(metrics["epoch_seconds"])
        save = (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs
        if rank == 0:
            log.info(
                "epoch %3d/%d  loss %.4f  test_acc %.4f  %.2fs",
                epoch + 1, cfg.epochs, metrics["train_loss"], metrics["test_accuracy"], metrics["epoch_seconds"],
            )
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0 and save:
                torch.save(
                    {
                        "model": {k: v.cpu() for k, v in bare.state_dict().items()},
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch,
                        "model_args": model_args,  # the checkpoint rebuilds its own model
                        "class_labels": cfg.class_labels or ds.class_labels,
                    },
                    os.path.join(tmp, STATE_FILE),
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
    return {"epoch_seconds": epoch_seconds, "start_epoch": start_epoch}
