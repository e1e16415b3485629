"""Model specs: a built-in family (mlp, cnn, text-transformer) or a user factory by import path.

A factory is ``factory(data: DataSpec, **model_args) -> nn.Module`` mapping a batch of
inputs ``(B, *data.input_shape)`` of ``data.input_dtype`` to logits ``(B, num_classes)``.
:func:`build_model` builds and probes it on the driver, so a bad spec fails before any
Ray Train worker starts.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from maas_ray.errors import ConfigError
from maas_ray.train.config import FAMILY_ARGS
from maas_ray.train.data import DataSpec, _import


class MLPClassifier(nn.Module):
    """(B, *shape) float features, flattened -> (B, C) logits."""

    def __init__(self, num_features: int, num_classes: int, hidden_sizes: list[int], dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        width = num_features
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # (B, F) -> (B, C)


class CNNClassifier(nn.Module):
    """(B, C, H, W) images -> (B, classes) logits: conv blocks, each halving H and W."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, channels: list[int], dropout: float):
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            if h >= 2 and w >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c * h * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 4, f"expected (batch, channels, height, width), got shape {tuple(x.shape)}"
        return self.head(self.features(x))


class _Block(nn.Module):
    """Pre-norm transformer block (nanoGPT style, bidirectional, with a padding mask)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        # (B, T, D) -> (B, heads, T, D/heads)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads) + bias  # (B, h, T, T)
        y = (self.drop(att.softmax(dim=-1)) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.mlp(self.ln2(x)))


class TextTransformerClassifier(nn.Module):
    """(B, T) int64 token ids (0 = padding) -> (B, classes) logits; any T <= max_seq_len."""

    def __init__(self, vocab_size: int, max_seq_len: int, num_classes: int, dim: int, heads: int, layers: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"text-transformer dim {dim} must be divisible by heads {heads}")
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_seq_len, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        assert ids.dim() == 2, f"expected (batch, seq) token ids, got shape {tuple(ids.shape)}"
        keep = (ids != 0).unsqueeze(-1).to(self.pos.dtype)  # (B, T, 1)
        x = self.tok(ids) + self.pos[:, : ids.shape[1]]  # (B, T, D)
        # A large negative (not -inf) on padded keys: an all-padding row stays finite.
        bias = (1.0 - keep.transpose(1, 2)).unsqueeze(1) * -1e4  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, bias)
        x = self.ln(x)
        pooled = (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # mean over real tokens: (B, D)
        return self.head(pooled)


# Defaults and checks of the built-ins' model_args live in config.py (MLPArgs, ...).
def _mlp(data: DataSpec, hidden_sizes: list[int], dropout: float) -> nn.Module:
    return MLPClassifier(math.prod(data.input_shape), data.num_classes, [int(h) for h in hidden_sizes], float(dropout))


def _cnn(data: DataSpec, channels: list[int], dropout: float) -> nn.Module:
    if len(data.input_shape) != 3:
        raise ConfigError(f"cnn needs images (channels, height, width), the data has items of shape {list(data.input_shape)}")
    return CNNClassifier(tuple(data.input_shape), data.num_classes, [int(c) for c in channels], float(dropout))


def _text_transformer(data: DataSpec, dim: int, heads: int, layers: int, dropout: float) -> nn.Module:
    if data.kind != "text" or data.vocab_size is None:
        raise ConfigError(f"text-transformer needs text data (token ids), the data is {data.kind!r}")
    return TextTransformerClassifier(data.vocab_size, data.input_shape[0], data.num_classes, dim, heads, layers, dropout)


FAMILIES: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp, "cnn": _cnn, "text-transformer": _text_transformer}


def resolve_factory(model: str) -> Callable[..., nn.Module]:
    if model in FAMILIES:
        return FAMILIES[model]
    factory = _import(model, "model factory")
    if not callable(factory):
        raise ConfigError(f"model factory {model!r} is not callable")
    return factory


def example_input(data: DataSpec, batch: int = 2) -> torch.Tensor:
    """A batch the model must accept: zeros, or token ids 2.. for text (not all padding)."""
    if data.input_dtype == "int64":
        return torch.full((batch, *data.input_shape), 2, dtype=torch.int64)
    return torch.zeros((batch, *data.input_shape), dtype=torch.float32)


def build_model(model: str, model_args: dict[str, Any], data: DataSpec, *, probe: bool = True) -> nn.Module:
    """Build the model and (``probe``) check it maps a batch to (batch, num_classes) logits."""
    factory = resolve_factory(model)
    if model in FAMILY_ARGS:
        model_args = FAMILY_ARGS[model].model_validate(model_args).model_dump()  # fill defaults
    try:
        module = factory(data, **model_args)
    except ConfigError:
        raise
    except Exception as exc:  # user code: any error is a bad spec
        raise ConfigError(
            f"model {model!r} with model_args {model_args} failed to build: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model factory {model!r} returned {type(module).__name__}, not a torch.nn.Module")
    if probe:
        x = example_input(data)
        module.eval()
        try:
            with torch.no_grad():
                out = module(x)
        except Exception as exc:  # user code
            raise ConfigError(
                f"model {model!r} failed on a batch of shape {list(x.shape)} {data.input_dtype}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        want = [x.shape[0], data.num_classes]
        if not isinstance(out, torch.Tensor) or list(out.shape) != want:
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(
                f"model {model!r} outputs {got} for a batch of shape {list(x.shape)}; "
                f"the data needs logits of shape {want} ({data.num_classes} classes)"
            )
    return module
