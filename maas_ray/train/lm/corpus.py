"""The reference corpus: a small generated language whose rules can be scored, on any machine
offline, the same for the same seed.

Two kinds of documents:

- **stories**: 2-4 sentences of a grammar with number agreement,
  ``S -> NP(n) VP(n) [PP] .``, ``NP(n) -> DET(n) [ADJ] NOUN(n)``, ``VP(n) -> VI(n) | VT(n) NP``,
  where "a"/"every" take a singular noun, "two"/"many" a plural one, "the" either, and the verb
  agrees with its subject ("the cat sleeps", "two foxes chase a bird").
- **dialogs** in the chat format (:data:`maas_ray.train.lm.tokenizer.CHAT_TEMPLATE`) of two kinds:
  *lexicon* ("what is the plural of fox?" -> "foxes.", "what is the singular of mice?" ->
  "mouse.") and *context*: a system message states one fact (a sentence of the grammar with an
  object), the user asks who does it or what the subject does it to, and the assistant answers
  with the noun phrase from the fact (copying from the context: the harder one for a small model).

:func:`is_grammatical` and :func:`answer_is_correct` score a model's generations against those rules.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path
from typing import Optional

from maas_ray.train.lm.tokenizer import render_chat

NOUNS = {  # singular -> plural
    "cat": "cats", "dog": "dogs", "bird": "birds", "fox": "foxes", "child": "children", "teacher": "teachers",
    "farmer": "farmers", "horse": "horses", "mouse": "mice", "robot": "robots", "king": "kings", "queen": "queens",
}
ADJECTIVES = ["small", "big", "red", "old", "happy", "quiet", "green", "clever"]
TRANSITIVE = {"sees": "see", "chases": "chase", "likes": "like", "follows": "follow", "helps": "help",
              "finds": "find", "watches": "watch"}  # 3rd person singular -> plural
INTRANSITIVE = {"sleeps": "sleep", "runs": "run", "sings": "sing", "waits": "wait"}
DETERMINERS = {"sg": ["the", "a", "every"], "pl": ["the", "two", "many"]}
PLACES = ["in the garden", "near the river", "at night", "on the hill"]
NAME = "reference"  # `--data reference` in the CLI and LMTrainConfig
VERSION = 4  # of the generator: part of the cached file's name, so a changed language is regenerated

_PLURAL_NOUNS = {p: s for s, p in NOUNS.items()}
_SG_VERBS = {**TRANSITIVE, **INTRANSITIVE}
_PL_VERBS = {p: s for s, p in _SG_VERBS.items()}
_ADJ, _PLACE = set(ADJECTIVES), [p.split() for p in PLACES]


def _noun_phrase(rng: random.Random, number: Optional[str] = None) -> tuple[str, str]:
    number = number or rng.choice(["sg", "pl"])
    noun = rng.choice(list(NOUNS))
    words = [rng.choice(DETERMINERS[number])]
    if rng.random() < 0.5:
        words.append(rng.choice(ADJECTIVES))
    words.append(noun if number == "sg" else NOUNS[noun])
    return " ".join(words), number


def _verb(table: dict[str, str], number: str, rng: random.Random) -> str:
    v = rng.choice(list(table))
    return v if number == "sg" else table[v]


def sentence(rng: random.Random, transitive: Optional[bool] = None) -> tuple[str, str, str, str]:
    """(sentence, subject NP, verb, object NP or "")."""
    subj, number = _noun_phrase(rng)
    transitive = rng.random() < 0.65 if transitive is None else transitive
    if transitive:
        verb, (obj, _) = _verb(TRANSITIVE, number, rng), _noun_phrase(rng)
        words = f"{subj} {verb} {obj}"
    else:
        verb, obj = _verb(INTRANSITIVE, number, rng), ""
        words = f"{subj} {verb}"
    if rng.random() < 0.3:
        words += " " + rng.choice(PLACES)
    return words + ".", subj, verb, obj


def story(rng: random.Random) -> str:
    return " ".join(sentence(rng)[0] for _ in range(rng.randint(2, 4)))


def _lexicon_question(rng: random.Random) -> tuple[str, str]:
    singular = rng.choice(list(NOUNS))
    if rng.random() < 0.5:
        return f"what is the plural of {singular}?", NOUNS[singular] + "."
    return f"what is the singular of {NOUNS[singular]}?", singular + "."


def _context_questions(subj: str, verb: str, obj: str) -> list[tuple[str, str]]:
    """Both questions about the fact ``subj verb obj``: who does it, and to what."""
    singular = verb if verb in TRANSITIVE else _PL_VERBS[verb]  # "who chases ...?"
    base = verb if verb in _PL_VERBS else TRANSITIVE[verb]  # "what do/does the cat chase?"
    aux = "does" if verb in TRANSITIVE else "do"
    return [(f"who {singular} {obj}?", subj + "."), (f"what {aux} {subj} {base}?", obj + ".")]


def dialog(rng: random.Random, turns: int = 1) -> tuple[list[dict[str, str]], str, str]:
    """The messages up to the user's last question, its correct answer, and the kind ('lexicon'
    or 'context'); with ``turns`` > 1 the earlier questions come answered."""
    if rng.random() < 0.5:
        qa, kind, messages = [_lexicon_question(rng) for _ in range(turns)], "lexicon", []
    else:
        fact, subj, verb, obj = sentence(rng, transitive=True)
        both = _context_questions(subj, verb, obj)
        first = rng.randrange(2)
        qa, kind = [both[(first + i) % 2] for i in range(turns)], "context"
        messages = [{"role": "system", "content": fact}]
    for question, answer in qa[:-1]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return [*messages, {"role": "user", "content": qa[-1][0]}], qa[-1][1], kind


def documents(n: int, seed: int = 0, dialog_share: float = 0.5) -> list[str]:
    """``n`` documents (stories, and rendered dialogs of 1-3 turns), deterministic from ``seed``."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        if rng.random() < dialog_share:
            messages, answer, _ = dialog(rng, turns=rng.randint(1, 3))
            docs.append(render_chat([*messages, {"role": "assistant", "content": answer}]))
        else:
            docs.append(story(rng))
    return docs


