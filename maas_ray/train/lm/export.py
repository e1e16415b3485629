"""Export a :class:`DecoderLM` to ONNX with a KV cache, describe it as a :class:`GenerationSpec`,
and prove onnxruntime and torch generate the same tokens.

The graph is optimum's GPT-2 ``text-generation-with-past`` layout: inputs ``input_ids`` (B, S),
``attention_mask`` (B, P+S), ``position_ids`` (B, S), ``past_key_values.{i}.key|value``
(B, heads, P, head_dim); outputs ``logits`` (B, S, vocab), ``present.{i}.key|value``
(B, heads, P+S, head_dim). B, S and P are dynamic; P = 0 is the prompt pass.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from maas_ray.errors import ConfigError, ParityError
from maas_ray.registry.manifest import GenerationSpec
from maas_ray.train.lm import tokenizer as tk
from maas_ray.train.lm.model import DecoderLM, DecoderLMArgs

logger = logging.getLogger(__name__)
INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
PAST_KEY, PAST_VALUE = "past_key_values.{i}.key", "past_key_values.{i}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{i}.key", "present.{i}.value"


def past_names(layers: int) -> list[str]:
    return [p.format(i=i) for i in range(layers) for p in (PAST_KEY, PAST_VALUE)]


def present_names(layers: int) -> list[str]:
    return [p.format(i=i) for i in range(layers) for p in (PRESENT_KEY, PRESENT_VALUE)]


class _CacheGraph(nn.Module):
    """Flat tensors in and out, as the exporter wants them."""

    def __init__(self, model: DecoderLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *flat_past):
        past = [(flat_past[2 * i], flat_past[2 * i + 1]) for i in range(len(flat_past) // 2)]
        logits, presents = self.model.forward_with_past(input_ids, attention_mask, position_ids, past)
        return (logits, *[t for kv in presents for t in kv])


def export_lm(model: DecoderLM) -> bytes:
    """The model as ONNX bytes (opset 17, fp32, TorchScript exporter), all of B, S, P dynamic."""
    model = model.cpu().float().eval()
    a = model.args
    b, s, p = 2, 3, 2  # traced with P > 0 and S > 1, so neither is specialised into the graph
    ids = torch.randint(0, a.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).unsqueeze(0).expand(b, s).contiguous()
    past = [torch.zeros(b, a.heads, p, a.head_dim) for _ in range(2 * a.layers)]
    pasts, presents = past_names(a.layers), present_names(a.layers)
    axes = {
        INPUT_IDS: {0: "batch", 1: "sequence"},
        ATTENTION_MASK: {0: "batch", 1: "total_sequence"},
        POSITION_IDS: {0: "batch", 1: "sequence"},
        LOGITS: {0: "batch", 1: "sequence"},
        **{n: {0: "batch", 2: "past_sequence"} for n in pasts},
        **{n: {0: "batch", 2: "total_sequence"} for n in presents},
    }
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice (see train/export.py)
        try:
            torch.onnx.export(
                _CacheGraph(model), (ids, mask, pos, *past), buf,
                input_names=[INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *pasts],
                output_names=[LOGITS, *presents], dynamic_axes=axes, opset_version=17, dynamo=False,
            )
        except Exception as exc:  # torch raises many types for unsupported ops
            raise ConfigError(f"cannot export the language model to ONNX: {type(exc).__name__}: {exc}") from exc
    return _fix_vocab_axis(buf.getvalue(), a.vocab_size)


def _fix_vocab_axis(onnx_bytes: bytes, vocab_size: int) -> bytes:
    """The logits' vocab axis as a number: shape inference leaves it symbolic when the logits come
    out of a gather (a recompute graph), and serving reads the vocabulary from it."""
    import onnx

    model = onnx.load_model_from_string(onnx_bytes)
    dim = next(o for o in model.graph.output if o.name == LOGITS).type.tensor_type.shape.dim[2]
    if dim.HasField("dim_value"):
        return onnx_bytes
    dim.dim_value = vocab_size
    return model.SerializeToString()


def generation_spec(args: DecoderLMArgs, tokenizer_json: str, has_position_ids: bool = True) -> GenerationSpec:
    """What serving needs to run the exported graph with this tokenizer (a recompute graph,
    :mod:`~maas_ray.train.lm.imported`, has no ``position_ids`` input: the exporter drops it)."""
    special = tk.special_token_ids(tokenizer_json)
    eos = special[tk.EOS]
    return GenerationSpec(
        context_length=args.context_length, vocab_size=args.vocab_size, num_layers=args.layers,
        num_kv_heads=args.heads, head_dim=args.head_dim, kv_dtype="FP32",
        past_key=PAST_KEY, past_value=PAST_VALUE, present_key=PRESENT_KEY, present_value=PRESENT_VALUE,
        has_position_ids=has_position_ids, tokenizer_file="tokenizer.json",
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, special_tokens=special, chat_template=tk.CHAT_TEMPLATE,
    )


def _left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, positions), each (B, T): rows left-padded, positions counted from each row's first real token."""
    t = max(len(p) for p in prompts)
    ids = np.full((len(prompts), t), pad, np.int64)
    mask = np.zeros((len(prompts), t), np.int64)
    for r, p in enumerate(prompts):
        ids[r, t - len(p):] = p
        mask[r, t - len(p):] = 1
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, pos


