"""A generative version's tokenizer in serving: prompts to ids, chat messages to a prompt, ids
back to text as they stream.

Three rules make it safe in front of users:

- **User text never forges a special token.** ``encode("... <|endoftext|> ...")`` encodes the
  characters, not the EOS id (``tokenizers``' ``encode_special_tokens``).
- **Chat templates run sandboxed** (jinja2's ``ImmutableSandboxedEnvironment``), and only the
  template's own text can contain special tokens: :meth:`LMTokenizer.encode_chat` renders the
  messages with placeholders first, so a special token typed inside a message stays text.
- **Streamed text is exact.** Byte-level BPE splits a UTF-8 character across tokens; the
  :class:`IncrementalDetokenizer` holds an incomplete character back until it completes.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any, Optional

from maas_ray.errors import ConfigError, InvalidInputError
from maas_ray.registry.manifest import GenerationSpec

logger = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 1024
MAX_RENDERED_CHARS = 4_000_000  # a template that loops can not build an unbounded prompt
_REPLACEMENT = "\ufffd"


class LMTokenizer:
    """The tokenizer of one generative version (a Hugging Face ``tokenizer.json``) and its
    :class:`~maas_ray.registry.manifest.GenerationSpec` (BOS, special tokens, chat template)."""

    def __init__(self, tokenizer: Any, spec: GenerationSpec) -> None:
        self._tok = tokenizer
        self._tok.encode_special_tokens = True  # user text: "<|endoftext|>" is 13 characters, not EOS
        self.spec = spec
        self.bos_token_id = spec.bos_token_id
        self.eos_token_id = spec.eos_token_id
        self._specials = dict(spec.special_tokens)
        for token in tokenizer.get_added_tokens_decoder().values():
            if token.special:
                self._specials.setdefault(token.content, tokenizer.token_to_id(token.content))
        # Longest first, so a special token that is a prefix of another never wins.
        names = sorted(self._specials, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(n) for n in names)) if names else None
        self._template = None
        self._token_texts: dict[int, str] = {}  # shared by this version's detokenizers (at most the vocab)

    @classmethod
    def from_bytes(cls, tokenizer_json: bytes, spec: GenerationSpec) -> "LMTokenizer":
        """Load ``tokenizer.json`` bytes (the version's checksummed extra file)."""
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ConfigError(f"not a Hugging Face tokenizer.json: {exc}") from exc
        return cls(tok, spec)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """User text -> ids, BOS first when the version has one; special tokens in ``text`` are text."""
        return self._bos() + self._encode_plain(text)

    def encode_chat(self, messages: Any, add_generation_prompt: bool = True) -> list[int]:
        """Chat messages -> ids through the version's template, BOS first when set. The
        template's special tokens are special; any typed inside a message's content are text.

        Raises:
            InvalidInputError: no template, bad messages, or the template failed on them.
        """
        messages = self._check_messages(messages)
        text = self._render(messages, add_generation_prompt)
        # Render again with a random mark for each content: where the template copies contents
        # as they are, the marks show which text is the users' (kept as text, special or not).
        marks = [f"\ue000{secrets.token_hex(8)}\ue001" for _ in messages]
        marked = self._render([{**m, "content": k} for m, k in zip(messages, marks)], add_generation_prompt)
        pieces = self._split_specials(marked)
        contents = {k: m["content"] for k, m in zip(marks, messages)}
        mark_re = re.compile("|".join(re.escape(k) for k in marks))
        filled = [(p if special else mark_re.sub(lambda g: contents[g.group(0)], p), special) for p, special in pieces]
        if all(marked.count(k) == 1 for k in marks) and "".join(p for p, _ in filled) == text:
            ids = self._bos()
            for piece, special in filled:
                if special:
                    ids.append(self._specials[piece])
                elif piece:
                    ids.extend(self._encode_plain(piece))
            return ids
        # The template transforms the content (trim, upper, ...): a special token may then come
        # only from the template's own text, so the content may not contain one.
        for m in messages:
            if self._special_re is not None and self._special_re.search(m["content"]):
                raise InvalidInputError(f"message content may not contain a special token with this "
                                        f"version's chat template, got {m['content'][:80]!r}")
        ids = self._bos()
        for piece, special in self._split_specials(text):
            if special:
                ids.append(self._specials[piece])
            elif piece:
                ids.extend(self._encode_plain(piece))
        return ids

    def render_chat(self, messages: Any, add_generation_prompt: bool = True) -> str:
        """The prompt text the chat template makes of ``messages`` (for display and logs; to
        tokenize a chat use :meth:`encode_chat`, which keeps typed special tokens as text).

        Raises:
            InvalidInputError: no template, bad messages, or the template failed on them.
        """
        return self._render(self._check_messages(messages), add_generation_prompt)

    def decode(self, ids: list[int]) -> str:
        """ids -> text, special tokens left out."""
        return self._tok.decode(ids, skip_special_tokens=True)

    def detokenizer(self) -> "IncrementalDetokenizer":
        """A fresh streaming decoder for one sequence."""
        return IncrementalDetokenizer(self._tok, self._token_texts)

    # -- internals -------------------------------------------------------------------------

    def _bos(self) -> list[int]:
        return [] if self.bos_token_id is None else [self.bos_token_id]

    def _encode_plain(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InvalidInputError(f"text to tokenize must be a string, got {type(text).__name__}")
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except Exception as exc:  # e.g. a lone surrogate: tokenizers raises TypeError
            raise InvalidInputError(f"cannot tokenize the text (invalid Unicode?): {exc}") from exc

    def _split_specials(self, text: str) -> list[tuple[str, bool]]:
        if self._special_re is None:
            return [(text, False)]
        out, pos = [], 0
        for m in self._special_re.finditer(text):
            out.append((text[pos:m.start()], False))
            out.append((m.group(0), True))
            pos = m.end()
        out.append((text[pos:], False))
        return out

    def _check_messages(self, messages: Any) -> list[dict[str, str]]:
        if not isinstance(messages, list) or not messages:
            raise InvalidInputError("messages must be a non-empty list of {role, content} objects")
        if len(messages) > MAX_MESSAGES:
            raise InvalidInputError(f"at most {MAX_MESSAGES} messages, got {len(messages)}")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise InvalidInputError(f"messages[{i}] must be an object with role and content, got {type(m).__name__}")
            role, content = m.get("role"), m.get("content")
            if role not in CHAT_ROLES:
                raise InvalidInputError(f"messages[{i}].role must be one of {list(CHAT_ROLES)}, got {role!r}"[:300])
            if isinstance(content, list):  # OpenAI's content parts: text parts only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise InvalidInputError(f"messages[{i}].content parts must be {{type: text, text: string}}")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise InvalidInputError(f"messages[{i}].content must be a string, got {type(content).__name__}")
            out.append({"role": role, "content": content})
        return out

    def _compiled(self):
        if self._template is None:
            if not self.spec.chat_template:
                raise InvalidInputError("this model version has no chat template; send a prompt instead of messages")
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:  # Hugging Face templates call it on bad input
                raise InvalidInputError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
            env.globals["raise_exception"] = raise_exception
            try:
                self._template = env.from_string(self.spec.chat_template)
            except TemplateError as exc:
                raise InvalidInputError(f"the version's chat template does not compile: {exc}") from exc
        return self._template

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        template = self._compiled()
        try:
            text = template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self._token_text(self.bos_token_id),
                                   eos_token=self._token_text(self.eos_token_id))
        except InvalidInputError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
                OverflowError, RecursionError) as exc:  # what a template can raise on odd input
            raise InvalidInputError(f"chat template failed on these messages: {type(exc).__name__}: {exc}") from exc
        if len(text) > MAX_RENDERED_CHARS:
            raise InvalidInputError(f"the rendered chat has {len(text)} characters, more than {MAX_RENDERED_CHARS}")
        return text

    def _token_text(self, token_id: Optional[int]) -> str:
        return "" if token_id is None else (self._tok.id_to_token(token_id) or "")


