"""Documents -> deterministic train / validation / test splits of token windows.

Sources (``LMTrainConfig.data``): the reference corpus by name (written to a text file first), a
text file (documents separated by blank lines), a folder of ``.txt``/``.md`` files (the same, file
by file, in name order), a ``.parquet``/``.jsonl`` file with a ``text`` column (a document per
row), or ``package.module:loader`` returning a list of strings. Documents, not windows, are split
(a document never straddles two splits); the tokenizer is trained on the training documents only
(or is the parent's, when fine-tuning). Each split becomes one stream ``EOS doc EOS doc ... EOS``
cut into windows of ``context_length + 1`` tokens: inputs ``x = w[:-1]``, targets ``y = w[1:]``.

A folder holding ``.parquet`` (or else ``.jsonl``) files and no text files, an object-store
prefix (``s3://bucket/prefix``, ``gs://...``) or one remote table file is read through Ray Data
(``text`` column only, the files in path order, rows in file order: see :func:`read_table_documents`).

The documents end up in memory on the driver (one copy in Ray's object store); tokenizing and
windowing a large corpus inside Ray Data is not implemented yet.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from maas_ray.errors import ConfigError
from maas_ray.train.data import _import, dataset_files, split_indices
from maas_ray.train.lm import corpus
from maas_ray.train.lm import tokenizer as tk
from maas_ray.train.lm.config import REFERENCE_CORPUS, TABLE_SUFFIXES, LMTrainConfig

logger = logging.getLogger(__name__)
TEXT_SUFFIXES = (".txt", ".md", ".text")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


@dataclass
class LMSplits:
    """Windows (N, context_length) int64 per split, the tokenizer, and the data's identity."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    tokenizer_json: str
    identity: dict[str, Any] = field(default_factory=dict)
    val_documents: list[str] = field(default_factory=list)  # a few, for parity prompts


def _paragraphs(text: str) -> list[str]:
    return [d.strip() for d in _BLANK_LINE.split(text.replace("\r\n", "\n")) if d.strip()]


def table_source(data: str) -> Optional[str]:
    """The table suffix (``.parquet`` or ``.jsonl``) when ``data`` is read through Ray Data, else
    None: an object-store URI (a prefix or one file), or a local folder holding table files and no
    text files. A single local table file stays a pandas read. Parquet wins when a folder or
    prefix holds both kinds."""
    if "://" in data:
        if data.split("?", 1)[0].lower().endswith(TABLE_SUFFIXES):
            return ".parquet" if data.split("?", 1)[0].lower().endswith(".parquet") else ".jsonl"
        names = [f.lower() for f in dataset_files(data, "")[0]]
    elif os.path.isdir(data):
        names = [str(p).lower() for p in Path(data).rglob("*") if p.is_file()]
        if any(n.endswith(TEXT_SUFFIXES) for n in names):
            return None
    else:
        return None
    for suffix in TABLE_SUFFIXES:
        if any(n.endswith(suffix) for n in names):
            return suffix
    if "://" in data:
        raise ConfigError(f"data {data!r} holds no {'/'.join(TABLE_SUFFIXES)} files")
    return None


def _text_dataset(data: str, suffix: str) -> tuple[Any, list[str], int, list[str]]:
    """(a Ray Dataset of the ``text`` column only, its files sorted by path, their size in bytes,
    the columns found), order-preserving; a missing ``text`` column is a ConfigError."""
    import pyarrow.fs as pafs
    import ray.data

    files, size_bytes = dataset_files(data, suffix)
    kwargs: dict[str, Any] = {}
    if "://" in data:  # the filesystem carries query parameters such as ?endpoint_override=
        try:
            kwargs["filesystem"] = pafs.FileSystem.from_uri(data)[0]
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read training text {data!r}: {exc}") from exc
        files = [f.split("?", 1)[0] for f in files]
    read = ray.data.read_parquet if suffix == ".parquet" else ray.data.read_json
    try:
        schema = read(files, **kwargs).schema()
        columns = list(schema.names) if schema is not None else []
        if "text" not in columns:
            raise ConfigError(f"data {data!r} has no 'text' column in its {suffix} files (columns: {columns})")
        ds = read(files, columns=["text"], **kwargs) if suffix == ".parquet" else read(files, **kwargs).select_columns(["text"])
        ds.context.execution_options.preserve_order = True
    except ConfigError:
        raise
    except Exception as exc:  # pyarrow / fsspec / Ray Data raise many types
        raise ConfigError(f"cannot read training text {data!r}: {exc}") from exc
    return ds, files, size_bytes, columns


