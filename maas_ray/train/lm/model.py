"""``decoder-lm``: GPT-2's architecture exactly, so its weights load into Hugging Face's
``GPT2LMHeadModel`` unchanged (same parameter names and layouts, :func:`hf_gpt2_config`).

Learned token and position embeddings, pre-norm blocks (LayerNorm eps 1e-5, one qkv projection
with bias, causal attention scaled 1/sqrt(head_dim), output projection with bias, MLP 4*dim with
GELU(tanh)), final LayerNorm, head tied to the token embedding (no bias). Projections are GPT-2's
``Conv1D`` (weight stored (in, out)), which is what makes the state dict Hugging Face's.

Two forwards: :meth:`DecoderLM.forward` ``(B, T) ids -> (B, T, vocab)`` logits for training, and
:meth:`DecoderLM.forward_with_past` with an attention mask, explicit positions and a KV cache,
the graph that :mod:`maas_ray.train.lm.export` exports.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from maas_ray.train.lm.config import DecoderLMArgs

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each (B, heads, P, head_dim)
LN_EPS = 1e-5


class Conv1D(nn.Module):
    """GPT-2's linear layer: ``x @ weight + bias`` with weight (in, out)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Attention(nn.Module):
    def __init__(self, a: DecoderLMArgs):
        super().__init__()
        self.heads, self.head_dim = a.heads, a.head_dim
        self.c_attn = Conv1D(a.dim, 3 * a.dim)
        self.c_proj = Conv1D(a.dim, a.dim)
        self.dropout = a.dropout
        self.resid_dropout = nn.Dropout(a.dropout)

    def _split(self, z: torch.Tensor) -> torch.Tensor:
        b, t, _ = z.shape
        return z.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, T, D) -> (B, h, T, hd)

    def forward(self, x: torch.Tensor, allowed: Optional[torch.Tensor] = None,
                past: Optional[KV] = None) -> tuple[torch.Tensor, KV]:
        """``allowed`` (B, 1, S, P+S) bool, None = plain causal (training, no cache)."""
        b, s, d = x.shape
        q, k, v = (self._split(z) for z in self.c_attn(x).split(d, dim=2))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, h, P+S, hd)
        if allowed is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, h, S, P+S)
            # A large finite negative, not -inf: a fully masked row (a left-padding query) then
            # stays finite, so its values cannot turn real rows into NaN in later layers.
            att = torch.where(allowed, att, torch.tensor(torch.finfo(att.dtype).min, dtype=att.dtype))
            att = F.dropout(att.softmax(dim=-1), self.dropout, self.training)
            y = att @ v
        y = y.transpose(1, 2).reshape(b, s, d)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, a: DecoderLMArgs):
        super().__init__()
        self.c_fc = Conv1D(a.dim, 4 * a.dim)
        self.c_proj = Conv1D(4 * a.dim, a.dim)
        self.dropout = nn.Dropout(a.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, a: DecoderLMArgs):
        super().__init__()
        self.ln_1 = nn.LayerNorm(a.dim, eps=LN_EPS)
        self.attn = Attention(a)
        self.ln_2 = nn.LayerNorm(a.dim, eps=LN_EPS)
        self.mlp = MLP(a)

    def forward(self, x: torch.Tensor, allowed: Optional[torch.Tensor] = None,
                past: Optional[KV] = None) -> tuple[torch.Tensor, KV]:
        h, present = self.attn(self.ln_1(x), allowed, past)
        x = x + h
        return x + self.mlp(self.ln_2(x)), present


