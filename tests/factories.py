"""Model factories and data loaders imported by path ('tests.factories:...') in the tests:
what a user's own package would hold."""

import numpy as np
from torch import nn


def tiny_mlp(data, width: int = 32):
    """A user's own model: (B, *input_shape) -> (B, num_classes)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(data.input_shape)), width), nn.ReLU(),
                         nn.Linear(width, data.num_classes))


def wrong_classes(data):
    """Ignores data.num_classes: its logits do not fit the data."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(data.input_shape)), 3))


def raises(data):
    raise RuntimeError("out of coffee")


def not_a_module(data):
    return "a string"


def blobs():
    """A loader: (x, y) of three separable blobs in 8 dimensions."""
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=4.0, size=(3, 8))
    y = rng.integers(0, 3, size=300)
    return (centers[y] + rng.normal(size=(300, 8))).astype(np.float32), np.array(["a", "b", "c"])[y]


def presplit():
    """A loader that chooses its own splits."""
    x, y = blobs()
    return {"train": (x[:200], y[:200]), "validation": (x[200:250], y[200:250]), "test": (x[250:], y[250:])}
