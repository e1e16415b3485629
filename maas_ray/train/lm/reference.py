"""Sample generations of a trained ``decoder-lm`` and, for the reference corpus, their score
against its rules (grammatical continuations, correct answers to held-out dialogs)."""

from __future__ import annotations

from typing import Sequence

from maas_ray.train.lm import corpus
from maas_ray.train.lm import tokenizer as tk
from maas_ray.train.lm.export import GreedyRunner
from maas_ray.train.lm.model import DecoderLM


def greedy_texts(model: DecoderLM, tokenizer_json: str, prompts: Sequence[str], max_tokens: int) -> list[str]:
    """Greedy continuations (text, up to the first EOS) of ``prompts``, batched, BOS first as
    serving encodes. Special tokens in the prompts are parsed (rendered chat prompts)."""
    tok = tk.load(tokenizer_json)
    eos = tk.special_token_ids(tokenizer_json)[tk.EOS]
    room = model.args.context_length - max_tokens
    ids = [([eos] + tok.encode(p, add_special_tokens=False).ids)[-room:] for p in prompts]
    generated = GreedyRunner(model.cpu().float().eval()).generate(ids, max_tokens)[1]
    texts = []
    for row in generated.tolist():
        row = row[: row.index(eos)] if eos in row else row
        texts.append(tok.decode(row, skip_special_tokens=False))
    return texts


def score_reference(model: DecoderLM, tokenizer_json: str, n: int, seed: int, max_tokens: int = 24) -> dict[str, float]:
    """On ``n`` held-out sentence starts and ``n`` held-out dialogs: the share of continuations
    whose first sentence is grammatical, and of answers that are exactly right, per dialog kind."""
    if n == 0:
        return {}
    starts, dialogs = corpus.eval_prompts(n, seed)
    continuations = greedy_texts(model, tokenizer_json, starts, max_tokens)
    grammatical = sum(corpus.is_grammatical(s + corpus.first_sentence(c)) for s, c in zip(starts, continuations))
    chat = [tk.render_chat(messages, add_generation_prompt=True) for messages, _, _ in dialogs]
    answers = greedy_texts(model, tokenizer_json, chat, max_tokens)
    scores = {"grammatical_rate": grammatical / n}
    for kind in ("lexicon", "context"):
        right = [corpus.answer_is_correct(a, want) for a, (_, want, k) in zip(answers, dialogs) if k == kind]
        scores[f"{kind}_answer_accuracy"] = sum(right) / max(1, len(right))
    return scores
