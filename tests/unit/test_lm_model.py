"""The decoder-lm model: GPT-2's parameter names and shapes, the tied head, the two forwards,
the LM task of the generic loop, and a published version loading back (no Ray)."""

import math

import pytest

torch = pytest.importorskip("torch")

from maas_ray.train.lm.config import DecoderLMArgs
from maas_ray.train.lm.model import (
    DecoderLM,
    hf_gpt2_config,
    load_weights,
    weights_state_dict,
)

pytestmark = pytest.mark.unit
ARGS = DecoderLMArgs(vocab_size=50, context_length=16, dim=16, heads=2, layers=2, dropout=0.0)


def test_state_dict_is_gpt2s():
    names = weights_state_dict(DecoderLM(ARGS))
    assert names["transformer.wte.weight"].shape == (50, 16)
    assert names["transformer.wpe.weight"].shape == (16, 16)
    assert names["transformer.h.1.attn.c_attn.weight"].shape == (16, 48)  # Conv1D: (in, out)
    assert names["transformer.h.0.mlp.c_fc.weight"].shape == (16, 64)
    assert {"transformer.ln_f.weight", "transformer.h.0.ln_2.bias", "transformer.h.0.attn.c_proj.bias"} <= set(names)
    assert "lm_head.weight" not in names  # tied to wte, as save_pretrained leaves it out
    cfg = hf_gpt2_config(ARGS, eos_token_id=0)
    assert (cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_positions"], cfg["activation_function"]) == (16, 2, 2, 16, "gelu_new")


def test_weights_round_trip_with_the_tied_head():
    torch.manual_seed(0)
    a, b = DecoderLM(ARGS).eval(), DecoderLM(ARGS).eval()
    load_weights(b, weights_state_dict(a))
    assert b.lm_head.weight.data_ptr() == b.transformer.wte.weight.data_ptr()
    x = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    with pytest.raises(ValueError, match="do not fit"):
        load_weights(b, {"nope": torch.zeros(1)})


def test_cached_forward_equals_training_forward_and_decode():
    torch.manual_seed(0)
    m = DecoderLM(ARGS).eval()
    x = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        full = m(x)
        prompt, past = m.forward_with_past(x[:, :6], torch.ones(2, 6, dtype=torch.long), torch.arange(6).expand(2, 6), m.empty_past(2))
        rest, _ = m.forward_with_past(x[:, 6:], torch.ones(2, 10, dtype=torch.long), torch.arange(6, 10).expand(2, 4), past)
    torch.testing.assert_close(torch.cat([prompt, rest], 1), full, atol=1e-5, rtol=1e-5)


def test_lm_task_loss_and_evaluation():
    from maas_ray.train.lm.task import LM_TASK, evaluate, next_token_loss
    from maas_ray.train.loop import CLASSIFY, resolve_task

    assert resolve_task(None) is CLASSIFY and resolve_task("maas_ray.train.lm.task:LM_TASK") is LM_TASK
    assert LM_TASK.metric == "val_loss" and not LM_TASK.higher_is_better
    logits = torch.zeros(3, 4, 50)  # uniform: loss log(50), perplexity 50
    assert math.isclose(next_token_loss(logits, torch.zeros(3, 4, dtype=torch.long)).item(), math.log(50), rel_tol=1e-6)
    torch.manual_seed(0)
    m = DecoderLM(ARGS)
    x, y = torch.randint(0, 50, (5, 16)), torch.randint(0, 50, (5, 16))
    out = evaluate(m, x, y, 0, 1)
    assert math.isclose(out["val_perplexity"], math.exp(out["val_loss"]), rel_tol=1e-9)
    assert not m.training


def test_published_tiny_lm_loads_back_and_greedy_is_reproducible(tmp_path):
    from maas_ray.registry import Registry
    from tests.helpers.lm import publish_tiny_lm, torch_greedy

    reg = Registry(str(tmp_path))
    m = publish_tiny_lm(reg, train_steps=20)
    assert m.kind == "generative" and m.generation.eos_token_id == 0 and m.generation.bos_token_id == 0
    assert {f: e.role for f, e in m.files.items()} == {
        "tokenizer.json": "tokenizer", "weights.safetensors": "weights", "model_spec.json": "model_spec"}
    assert m.generation.num_layers == 2 and m.generation.head_dim == 16 and m.metrics["parity_max_abs_diff"] < 1e-3
    first = torch_greedy(reg, "tiny-lm", m.version, [0, 5, 6], 6)
    assert len(first) == 6 and first == torch_greedy(reg, "tiny-lm", m.version, [0, 5, 6], 6)