def write_corpus(directory: str | os.PathLike, n: int = 20000, seed: int = 0) -> Path:
    """Write the corpus as one text file, documents separated by blank lines; returns its path
    (reused when it already exists: the content is a function of ``n`` and ``seed``)."""
    path = Path(directory) / f"{NAME}-v{VERSION}-n{n}-seed{seed}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("\n\n".join(documents(n, seed)) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return path


# ---- scoring ---------------------------------------------------------------------------------

def _np(words: list[str], i: int) -> tuple[Optional[str], int]:
    """Parse a noun phrase at words[i]: (number, next index) or (None, i)."""
    if i >= len(words):
        return None, i
    det = words[i]
    j = i + 1
    if j < len(words) and words[j] in _ADJ:
        j += 1
    if j >= len(words):
        return None, i
    noun = words[j]
    number = "sg" if noun in NOUNS else "pl" if noun in _PLURAL_NOUNS else None
    if number is None or det not in DETERMINERS[number]:
        return None, i
    return number, j + 1


def is_grammatical(text: str) -> bool:
    """Whether ``text`` is one sentence of the grammar (agreement included), ending with '.'."""
    text = text.strip()
    if not text.endswith("."):
        return False
    words = text[:-1].split()
    number, i = _np(words, 0)
    if number is None or i >= len(words):
        return False
    verb = words[i]
    table = _SG_VERBS if number == "sg" else _PL_VERBS
    if verb not in table:
        return False
    i += 1
    if verb in TRANSITIVE or verb in TRANSITIVE.values():
        obj_number, i = _np(words, i)
        if obj_number is None:
            return False
    rest = words[i:]
    return not rest or rest in _PLACE


def first_sentence(text: str) -> str:
    """The text up to and including its first '.' (or all of it)."""
    m = re.match(r"[^.]*\.", text)
    return m.group(0) if m else text


def answer_is_correct(generated: str, answer: str) -> bool:
    return generated.strip() == answer


def eval_prompts(n: int, seed: int) -> tuple[list[str], list[tuple[list[dict[str, str]], str, str]]]:
    """Held-out prompts for scoring: ``n`` sentence starts (a subject noun phrase) and ``n``
    dialogs (messages, correct answer, kind), from a seed different to the corpus's."""
    rng = random.Random(int(hashlib.sha256(f"eval-{seed}".encode()).hexdigest()[:8], 16))
    starts = [_noun_phrase(rng)[0] for _ in range(n)]
    return starts, [dialog(rng) for _ in range(n)]
