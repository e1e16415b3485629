"""Run a batch-scoring job: list the input's units, skip the done ones, score the rest in one
Ray Data pipeline with one actor pool (rows tagged with their unit), write each unit's parquet
into its own folder and mark it done."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from maas_ray.batch.config import BatchConfig
from maas_ray.batch.gpus import check_cluster_gpus
from maas_ray.batch.scorer import UNIT_COLUMN, VersionScorer
from maas_ray.batch.sources import (
    Unit,
    clear,
    columns,
    detect_format,
    filesystem,
    is_done,
    list_units,
    mark_done,
    output_folder,
    ray_read_args,
    read_unit,
    rows_written,
)
from maas_ray.errors import ConfigError, MaasError
from maas_ray.registry import Registry

logger = logging.getLogger(__name__)


@dataclass
class BatchReport:
    """What one run did: rows scored (this run), units scored and skipped, wall time."""

    model: str
    version: int
    output: str
    rows: int = 0
    seconds: float = 0.0
    scored_units: list[str] = field(default_factory=list)
    skipped_units: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        skipped = f" (skipped {len(self.skipped_units)} done input(s))" if self.skipped_units else ""
        return (f"scored {self.rows} rows in {self.seconds:.1f} s ({self.rows_per_s:.0f} rows/s) -> "
                f"{self.output}{skipped}")


def run_batch(config: BatchConfig, *, on_unit: Optional[Callable[[str, int], None]] = None) -> BatchReport:
    """Score ``config.input`` with ``config.model``:``config.version`` into ``config.output``.

    Uses the Ray this process is connected to (``ray.init`` first, or Ray starts a local
    one). All the input's pending units stream through one Ray Data pipeline, so one actor
    pool (each actor loading the version once) scores the whole job; each row carries its
    unit's key, and the sink writes it into that unit's output folder. ``on_unit(key, rows)``
    is told of each scored unit once the pipeline has finished, in the input's order. Raises
    ConfigError for an input or model it cannot score, or for ``gpus_per_actor`` > 0 on a
    cluster that has (and can autoscale to) no node with that many GPUs, and the
    preprocessor's InvalidInputError for bad rows.
    """
    import ray.data

    job = _Job(config)
    pending = job.pending()
    if pending:
        if config.gpus_per_actor > 0:
            check_cluster_gpus(config.gpus_per_actor)
        # One read per group of same-schema files (one group, usually): each row tagged with
        # its unit's key, cut into blocks of at most batch_size rows.
        parts = [_read_group(group, job.fmt, ray.data).repartition(target_num_rows_per_block=config.batch_size)
                 for group in _schema_groups(pending, job.fmt)]
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        # batch_size=None: a batch is one block (<= batch_size rows of one group), so a batch
        # never mixes the columns of two files with different schemas.
        job.write(lambda: job.score(ds, batch_size=None).write_datasink(_unit_sink(config.output)))
    for unit in pending:
        job.finish(unit, on_unit)
    job.report.seconds = time.perf_counter() - job.t0
    return job.report


def _run_per_unit(config: BatchConfig, *, on_unit: Optional[Callable[[str, int], None]] = None) -> BatchReport:
    """The former job: one pipeline, hence one actor pool, per unit. Kept only so that
    benchmarks/batch_bench.py can measure against it; not part of the API."""
    import ray.data

    job = _Job(config)
    for unit in job.pending():
        ds = read_unit(unit, job.fmt, ray.data).repartition(target_num_rows_per_block=config.batch_size)
        folder = output_folder(config.output, unit)[2]
        job.write(lambda ds=ds, folder=folder: job.score(ds, batch_size=config.batch_size).write_parquet(
            folder, **ray_read_args(folder)))
        job.finish(unit, on_unit)
    job.report.seconds = time.perf_counter() - job.t0
    return job.report


class _Job:
    """One run's resolved version, format, units and report, and the steps both paths share."""

    def __init__(self, config: BatchConfig) -> None:
        reg = Registry(config.registry)
        self.config = config
        # Actors open the registry themselves: an absolute root, whatever their working directory.
        self.root = reg.root if "://" in reg.root else os.path.abspath(os.path.expanduser(reg.root))
        self.version = reg.resolve(config.model, config.version)
        manifest = reg.describe(config.model, self.version)
        self.fmt = detect_format(config.input, config.format, manifest.preprocessor.name)
        self.units = list_units(config.input, self.fmt)
        self.report = BatchReport(config.model, self.version, config.output)
        self.t0 = time.perf_counter()

    def pending(self) -> list[Unit]:
        """The units not marked done, their output folders emptied (an unfinished earlier
        run's files) and present; the done ones go to the report as skipped."""
        todo = []
        for unit in self.units:
            if is_done(self.config.output, unit):
                self.report.skipped_units.append(unit.key)
                continue
            clear(self.config.output, unit)
            fs, path, _ = output_folder(self.config.output, unit)
            fs.create_dir(path, recursive=True)
            todo.append(unit)
        return todo

    def score(self, ds: Any, *, batch_size: Optional[int]) -> Any:
        import ray.data

        c = self.config
        return ds.map_batches(
            VersionScorer,
            fn_constructor_kwargs={"registry": self.root, "model": c.model, "version": self.version,
                                   "fmt": self.fmt, "device": "cuda" if c.gpus_per_actor > 0 else "cpu",
                                   "threads": max(1, int(c.cpus_per_actor))},
            batch_format="pyarrow",
            batch_size=batch_size,
            # Ray Data creates pool actors with max_restarts=-1 and max_task_retries=-1: a killed
            # actor restarts and the batch it held is retried, so no row is lost.
            compute=ray.data.ActorPoolStrategy(size=c.actors),
            num_cpus=c.cpus_per_actor,
            num_gpus=c.gpus_per_actor or None,
        )

    @staticmethod
    def write(execute: Callable[[], Any]) -> None:
        """Run the pipeline; a MaasError a task raised surfaces as itself."""
        try:
            with warnings.catch_warnings():
                # A job smaller than one batch per actor: Ray Data warns the pool is too big.
                warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
                execute()
        except MaasError:
            raise
        except Exception as exc:  # noqa: BLE001 - a task's error arrives wrapped by Ray
            cause = _maas_cause(exc)
            if cause is not None:
                raise cause from exc
            raise

    def finish(self, unit: Unit, on_unit: Optional[Callable[[str, int], None]]) -> None:
        c = self.config
        rows = rows_written(c.output, unit)
        mark_done(c.output, unit, json.dumps(
            {"input": unit.uri, "model": c.model, "version": self.version, "rows": rows}).encode())
        self.report.rows += rows
        self.report.scored_units.append(unit.key)
        if on_unit is not None:
            on_unit(unit.key, rows)


