"""A stand-in generative version for developing the benchmark without a trained model: a
``decoder-lm`` (GPT-2's architecture) with seeded random weights, a byte-level BPE tokenizer
trained on text already on the machine, exported to the issue-24 ONNX graph contract (optimum's
GPT-2 ``text-generation-with-past`` layout) and published to a registry with its
``GenerationSpec``, weights and model spec, as training publishes a real one.

Throughput does not depend on the weights' values, only on their shapes, so a seeded model
measures what a trained one of the same size would. ``tests/helpers/lm.py``'s
``publish_tiny_lm`` (when present) is preferred by ``benchmarks.generate``; this is its fallback.

    python -m benchmarks.peers.standin --registry /tmp/reg --model lm --dim 128 --layers 4
"""

from __future__ import annotations

import argparse
import io
import json
import warnings
from pathlib import Path
from typing import Optional

SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def corpus_lines() -> list[str]:
    """Offline English text: the standard library's module docstrings."""
    import argparse as a, asyncio, collections, json as j, logging, pathlib, random, re, statistics, textwrap
    docs = [m.__doc__ or "" for m in (a, asyncio, collections, j, logging, pathlib, random, re, statistics, textwrap)]
    return [line for d in docs for line in d.splitlines() if line.strip()] * 4


def train_tokenizer(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer)
    return tok.to_str()


class _Graph:
    """``forward_with_past`` with flat inputs/outputs, as the ONNX graph has them."""

    def __new__(cls, model):
        import torch

        class G(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, position_ids, *flat):
                past = [(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)]
                logits, presents = self.m.forward_with_past(input_ids, attention_mask, position_ids, past)
                return (logits, *[t for kv in presents for t in kv])

        return G(model)


def export_graph(model) -> bytes:
    import torch

    a = model.args
    layers = a.layers
    past_names = [n for i in range(layers) for n in (f"past_key_values.{i}.key", f"past_key_values.{i}.value")]
    present_names = [n for i in range(layers) for n in (f"present.{i}.key", f"present.{i}.value")]
    ids = torch.zeros(2, 3, dtype=torch.int64)
    past = [torch.zeros(2, a.heads, 4, a.head_dim) for _ in past_names]
    mask = torch.ones(2, 7, dtype=torch.int64)
    pos = torch.arange(4, 7).unsqueeze(0).repeat(2, 1)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes.update({n: {0: "batch", 2: "past"} for n in past_names})
    axes.update({n: {0: "batch", 2: "total"} for n in present_names})
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Graph(model.eval()), (ids, mask, pos, *past), buf,
                          input_names=["input_ids", "attention_mask", "position_ids", *past_names],
                          output_names=["logits", *present_names], dynamic_axes=axes, opset_version=17,
                          dynamo=False)
    return buf.getvalue()


def publish_standin(registry_root: str, model_name: str = "lm", *, dim: int = 128, layers: int = 4, heads: int = 4,
                    context_length: int = 256, vocab_size: int = 2000, seed: int = 0) -> tuple[str, int]:
    """Publish a seeded ``decoder-lm`` as the next version of ``model_name``; returns (model, version)."""
    import torch
    from safetensors.torch import save as st_save
    from tokenizers import Tokenizer

    from maas_ray.registry import Registry
    from maas_ray.registry.manifest import GenerationSpec
    from maas_ray.registry.store import ExtraFile
    from maas_ray.train.lm.model import DecoderLM, DecoderLMArgs, weights_state_dict

    tok_json = train_tokenizer(vocab_size)
    tok = Tokenizer.from_str(tok_json)
    torch.manual_seed(seed)
    args = DecoderLMArgs(vocab_size=tok.get_vocab_size(), context_length=context_length, dim=dim, heads=heads,
                         layers=layers, dropout=0.0)
    model = DecoderLM(args).eval()
    specials = {t: tok.token_to_id(t) for t in SPECIALS}
    eos = specials["<|endoftext|>"]
    gen = GenerationSpec(context_length=context_length, vocab_size=args.vocab_size, num_layers=layers,
                         num_kv_heads=heads, head_dim=args.head_dim, eos_token_id=eos, pad_token_id=eos,
                         special_tokens=specials, chat_template=CHAT_TEMPLATE)
    spec_doc = {"model": "decoder-lm", "model_args": args.model_dump()}
    files = {
        "weights.safetensors": ExtraFile(st_save(weights_state_dict(model)), role="weights"),
        "model_spec.json": ExtraFile(json.dumps(spec_doc).encode(), role="model_spec"),
        "tokenizer.json": ExtraFile(tok_json.encode(), role="tokenizer"),
    }
    m = Registry(registry_root).publish(model_name, export_graph(model), files=files, model_spec=spec_doc,
                                        generation=gen, description=f"benchmark stand-in decoder-lm {spec_doc}")
    return model_name, m.version


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", required=True)
    p.add_argument("--model", default="lm")
    for name, default in (("dim", 128), ("layers", 4), ("heads", 4), ("context-length", 256), ("vocab-size", 2000)):
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args(argv)
    Path(a.registry).mkdir(parents=True, exist_ok=True)
    print(publish_standin(a.registry, a.model, dim=a.dim, layers=a.layers, heads=a.heads,
                          context_length=a.context_length, vocab_size=a.vocab_size))


if __name__ == "__main__":
    main()
