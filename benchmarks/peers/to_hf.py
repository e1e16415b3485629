"""A registry ``decoder-lm`` version as a local Hugging Face ``GPT2LMHeadModel`` checkpoint, so the
peers (``transformers``, vLLM) serve exactly the weights maas-ray serves.

``decoder-lm`` is GPT-2's architecture with GPT-2's parameter names (``maas_ray/train/lm/model.py``),
so the conversion is: ``config.json`` from the model spec, the weights file as
``model.safetensors`` (the tied head left out, as ``save_pretrained`` does), and the version's
``tokenizer.json`` wrapped as a ``PreTrainedTokenizerFast``. :func:`verify` then proves it: the
same greedy tokens as the version's ONNX graph (run with its KV cache) and logits within fp32
tolerance at every step.

    python -m benchmarks.peers.to_hf --registry /tmp/reg --model lm --out /tmp/lm-hf [--version 1]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from maas_ray.registry import Registry

LN_EPS = 1e-5


def _role(manifest, role: str) -> str:
    name = next((n for n, e in manifest.files.items() if e.role == role), None)
    if name is None:
        raise ValueError(f"{manifest.model}:{manifest.version} has no {role!r} file; files: {sorted(manifest.files)}")
    return name


def gpt2_config(model_args: dict, *, eos_token_id: int, bos_token_id: Optional[int], pad_token_id: Optional[int]) -> dict:
    """GPT2Config fields for ``decoder-lm`` model_args (the train side's ``hf_gpt2_config`` when present)."""
    try:
        from maas_ray.train.lm.model import DecoderLMArgs, hf_gpt2_config

        cfg = hf_gpt2_config(DecoderLMArgs(**model_args), eos_token_id=eos_token_id, bos_token_id=bos_token_id)
    except ImportError:
        a = model_args
        cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": a["vocab_size"],
               "n_positions": a["context_length"], "n_ctx": a["context_length"], "n_embd": a["dim"],
               "n_layer": a["layers"], "n_head": a["heads"], "n_inner": None, "activation_function": "gelu_new",
               "layer_norm_epsilon": LN_EPS, "tie_word_embeddings": True, "use_cache": True,
               "eos_token_id": eos_token_id, "bos_token_id": eos_token_id if bos_token_id is None else bos_token_id}
    # Serving is inference: dropout off (it is inactive in eval mode anyway).
    cfg.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, torch_dtype="float32")
    if pad_token_id is not None:
        cfg["pad_token_id"] = pad_token_id
    return cfg


def registry_to_hf(registry: Union[str, Registry], model: str, out: Union[str, Path],
                   version: Union[int, str, None] = None) -> Path:
    """Write ``out/`` = config.json, model.safetensors, tokenizer files, generation_config.json;
    plus ``model.onnx`` (the version's graph, for :func:`verify` and onnxruntime-genai)."""
    from safetensors.numpy import load as st_load, save_file

    reg = registry if isinstance(registry, Registry) else Registry(str(registry))
    loaded = reg.load(model, version)
    m, gen = loaded.manifest, loaded.manifest.generation
    if gen is None:
        raise ValueError(f"{model}:{m.version} is not a generative version (no manifest.generation)")
    spec = json.loads(loaded.files[_role(m, "model_spec")]) if any(
        e.role == "model_spec" for e in m.files.values()) else (m.model_spec or {})
    if spec.get("model") != "decoder-lm":
        raise ValueError(f"{model}:{m.version} is {spec.get('model')!r}, not decoder-lm: no GPT-2 checkpoint to make")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    args = dict(spec["model_args"])
    args.setdefault("vocab_size", gen.vocab_size)
    args.setdefault("context_length", gen.context_length)
    config = gpt2_config(args, eos_token_id=gen.eos_token_id, bos_token_id=gen.bos_token_id,
                         pad_token_id=gen.pad_token_id)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": gen.eos_token_id, "bos_token_id": config["bos_token_id"],
         # what maas-ray prepends to every prompt (LMTokenizer.encode), for the peers to do the same
         "maas_bos": gen.bos_token_id,
         **({"pad_token_id": gen.pad_token_id} if gen.pad_token_id is not None else {})}, indent=2))
    state = st_load(loaded.files[_role(m, "weights")])
    head = state.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, state["transformer.wte.weight"]):
        raise ValueError("lm_head.weight differs from transformer.wte.weight: the head is not tied")
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    tok_bytes = loaded.files[_role(m, "tokenizer")]
    (out / "tokenizer.json").write_bytes(tok_bytes)
    from transformers import PreTrainedTokenizerFast

    eos_text = next((t for t, i in gen.special_tokens.items() if i == gen.eos_token_id), "<|endoftext|>")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), eos_token=eos_text,
                                  bos_token=eos_text, pad_token=eos_text, unk_token=eos_text,
                                  model_max_length=gen.context_length, chat_template=gen.chat_template)
    tok.save_pretrained(str(out))
    # save_pretrained rewrites tokenizer.json; keep the version's bytes (what maas-ray tokenizes with)
    (out / "tokenizer.json").write_bytes(tok_bytes)
    loaded.write_to(str(out))  # model.onnx (+ extras, harmless)
    return out


