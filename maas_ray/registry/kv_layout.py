"""Read a generative graph's KV-cache layout from the ONNX file itself, so a decoder language
model exported elsewhere (optimum's ``text-generation-with-past``, or our own export) can be
published with its tokenizer: ``maas models publish NAME model.onnx --tokenizer tokenizer.json``.

What is read from the graph: the cache inputs (``past_key_values.{i}.key|value``, or
``past.{i}.key|value``), their heads and head size (axes 1 and 3), the layer count, the logits'
vocabulary size, whether ``position_ids`` is an input, and the cache dtype. What the graph
cannot say (the context length, the special tokens, a chat template) comes from the caller, with
the tokenizer's special tokens as defaults.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from maas_ray.errors import ConfigError
from maas_ray.registry.manifest import GenerationSpec

# (past input pattern, present output pattern) pairs that exporters use; {i} is the layer.
_LAYOUTS = (
    ("past_key_values.{i}.{kv}", "present.{i}.{kv}"),
    ("past_key_values.{i}.{kv}", "present_key_values.{i}.{kv}"),
    ("past.{i}.{kv}", "present.{i}.{kv}"),
)
_ONNX_DTYPES = {1: "FP32", 10: "FP16", 16: "BF16"}
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")


def _dims(value_info: Any) -> list[Any]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


def read_kv_layout(model_bytes: bytes) -> dict[str, Any]:
    """The KV-cache layout of a decoder graph: layers, kv heads, head size, dtype, vocabulary,
    name patterns and whether it takes ``position_ids``. ConfigError naming what is missing."""
    import onnx

    try:
        graph = onnx.load_model_from_string(model_bytes).graph
    except Exception as exc:  # onnx raises DecodeError and others
        raise ConfigError(f"not an ONNX model: {exc}") from exc
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    missing = [n for n in ("input_ids", "attention_mask") if n not in inputs] + \
        (["logits"] if "logits" not in outputs else [])
    if missing:
        raise ConfigError(f"a generative graph needs inputs input_ids, attention_mask and output logits; "
                          f"this one lacks {missing} (inputs {sorted(inputs)[:8]}, outputs {sorted(outputs)[:8]})")
    for past, present in _LAYOUTS:
        key0 = past.format(i=0, kv="key")
        if key0 in inputs and present.format(i=0, kv="key") in outputs:
            break
    else:
        raise ConfigError(f"no KV-cache inputs found (expected e.g. past_key_values.0.key with an output "
                          f"present.0.key); the graph's inputs are {sorted(inputs)[:12]}")
    layers = 0
    while all(p.format(i=layers, kv=kv) in names
              for p, names in ((past, inputs), (present, outputs)) for kv in ("key", "value")):
        layers += 1
    key = _dims(inputs[key0])
    if len(key) != 4 or not isinstance(key[1], int) or not isinstance(key[3], int):
        raise ConfigError(f"{key0} must be (batch, kv_heads, past, head_dim) with fixed heads and head_dim, "
                          f"got {key}")
    logits = _dims(outputs["logits"])
    if len(logits) != 3 or not isinstance(logits[2], int):
        raise ConfigError(f"logits must be (batch, sequence, vocab) with a fixed vocab, got {logits}")
    elem = inputs[key0].type.tensor_type.elem_type
    if elem not in _ONNX_DTYPES:
        raise ConfigError(f"{key0} has ONNX element type {elem}; the cache must be float32, float16 or bfloat16")
    return {
        "num_layers": layers, "num_kv_heads": key[1], "head_dim": key[3], "vocab_size": logits[2],
        "kv_dtype": _ONNX_DTYPES[elem], "has_position_ids": "position_ids" in inputs,
        "past_key": past.replace("{kv}", "key"), "past_value": past.replace("{kv}", "value"),
        "present_key": present.replace("{kv}", "key"), "present_value": present.replace("{kv}", "value"),
    }


def _pick(special: dict[str, int], wanted: Optional[str], candidates: tuple[str, ...], what: str) -> Optional[int]:
    if wanted is not None:
        if wanted not in special:
            raise ConfigError(f"{what} token {wanted!r} is not a special token of the tokenizer; "
                              f"its special tokens are {sorted(special)[:20]}")
        return special[wanted]
    return next((special[c] for c in candidates if c in special), None)


def generation_spec_from_graph(
    model_bytes: bytes,
    tokenizer_json: bytes,
    *,
    context_length: int,
    eos_token: Optional[str] = None,
    bos_token: Optional[str] = None,
    chat_template: Optional[str] = None,
) -> GenerationSpec:
    """The GenerationSpec of a decoder graph exported elsewhere, with its ``tokenizer.json``.

    The EOS (and optional BOS) default to the tokenizer's conventional special tokens
    (``<|endoftext|>``, ``</s>``, ...); name them when the tokenizer has several.
    """
    layout = read_kv_layout(model_bytes)
    try:
        doc = json.loads(tokenizer_json)
        special = {t["content"]: int(t["id"]) for t in doc.get("added_tokens", []) if t.get("special")}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(f"the tokenizer is not a Hugging Face tokenizer.json: {exc}") from exc
    eos = _pick(special, eos_token, _EOS_CANDIDATES, "EOS")
    if eos is None:
        raise ConfigError(f"cannot tell the tokenizer's end-of-sequence token among {sorted(special)[:20]}: "
                          "name it (--eos-token)")
    bos = _pick(special, bos_token, _BOS_CANDIDATES, "BOS")  # None: prompts get no BOS (GPT-2's way)
    pad = _pick(special, None, _PAD_CANDIDATES, "pad")
    if any(i >= layout["vocab_size"] for i in special.values()):
        raise ConfigError(f"the tokenizer's special token ids {sorted(special.values())[-3:]} do not fit the "
                          f"graph's vocabulary of {layout['vocab_size']}")
    try:
        return GenerationSpec(
            context_length=context_length, **layout, bos_token_id=bos, eos_token_id=eos,
            pad_token_id=eos if pad is None else pad,  # no pad token: the EOS, as Hugging Face does
            special_tokens=special, chat_template=chat_template,
        )
    except ValueError as exc:  # pydantic's ValidationError names the field and value
        raise ConfigError(f"generation spec: {exc}") from exc