class IncrementalDetokenizer:
    """Text of one sequence as its tokens arrive: ``push(ids)`` returns exactly the new text.

    Decodes a short window (the tokens since the last emitted text, plus the few before them
    for context, as vLLM and Hugging Face's TextStreamer do), so a step costs O(1), not O(length).
    Text ending in U+FFFD (an incomplete UTF-8 character of a byte-level BPE) is held back
    until the next token completes it; :meth:`flush` returns whatever is left.
    """

    def __init__(self, tokenizer: Any, token_texts: Optional[dict[int, str]] = None) -> None:
        self._tok = tokenizer
        # The context window is most often the one token emitted last: its text is a function of
        # the id alone, so it is decoded once per id (a dict shared by a version's sequences)
        # instead of once per step; one decode per token is left.
        self._token_texts = {} if token_texts is None else token_texts
        self._ids: list[int] = []
        self._prefix = 0  # _ids[_prefix:_read] decoded is text already returned (the context window)
        self._read = 0

    def _window_text(self) -> str:
        """The text of the context window ``_ids[_prefix:_read]``."""
        n = self._read - self._prefix
        if n == 0:
            return ""
        if n == 1:
            t = self._ids[self._prefix]
            text = self._token_texts.get(t)
            if text is None:
                text = self._token_texts[t] = self._tok.decode([t], skip_special_tokens=True)
            return text
        return self._tok.decode(self._ids[self._prefix:self._read], skip_special_tokens=True)

    def push(self, ids: list[int]) -> str:
        self._ids.extend(ids)
        prefix_text = self._window_text()
        text = self._tok.decode(self._ids[self._prefix:], skip_special_tokens=True)
        if len(text) > len(prefix_text) and not text.endswith(_REPLACEMENT):
            new = text[len(prefix_text):]
            del self._ids[:self._read]  # keep the window bounded
            self._prefix, self._read = 0, len(self._ids)
            return new
        return ""

    def flush(self) -> str:
        """The text held back (an incomplete character at the end decodes as U+FFFD)."""
        prefix_text = self._window_text()
        text = self._tok.decode(self._ids[self._prefix:], skip_special_tokens=True)
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text):]
