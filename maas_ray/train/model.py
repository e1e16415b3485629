"""The model family we train: an MLP classifier over flat feature vectors."""

from __future__ import annotations

import torch
from torch import nn


class MLPClassifier(nn.Module):
    """(B, F) float features -> (B, C) logits."""

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
        assert x.dim() == 2, f"expected (batch, features), got shape {tuple(x.shape)}"
        return self.net(x)  # (B, C)
