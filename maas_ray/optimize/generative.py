"""optimize_generative: a ``kind: generative`` version (a decoder LM with a KV cache) -> dynamic
INT8 of its MatMul weights, with the KV-cache graph's inputs and outputs checked unchanged ->
parent and child measured on the same held-out tokens (teacher-forced perplexity) and the same
prompt (greedy decode tokens/s, batch 1, onnxruntime CPU) -> the child published as the next
version (tokenizer, generation spec and lineage carried over) unless perplexity grew more than
``max_perplexity_increase``.

The held-out tokens are the test split rebuilt from the version's recorded ``maas train``
config (documents, split and tokenizer as training had them; the data's sha256 is checked), or
``eval_text`` (required for a version published with ``maas models publish --tokenizer``).
No torch here: the graph runs in onnxruntime through the serving engine's own ``GraphRunner``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from maas_ray.errors import ConfigError, InferenceError, MaasError
from maas_ray.optimize.config import OptimizeConfig
from maas_ray.registry import (
    ONNX_EXTERNAL_DATA,
    ExtraFile,
    LoadedModel,
    Manifest,
    ParentRef,
    Registry,
)
from maas_ray.registry.manifest import GenerationSpec
from maas_ray.runtime import create_session
from maas_ray.serving.generate.kv import GraphRunner

logger = logging.getLogger(__name__)

EXTERNAL_DATA_FILE = "model.onnx.data"  # the child's external data, when its weights still pass protobuf's cap
_SINGLE_FILE_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB cap, with room for the graph itself
# Not carried to the child: the parent's FP32 torch weights (not what the INT8 graph computes;
# fine-tune from the parent, recorded as such) and its external data (the child has its own).
_DROP_ROLES = ("weights", ONNX_EXTERNAL_DATA)
_PPL_LOGITS = 1 << 24  # most logits (window positions x vocabulary) one perplexity pass holds: 64 MB
_PROMPT_TOKENS = 16  # tokens of the tokens/s prompt (the first held-out window's first tokens)


@dataclass(frozen=True)
class HeldOut:
    """Windows of held-out tokens: inputs ``x`` and next-token targets ``y``, each (N, T) int64."""

    x: np.ndarray
    y: np.ndarray
    source: str

    @property
    def tokens(self) -> int:
        return int(self.y.size)


@dataclass(frozen=True)
class LMMeasurement:
    perplexity: float  # exp(mean next-token NLL) over the held-out windows, teacher-forced
    decode_tokens_per_s: float  # greedy, batch 1, the same prompt; prefill excluded
    greedy: tuple[int, ...]  # the greedy continuation of that prompt


@dataclass(frozen=True)
class GenerativeOptimizeReport:
    manifest: Manifest
    parent: LMMeasurement
    child: LMMeasurement
    parent_size: int  # model.onnx + its external data
    eval_tokens: int
    eval_source: str

    @property
    def perplexity_increase(self) -> float:
        """child / parent - 1 (0.01 = 1 % higher)."""
        return self.child.perplexity / self.parent.perplexity - 1.0

    @property
    def speedup(self) -> float:
        return self.child.decode_tokens_per_s / self.parent.decode_tokens_per_s

    @property
    def size_ratio(self) -> float:
        return total_size(self.manifest) / self.parent_size

    @property
    def greedy_match(self) -> float:
        """Share of the greedy continuation the child makes before it first differs from the parent's."""
        n = next((i for i, (a, b) in enumerate(zip(self.parent.greedy, self.child.greedy)) if a != b),
                 len(self.parent.greedy))
        return n / max(1, len(self.parent.greedy))


def total_size(m: Manifest) -> int:
    """Bytes of the graph: model.onnx plus its ONNX external data files."""
    return m.size_bytes + sum(f.size_bytes for f in m.files.values() if f.role == ONNX_EXTERNAL_DATA)


# ---- the graph ---------------------------------------------------------------------------------

