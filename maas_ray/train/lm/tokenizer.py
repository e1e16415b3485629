"""The byte-level BPE tokenizer of a ``decoder-lm`` version (Hugging Face ``tokenizers``),
trained on the training split only and published as the version's ``tokenizer.json``.

Special tokens (ids 0..3, in this order): ``<|endoftext|>`` (EOS; also the BOS serving prepends,
since every training document is preceded by one), ``<|system|>``, ``<|user|>``, ``<|assistant|>``.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from maas_ray.errors import ConfigError

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|system|>", "<|user|>", "<|assistant|>"]
# Hugging Face's convention: rendered with `messages` and `add_generation_prompt`; an assistant
# turn ends with EOS, so chat generation stops there.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """:data:`CHAT_TEMPLATE` in plain Python (training renders its dialogs with it)."""
    text = "".join(f"<|{m['role']}|>{m['content']}{EOS}" for m in messages)
    return text + ("<|assistant|>" if add_generation_prompt else "")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2) -> str:
    """Train a byte-level BPE on ``texts``; returns the ``tokenizer.json`` text. Any byte string
    encodes (the 256 byte symbols are always in the vocabulary)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


def load(tokenizer_json: str):
    """A ``tokenizers.Tokenizer`` from its JSON text."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(tokenizer_json)
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise ConfigError(f"not a tokenizer.json: {exc}") from exc


def special_token_ids(tokenizer_json: str) -> dict[str, int]:
    tok = load(tokenizer_json)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ConfigError(f"the tokenizer lacks the special tokens {missing}")
    return ids  # type: ignore[return-value]


def _batches(texts: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_documents(tokenizer_json: str, texts: Iterable[str]) -> np.ndarray:
    """One int32 token stream ``EOS doc EOS doc ... EOS``: every document is preceded by EOS (the
    BOS serving prepends) and ends with one. Special tokens in the text (the chat markers of a
    rendered dialog) are parsed as special here: this is training data, not user input."""
    tok = load(tokenizer_json)
    eos = tok.token_to_id(EOS)
    parts: list[np.ndarray] = [np.array([eos], np.int32)]
    for batch in _batches(texts, 1024):
        for enc in tok.encode_batch(batch, add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eos], np.int32))
    return np.concatenate(parts)


def decode(tokenizer_json: str, ids: list[int]) -> str:
    return load(tokenizer_json).decode(ids, skip_special_tokens=False)
