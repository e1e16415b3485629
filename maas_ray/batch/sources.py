"""Input units (what a re-run skips when done), their Ray datasets, and the mapping of a
batch's columns to the version's request inputs.

A unit is one input file (parquet, CSV, text), or a whole folder of images. Its output folder
is ``<output>/<key>``, the key derived from the file's path relative to ``--input`` (so the
same input gives the same names on every run).
"""

from __future__ import annotations

import csv
import hashlib
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import urlsplit

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


# The environment an s3:// input or output is opened with, on the driver: the AWS SDK's own
# variables. The filesystem built from them is handed (pickled) to every Ray Data read task,
# scoring actor and write task, whose processes need not have these variables themselves.
S3_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
          "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path within it) for a local path or an s3:// URI.

    For s3://, an endpoint (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``) and static
    credentials (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``) set
    here are written into the filesystem object, so that it works unchanged in Ray's other
    processes; without them, each process uses the AWS SDK's default chain (instance role,
    profile) as pyarrow does.
    """
    import pyarrow.fs as pafs

    if uri.startswith("s3://"):
        try:
            return s3_filesystem(uri)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError with the reason
            raise ConfigError(f"cannot open {uri}: {exc}") from exc
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), posixpath.abspath(local)


def s3_filesystem(uri: str, env: Optional[Mapping[str, str]] = None) -> tuple[Any, str]:
    """(S3FileSystem, bucket/key) for an s3:// URI, endpoint and credentials from ``env``
    (default: this process's environment) written into it explicitly."""
    import pyarrow.fs as pafs

    env = os.environ if env is None else env
    if "?" in uri:
        raise ConfigError(f"{uri!r}: query parameters are not supported here; set AWS_ENDPOINT_URL "
                          "(and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) instead")
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not endpoint and not (key and secret):
        return pafs.FileSystem.from_uri(uri)  # the default chain, in every process
    opts: dict[str, Any] = {}
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"AWS_ENDPOINT_URL must be http(s)://host[:port], got {endpoint!r}")
        opts.update(endpoint_override=parts.netloc, scheme=parts.scheme,
                    region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1")
        path = uri[len("s3://"):].rstrip("/")
    else:  # AWS itself: from_uri finds the bucket's region
        fs, path = pafs.FileSystem.from_uri(uri)
        opts["region"] = fs.region
    if key and secret:
        opts.update(access_key=key, secret_key=secret, session_token=env.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**opts), path


def ray_read_args(uri: str) -> dict[str, Any]:
    """The ``filesystem=`` a Ray Data read of ``uri`` needs: the explicit S3 filesystem for
    s3:// (see :func:`filesystem`), nothing for a local path."""
    return {"filesystem": filesystem(uri)[0]} if uri.startswith("s3://") else {}


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
    fs = ray_read_args(unit.uri)
    if fmt == "parquet":
        return ray_data.read_parquet(unit.uri, **fs)
    if fmt == "csv":
        return ray_data.read_csv(unit.uri, **fs)
    if fmt == "text":
        return ray_data.read_text(unit.uri, **fs)
    return ray_data.read_binary_files(unit.uri, include_paths=True, file_extensions=["png", "jpg", "jpeg"], **fs)


def columns(unit: Unit, fmt: str) -> list[str]:
    """A parquet or CSV unit's column names (the parquet footer; the CSV header line); [] for
    the other formats, whose columns batch scoring makes itself."""
    if fmt not in ("parquet", "csv"):
        return []
    fs, path = filesystem(unit.uri)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(path) as fh:
            return list(pq.read_schema(fh).names)
    with fs.open_input_stream(path) as fh:
        header = fh.read(65536).split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
    return next(csv.reader([header]), [])


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