class DecoderLM(nn.Module):
    """A GPT-2 causal language model: ``(B, T)`` int64 ids -> ``(B, T, vocab)`` logits."""

    def __init__(self, args: DecoderLMArgs):
        super().__init__()
        self.args = args
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(args.vocab_size, args.dim),
            wpe=nn.Embedding(args.context_length, args.dim),
            drop=nn.Dropout(args.dropout),
            h=nn.ModuleList(Block(args) for _ in range(args.layers)),
            ln_f=nn.LayerNorm(args.dim, eps=LN_EPS),
        ))
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        nn.init.normal_(self.transformer.wte.weight, std=0.02)
        nn.init.normal_(self.transformer.wpe.weight, std=0.01)
        for block in self.transformer.h:  # GPT-2's scaled init of the residual projections
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * args.layers))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Training forward, positions 0..T-1, plain causal attention: (B, T) -> (B, T, vocab)."""
        t = input_ids.shape[1]
        assert t <= self.args.context_length, f"sequence of {t} tokens > context_length {self.args.context_length}"
        tr = self.transformer
        x = tr.drop(tr.wte(input_ids) + tr.wpe(torch.arange(t, device=input_ids.device)))  # (B, T, D)
        for block in tr.h:
            x, _ = block(x)
        return self.lm_head(tr.ln_f(x))

    def forward_with_past(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                          past: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        """The cached forward (the ONNX graph's): ids (B, S), mask (B, P+S) 1 = attend, positions
        (B, S), ``past`` one (key, value) per layer, each (B, heads, P, head_dim), P >= 0.
        Returns logits (B, S, vocab) and per layer the cache (B, heads, P+S, head_dim).

        Query i sits at cache index P+i; it attends key j iff j <= P+i and mask[:, j] == 1 (causal
        by absolute index, so a chunk S > 1 after a cache P > 0 works, and left padding is never seen).
        """
        tr = self.transformer
        s, total = input_ids.shape[1], attention_mask.shape[1]
        key_idx = torch.arange(total, device=input_ids.device)  # (P+S,)
        query_idx = key_idx[total - s:]  # (S,): P..P+S-1
        causal = key_idx.unsqueeze(0) <= query_idx.unsqueeze(1)  # (S, P+S)
        allowed = causal.unsqueeze(0).unsqueeze(0) & attention_mask.bool().unsqueeze(1).unsqueeze(2)  # (B, 1, S, P+S)
        x = tr.drop(tr.wte(input_ids) + tr.wpe(position_ids))
        presents: list[KV] = []
        for block, kv in zip(tr.h, past):
            x, present = block(x, allowed, kv)
            presents.append(present)
        return self.lm_head(tr.ln_f(x)), presents

    def empty_past(self, batch: int) -> list[KV]:
        """The cache of a prompt pass: per layer two (B, heads, 0, head_dim) tensors."""
        a = self.args
        z = torch.zeros(batch, a.heads, 0, a.head_dim)
        return [(z, z) for _ in range(a.layers)]


def weights_state_dict(model: DecoderLM) -> dict[str, torch.Tensor]:
    """The weights as Hugging Face's GPT2LMHeadModel names them (the tied head left out, as
    ``save_pretrained`` does), contiguous fp32 CPU tensors for safetensors."""
    return {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def load_weights(model: DecoderLM, state: dict[str, torch.Tensor]) -> DecoderLM:
    """Load :func:`weights_state_dict`'s tensors (head re-tied); strict otherwise."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"weights do not fit the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    return model


def hf_gpt2_config(args: DecoderLMArgs, *, eos_token_id: int, bos_token_id: Optional[int] = None) -> dict:
    """The ``config.json`` of the same model as Hugging Face's GPT2LMHeadModel."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": args.vocab_size,
        "n_positions": args.context_length, "n_ctx": args.context_length, "n_embd": args.dim,
        "n_layer": args.layers, "n_head": args.heads, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": args.dropout, "embd_pdrop": args.dropout, "attn_pdrop": args.dropout,
        "layer_norm_epsilon": LN_EPS, "initializer_range": 0.02, "scale_attn_weights": True,
        "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eos_token_id if bos_token_id is None else bos_token_id, "eos_token_id": eos_token_id,
    }