def _schema_groups(units: list[Unit], fmt: str) -> list[list[Unit]]:
    """The units grouped by their columns (parquet: the footer's schema; CSV: the header
    line), in the input's order: one read per group keeps each block to one schema."""
    if fmt not in ("parquet", "csv") or len(units) < 2:
        return [units]
    import pyarrow.parquet as pq

    groups: dict[str, list[Unit]] = {}
    for unit in units:
        fs, path = filesystem(unit.uri)
        if fmt == "parquet":
            with fs.open_input_file(path) as fh:
                sig = str(pq.read_schema(fh).remove_metadata())
        else:
            with fs.open_input_stream(path) as fh:
                sig = fh.read(65536).split(b"\n", 1)[0].decode("utf-8", "replace")
        groups.setdefault(sig, []).append(unit)
    return list(groups.values())


def _read_group(units: list[Unit], fmt: str, ray_data: Any) -> Any:
    """One Ray dataset over a group of same-schema units, each row tagged with its unit's key.

    Ray Data's ``include_paths`` writes the file's path into a column named ``path``,
    overwriting a column of the input's own by that name; so a group whose files have a
    ``path`` column is read file by file, each tagged as a whole, and the reads unioned (one
    actor pool still scores them all)."""
    if "path" not in columns(units[0], fmt):
        return _read_tagged(units, fmt, ray_data)
    logger.info("the input has a column named 'path': reading its %d file(s) one by one", len(units))
    parts = [read_unit(u, fmt, ray_data).map_batches(_Tag(u.key), batch_format="pyarrow", batch_size=None,
                                                      zero_copy_batch=True) for u in units]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _read_tagged(units: list[Unit], fmt: str, ray_data: Any) -> Any:
    """One Ray dataset over the units, each row tagged with its unit's key (from the file
    path Ray Data reports; an image folder is one unit, tagged as a whole)."""
    if fmt == "images":
        return read_unit(units[0], fmt, ray_data).map_batches(
            _Tag(units[0].key), batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    uris = [u.uri for u in units]
    read = {"parquet": ray_data.read_parquet, "csv": ray_data.read_csv, "text": ray_data.read_text}[fmt]
    return read(uris, include_paths=True, **ray_read_args(uris[0])).map_batches(
        _TagByPath({u.path: u.key for u in units}), batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


class _TagByPath:
    """Ray Data map: Ray Data's ``path`` column (the file each row came from) -> the unit
    column, dropping ``path``."""

    def __init__(self, keys: dict[str, str]) -> None:
        self.keys = keys

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        if UNIT_COLUMN in table.column_names:
            raise ConfigError(f"the input has a column named {UNIT_COLUMN!r}, which batch scoring reserves")
        paths = table.column("path")
        uniq = paths.unique().to_pylist()
        lookup = {p: self._key(p) for p in uniq}
        keys = pa.array([lookup[p] for p in paths.to_pylist()], pa.string()) if len(uniq) > 1 else \
            pa.array([lookup[uniq[0]]] * table.num_rows if uniq else [], pa.string())
        return table.drop_columns(["path"]).append_column(UNIT_COLUMN, keys)

    def _key(self, path: str) -> str:
        for candidate in (path, path.split("://", 1)[-1], posixpath.abspath(path) if "://" not in path else path):
            if candidate in self.keys:
                return self.keys[candidate]
        raise ConfigError(f"batch scoring read rows from {path!r}, which is none of the job's inputs")


class _Tag:
    """Ray Data map: adds the unit's key to every row (a dictionary-encoded constant column)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        if UNIT_COLUMN in table.column_names:
            raise ConfigError(f"the input has a column named {UNIT_COLUMN!r}, which batch scoring reserves")
        return table.append_column(UNIT_COLUMN, pa.array([self.key] * table.num_rows, pa.string()))


def split_by_unit(table: Any) -> dict[str, Any]:
    """A scored table -> {unit key: its rows, without the unit column}, in the table's order."""
    import pyarrow.compute as pc

    col = table.column(UNIT_COLUMN)
    rest = table.drop_columns([UNIT_COLUMN])
    keys = pc.unique(col).to_pylist()
    if len(keys) == 1:
        return {keys[0]: rest}
    return {k: rest.filter(pc.equal(col, k)) for k in keys}


def _unit_sink(output: str) -> Any:
    """A Ray Data Datasink writing each block's rows into their units' output folders: one
    parquet file per unit per write task, named uniquely (a retried task writes anew). The
    filesystem is opened here, on the driver, and travels with the sink to the write tasks
    (an s3:// output's endpoint and credentials with it)."""
    from ray.data import Datasink

    fs, root = filesystem(output)

    class _UnitSink(Datasink):
        def get_name(self) -> str:
            return "UnitParquet"

        def write(self, blocks: Any, ctx: Any) -> dict[str, int]:
            import pyarrow as pa
            import pyarrow.parquet as pq

            groups: dict[str, list[Any]] = {}
            for block in blocks:
                if block.num_rows:
                    for key, part in split_by_unit(block).items():
                        groups.setdefault(key, []).append(part)
            written = {}
            for key, parts in groups.items():
                table = parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="default")
                name = f"part-{uuid.uuid4().hex}.parquet"
                pq.write_table(table, posixpath.join(root, key, name), filesystem=fs)
                written[key] = table.num_rows
            return written

    return _UnitSink()


def _maas_cause(exc: BaseException) -> Optional[MaasError]:
    """The MaasError a Ray task raised, found through Ray's wrappers (RayTaskError chains)."""
    seen = set()
    cur: Any = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, MaasError):
            return cur
        inner = getattr(cur, "cause", None)
        cur = inner if isinstance(inner, BaseException) else (cur.__cause__ or cur.__context__)
    return None


__all__ = ["BatchReport", "run_batch"]