def onnx_greedy(onnx_path: str, spec, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding with the version's graph and its KV cache: (tokens, last-position logits per step)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    past = {spec.past_key.format(i=i): np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
            for i in range(spec.num_layers)}
    past.update({spec.past_value.format(i=i): np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
                 for i in range(spec.num_layers)})
    ids, out_tokens, logits_seen, pos = list(prompt), [], [], 0
    feed_ids = ids
    outs_names = [o.name for o in sess.get_outputs()]
    for _ in range(steps):
        n = len(feed_ids)
        feed = {"input_ids": np.array([feed_ids], np.int64),
                "attention_mask": np.ones((1, pos + n), np.int64), **past}
        if "position_ids" in names:
            feed["position_ids"] = np.arange(pos, pos + n, dtype=np.int64)[None]
        res = dict(zip(outs_names, sess.run(None, feed)))
        last = res["logits"][0, -1]
        logits_seen.append(last)
        tok = int(last.argmax())
        out_tokens.append(tok)
        for i in range(spec.num_layers):
            past[spec.past_key.format(i=i)] = res[spec.present_key.format(i=i)]
            past[spec.past_value.format(i=i)] = res[spec.present_value.format(i=i)]
        pos += n
        feed_ids = [tok]
    return out_tokens, logits_seen


def verify(hf_dir: Union[str, Path], spec, prompts: list[list[int]], steps: int = 16, atol: float = 1e-4) -> dict:
    """Greedy tokens of the HF checkpoint (``generate``, with its cache) against the version's ONNX
    graph: identical tokens, and max |logit difference| per step (HF's ``output_logits``)."""
    import torch
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    worst = 0.0
    for prompt in prompts:
        want, want_logits = onnx_greedy(str(Path(hf_dir) / "model.onnx"), spec, prompt, steps)
        with torch.no_grad():
            g = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=spec.eos_token_id)
        got = g.sequences[0, len(prompt):].tolist()
        # min_new_tokens masks EOS in HF: past an EOS the ONNX path chose, the two continue from
        # different tokens, so compare tokens before it and logits up to the step that chose it
        stop = want.index(spec.eos_token_id) if spec.eos_token_id in want else len(want)
        diff = max(float(np.abs(l[0].numpy() - w).max()) for l, w in list(zip(g.logits, want_logits))[: stop + 1])
        worst = max(worst, diff)
        if got[:stop] != want[:stop]:
            raise AssertionError(f"greedy tokens differ for prompt {prompt[:8]}...: HF {got} vs ONNX {want}")
        if diff > atol:
            raise AssertionError(f"logits differ by {diff:.3g} > {atol} for prompt {prompt[:8]}...")
    return {"prompts": len(prompts), "steps": steps, "max_abs_logit_diff": worst, "tokens_identical": True}


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", default=os.environ.get("MAAS_REGISTRY_ROOT"))
    p.add_argument("--model", required=True)
    p.add_argument("--version", default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = registry_to_hf(a.registry, a.model, a.out, a.version)
    from tokenizers import Tokenizer

    spec = Registry(a.registry).describe(a.model, a.version).generation
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    bos = [] if spec.bos_token_id is None else [spec.bos_token_id]
    prompts = [bos + tok.encode(t, add_special_tokens=False).ids for t in ("the small cat", "In the beginning", "two")]
    print(json.dumps({"hf_dir": str(out), **verify(out, spec, prompts)}))


if __name__ == "__main__":
    main()
