"""Input units (what a re-run skips when done), their Ray datasets, and the mapping of a
batch's columns to the version's request inputs.

A unit is one input file (parquet, CSV, text), or a whole folder of images. Its output folder
is ``<output>/<key>``, the key derived from the file's path relative to ``--input`` (so the
same input gives the same names on every run).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from maas_ray.errors import ConfigError, InvalidInputError

EXTENSIONS = {"parquet": (".parquet", ".pq"), "csv": (".csv",), "text": (".txt",),
              "images": (".png", ".jpg", ".jpeg")}
SUCCESS = "_SUCCESS"


@dataclass(frozen=True)
class Unit:
    """One input file (or image folder) and the output folder its rows go to."""

    path: str  # as pyarrow's filesystem names it (no scheme)
    uri: str  # as Ray Data reads it (s3://... or a local path)
    key: str  # the output sub-folder's name


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path within it) for a local path or an s3:// URI."""
    import pyarrow.fs as pafs

    if uri.startswith("s3://"):
        try:
            return pafs.FileSystem.from_uri(uri)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError with the reason
            raise ConfigError(f"cannot open {uri}: {exc}") from exc
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), posixpath.abspath(local)


def _uri(original: str, path: str) -> str:
    return f"s3://{path}" if original.startswith("s3://") else path


