"""onnxruntime-genai on the version's own ONNX graph, in process: the limit of the ONNX path.

:func:`genai_config` writes the ``genai_config.json`` our graph needs (genai's generic decoder,
the optimum GPT-2 I/O names of the issue-24 contract, no shared past/present buffer since the
graph concatenates). ``benchmarks.generate`` (``closed_loop_genai``) measures it without HTTP
through :func:`static_engine`: requests are batched when they arrive together, and one that
arrives while a batch runs waits until that whole batch has finished.

onnxruntime-genai 0.18's ``Engine`` runs it with *static* batching (``engine.static_batching``).
Its continuous batching (``engine.dynamic_batching``) cannot take this graph: it needs a packed
graph (``position_ids`` of shape ``[num_tokens]``, a paged KV cache), not the padded
``(batch, seq)`` past/present layout; :func:`dynamic_batching_error` records genai's words.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


# genai's "gpt2" type expects the old combined "past_%d" cache; "llama" is its generic decoder-only
# model with separate past key/value names, which is what this graph has.
MODEL_TYPE = "llama"


def genai_config(spec, *, dim: int, filename: str = "model.onnx", threads: int = 2) -> dict:
    """The genai_config.json of a generative version (``spec``: its GenerationSpec)."""
    pat = lambda p: p.replace("{i}", "%d")  # noqa: E731  genai's layer placeholder
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": pat(spec.past_key), "past_value_names": pat(spec.past_value)}
    if spec.has_position_ids:
        inputs["position_ids"] = "position_ids"
    return {
        "model": {
            "type": MODEL_TYPE,
            "context_length": spec.context_length,
            "vocab_size": spec.vocab_size,
            "eos_token_id": spec.eos_token_id,
            "bos_token_id": spec.bos_token_id if spec.bos_token_id is not None else spec.eos_token_id,
            "pad_token_id": genai_pad(spec),
            "decoder": {
                "filename": filename,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [],
                                    "intra_op_num_threads": threads, "inter_op_num_threads": 1},
                "hidden_size": dim,
                "head_size": spec.head_dim,
                "num_attention_heads": spec.num_kv_heads,
                "num_key_value_heads": spec.num_kv_heads,
                "num_hidden_layers": spec.num_layers,
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": pat(spec.present_key),
                            "present_value_names": pat(spec.present_value)},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": spec.context_length,
                   "min_length": 0, "past_present_share_buffer": False, "temperature": 1.0, "top_k": 1,
                   "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "early_stopping": True,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def genai_pad(spec) -> int:
    """The pad id genai gets. genai takes a row's padding to be every ``pad_token_id`` in it, so
    the pad must never occur in a prompt: when the version's pad is also its BOS or EOS (GPT-2's
    single ``<|endoftext|>``), the BOS would be masked out. A special token that user text cannot
    produce (``<|system|>``...) is used instead."""
    taken = {spec.bos_token_id, spec.eos_token_id}
    if spec.pad_token_id is not None and spec.pad_token_id not in taken:
        return spec.pad_token_id
    free = sorted(i for i in spec.special_tokens.values() if i not in taken)
    return free[0] if free else spec.vocab_size - 1


def write_config(model_dir: str, spec, *, dim: int, threads: int = 2) -> str:
    path = os.path.join(model_dir, "genai_config.json")
    Path(path).write_text(json.dumps(genai_config(spec, dim=dim, threads=threads), indent=2))
    return path


def dynamic_batching_error(model_dir: str, max_batch_size: int = 32) -> Optional[str]:
    """Why the Engine's continuous batching (``engine.dynamic_batching``) cannot take this graph,
    in genai's own words (None if it can)."""
    import onnxruntime_genai as og

    cfg = og.Config(model_dir)
    cfg.overlay(json.dumps({"engine": {"dynamic_batching": {"max_batch_size": max_batch_size, "num_blocks": 1024}}}))
    try:
        og.Engine(og.Model(cfg))
    except Exception as exc:  # the binding raises RuntimeError with genai's message
        return f"{type(exc).__name__}: {exc}"
    return None


def static_engine(model_dir: str, max_batch_size: int):
    """``og.Engine`` with static batching up to ``max_batch_size`` requests."""
    import onnxruntime_genai as og

    cfg = og.Config(model_dir)
    cfg.overlay(json.dumps({"engine": {"static_batching": {"max_batch_size": max_batch_size}}}))
    return og.Engine(og.Model(cfg))
