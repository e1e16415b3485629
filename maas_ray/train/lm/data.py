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
By default (``data_loading: memory``, or ``auto`` with files of at most ``ray_data_threshold_bytes``)
its documents then end up in memory on the driver like any other source (:func:`load_lm_splits`).

Streamed (:func:`streamed_source`: ``data_loading: ray_data``, or ``auto`` above the threshold;
table sources only): :func:`load_lm_streams`. A document's split is a seeded hash of its text
(:func:`split_of`; no count or shuffle first, the fractions hold in expectation). The driver streams
the text column once, in order, for the content hash, the documents per split, a bounded uniform
sample for the tokenizer and a few validation documents (:func:`survey_documents`); it never holds
the corpus. Tokenizing and windowing run in Ray Data ``map_batches`` (:func:`window_batch`: one
``EOS doc EOS doc ...`` stream per batch of :data:`STREAM_BATCH_DOCUMENTS` documents of a split,
so up to ``context_length`` tokens per batch are not trained on); each split's windows are
materialized once in Ray's object store (spilled to disk past its memory), which gives the exact
window counts and spares re-tokenizing every epoch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from maas_ray.errors import ConfigError
from maas_ray.train.data import _import, dataset_files, split_indices
from maas_ray.train.lm import corpus
from maas_ray.train.lm import tokenizer as tk
from maas_ray.train.lm.config import REFERENCE_CORPUS, TABLE_SUFFIXES, LMTrainConfig

logger = logging.getLogger(__name__)
TEXT_SUFFIXES = (".txt", ".md", ".text")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
SPLITS = ("train", "validation", "test")  # split_of's 0, 1, 2
# Documents per tokenize-and-window batch of the streamed path: each batch is one stream whose
# last partial window (< context_length + 1 tokens) is dropped, so larger batches lose less.
STREAM_BATCH_DOCUMENTS = 512


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


