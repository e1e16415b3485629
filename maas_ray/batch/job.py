"""Run a batch-scoring job: list the input's units, skip the done ones, score the rest with a
Ray Data actor pool, write each unit's parquet and mark it done."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from maas_ray.batch.config import BatchConfig
from maas_ray.batch.scorer import VersionScorer
from maas_ray.batch.sources import (
    clear,
    detect_format,
    is_done,
    list_units,
    mark_done,
    output_folder,
    read_unit,
    rows_written,
)
from maas_ray.errors import MaasError
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
    one). ``on_unit(key, rows)`` is told of each unit as it finishes. Raises ConfigError for an
    input or model it cannot score, and the preprocessor's InvalidInputError for bad rows.
    """
    import ray
    import ray.data

    reg = Registry(config.registry)
    # Actors open the registry themselves: an absolute root, whatever their working directory.
    root = reg.root if "://" in reg.root else os.path.abspath(os.path.expanduser(reg.root))
    version = reg.resolve(config.model, config.version)
    manifest = reg.describe(config.model, version)
    fmt = detect_format(config.input, config.format, manifest.preprocessor.name)
    units = list_units(config.input, fmt)
    report = BatchReport(config.model, version, config.output)
    device = "cuda" if config.gpus_per_actor > 0 else "cpu"
    threads = max(1, int(config.cpus_per_actor))
    t0 = time.perf_counter()
    for unit in units:
        if is_done(config.output, unit):
            report.skipped_units.append(unit.key)
            continue
        clear(config.output, unit)
        # Split the unit into batch-sized blocks (streaming, no shuffle): one file of one row
        # group would otherwise be one task for one actor.
        blocks = read_unit(unit, fmt, ray.data).repartition(target_num_rows_per_block=config.batch_size)
        ds = blocks.map_batches(
            VersionScorer,
            fn_constructor_kwargs={"registry": root, "model": config.model, "version": version,
                                   "fmt": fmt, "device": device, "threads": threads},
            batch_format="pyarrow",
            batch_size=config.batch_size,
            # Ray Data creates pool actors with max_restarts=-1 and max_task_retries=-1: a killed
            # actor restarts and the batch it held is retried, so no row is lost.
            compute=ray.data.ActorPoolStrategy(size=config.actors),
            num_cpus=config.cpus_per_actor,
            num_gpus=config.gpus_per_actor or None,
        )
        try:
            with warnings.catch_warnings():
                # A unit smaller than one batch per actor: Ray Data warns the pool is too big.
                warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
                ds.write_parquet(output_folder(config.output, unit)[2])
        except MaasError:
            raise
        except Exception as exc:  # noqa: BLE001 - a task's error arrives wrapped by Ray
            cause = _maas_cause(exc)
            if cause is not None:
                raise cause from exc
            raise
        rows = rows_written(config.output, unit)
        mark_done(config.output, unit, json.dumps(
            {"input": unit.uri, "model": config.model, "version": version, "rows": rows}).encode())
        report.rows += rows
        report.scored_units.append(unit.key)
        if on_unit is not None:
            on_unit(unit.key, rows)
    report.seconds = time.perf_counter() - t0
    return report


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
