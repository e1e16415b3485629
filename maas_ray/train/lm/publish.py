"""A ``decoder-lm`` version in the registry: export + parity + publish, and loading it back.

A version holds model.onnx (the KV-cache graph), ``tokenizer.json`` (role ``tokenizer``),
``weights.safetensors`` (role ``weights``, Hugging Face GPT-2 names) and ``model_spec.json``
(role ``model_spec``: family, ``model_args``, and ``hf_config``, GPT-2's ``config.json``), and
``manifest.generation`` (a :class:`GenerationSpec`), which makes it ``kind: generative``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from maas_ray.errors import ConfigError, IntegrityError
from maas_ray.registry import ExtraFile, Manifest, ParentRef, ProcessorSpec, Registry
from maas_ray.train.lm import tokenizer as tk
from maas_ray.train.lm.export import export_lm, generation_spec, parity_check_lm
from maas_ray.train.lm.model import (
    DecoderLM,
    DecoderLMArgs,
    hf_gpt2_config,
    load_weights,
    weights_state_dict,
)

logger = logging.getLogger(__name__)
FAMILY = "decoder-lm"
WEIGHTS_FILE, SPEC_FILE, TOKENIZER_FILE = "weights.safetensors", "model_spec.json", "tokenizer.json"


def spec_doc(args: DecoderLMArgs, tokenizer_json: str) -> dict[str, Any]:
    eos = tk.special_token_ids(tokenizer_json)[tk.EOS]
    return {"model": FAMILY, "model_args": args.model_dump(), "hf_config": hf_gpt2_config(args, eos_token_id=eos)}


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


def export_and_check(model: DecoderLM, tokenizer_json: str, prompt_texts: Sequence[str], decode_steps: int = 8,
                     tolerance: float = 1e-3) -> Exported:
    """Export the model and run :func:`parity_check_lm` on the prompts (left-padded batch)."""
    t0 = time.perf_counter()
    onnx_bytes = export_lm(model)
    seconds = time.perf_counter() - t0
    steps = min(decode_steps, model.args.context_length - 2)
    prompts = parity_prompts(tokenizer_json, prompt_texts, model.args.context_length, steps)
    diff = parity_check_lm(model, onnx_bytes, prompts, steps, tolerance=tolerance)
    return Exported(onnx_bytes, diff, seconds)


def publish_lm(registry: Registry, name: str, model: DecoderLM, tokenizer_json: str, exported: Exported, *,
               metrics: Optional[dict[str, float]] = None, training_config: Optional[dict[str, Any]] = None,
               parent: Optional[ParentRef] = None, dataset: Optional[dict[str, Any]] = None,
               description: str = "") -> Manifest:
    """Publish an exported, parity-checked model as the next version of ``name``."""
    from maas_ray.train.pipeline import state_to_bytes

    doc = spec_doc(model.args, tokenizer_json)
    files = {
        TOKENIZER_FILE: ExtraFile(tokenizer_json.encode(), role="tokenizer"),
        WEIGHTS_FILE: ExtraFile(state_to_bytes(weights_state_dict(model)), role="weights"),
        SPEC_FILE: ExtraFile(json.dumps(doc, indent=2).encode(), role="model_spec"),
    }
    return registry.publish(
        name, exported.onnx_bytes,
        preprocessor=ProcessorSpec(name="tensor"), postprocessor=ProcessorSpec(name="tensor"),
        metrics={**(metrics or {}), "parity_max_abs_diff": exported.parity_max_abs_diff},
        training_config=training_config, parent=parent, files=files,
        model_spec={"model": FAMILY, "model_args": doc["model_args"]}, dataset=dataset,
        description=description or f"{FAMILY} {doc['model_args']}",
        generation=generation_spec(model.args, tokenizer_json),
    )


@dataclass
class PublishedLM:
    """A published ``decoder-lm`` version loaded back for torch (fine-tuning, references)."""

    ref: ParentRef
    manifest: Manifest
    model: DecoderLM
    tokenizer_json: str


def load_published_lm(registry: Registry, name: str, version: Any = None) -> PublishedLM:
    """The torch model (eval mode, fp32) and tokenizer of a published ``decoder-lm`` version."""
    from maas_ray.train.pipeline import state_from_bytes

    manifest = registry.describe(name, version)
    missing = [f for f in (WEIGHTS_FILE, SPEC_FILE, TOKENIZER_FILE) if f not in manifest.files]
    if manifest.generation is None or missing:
        raise ConfigError(f"{name}:{manifest.version} is not a {FAMILY} version with weights (missing {missing or 'generation'})")
    loaded = registry.load(name, manifest.version, files=[WEIGHTS_FILE, SPEC_FILE, TOKENIZER_FILE])
    doc = json.loads(loaded.files[SPEC_FILE])
    if doc.get("model") != FAMILY:
        raise ConfigError(f"{name}:{manifest.version} is a {doc.get('model')!r} model, not {FAMILY}")
    model = DecoderLM(DecoderLMArgs.model_validate(doc["model_args"]))
    try:
        load_weights(model, state_from_bytes(loaded.files[WEIGHTS_FILE]))
    except Exception as exc:  # safetensors' own errors, or a shape mismatch
        raise IntegrityError(f"{name}:{manifest.version}: cannot load {WEIGHTS_FILE}: {exc}") from exc
    return PublishedLM(ParentRef(model=name, version=manifest.version), manifest, model.eval(),
                       loaded.files[TOKENIZER_FILE].decode())