def graph_interface(path: str) -> dict[str, tuple[str, int, tuple]]:
    """name -> (input|output, ONNX element type, dims: a number or a dynamic axis's name) of a
    graph's inputs and outputs (initializers listed as inputs by old exporters left out)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    out = {}
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for v in values:
            if v.name in weights:
                continue
            t = v.type.tensor_type
            out[v.name] = (kind, t.elem_type, tuple(d.dim_param or d.dim_value for d in t.shape.dim))
    return out


def _interface_diff(before: dict, after: dict) -> list[str]:
    return [f"{n}: {before.get(n)} -> {after.get(n)}" for n in sorted(set(before) | set(after))
            if before.get(n) != after.get(n)]


def _read_graph(path: str) -> tuple[bytes, Optional[bytes]]:
    """model.onnx bytes, self-contained when the whole graph fits protobuf's cap; else the graph
    and one external data file (:data:`EXTERNAL_DATA_FILE`)."""
    import onnx

    directory = os.path.dirname(path)
    on_disk = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    model = onnx.load(path)  # follows external data written beside it
    if on_disk < _SINGLE_FILE_LIMIT:
        return model.SerializeToString(), None
    out_dir = tempfile.mkdtemp(prefix="ext-", dir=os.path.dirname(directory))
    out = os.path.join(out_dir, "model.onnx")
    onnx.save_model(model, out, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA_FILE, size_threshold=1024)
    with open(out, "rb") as g, open(os.path.join(out_dir, EXTERNAL_DATA_FILE), "rb") as d:
        return g.read(), d.read()


def quantize_int8(loaded: LoadedModel) -> tuple[bytes, Optional[bytes]]:
    """Dynamic INT8 (onnxruntime) of the MatMul weights of a loaded version's graph: model.onnx
    bytes and external data (None when self-contained). Raises InferenceError when quantization
    fails or changes the name, element type or axes of any graph input or output (the KV cache)."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    external = bool(loaded.external_data())
    with tempfile.TemporaryDirectory(prefix="maas-opt-lm-") as tmp:
        src_dir, pre_dir, dst_dir = (os.path.join(tmp, d) for d in ("src", "pre", "dst"))
        for d in (src_dir, pre_dir, dst_dir):
            os.mkdir(d)
        src = LoadedModel(loaded.manifest, loaded.model_bytes, loaded.external_data()).write_to(src_dir)
        pre, dst = os.path.join(pre_dir, "model.onnx"), os.path.join(dst_dir, "model.onnx")
        try:
            # Shape inference + folding first, as onnxruntime's quantization docs recommend; its
            # onnxruntime optimization step cannot save a graph over 2 GB, so a parent with
            # external data skips it.
            quant_pre_process(src, pre, skip_optimization=external, skip_symbolic_shape=True,
                              save_as_external_data=external, external_data_location="pre.onnx.data")
            # MatMul only: weights (MatMulConstBOnly, quantize_dynamic's default), not attention's
            # activation x activation products; Gather (the embedding) stays FP32.
            quantize_dynamic(pre, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             use_external_data_format=external)
            changed = _interface_diff(graph_interface(src), graph_interface(dst))
            if changed:
                raise InferenceError(f"int8 quantization changed the graph's inputs/outputs: {'; '.join(changed[:4])}")
            out = _read_graph(dst)
        except MaasError:
            raise
        except Exception as exc:  # onnx / onnxruntime raise many unrelated types
            raise InferenceError(f"int8 quantization of the generative graph failed: {exc}") from exc
    logger.info("int8: %d -> %d bytes", total_size(loaded.manifest), len(out[0]) + len(out[1] or b""))
    return out


# ---- held-out tokens -----------------------------------------------------------------------------

