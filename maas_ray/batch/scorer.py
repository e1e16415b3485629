"""The Ray Data actor that scores batches: one version loaded once per actor, run through
the same preprocessor, onnxruntime runner and postprocessor as online serving."""

from __future__ import annotations

import logging
from typing import Any, Optional

from maas_ray.batch.sources import array_to_column, batch_tensors, plan_columns
from maas_ray.serving.config import Limits, ModelConfig
from maas_ray.serving.replicas import LocalPipeline

logger = logging.getLogger(__name__)

UNIT_COLUMN = "__maas_unit"  # the input unit a row came from (one job scores many units in one pool)


def load_pipeline(registry: Optional[str], model: str, version: int, *, device: str = "cpu",
                  threads: Optional[int] = None) -> LocalPipeline:
    """The version's LocalPipeline (the ingress placement's in-process pre -> run -> post)."""
    config = ModelConfig(name=model, versions=[{"version": version}], device=device, intra_op_threads=threads)
    return LocalPipeline(registry, config, version, limits=Limits())


class VersionScorer:
    """Ray Data ``map_batches`` callable class: a pyarrow Table in, the pass-through columns
    plus the version's response outputs out (2-D outputs as fixed-size lists per row).

    A batch that the preprocessor refuses (an unseen category, a NaN in a column that is not
    nullable, ...) fails the job with the preprocessor's message, as a request would get a 400.
    """

    def __init__(self, registry: Optional[str], model: str, version: int, fmt: str, device: str,
                 threads: Optional[int]) -> None:
        self.pipeline = load_pipeline(registry, model, version, device=device, threads=threads)
        # What onnxruntime really runs (device="cuda" already fails unless CUDA is first).
        self.providers: list[str] = list(self.pipeline.batched.runner.session.get_providers())
        logger.info("batch scorer %s:%s (device %s): onnxruntime providers %s", model, version, device,
                    self.providers)
        self.fmt = fmt
        self.inputs = [r.name for r in self.pipeline.pre.request_inputs]
        self._plans: dict[tuple[str, ...], tuple[dict[str, Any], list[str]]] = {}

    def score(self, tensors: dict) -> dict:
        """Request tensors -> response tensors: exactly the online path's three stages, run
        on the whole batch (no dynamic batching: the batch is already large)."""
        p = self.pipeline
        feeds = p.pre(tensors, strict_dtypes=False)
        return p.post(p.batched.runner.run(feeds))

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        unit = None
        if UNIT_COLUMN in table.column_names:  # carried through whatever the plan passes on
            unit = table.column(UNIT_COLUMN)
            table = table.drop_columns([UNIT_COLUMN])
        names = tuple(table.column_names)
        if names not in self._plans:
            self._plans[names] = plan_columns(names, self.inputs, self.fmt)
        plan, passthrough = self._plans[names]
        tensors, keep = batch_tensors(table, plan, passthrough)
        outputs = self.score(tensors)
        columns = {c: table.column(c) for c in keep if c not in outputs}
        columns.update({n: array_to_column(a) for n, a in outputs.items()})
        if unit is not None:
            columns[UNIT_COLUMN] = unit
        return pa.table(columns)
