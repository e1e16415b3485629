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


# Language models (``kind: generative`` with ``model: tests.factories:...``): called as
# factory(vocab_size=..., context_length=..., **model_args), (B, T) ids -> (B, T, vocab) logits.
class GruLM(nn.Module):
    """A causal LM that is not a transformer: served by recompute (no KV cache of its own)."""

    def __init__(self, vocab_size: int, dim: int, bidirectional: bool = False):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(dim * (2 if bidirectional else 1), vocab_size)

    def forward(self, ids):
        return self.head(self.rnn(self.emb(ids))[0])


def gru_lm(vocab_size: int, context_length: int, dim: int = 32):
    return GruLM(vocab_size, dim)


def peeking_lm(vocab_size: int, context_length: int):
    """Not causal (a bidirectional GRU sees the next token): refused."""
    return GruLM(vocab_size, 16, bidirectional=True)


def flat_lm(vocab_size: int, context_length: int):
    """(B, T) -> (B, vocab): the last position only, not every position's logits."""
    return nn.Sequential(nn.Embedding(vocab_size, 8), nn.Flatten(), nn.LazyLinear(vocab_size))


def cached_gpt(vocab_size: int, context_length: int, dim: int = 32, layers: int = 2, heads: int = 2):
    """A model with its own KV cache: ``forward_with_past`` and ``cache_layout`` (served cached)."""
    from maas_ray.train.lm.model import DecoderLM, DecoderLMArgs

    model = DecoderLM(DecoderLMArgs(vocab_size=vocab_size, context_length=context_length, dim=dim, heads=heads,
                                    layers=layers, dropout=0.0))
    model.cache_layout = {"layers": layers, "kv_heads": heads, "head_dim": dim // heads}
    return model


def string_lm(vocab_size: int, context_length: int):
    return "a string"


def broken_lm(vocab_size: int, context_length: int):
    raise RuntimeError("out of coffee")