def _clean(texts: Iterable[Any]) -> list[str]:
    """The documents of a ``text`` column: missing and blank rows dropped."""
    return [str(t) for t in texts if t is not None and str(t).strip()]


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
    docs = _clean(texts)
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
            return _clean(table["text"].dropna().tolist()), {}  # a missing row is no document, not "None"
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
    if streamed_source(cfg) is not None:  # a streamed run's documents, rebuilt in memory (maas optimize)
        labels = split_of(docs, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        train_i, val_i, test_i = (np.flatnonzero(labels == k) for k in range(len(SPLITS)))
    else:
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
        _hash_document(h, d)
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


def _hash_document(h: Any, doc: str) -> None:
    """The content hash of the dataset identity: every document's UTF-8 then a NUL, in order."""
    h.update(doc.encode("utf-8", "surrogatepass"))
    h.update(b"\0")


# ---- streamed through Ray Data -----------------------------------------------------------------

def streamed_source(cfg: LMTrainConfig) -> Optional[str]:
    """The table suffix when ``cfg``'s documents are tokenized and windowed in Ray Data
    (:func:`load_lm_streams`), else None (:func:`load_lm_splits`): ``data_loading: ray_data``, or
    ``auto`` and a table source whose files total more than ``ray_data_threshold_bytes``. 'ray_data'
    on anything but a table source is a ConfigError."""
    if cfg.data_loading == "memory" or cfg.data == REFERENCE_CORPUS:
        return None
    suffix = table_source(cfg.data) if os.path.exists(cfg.data) or "://" in cfg.data else None
    if cfg.data_loading == "ray_data":
        if suffix is None:
            raise ConfigError(f"data_loading 'ray_data' needs a folder or object-store prefix of {'/'.join(TABLE_SUFFIXES)} "
                              f"files with a 'text' column (or one remote such file), got data {cfg.data!r}")
        return suffix
    if suffix is None:
        return None
    return suffix if dataset_files(cfg.data, suffix)[1] > cfg.ray_data_threshold_bytes else None


def split_of(texts: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Each document's split (0 train, 1 validation, 2 test: :data:`SPLITS`) from a seeded blake2b
    of its text, so it needs no count, order or shuffle and is the same in every batch, run and
    process; the fractions hold in expectation. Duplicate documents share a split."""
    key = str(seed).encode()
    u = np.array([int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8, key=key).digest(), "little") / 2.0**64
                  for t in texts], dtype=np.float64)
    return np.where(u < 1.0 - val_fraction - test_fraction, 0, np.where(u < 1.0 - test_fraction, 1, 2)).astype(np.int8)


_TOKENIZERS: dict[str, Any] = {}  # tokenizer.json text -> Tokenizer, per Ray Data worker process


def window_batch(texts: Sequence[str], tokenizer_json: str, context_length: int) -> dict[str, np.ndarray]:
    """One batch of documents -> ``{"x", "y"}``: the stream ``EOS doc EOS doc ... EOS`` (as
    :func:`maas_ray.train.lm.tokenizer.encode_documents` makes it) cut by :func:`windows`; int64,
    (N, context_length) each, N = 0 when the batch has too few tokens."""
    tok = _TOKENIZERS.get(tokenizer_json)
    if tok is None:  # parsed once per process, not per batch
        _TOKENIZERS.clear()
        tok = _TOKENIZERS[tokenizer_json] = tk.load(tokenizer_json)
    eos = tok.token_to_id(tk.EOS)
    ids = [eos]
    for enc in tok.encode_batch(list(texts), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    x, y = windows(np.asarray(ids, np.int32), context_length)
    return {"x": x, "y": y}


class _SplitTexts:
    """map_batches: the batch's documents of one split (blank rows dropped)."""

    def __init__(self, split: int, val_fraction: float, test_fraction: float, seed: int) -> None:
        self.split, self.fractions, self.seed = split, (val_fraction, test_fraction), seed

    def __call__(self, batch: Any) -> Any:  # pyarrow.Table -> pyarrow.Table (an empty one is fine)
        import pyarrow as pa

        docs = _clean(batch.column("text").to_pylist())
        keep = split_of(docs, *self.fractions, self.seed) == self.split
        return pa.table({"text": pa.array([d for d, k in zip(docs, keep) if k], pa.string())})


class _Windows:
    """map_batches: :func:`window_batch` of a batch of one split's documents."""

    def __init__(self, tokenizer_json: str, context_length: int) -> None:
        self.tokenizer_json, self.context_length = tokenizer_json, context_length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return window_batch([str(t) for t in batch["text"]], self.tokenizer_json, self.context_length)


@dataclass
class DocumentSurvey:
    """What the driver learns from one ordered pass over the documents (:func:`survey_documents`)."""

    content_sha256: str
    documents: dict[str, int]  # per split
    tokenizer_sample: list[str]  # training documents, a seeded uniform sample
    val_documents: list[str]  # the first few validation documents, for parity prompts


def survey_documents(batches: Iterable[Sequence[Any]], val_fraction: float, test_fraction: float, seed: int,
                     sample_size: int, keep_val: int = 8) -> DocumentSurvey:
    """One pass over batches of ``text`` values in read order, holding at most ``sample_size +
    keep_val`` documents: the content hash (the same as :func:`load_lm_splits` records for the
    same documents), the documents per split (:func:`split_of`), a reservoir sample of the
    training documents (seeded, so the same order gives the same sample) and the first
    ``keep_val`` validation documents."""
    h = hashlib.sha256()
    counts = [0] * len(SPLITS)
    sample: list[str] = []
    val: list[str] = []
    rng = random.Random(seed)
    for batch in batches:
        docs = _clean(batch)
        for d, k in zip(docs, split_of(docs, val_fraction, test_fraction, seed)):
            _hash_document(h, d)
            counts[k] += 1
            if k == 0 and sample_size:  # Algorithm R: every training document kept with p = size / seen
                if len(sample) < sample_size:
                    sample.append(d)
                else:
                    j = rng.randrange(counts[0])
                    if j < sample_size:
                        sample[j] = d
            elif k == 1 and len(val) < keep_val:
                val.append(d)
    return DocumentSurvey(h.hexdigest(), dict(zip(SPLITS, counts)), sample, val)


@dataclass
class LMStreams:
    """The streamed counterpart of :class:`LMSplits`: per split a materialized Ray Dataset of
    ``x``/``y`` windows (int64, (context_length,) per row), the tokenizer and the data's identity."""

    datasets: dict[str, Any]
    tokenizer_json: str
    identity: dict[str, Any] = field(default_factory=dict)
    val_documents: list[str] = field(default_factory=list)


def load_lm_streams(cfg: LMTrainConfig, suffix: str, tokenizer_json: Optional[str] = None) -> LMStreams:
    """A table source tokenized and windowed in Ray Data (Ray must be running). Passes over the
    files: one on the driver (:func:`survey_documents`: hash, counts, tokenizer sample), then one
    per split, in Ray Data, whose windows are materialized in the object store and counted."""
    ds, files, size_bytes, _ = _text_dataset(cfg.data, suffix)
    try:
        survey = survey_documents(
            (b.column("text").to_pylist() for b in ds.iter_batches(batch_format="pyarrow")),
            cfg.val_fraction, cfg.test_fraction, cfg.seed,
            sample_size=0 if tokenizer_json is not None else cfg.tokenizer_sample_documents,
        )
    except Exception as exc:  # pyarrow / fsspec / Ray Data raise many types
        raise ConfigError(f"cannot read training text {cfg.data!r}: {exc}") from exc
    empty = [k for k, n in survey.documents.items() if n == 0]
    if empty:
        raise ConfigError(f"data {cfg.data!r}: no documents in the {empty} split(s) ({survey.documents} documents in "
                          f"{len(files)} {suffix} files, split by a hash of the text): more data or larger fractions")
    if tokenizer_json is None:
        tokenizer_json = tk.train_tokenizer(survey.tokenizer_sample, vocab_size=cfg.vocab_size)
    ctx = cfg.context_length
    datasets: dict[str, Any] = {}
    rows: dict[str, int] = {}
    for k, name in enumerate(SPLITS):
        windowed = (
            ds.map_batches(_SplitTexts(k, cfg.val_fraction, cfg.test_fraction, cfg.seed), batch_format="pyarrow")
            .map_batches(_Windows(tokenizer_json, ctx), batch_size=STREAM_BATCH_DOCUMENTS, batch_format="numpy")
        )
        try:
            datasets[name] = windowed.materialize()  # tokenized once, not every epoch; exact counts
        except Exception as exc:  # pyarrow / fsspec / Ray Data raise many types
            raise ConfigError(f"cannot tokenize the {name} split of {cfg.data!r}: {exc}") from exc
        rows[name] = datasets[name].count()
        if rows[name] == 0:
            raise ConfigError(
                f"the {name} split has no window of context_length + 1 = {ctx + 1} tokens "
                f"({survey.documents[name]} documents): more data, a larger {name} fraction or a smaller context_length"
            )
    identity = {
        "source": cfg.data,
        "documents": survey.documents,
        "rows": rows,  # windows of context_length tokens
        "content_sha256": survey.content_sha256,
        "loading": "ray_data", "files": files[:100], "file_count": len(files), "size_bytes": size_bytes,
        "streamed": True,  # tokenized in Ray Data; the split is split_of's hash, not split_indices
        "tokenizer_sample_documents": len(survey.tokenizer_sample) if survey.tokenizer_sample else None,
    }
    logger.info("data %s: %s documents, %s windows (streamed with Ray Data)", cfg.data, survey.documents, rows)
    return LMStreams(datasets, tokenizer_json, identity, survey.val_documents)
