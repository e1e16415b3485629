"""The ``decoder-lm`` task of the generic DDP loop (:class:`maas_ray.train.loop.Task`):
next-token cross-entropy, checkpoints selected on the lowest validation loss."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from maas_ray.train.lm.config import FAMILY, DecoderLMArgs, LMTrainConfig
from maas_ray.train.lm.imported import build_imported
from maas_ray.train.lm.model import DecoderLM
from maas_ray.train.loop import Task


def build(spec: dict[str, Any], probe: bool = False) -> nn.Module:
    """The model of a spec: ``{"model": "decoder-lm", "model_args"}`` (vocab_size inside), or
    ``{"model": "package.module:factory", "model_args", "vocab_size"}``
    (:mod:`~maas_ray.train.lm.imported`; ``probe`` checks its output shape and causality)."""
    if spec["model"] == FAMILY:
        return DecoderLM(DecoderLMArgs.model_validate(spec["model_args"]))
    return build_imported(spec["model"], spec["model_args"], int(spec["vocab_size"]), probe=probe)


def model_spec(model: str, model_args: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The spec :func:`build` takes, for a config's model and the trained tokenizer's vocabulary."""
    if model == FAMILY:
        return {"model": FAMILY, "model_args": DecoderLMArgs.model_validate({**model_args, "vocab_size": vocab_size}).model_dump()}
    return {"model": model, "model_args": dict(model_args), "vocab_size": vocab_size}


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (B, T, vocab) logits against (B, T) next tokens (fp32 under autocast)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@torch.no_grad()
def token_loss_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """(sum of token losses, token count) over windows, in batches, as a float64 tensor."""
    model.eval()
    out = torch.zeros(2, dtype=torch.float64, device=x.device)
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size])
        yb = y[i : i + batch_size]
        out[0] += F.cross_entropy(logits.flatten(0, 1).float(), yb.flatten(), reduction="sum").double()
        out[1] += yb.numel()
    return out


def _loss_metrics(sums: torch.Tensor, world: int) -> dict[str, float]:
    if world > 1:
        torch.distributed.all_reduce(sums)
    loss = (sums[0] / sums[1].clamp(min=1)).item()
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int, world: int) -> dict[str, float]:
    """Validation loss and perplexity: each worker scores its share of the windows, all-reduced."""
    return _loss_metrics(token_loss_sums(model, x[rank::world], y[rank::world]), world)


@torch.no_grad()
def batches_loss_sums(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`token_loss_sums` over batches of windows (a Ray Data shard or dataset), float64."""
    out = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        out += token_loss_sums(model, x, y, batch_size=len(x))
    return out


def evaluate_stream(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                    world: int) -> dict[str, float]:
    """:func:`evaluate` on this worker's validation shard: the sums over it, all-reduced."""
    return _loss_metrics(batches_loss_sums(model, batches, device), world)


LM_TASK = Task(LMTrainConfig, build, next_token_loss, "val_loss", False, evaluate, evaluate_stream, eval_batch_size=32)
TASK_PATH = f"{__name__}:LM_TASK"
