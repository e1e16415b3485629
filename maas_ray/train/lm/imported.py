"""A user's own causal language model by import path: ``model: package.module:factory``.

The factory is called as ``factory(vocab_size=V, context_length=C, **model_args)`` (``V`` from
the trained tokenizer, ``C`` from ``model_args``) and returns an ``nn.Module`` mapping ``(B, T)``
int64 token ids to ``(B, T, vocab)`` logits, causally: position ``t``'s logits may depend only
on tokens ``0..t``. That is all Ray Train needs (next-token loss, as for ``decoder-lm``).

Serving runs the KV-cache graph contract of :mod:`maas_ray.train.lm.export`. A model can meet it
two ways:

- **Its own cache** (fast): the module has ``forward_with_past(input_ids, attention_mask,
  position_ids, past) -> (logits, presents)`` with :class:`~maas_ray.train.lm.model.DecoderLM`'s
  semantics, and a ``cache_layout`` dict ``{"layers", "kv_heads", "head_dim"}``. Each decode step
  then costs one token's work.
- **Recompute** (any causal model): the "cache" is the sequence's own token ids (one layer, one
  head, width 1), and every step runs the model on the whole sequence, as Hugging Face's
  ``generate(use_cache=False)`` does. Each step costs a full forward over the sequence so far,
  so it suits small models and short contexts; the spec records ``cache: recompute``.

Padding: serving left-pads sequences of different lengths in a batch (mask 0 = padding, always a
prefix of a row). A model that takes only ids cannot be told to skip padding, so recompute rolls
each row left until its real tokens start at position 0 (the padding moves to the end, where a
causal model's real positions never see it) and rolls the logits back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from maas_ray.errors import ConfigError
from maas_ray.train.lm.model import KV

CACHED, RECOMPUTE = "cached", "recompute"


@dataclass(frozen=True)
class LMShape:
    """What export, parity and serving need to know of a model (``DecoderLMArgs`` has the same)."""

    vocab_size: int
    context_length: int
    layers: int
    heads: int
    head_dim: int

    def model_dump(self) -> dict[str, int]:
        return asdict(self)


class ImportedLM(nn.Module):
    """A factory's module with the cached forward that export and parity run (its own, or recompute)."""

    def __init__(self, module: nn.Module, vocab_size: int, context_length: int):
        super().__init__()
        self.module = module
        self.spec: dict[str, Any] = {}  # set by build_imported: what publishing records to rebuild it
        layout = getattr(module, "cache_layout", None)
        self.cache = CACHED if callable(getattr(module, "forward_with_past", None)) and layout is not None else RECOMPUTE
        if self.cache == CACHED:
            try:
                layers, heads, head_dim = (int(layout[k]) for k in ("layers", "kv_heads", "head_dim"))
            except (TypeError, KeyError, ValueError) as exc:
                raise ConfigError(f"cache_layout must be a dict of ints with layers, kv_heads and head_dim, "
                                  f"got {layout!r}") from exc
        else:
            layers, heads, head_dim = 1, 1, 1
        self.args = LMShape(vocab_size, context_length, layers, heads, head_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.module(input_ids)

    def forward_with_past(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                          past: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        """:meth:`DecoderLM.forward_with_past`'s contract; in recompute mode ``past`` is one layer
        whose key holds the token ids so far as floats, (B, 1, P, 1)."""
        if self.cache == CACHED:
            return self.module.forward_with_past(input_ids, attention_mask, position_ids, past)
        seen, flags = past[0]
        b, s = input_ids.shape
        full = torch.cat([seen[:, 0, :, 0].to(torch.int64), input_ids], dim=1)  # (B, T)
        t = full.shape[1]
        pads = t - attention_mask.sum(dim=1, keepdim=True)  # (B, 1): leading padding per row
        index = torch.arange(t, device=full.device).unsqueeze(0)  # (1, T)
        rolled = full.gather(1, (index + pads) % t)  # real tokens first, padding last
        logits = self.module(rolled)
        back = ((index - pads) % t).unsqueeze(-1).expand(b, t, self.args.vocab_size)  # a fixed vocab axis in the graph
        logits = logits.gather(1, back)[:, t - s:]  # (B, S, vocab), each row's own positions
        new = input_ids.to(seen.dtype).view(b, 1, s, 1)
        # float32 holds token ids exactly up to 2**24; the value half keeps the mask (unused, but
        # the graph contract has a key and a value per layer)
        return logits, [(torch.cat([seen, new], dim=2), torch.cat([flags, torch.ones_like(new)], dim=2))]

    def empty_past(self, batch: int) -> list[KV]:
        a = self.args
        z = torch.zeros(batch, a.heads, 0, a.head_dim)
        return [(z, z) for _ in range(a.layers)]


def build_imported(model: str, model_args: dict[str, Any], vocab_size: int, *, probe: bool = True) -> ImportedLM:
    """``factory(vocab_size=..., **model_args)`` wrapped, and (``probe``) checked to map (2, T)
    ids to (2, T, vocab_size) logits."""
    from maas_ray.train.model import resolve_factory

    factory = resolve_factory(model)
    try:
        module = factory(vocab_size=vocab_size, **model_args)
    except ConfigError:
        raise
    except Exception as exc:  # user code: any error is a bad spec
        raise ConfigError(f"model {model!r} with model_args {model_args} failed to build: "
                          f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model factory {model!r} returned {type(module).__name__}, not a torch.nn.Module")
    lm = ImportedLM(module, vocab_size, int(model_args["context_length"]))
    lm.spec = {"model": model, "model_args": dict(model_args), "vocab_size": vocab_size, "cache": lm.cache}
    if probe:
        t = min(8, lm.args.context_length)
        x = torch.arange(2 * t, dtype=torch.int64).view(2, t) % vocab_size
        module.eval()
        try:
            with torch.no_grad():
                out = module(x)
        except Exception as exc:  # user code
            raise ConfigError(f"model {model!r} failed on token ids of shape {list(x.shape)}: "
                              f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, t, vocab_size):
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(f"model {model!r} must map (batch, seq) ids to (batch, seq, vocab_size) logits: "
                              f"(2, {t}) gave {got}, want [2, {t}, {vocab_size}]")
        changed = x.clone()
        changed[:, -1] = (changed[:, -1] + 1) % vocab_size
        with torch.no_grad():
            leak = (module(changed)[:, :-1] - out[:, :-1]).abs().max().item() if t > 1 else 0.0
        if not leak <= 1e-4 * max(1.0, out.abs().max().item()):  # training on it would learn to copy the answer
            raise ConfigError(f"model {model!r} is not causal: changing the last token changed earlier "
                              f"positions' logits by {leak:.3g}")
        module.train()
    return lm
