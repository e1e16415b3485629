"""Offline batch scoring: ``maas batch MODEL:VERSION --input ... --output ...``.

Ray Data reads the input (parquet / CSV files, a folder of images, text files; local or
``s3://``), an actor pool scores it with the version's own pre- and postprocessors and
onnxruntime runner (:class:`maas_ray.serving.replicas.LocalPipeline`: the same code online
serving runs, loaded once per actor), and writes parquet. Each input file (a folder of images:
the folder) is one unit of work with a deterministic output directory, marked done by a
``_SUCCESS`` file: a re-run skips the done units and redoes the rest.

- :mod:`maas_ray.batch.config`: :class:`BatchConfig`, the job's settings
- :mod:`maas_ray.batch.sources`: input units, their Ray datasets, columns -> request inputs
- :mod:`maas_ray.batch.scorer`: the actor that scores one batch
- :mod:`maas_ray.batch.job`: :func:`run_batch`, the job itself
- :mod:`maas_ray.batch.cli`: the ``maas batch`` subcommand
"""

from maas_ray.batch.config import BatchConfig
from maas_ray.batch.job import BatchReport, run_batch

__all__ = ["BatchConfig", "BatchReport", "run_batch"]
