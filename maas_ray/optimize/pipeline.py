"""optimize_and_publish: parent version -> transform -> measure parent and child on the same
held-out rows and cores -> publish the child (parent recorded) unless accuracy dropped too much."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

from maas_ray.errors import ConfigError
from maas_ray.optimize.config import OptimizeConfig
from maas_ray.optimize.evaluate import Measurement, measure
from maas_ray.optimize.transforms import transform
from maas_ray.registry import ExtraFile, Manifest, ParentRef, Registry

if TYPE_CHECKING:
    from maas_ray.optimize.generative import GenerativeOptimizeReport

logger = logging.getLogger(__name__)

# Extra files the child keeps. Weights are dropped on purpose: they are the parent's FP32
# torch weights, not what the child's graph computes; fine-tune from the parent (recorded).
# External data is dropped because the transforms write one self-contained graph.
_KEEP_ROLES = ("tokenizer", "model_spec")


@dataclass(frozen=True)
class OptimizeReport:
    manifest: Manifest
    parent: Measurement
    child: Measurement
    parent_size: int

    @property
    def accuracy_delta(self) -> float:
        return self.child.accuracy - self.parent.accuracy

    @property
    def speedup_b1(self) -> float:
        return self.parent.p50_ms_b1 / self.child.p50_ms_b1

    @property
    def speedup_best(self) -> float:
        return self.child.best_items_per_s / self.parent.best_items_per_s

    @property
    def size_ratio(self) -> float:
        return self.manifest.size_bytes / self.parent_size


def _held_out(parent: Manifest, tokenizer_json: Optional[str]):
    """The parent's validation and test rows, rebuilt from its recorded training config."""
    from maas_ray.train.data import load_splits  # numpy + tokenizers; no torch

    tc = parent.training_config or {}
    if "data" not in tc:
        raise ConfigError(
            f"{parent.model}:{parent.version} records no training data (published outside `maas train`?); "
            "cannot measure accuracy on its held-out split"
        )
    splits = load_splits(
        tc["data"], val_fraction=tc["val_fraction"], test_fraction=tc["test_fraction"], seed=tc["seed"],
        vocab_size=tc.get("vocab_size", 2000), max_seq_len=tc.get("max_seq_len", 32), tokenizer_json=tokenizer_json,
    )
    recorded = (parent.dataset or {}).get("sha256")
    if recorded and recorded != splits.identity["sha256"]:
        raise ConfigError(
            f"the data {tc['data']!r} changed since {parent.model}:{parent.version} was trained "
            f"(sha256 {splits.identity['sha256'][:12]}... vs recorded {recorded[:12]}...): "
            "accuracy would not be comparable"
        )
    return splits


def optimize_and_publish(
    model: str, ref: Union[int, str, None], cfg: OptimizeConfig, registry: Optional[Registry] = None
) -> Union[OptimizeReport, "GenerativeOptimizeReport"]:
    """Derive an optimized version of ``model:ref`` and publish it as the next version.

    A generative version (``kind: generative``) goes to
    :func:`~maas_ray.optimize.generative.optimize_generative` (int8 only; perplexity and decode
    tokens/s instead of accuracy and batches) and returns its ``GenerativeOptimizeReport``.

    Raises:
        ConfigError: the accuracy drop exceeds ``cfg.max_accuracy_drop`` (nothing published),
            or the parent's held-out data cannot be rebuilt.
    """
    registry = registry or Registry()
    if registry.describe(model, ref).generation is not None:
        from maas_ray.optimize.generative import optimize_generative

        return optimize_generative(model, ref, cfg, registry)
    if cfg.eval_text is not None:
        raise ConfigError(f"eval_text applies to generative versions only; {model}:{ref} is a classifier "
                          "(measured on its own test split)")
    loaded = registry.load(model, ref, skip_roles=("weights",))  # sha256-verified
    pm = loaded.manifest
    tok_name = loaded.file_for("tokenizer")
    tokenizer = loaded.files[tok_name].decode() if tok_name else None
    splits = _held_out(pm, tokenizer)

    child_bytes = transform(loaded.model_bytes, cfg, calibration=splits.x_val)
    timing = dict(threads=cfg.threads, batch_sizes=cfg.batch_sizes, seconds=cfg.timing_seconds)
    parent_m = measure(loaded.model_bytes, splits.x_test, splits.y_test, **timing)
    child_m = measure(child_bytes, splits.x_test, splits.y_test, **timing)
    drop = parent_m.accuracy - child_m.accuracy
    if drop > cfg.max_accuracy_drop:
        raise ConfigError(
            f"not published: {cfg.method}{' static' if cfg.static else ''} drops test accuracy of {model}:{pm.version} "
            f"from {parent_m.accuracy:.4f} to {child_m.accuracy:.4f} ({drop:+.4f} > max_accuracy_drop {cfg.max_accuracy_drop})"
        )

    import onnxruntime as ort

    metrics = {
        "test_accuracy": child_m.accuracy,
        "parent_test_accuracy": parent_m.accuracy,
        "accuracy_delta": child_m.accuracy - parent_m.accuracy,
        "latency_p50_ms_b1": child_m.p50_ms_b1,
        "parent_latency_p50_ms_b1": parent_m.p50_ms_b1,
        "best_batch": float(child_m.best_batch),
        "throughput_best": child_m.best_items_per_s,
        "parent_best_batch": float(parent_m.best_batch),
        "parent_throughput_best": parent_m.best_items_per_s,
        "size_bytes": float(len(child_bytes)),
        "parent_size_bytes": float(pm.size_bytes),
        "threads": float(cfg.threads),
    }
    config = dict(pm.training_config or {})
    config["optimization"] = {
        **cfg.model_dump(mode="json"), "parent": f"{model}:{pm.version}",
        "onnxruntime": ort.__version__, "measured_on": "test split, in process, CPUExecutionProvider",
    }
    files = {
        name: ExtraFile(data, role=pm.files[name].role)
        for name, data in loaded.files.items() if pm.files[name].role in _KEEP_ROLES
    }
    manifest = registry.publish(
        model, child_bytes,
        preprocessor=pm.preprocessor, postprocessor=pm.postprocessor,
        metrics=metrics, training_config=config,
        parent=ParentRef(model=model, version=pm.version),
        description=f"{cfg.method}{' static' if cfg.static else ''} of {model}:{pm.version}",
        files=files, model_spec=pm.model_spec, dataset=pm.dataset,
    )
    report = OptimizeReport(manifest, parent_m, child_m, pm.size_bytes)
    logger.info("published %s:%d from %s:%d", model, manifest.version, model, pm.version)
    return report