def _key(rel: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", rel.rsplit(".", 1)[0] if "." in rel else rel).strip("_")[:80]
    return f"{stem or 'input'}-{hashlib.sha1(rel.encode()).hexdigest()[:10]}"


def detect_format(uri: str, fmt: str, preprocessor: str) -> str:
    """The input format: as given, images for an image model, else by the files' extension."""
    if fmt != "auto":
        return fmt
    if preprocessor == "image":
        return "images"
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    names = [path] if info.type == pafs.FileType.File else [
        f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if f.type == pafs.FileType.File
    ]
    for name in sorted(names):
        for kind, exts in EXTENSIONS.items():
            if kind != "images" and name.lower().endswith(exts):
                return kind
    raise ConfigError(f"cannot tell the format of {uri} (no .parquet, .csv or .txt file); pass --format")


def list_units(uri: str, fmt: str) -> list[Unit]:
    """The input's units, sorted: each file of the format, or the image folder as one unit."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"input {uri} does not exist")
    if info.type == pafs.FileType.File:
        return [Unit(path, _uri(uri, path), _key(posixpath.basename(path)))]
    if fmt == "images":
        return [Unit(path, _uri(uri, path), _key(posixpath.basename(path.rstrip("/")) or "images"))]
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(
        f.path for f in found
        if f.type == pafs.FileType.File and f.path.lower().endswith(EXTENSIONS[fmt])
        and not posixpath.basename(f.path).startswith(("_", "."))
    )
    if not files:
        raise ConfigError(f"input {uri}: no {'/'.join(EXTENSIONS[fmt])} files in it")
    return [Unit(f, _uri(uri, f), _key(posixpath.relpath(f, path))) for f in files]


def read_unit(unit: Unit, fmt: str, ray_data: Any) -> Any:
    """The unit's Ray dataset (``ray_data`` is the ``ray.data`` module)."""
    if fmt == "parquet":
        return ray_data.read_parquet(unit.uri)
    if fmt == "csv":
        return ray_data.read_csv(unit.uri)
    if fmt == "text":
        return ray_data.read_text(unit.uri)
    return ray_data.read_binary_files(unit.uri, include_paths=True, file_extensions=["png", "jpg", "jpeg"])


# ---- columns <-> tensors ------------------------------------------------------------------------------------
def column_to_array(col: Any) -> np.ndarray:
    """One Arrow column as the array a request would carry: numbers (nulls as NaN), strings
    (nulls as '', a missing value), bytes, or a stacked (N, ...) array of fixed-size lists."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return np.asarray(pc.fill_null(col, "").to_numpy(zero_copy_only=False), dtype=object)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)
    if pa.types.is_boolean(t):
        return col.to_numpy(zero_copy_only=False) if col.null_count == 0 else \
            pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if col.null_count or len(set(lengths.tolist())) > 1:
            raise InvalidInputError("list column: every row needs a list of the same length (no nulls)")
        flat = column_to_array(col.flatten())
        return flat.reshape(len(col), *((-1,) if len(col) else (0,)))
    if isinstance(t, pa.ExtensionType):  # Ray Data's tensor columns
        return np.asarray(col.to_numpy(zero_copy_only=False))
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return col.to_numpy(zero_copy_only=False)  # ints with nulls come back as float64 with NaN
    raise InvalidInputError(f"column of type {t} cannot be scored")


def array_to_column(arr: np.ndarray) -> Any:
    """One output tensor as an Arrow column: scalars per row, or a fixed-size list per row."""
    import pyarrow as pa

    if arr.dtype == object:
        def text(v: Any) -> Any:
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else v

        if arr.ndim == 1:
            return pa.array([text(v) for v in arr])
        return pa.array([[text(v) for v in row] for row in arr.reshape(len(arr), -1)])
    if arr.ndim == 1:
        return pa.array(arr)
    per_row = int(np.prod(arr.shape[1:]))
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(arr).reshape(-1)), per_row)


def plan_columns(names: Sequence[str], request_inputs: Sequence[str], fmt: str) -> tuple[dict[str, Any], list[str]]:
    """Which input columns feed which request input, and which pass through to the output.

    Returns ({request input: column name, or a list of columns to stack}, passthrough columns).
    Columns named as the request inputs feed them (tabular models: one per feature); else a
    one-input model takes an image folder's ``bytes``, a text file's ``text``, or all numeric
    columns stacked in order (``id`` and non-numeric columns pass through). Text rows keep
    their ``text``.
    """
    present = set(names)
    if all(r in present for r in request_inputs):
        consumed = set() if fmt == "text" else set(request_inputs)  # a text row keeps its text
        return {r: r for r in request_inputs}, [n for n in names if n not in consumed]
    if len(request_inputs) != 1:
        lacking = [r for r in request_inputs if r not in present]
        raise ConfigError(f"the input has no column(s) {lacking[:10]}; the model takes {list(request_inputs)[:10]}")
    only = request_inputs[0]
    if fmt == "images":
        return {only: "bytes"}, ["path"]
    if fmt == "text":
        return {only: "text"}, ["text"]
    return {only: None}, []  # stack the numeric columns: decided per batch by their types


def batch_tensors(table: Any, plan: dict[str, Any], passthrough: list[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """A batch (pyarrow Table) -> request tensors, and the columns to pass through."""
    import pyarrow as pa

    tensors: dict[str, np.ndarray] = {}
    keep = list(passthrough)
    for name, source in plan.items():
        if source is not None:
            tensors[name] = column_to_array(table.column(source))
            continue
        numeric = [c for c, f in zip(table.column_names, table.schema)
                   if c != "id" and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))]
        if not numeric:
            raise ConfigError(f"the input has no column {name!r} and no numeric columns to stack for it")
        keep = [c for c in table.column_names if c not in numeric]
        tensors[name] = np.stack([column_to_array(table.column(c)) for c in numeric], axis=1)
    return tensors, keep


def output_folder(output: str, unit: Unit) -> tuple[Any, str, str]:
    """(filesystem, path, uri) of a unit's output folder."""
    fs, root = filesystem(output)
    path = posixpath.join(root, unit.key)
    return fs, path, _uri(output, path)


def is_done(output: str, unit: Unit) -> bool:
    import pyarrow.fs as pafs

    fs, path, _ = output_folder(output, unit)
    return fs.get_file_info(posixpath.join(path, SUCCESS)).type == pafs.FileType.File


def rows_written(output: str, unit: Unit) -> int:
    """Rows in a unit's output parquet files (from their footers)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path, _ = output_folder(output, unit)
    total = 0
    for f in fs.get_file_info(pafs.FileSelector(path)):
        if f.type == pafs.FileType.File and f.path.endswith(".parquet"):
            with fs.open_input_file(f.path) as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
    return total


def clear(output: str, unit: Unit) -> None:
    """Remove what an unfinished earlier run left in a unit's output folder."""
    import pyarrow.fs as pafs

    fs, path, _ = output_folder(output, unit)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path)


def mark_done(output: str, unit: Unit, note: Optional[bytes] = None) -> None:
    fs, path, _ = output_folder(output, unit)
    with fs.open_output_stream(posixpath.join(path, SUCCESS)) as fh:
        fh.write(note or b"")