class GreedyRunner:
    """One greedy generation, batched and left-padded, through torch or onnxruntime."""

    def __init__(self, model: DecoderLM, session=None):
        self.model, self.session = model, session
        self.names = past_names(model.args.layers)
        self.positions = session is not None and POSITION_IDS in {i.name for i in session.get_inputs()}

    def step(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]):
        if self.session is not None:
            feeds = {INPUT_IDS: ids, ATTENTION_MASK: mask, **dict(zip(self.names, past))}
            if self.positions:
                feeds[POSITION_IDS] = pos
            out = self.session.run(None, feeds)
            return out[0], out[1:]
        with torch.no_grad():
            kv = [(torch.from_numpy(past[2 * i]), torch.from_numpy(past[2 * i + 1])) for i in range(len(past) // 2)]
            logits, presents = self.model.forward_with_past(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos), kv)
        return logits.numpy(), [t.numpy() for p in presents for t in p]

    def generate(self, prompts: Sequence[Sequence[int]], steps: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The prompt pass and ``steps`` decode passes. Returns the logits of every pass (the prompt
        pass: its real positions only, (real tokens, vocab); a decode pass: (B, vocab)) and the
        greedy tokens (B, steps)."""
        a = self.model.args
        ids, mask, pos = _left_pad(prompts, pad=0)
        past = [np.zeros((len(prompts), a.heads, 0, a.head_dim), np.float32) for _ in self.names]
        logits_seen, tokens = [], []
        for step in range(steps + 1):
            logits, past = self.step(ids, mask, pos, past)
            logits_seen.append(logits[mask[:, -logits.shape[1]:].astype(bool)] if step == 0 else logits[:, -1])
            nxt = logits[:, -1].argmax(-1).astype(np.int64)
            tokens.append(nxt)
            ids, pos = nxt[:, None], pos[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        return logits_seen, np.stack(tokens[:steps], axis=1) if steps else np.zeros((len(prompts), 0), np.int64)


def greedy_torch(model: DecoderLM, prompt_ids: Sequence[int], n: int) -> list[int]:
    """torch's greedy continuation of one prompt (cached forward), ``n`` tokens, no EOS stop."""
    model = model.cpu().float().eval()
    return [int(t) for t in GreedyRunner(model).generate([list(prompt_ids)], n)[1][0]]


def parity_check_lm(model: DecoderLM, onnx_bytes: bytes, prompts: Sequence[Sequence[int]], decode_steps: int,
                    tolerance: float = 1e-3, session: Optional[object] = None) -> float:
    """Prompt pass (the prompts batched, left-padded) plus ``decode_steps`` greedy steps through
    onnxruntime (CPU) and torch: the greedy tokens must be identical and every logit of a real
    position within ``tolerance`` (fp32). Returns the max abs diff; raises ParityError."""
    from maas_ray.runtime import create_session

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("parity needs at least one prompt, none of them empty")
    if max(len(p) for p in prompts) + decode_steps > model.args.context_length:
        raise ConfigError(f"longest prompt + {decode_steps} decode steps > context_length {model.args.context_length}")
    model = model.cpu().float().eval()
    sess = session or create_session(onnx_bytes, device="cpu")
    want_logits, want_tokens = GreedyRunner(model).generate(prompts, decode_steps)
    got_logits, got_tokens = GreedyRunner(model, sess).generate(prompts, decode_steps)
    diff = max(float(np.max(np.abs(w - g))) for w, g in zip(want_logits, got_logits))
    logger.info("LM parity on %d prompts + %d decode steps: max abs logit diff %.3g", len(prompts), decode_steps, diff)
    if not np.array_equal(want_tokens, got_tokens):
        raise ParityError(f"greedy tokens differ between torch and onnxruntime: {want_tokens.tolist()} vs {got_tokens.tolist()}")
    if not diff <= tolerance:
        raise ParityError(f"LM parity check failed: max abs logit diff {diff:.3g} > tolerance {tolerance:.3g}")
    return diff
