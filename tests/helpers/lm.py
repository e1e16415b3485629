"""A tiny real ``decoder-lm`` version for serving tests (no Ray): tokenizer trained on a few
hundred documents of the reference corpus, a random or briefly trained model, exported with its
KV cache, parity-checked and published; and torch's greedy continuation to compare serving with."""

from __future__ import annotations

from typing import Sequence

from maas_ray.registry import Manifest, Registry

TINY_VOCAB = 320  # 256 bytes + 4 special tokens + 60 merges


def publish_tiny_lm(registry: Registry, name: str = "tiny-lm", *, seed: int = 0, dim: int = 32, layers: int = 2,
                    heads: int = 2, context_length: int = 64, train_steps: int = 0) -> Manifest:
    """Publish the next version of ``name``: deterministic for the arguments (a few seconds)."""
    import numpy as np
    import torch

    from maas_ray.train.lm import corpus
    from maas_ray.train.lm import tokenizer as tk
    from maas_ray.train.lm.model import DecoderLM, DecoderLMArgs
    from maas_ray.train.lm.publish import export_and_check, publish_lm

    docs = corpus.documents(300, seed=seed)
    tokenizer_json = tk.train_tokenizer(docs, vocab_size=TINY_VOCAB)
    torch.manual_seed(seed)
    args = DecoderLMArgs(vocab_size=tk.load(tokenizer_json).get_vocab_size(), context_length=context_length,
                         dim=dim, heads=heads, layers=layers, dropout=0.0)
    model = DecoderLM(args)
    if train_steps:
        stream = torch.from_numpy(tk.encode_documents(tokenizer_json, docs).astype(np.int64))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(train_steps):
            starts = torch.randint(0, len(stream) - context_length - 1, (16,), generator=gen)
            batch = torch.stack([stream[s : s + context_length + 1] for s in starts.tolist()])
            loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    exported = export_and_check(model, tokenizer_json, ["the small cat", "two dogs chase", "every"], decode_steps=8)
    return publish_lm(registry, name, model, tokenizer_json, exported,
                      training_config={"helper": "publish_tiny_lm", "seed": seed, "train_steps": train_steps})


def torch_greedy(registry: Registry, name: str, version: int, prompt_ids: Sequence[int], n: int) -> list[int]:
    """torch's greedy continuation (``n`` tokens, not stopped at EOS) of ``prompt_ids`` (which
    include the BOS, as serving's tokenizer encodes them) from the published weights."""
    from maas_ray.train.lm.export import greedy_torch
    from maas_ray.train.lm.publish import load_published_lm

    return greedy_torch(load_published_lm(registry, name, version).model, prompt_ids, n)