def read_table_documents(data: str, suffix: str) -> tuple[list[str], dict[str, Any]]:
    """The ``text`` column of every ``suffix`` file under ``data`` (one file, a folder or an
    object-store prefix), read with Ray Data (started locally if not running), plus what identifies
    the read (files, their size). The order is deterministic: files sorted by path, rows in file
    order (Ray Data's ``preserve_order`` for this dataset only)."""
    ds, files, size_bytes, columns = _text_dataset(data, suffix)
    try:
        texts = [t for b in ds.iter_batches(batch_format="pyarrow") for t in b.column("text").to_pylist()]
    except Exception as exc:  # pyarrow / fsspec / Ray Data raise many types
        raise ConfigError(f"cannot read training text {data!r}: {exc}") from exc
    docs = [str(t) for t in texts if t is not None and str(t).strip()]
    if not docs:
        raise ConfigError(f"data {data!r} has no non-empty 'text' rows ({len(texts)} rows in {len(files)} {suffix} files; columns: {columns})")
    logger.info("data %s: %d documents from %d %s files (Ray Data)", data, len(docs), len(files), suffix)
    return docs, {"loading": "ray_data", "files": files[:100], "file_count": len(files), "size_bytes": size_bytes}


def read_documents(cfg: LMTrainConfig) -> list[str]:
    """The documents of ``cfg.data``, in a deterministic order."""
    return _read_documents(cfg)[0]


def _read_documents(cfg: LMTrainConfig) -> tuple[list[str], dict[str, Any]]:
    data = cfg.data
    suffix = table_source(data) if data != REFERENCE_CORPUS and (os.path.exists(data) or "://" in data) else None
    if suffix is not None:
        return read_table_documents(data, suffix)
    if data == REFERENCE_CORPUS:
        data = str(corpus.write_corpus(cfg.corpus_dir, n=cfg.corpus_documents, seed=cfg.seed))
    elif not os.path.exists(data) and ":" in data:
        docs = _import(data, "loader")()
        if not isinstance(docs, (list, tuple)) or not all(isinstance(d, str) for d in docs):
            raise ConfigError(f"loader {data!r} must return a list of strings, got {type(docs).__name__}")
        return [d for d in docs if d.strip()], {}
    path = Path(data)
    try:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise ConfigError(f"folder {data!r} has no {'/'.join(TEXT_SUFFIXES)} files")
            return [d for p in files for d in _paragraphs(p.read_text(encoding="utf-8"))], {}
        if path.suffix.lower() in TABLE_SUFFIXES:
            import pandas as pd

            table = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_json(path, lines=True)
            if "text" not in table.columns:
                raise ConfigError(f"{data!r} has no 'text' column (columns: {list(table.columns)})")
            return [t for t in table["text"].astype(str).tolist() if t.strip()], {}
        return _paragraphs(path.read_text(encoding="utf-8")), {}
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # missing file, not UTF-8, bad table
        raise ConfigError(f"cannot read training text {data!r}: {exc}") from exc


def windows(stream: np.ndarray, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of ``context_length + 1`` tokens -> (x, y), each (N, context_length)."""
    n = (len(stream) - 1) // context_length
    if n < 1:
        return np.zeros((0, context_length), np.int64), np.zeros((0, context_length), np.int64)
    w = np.lib.stride_tricks.as_strided(stream, (n, context_length + 1), (stream.strides[0] * context_length, stream.strides[0]))
    w = w.astype(np.int64)
    return w[:, :-1].copy(), w[:, 1:].copy()


def load_lm_splits(cfg: LMTrainConfig, tokenizer_json: Optional[str] = None) -> LMSplits:
    """Read, split (by document), train the tokenizer (unless given), tokenize, window."""
    docs, read_info = _read_documents(cfg)
    if len(docs) < 3:
        raise ConfigError(f"data {cfg.data!r} has {len(docs)} documents: at least 3 are needed (train, validation, test)")
    train_i, val_i, test_i = split_indices(len(docs), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    parts = {name: [docs[i] for i in sorted(idx)] for name, idx in (("train", train_i), ("validation", val_i), ("test", test_i))}
    if tokenizer_json is None:
        tokenizer_json = tk.train_tokenizer(parts["train"], vocab_size=cfg.vocab_size)
    ctx = cfg.context_length
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    tokens: dict[str, int] = {}
    for name, texts in parts.items():
        stream = tk.encode_documents(tokenizer_json, texts)
        tokens[name] = int(len(stream))
        out[name] = windows(stream, ctx)
        if len(out[name][0]) == 0:
            raise ConfigError(
                f"the {name} split has {len(stream)} tokens, fewer than context_length + 1 = {ctx + 1}: "
                f"more data, a larger {name} fraction or a smaller context_length"
            )
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    identity = {
        "source": cfg.data if cfg.data != REFERENCE_CORPUS else f"{REFERENCE_CORPUS} (n={cfg.corpus_documents}, seed={cfg.seed})",
        "documents": {k: len(v) for k, v in parts.items()},
        "tokens": tokens,
        "rows": {k: int(len(v[0])) for k, v in out.items()},  # windows of context_length tokens
        "content_sha256": h.hexdigest(),
        **read_info,
    }
    logger.info("data %s: %s documents, %s tokens", identity["source"], identity["documents"], tokens)
    return LMSplits(*out["train"], *out["validation"], *out["test"], tokenizer_json=tokenizer_json,
                    identity=identity, val_documents=parts["validation"][:8])