def held_out_tokens(pm: Manifest, tokenizer_json: str, cfg: OptimizeConfig) -> HeldOut:
    """``cfg.eval_text`` tokenized as training data is (EOS doc EOS doc ... EOS) in windows of the
    model's context, or the test split of the version's recorded training data; at most
    ``cfg.eval_tokens`` tokens (whole windows, at least one)."""
    from pydantic import ValidationError

    from maas_ray.train.lm import tokenizer as tk  # tokenizers + numpy; no torch
    from maas_ray.train.lm.config import LMTrainConfig
    from maas_ray.train.lm.data import load_lm_splits, read_documents, windows

    ref = f"{pm.model}:{pm.version}"
    if cfg.eval_text is not None:
        docs = read_documents(LMTrainConfig(data=cfg.eval_text))
        with open(cfg.eval_text, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        x, y = windows(tk.encode_documents(tokenizer_json, docs), pm.generation.context_length)
        source = f"eval_text {cfg.eval_text} (sha256 {digest[:12]}..., {len(docs)} documents)"
    else:
        tc = pm.training_config or {}
        if "data" not in tc or "corpus_documents" not in tc:  # an LMTrainConfig: `maas train` trained it (any LM)
            raise ConfigError(
                f"{ref} records no language-model training data (published outside `maas train`?): "
                "pass --eval-text FILE to measure perplexity on"
            )
        try:
            lm_cfg = LMTrainConfig.model_validate({k: v for k, v in tc.items() if k != "optimization"})
        except ValidationError as exc:
            raise ConfigError(f"{ref}'s recorded training config no longer validates ({exc.error_count()} errors): "
                              "pass --eval-text FILE") from exc
        splits = load_lm_splits(lm_cfg, tokenizer_json=tokenizer_json)
        recorded = (pm.dataset or {}).get("content_sha256")
        if recorded and recorded != splits.identity["content_sha256"]:
            raise ConfigError(
                f"the data {tc['data']!r} changed since {ref} was trained (sha256 "
                f"{splits.identity['content_sha256'][:12]}... vs recorded {recorded[:12]}...): perplexity "
                "would not be comparable; pass --eval-text FILE"
            )
        x, y = splits.x_test, splits.y_test
        source = f"the test split of {splits.identity['source']}"
    if len(x) == 0:
        raise ConfigError(f"the held-out text ({source}) has fewer than context_length + 1 = "
                          f"{pm.generation.context_length + 1} tokens")
    n = max(1, cfg.eval_tokens // x.shape[1])
    return HeldOut(x[:n], y[:n], source)


# ---- measurements ------------------------------------------------------------------------------

def perplexity(runner: GraphRunner, x: np.ndarray, y: np.ndarray, batch: Optional[int] = None) -> float:
    """exp(mean next-token NLL) of ``y`` given ``x`` (N, T), full-sequence passes with an empty
    cache, ``batch`` windows a pass (default: as many as keep the logits within 64 MB)."""
    spec, nll, count = runner.spec, 0.0, 0
    batch = batch or max(1, _PPL_LOGITS // (x.shape[1] * spec.vocab_size))
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        b, t = xb.shape
        feeds = {"input_ids": xb, "attention_mask": np.ones((b, t), np.int64),
                 **dict(zip(runner.past_names, runner.empty(b)))}
        if spec.has_position_ids:
            feeds["position_ids"] = np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy()
        logits = runner.session.run(["logits"], feeds)[0]  # (B, T, vocab) float32
        top = logits.max(-1, keepdims=True)
        lse = top[..., 0] + np.log(np.exp(logits - top).sum(-1, dtype=np.float64))  # (B, T)
        nll += float((lse - np.take_along_axis(logits, yb[..., None], -1)[..., 0]).sum(dtype=np.float64))
        count += yb.size
    return math.exp(min(nll / count, 50.0))  # capped as training caps it


def _greedy(runner: GraphRunner, prompt: np.ndarray, n: int) -> tuple[float, list[int]]:
    """Prefill ``prompt`` then ``n`` decode passes (batch 1): (seconds of the decode passes, tokens)."""
    p = len(prompt)
    logits, past = runner.run(prompt[None], np.ones((1, p), np.int64), np.arange(p, dtype=np.int64)[None],
                              runner.empty(1))
    tokens = [int(logits[0].argmax())]
    t0 = time.perf_counter()
    for _ in range(n):
        length = p + len(tokens)
        logits, past = runner.run(np.array([[tokens[-1]]], np.int64), np.ones((1, length), np.int64),
                                  np.array([[length - 1]], np.int64), past)
        tokens.append(int(logits[0].argmax()))
    return time.perf_counter() - t0, tokens


def measure_lm(model_bytes: bytes, external: Optional[dict[str, bytes]], spec: GenerationSpec, held: HeldOut,
               cfg: OptimizeConfig) -> LMMeasurement:
    """Perplexity on ``held`` and greedy decode tokens/s (median of runs over ``cfg.timing_seconds``,
    at least 3, after one warm-up) on its first window's first tokens, onnxruntime CPU."""
    session = create_session(model_bytes, device="cpu", intra_op_threads=cfg.threads, external_data=external or None)
    runner = GraphRunner(session, spec)  # checks the graph against the spec, as the engine does
    ppl = perplexity(runner, held.x, held.y)
    prompt = held.x[0, : min(_PROMPT_TOKENS, spec.context_length // 4 or 1)]
    n = max(1, min(cfg.decode_tokens, spec.context_length - len(prompt) - 1))
    _, tokens = _greedy(runner, prompt, n)  # warm-up: the first runs allocate
    rates, deadline = [], time.perf_counter() + cfg.timing_seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        seconds, _ = _greedy(runner, prompt, n)
        rates.append(n / seconds)
    return LMMeasurement(ppl, float(np.median(rates)), tuple(tokens))


# ---- the pipeline ------------------------------------------------------------------------------

def optimize_generative(model: str, ref: Union[int, str, None], cfg: OptimizeConfig,
                        registry: Registry) -> GenerativeOptimizeReport:
    """Publish the dynamic-INT8 child of generative version ``model:ref`` (see the module docstring).

    Raises:
        ConfigError: a method other than dynamic int8, perplexity grew more than
            ``cfg.max_perplexity_increase`` (nothing published), or no held-out text.
        InferenceError: quantization failed or changed the graph's inputs/outputs.
    """
    if cfg.method != "int8" or cfg.static:
        what = f"--{cfg.method}{' --static' if cfg.static else ''}"
        raise ConfigError(f"{model}:{ref} is a generative version: {what} is not supported for it, "
                          "only --int8 (dynamic, MatMul weights)")
    loaded = registry.load(model, ref, skip_roles=("weights",))  # sha256-verified
    pm, spec = loaded.manifest, loaded.manifest.generation
    if spec.tokenizer_file not in loaded.files:
        raise ConfigError(f"{model}:{pm.version} has no tokenizer file {spec.tokenizer_file!r}")
    held = held_out_tokens(pm, loaded.files[spec.tokenizer_file].decode(), cfg)

    child_bytes, child_external = quantize_int8(loaded)
    child_ext = {EXTERNAL_DATA_FILE: child_external} if child_external is not None else None
    parent_m = measure_lm(loaded.model_bytes, loaded.external_data(), spec, held, cfg)
    child_m = measure_lm(child_bytes, child_ext, spec, held, cfg)
    increase = child_m.perplexity / parent_m.perplexity - 1.0
    if increase > cfg.max_perplexity_increase:
        raise ConfigError(
            f"not published: int8 raises the perplexity of {model}:{pm.version} from {parent_m.perplexity:.4f} "
            f"to {child_m.perplexity:.4f} ({increase:+.2%} > max_perplexity_increase "
            f"{cfg.max_perplexity_increase:.2%}) on {held.tokens} held-out tokens ({held.source})"
        )

    import onnxruntime as ort

    files = {name: ExtraFile(data, role=pm.files[name].role)
             for name, data in loaded.files.items() if pm.files[name].role not in _DROP_ROLES}
    if child_external is not None:
        files[EXTERNAL_DATA_FILE] = ExtraFile(child_external, role=ONNX_EXTERNAL_DATA)
    child_size = len(child_bytes) + len(child_external or b"")
    metrics = {
        "perplexity": child_m.perplexity,
        "parent_perplexity": parent_m.perplexity,
        "perplexity_delta": child_m.perplexity - parent_m.perplexity,
        "perplexity_increase": increase,
        "decode_tokens_per_s": child_m.decode_tokens_per_s,
        "parent_decode_tokens_per_s": parent_m.decode_tokens_per_s,
        "eval_tokens": float(held.tokens),
        "size_bytes": float(child_size),
        "parent_size_bytes": float(total_size(pm)),
        "threads": float(cfg.threads),
    }
    if cfg.eval_text is None:  # the same split the parent's test_perplexity was measured on
        metrics["test_perplexity"] = child_m.perplexity
    config = dict(pm.training_config or {})
    config["optimization"] = {
        **cfg.model_dump(mode="json"), "parent": f"{model}:{pm.version}", "onnxruntime": ort.__version__,
        "quantized": "dynamic int8, MatMul weights (QInt8)", "measured_on": held.source,
        "decode": f"greedy, batch 1, {len(parent_m.greedy) - 1} tokens, in process, CPUExecutionProvider",
    }
    manifest = registry.publish(
        model, child_bytes,
        preprocessor=pm.preprocessor, postprocessor=pm.postprocessor, metrics=metrics, training_config=config,
        parent=ParentRef(model=model, version=pm.version), description=f"int8 of {model}:{pm.version}",
        files=files, model_spec=pm.model_spec, dataset=pm.dataset, generation=spec,
    )
    logger.info("published %s:%d (int8) from %s:%d", model, manifest.version, model, pm.version)
    return GenerativeOptimizeReport(manifest, parent_m, child_m, total_size(pm), held.tokens, held.source)
