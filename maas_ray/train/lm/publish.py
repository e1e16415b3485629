"""A language-model version in the registry: export + parity + publish, and loading it back.

A version holds model.onnx (the KV-cache graph), ``tokenizer.json`` (role ``tokenizer``),
``weights.safetensors`` (role ``weights``) and ``model_spec.json`` (role ``model_spec``), and
``manifest.generation`` (a :class:`GenerationSpec`), which makes it ``kind: generative``.
For ``decoder-lm`` the weights have Hugging Face GPT-2 names and the spec holds ``model_args``
and ``hf_config`` (GPT-2's ``config.json``); for a factory by import path
(:mod:`~maas_ray.train.lm.imported`) the weights are its module's state dict and the spec holds
the import path, ``model_args``, ``vocab_size`` and ``cache`` (``cached`` or ``recompute``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from maas_ray.errors import ConfigError, IntegrityError
from maas_ray.registry import ExtraFile, Manifest, ParentRef, ProcessorSpec, Registry
from maas_ray.registry.kv_layout import read_kv_layout
from maas_ray.train.lm import tokenizer as tk
from maas_ray.train.lm.export import export_lm, generation_spec, parity_check_lm
from maas_ray.train.lm.imported import ImportedLM
from maas_ray.train.lm.model import (
    DecoderLM,
    hf_gpt2_config,
    load_weights,
    weights_state_dict,
)
from maas_ray.train.lm.task import build

logger = logging.getLogger(__name__)
FAMILY = "decoder-lm"
WEIGHTS_FILE, SPEC_FILE, TOKENIZER_FILE = "weights.safetensors", "model_spec.json", "tokenizer.json"


LM = Union[DecoderLM, ImportedLM]


def spec_doc(model: LM, tokenizer_json: str) -> dict[str, Any]:
    if isinstance(model, ImportedLM):
        return dict(model.spec)
    eos = tk.special_token_ids(tokenizer_json)[tk.EOS]
    return {"model": FAMILY, "model_args": model.args.model_dump(),
            "hf_config": hf_gpt2_config(model.args, eos_token_id=eos)}


def _weights(model: LM) -> dict[str, Any]:
    if isinstance(model, DecoderLM):
        return weights_state_dict(model)
    return {k: v.float() for k, v in model.state_dict().items()}  # tied weights: both names, loaded back as one


def parity_prompts(tokenizer_json: str, texts: Sequence[str], context_length: int, decode_steps: int) -> list[list[int]]:
    """Token ids of ``texts`` as serving encodes them (BOS first), cut to leave room for the steps."""
    tok = tk.load(tokenizer_json)
    bos = tk.special_token_ids(tokenizer_json)[tk.EOS]
    room = max(1, context_length - decode_steps)
    return [([bos] + tok.encode(t, add_special_tokens=False).ids)[:room] for t in texts]


@dataclass
class Exported:
    onnx_bytes: bytes
    parity_max_abs_diff: float
    export_seconds: float


def export_and_check(model: LM, tokenizer_json: str, prompt_texts: Sequence[str], decode_steps: int = 8,
                     tolerance: float = 1e-3) -> Exported:
    """Export the model and run :func:`parity_check_lm` on the prompts (left-padded batch)."""
    t0 = time.perf_counter()
    onnx_bytes = export_lm(model)
    seconds = time.perf_counter() - t0
    steps = min(decode_steps, model.args.context_length - 2)
    prompts = parity_prompts(tokenizer_json, prompt_texts, model.args.context_length, steps)
    diff = parity_check_lm(model, onnx_bytes, prompts, steps, tolerance=tolerance)
    return Exported(onnx_bytes, diff, seconds)


def publish_lm(registry: Registry, name: str, model: LM, tokenizer_json: str, exported: Exported, *,
               metrics: Optional[dict[str, float]] = None, training_config: Optional[dict[str, Any]] = None,
               parent: Optional[ParentRef] = None, dataset: Optional[dict[str, Any]] = None,
               description: str = "") -> Manifest:
    """Publish an exported, parity-checked model as the next version of ``name``."""
    from maas_ray.train.pipeline import state_to_bytes

    doc = spec_doc(model, tokenizer_json)
    files = {
        TOKENIZER_FILE: ExtraFile(tokenizer_json.encode(), role="tokenizer"),
        WEIGHTS_FILE: ExtraFile(state_to_bytes(_weights(model)), role="weights"),
        SPEC_FILE: ExtraFile(json.dumps(doc, indent=2).encode(), role="model_spec"),
    }
    return registry.publish(
        name, exported.onnx_bytes,
        preprocessor=ProcessorSpec(name="tensor"), postprocessor=ProcessorSpec(name="tensor"),
        metrics={**(metrics or {}), "parity_max_abs_diff": exported.parity_max_abs_diff},
        training_config=training_config, parent=parent, files=files,
        model_spec={k: v for k, v in doc.items() if k != "hf_config"}, dataset=dataset,
        description=description or f"{doc['model']} {doc['model_args']}",
        generation=generation_spec(model.args, tokenizer_json,
                                   has_position_ids=read_kv_layout(exported.onnx_bytes)["has_position_ids"]),
    )


@dataclass
class PublishedLM:
    """A published language-model version loaded back for torch (fine-tuning, references)."""

    ref: ParentRef
    manifest: Manifest
    model: LM
    tokenizer_json: str
    spec: dict[str, Any]  # model_spec.json: what task.build rebuilds it from


def load_published_lm(registry: Registry, name: str, version: Any = None) -> PublishedLM:
    """The torch model (eval mode, fp32) and tokenizer of a version ``maas train`` published."""
    from maas_ray.train.pipeline import state_from_bytes

    manifest = registry.describe(name, version)
    missing = [f for f in (WEIGHTS_FILE, SPEC_FILE, TOKENIZER_FILE) if f not in manifest.files]
    if manifest.generation is None or missing:
        raise ConfigError(f"{name}:{manifest.version} is not a language model `maas train` published "
                          f"(missing {missing or 'generation'})")
    loaded = registry.load(name, manifest.version, files=[WEIGHTS_FILE, SPEC_FILE, TOKENIZER_FILE])
    doc = json.loads(loaded.files[SPEC_FILE])
    if doc.get("model") != FAMILY and not ("vocab_size" in doc and isinstance(doc.get("model_args"), dict)):
        raise ConfigError(f"{name}:{manifest.version} is a {doc.get('model')!r} model, not a language model")
    model: LM = build(doc)  # the spec doc is the training task's model spec
    try:
        state = state_from_bytes(loaded.files[WEIGHTS_FILE])
        if isinstance(model, DecoderLM):
            load_weights(model, state)
        else:
            model.load_state_dict(state)
    except Exception as exc:  # safetensors' own errors, or a shape mismatch
        raise IntegrityError(f"{name}:{manifest.version}: cannot load {WEIGHTS_FILE}: {exc}") from exc
    return PublishedLM(ParentRef(model=name, version=manifest.version), manifest, model.eval(),
                       loaded.files[TOKENIZER_FILE].decode(), doc)
