"""documents -> tokenizer (training split) -> Ray Train DDP on next-token loss -> the checkpoint
with the lowest validation loss -> test perplexity once -> sample generations (and the reference
corpus's score) -> ONNX with a KV cache -> parity -> publish a ``kind: generative`` version."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from maas_ray.errors import ConfigError, TrainingError
from maas_ray.registry import Manifest, Registry
from maas_ray.train.lm import tokenizer as tk
from maas_ray.train.lm.config import REFERENCE_CORPUS, LMTrainConfig
from maas_ray.train.lm.data import (
    LMSplits,
    LMStreams,
    load_lm_splits,
    load_lm_streams,
    streamed_source,
)
from maas_ray.train.lm.publish import (
    export_and_check,
    load_published_lm,
    publish_lm,
)
from maas_ray.train.lm.reference import greedy_texts, score_reference
from maas_ray.train.lm.task import (
    TASK_PATH,
    batches_loss_sums,
    build,
    model_spec,
    token_loss_sums,
)
from maas_ray.train.loop import load_state, train_loop_per_worker
from maas_ray.train.pipeline import _cluster_has_gpu, _fit_with_progress

logger = logging.getLogger(__name__)
METRIC, MODE = "val_loss", "min"


class LMTrainReport(BaseModel):
    """What a language-model training run produced and measured."""

    model_config = ConfigDict(protected_namespaces=())

    manifest: Manifest = Field(description="The published version.")
    val_perplexity: float = Field(description="Validation perplexity of the chosen checkpoint.")
    test_perplexity: float = Field(description="On the test split, once, with the chosen checkpoint.")
    best_epoch: int = Field(description="Epoch (0-based) of the chosen checkpoint.")
    history: list[dict[str, float]] = Field(description="Per-epoch metrics of the final worker group.")
    samples: dict[str, str] = Field(description="Sample prompt -> greedy continuation.")
    scores: dict[str, float] = Field(default_factory=dict, description="The reference corpus's rules on held-out prompts.")
    parity_max_abs_diff: float
    export_seconds: float
    epochs_run: int
    resumed_from_epoch: int
    wall_seconds: float = Field(description="Ray Train fit, from start to the last epoch.")
    checkpoint_path: str
    streamed: bool = Field(default=False, description="The windows were tokenized in Ray Data and reached the "
                           "workers as dataset shards (data_loading), not as arrays in the object store.")


def format_lm_epoch(m: dict[str, Any]) -> str:
    """One console line per epoch: train loss, validation loss and perplexity (* = best so far)."""
    return (
        f"epoch {m['epoch'] + 1:3d}/{m['epochs']}  train_loss {m['train_loss']:.4f}  "
        f"val_loss {m['val_loss']:.4f}  val_ppl {m['val_perplexity']:8.3f}{' *' if m['improved'] else '  '}  "
        f"{m['samples_per_s'] * m.get('context_length', 1):8.0f} tokens/s  {m['elapsed_s']:6.1f}s"
    )


def _trainer(cfg: LMTrainConfig, loop_config: dict[str, Any], use_gpu: bool, datasets: Optional[dict[str, Any]] = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    run_name = cfg.run_name or f"{cfg.model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config, datasets=datasets,  # each split: equal shards
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name, storage_path=cfg.storage_path, failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    ), run_name


def perplexity(model: torch.nn.Module, splits: LMSplits | LMStreams) -> float:
    """On the test windows; streamed: batch by batch, never one array on the driver."""
    if isinstance(splits, LMStreams):
        model.eval()
        batches = splits.datasets["test"].iter_torch_batches(batch_size=32)
        sums = batches_loss_sums(model, ((b["x"], b["y"]) for b in batches))
    else:
        sums = token_loss_sums(model, torch.from_numpy(splits.x_test), torch.from_numpy(splits.y_test))
    return math.exp(min((sums[0] / sums[1]).item(), 50.0))


def train_and_publish_lm(
    cfg: LMTrainConfig,
    registry: Optional[Registry] = None,
    *,
    on_epoch: Optional[Callable[[dict[str, Any]], None]] = None,
    ray_init: Optional[dict[str, Any]] = None,
) -> LMTrainReport:
    """Train a ``decoder-lm`` (or a factory's causal LM, ``cfg.model`` an import path) with Ray
    Train DDP on the connected Ray cluster (started locally if none) and publish it. ``on_epoch`` gets rank 0's metrics after every epoch
    (:func:`format_lm_epoch` makes the console line); by default they are logged at INFO.

    With ``cfg.parent`` the parent's architecture and tokenizer are reused and its weights are
    the starting point. The data, the tokenizer and the model are checked on the driver, before
    any worker starts.
    """
    import ray
    from ray.util.queue import Queue

    registry = registry or Registry()
    parent = load_published_lm(registry, *cfg.parent.split(":")) if cfg.parent else None
    if parent is not None:  # fine-tuning keeps the parent's architecture and tokenizer
        parent_model = parent.spec["model"]
        parent_args = {k: v for k, v in parent.spec["model_args"].items() if k != "vocab_size"}
        if (cfg.model, cfg.model_args) != (parent_model, parent_args):
            logger.warning("fine-tuning keeps the parent's model %s %s, not %s %s", parent_model, parent_args,
                           cfg.model, cfg.model_args)
            cfg = cfg.model_copy(update={"model": parent_model, "model_args": parent_args})
    if not ray.is_initialized() and ("://" in cfg.data or os.path.isdir(cfg.data)):
        ray.init(**(ray_init or {}))  # a folder or prefix of tables is read with Ray Data; no workers yet
    suffix = streamed_source(cfg)
    splits: LMSplits | LMStreams
    if suffix is not None:  # tokenized and windowed in Ray Data, fed to the workers as shards
        splits = load_lm_streams(cfg, suffix, tokenizer_json=parent.tokenizer_json if parent else None)
        if splits.identity["rows"]["train"] < cfg.num_workers:
            raise ConfigError(f"the train split has {splits.identity['rows']['train']} windows, fewer than "
                              f"num_workers ({cfg.num_workers}): every worker needs one")
        first_window = torch.tensor(splits.datasets["train"].take_batch(1, batch_format="numpy")["x"])  # a copy: read-only
    else:
        splits = load_lm_splits(cfg, tokenizer_json=parent.tokenizer_json if parent else None)
        first_window = torch.from_numpy(splits.x_train[:1])
    streamed = isinstance(splits, LMStreams)
    vocab = tk.load(splits.tokenizer_json).get_vocab_size()
    torch.manual_seed(cfg.seed)
    spec_doc = model_spec(cfg.model, cfg.model_args, vocab)
    try:  # fails here, before any worker, if the model cannot be built or run the data
        with torch.no_grad():
            build(spec_doc, probe=True).eval()(first_window)
    except ConfigError:
        raise
    except Exception as exc:  # user code
        raise ConfigError(f"model {cfg.model!r} failed on a window of {cfg.context_length} training tokens: "
                          f"{type(exc).__name__}: {exc}") from exc

    if not ray.is_initialized():
        ray.init(**(ray_init or {}))
    use_gpu = _cluster_has_gpu() if cfg.use_gpu is None else cfg.use_gpu
    loop_config: dict[str, Any] = {
        "task": TASK_PATH,
        "train_config": cfg.model_dump(),
        "model_spec": spec_doc,
        "splits": None if streamed else ray.put(splits),  # None: the loop reads its dataset shards
        "rows": splits.identity["rows"],
        "init_state": ray.put(parent.model.state_dict()) if parent else None,
        "progress": Queue(),
    }
    datasets = {"train": splits.datasets["train"], "validation": splits.datasets["validation"]} if streamed else None
    trainer, run_name = _trainer(cfg, loop_config, use_gpu, datasets)
    logger.info("training %s (%s %s): %d %s workers, run %s, data %s", cfg.model_name, cfg.model, spec_doc["model_args"],
                cfg.num_workers, "GPU" if use_gpu else "CPU", run_name,
                "streamed with Ray Data" if streamed else "in memory (object store)")
    report_epoch = on_epoch or (lambda m: logger.info("%s", format_lm_epoch(m)))
    t0 = time.perf_counter()
    result = _fit_with_progress(trainer, lambda m: report_epoch({**m, "context_length": cfg.context_length}),
                                loop_config["progress"])
    ray.kill(loop_config["progress"].actor)
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise TrainingError(f"training failed: {result.error}") from result.error
    best = result.get_best_checkpoint(METRIC, MODE) or result.checkpoint
    if best is None:
        raise TrainingError("training produced no checkpoint")
    with best.as_directory() as path:
        state = load_state(path)

    model = build(spec_doc)
    model.load_state_dict(state["model"])
    model.eval()
    test_ppl = perplexity(model, splits)  # once, on the chosen checkpoint
    if cfg.max_test_perplexity is not None and test_ppl > cfg.max_test_perplexity:
        raise TrainingError(f"test perplexity {test_ppl:.3f} is above max_test_perplexity {cfg.max_test_perplexity}")
    samples = dict(zip(cfg.sample_prompts, greedy_texts(model, splits.tokenizer_json, cfg.sample_prompts, cfg.sample_tokens)))
    scores = score_reference(model, splits.tokenizer_json, cfg.score_prompts, cfg.seed) if cfg.data == REFERENCE_CORPUS else {}
    prompts = [*cfg.sample_prompts, *(d[:200] for d in splits.val_documents[:4])]
    exported = export_and_check(model, splits.tokenizer_json, prompts, decode_steps=8, tolerance=cfg.parity_tolerance)
    val_loss = float(state[METRIC])
    metrics = {
        "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0)), "test_perplexity": test_ppl,
        "best_epoch": float(state["epoch"]), "export_seconds": exported.export_seconds, **scores,
    }
    manifest = publish_lm(
        registry, cfg.model_name, model, splits.tokenizer_json, exported, metrics=metrics,
        training_config=cfg.model_dump(mode="json"), parent=parent.ref if parent else None, dataset=splits.identity,
        description=f"{cfg.model} {spec_doc['model_args']} trained on {splits.identity['source']}",
    )
    ret = result.return_value or {}
    history = ret.get("history", [])
    return LMTrainReport(
        manifest=manifest, val_perplexity=metrics["val_perplexity"], test_perplexity=test_ppl,
        best_epoch=int(state["epoch"]), history=history, samples=samples, scores=scores,
        parity_max_abs_diff=exported.parity_max_abs_diff, export_seconds=exported.export_seconds,
        epochs_run=len(history), resumed_from_epoch=int(ret.get("start_epoch", 0)), wall_seconds=wall,
        checkpoint_path=best.path, streamed=streamed,
    )

