"""LMTrainConfig: how to train, export and publish one ``decoder-lm`` version (no torch here,
so the CLI validates a config before anything heavy loads).

It is a :class:`~maas_ray.train.config.TrainConfig` (the same optimizer, schedule, DDP, checkpoint,
resume and ``parent`` fields, so ``maas train`` takes the same flags) with the language-model
fields added and the classifier-only ones refused.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Optional

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from maas_ray.errors import format_validation_error
from maas_ray.registry.manifest import ModelName
from maas_ray.train.config import _IMPORT_PATH, TrainConfig, load_config

FAMILY = "decoder-lm"
REFERENCE_CORPUS = "reference"  # maas_ray.train.lm.corpus
TABLE_SUFFIXES = (".parquet", ".jsonl")  # one document per row of a `text` column
# TrainConfig fields that mean nothing for a language model: refused when set.
CLASSIFIER_ONLY = ("max_seq_len", "class_labels", "min_test_accuracy", "external_data_threshold_bytes")


class DecoderLMArgs(BaseModel):
    """``model_args`` of the ``decoder-lm`` family (GPT-2's hyper-parameters)."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(default=512, ge=2, description="Tokens in the vocabulary: set from the trained tokenizer.")
    context_length: int = Field(default=128, ge=2, le=65536, description="Most positions one sequence may hold (GPT-2's n_positions).")
    dim: int = Field(default=128, ge=8, description="Width of the residual stream (n_embd).")
    heads: int = Field(default=4, ge=1, description="Attention heads (n_head); must divide dim.")
    layers: int = Field(default=4, ge=1, le=96, description="Transformer blocks (n_layer).")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout on embeddings, attention and residuals.")

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> "DecoderLMArgs":
        if self.dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim})")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


class LMTrainConfig(TrainConfig):
    """A ``decoder-lm`` training run: next-token loss with Ray Train DDP, checkpoints selected on
    the lowest validation loss, test perplexity once, export with a KV cache, parity, publish."""

    kind: Literal["generative"] = Field(
        default="generative",
        description="'generative': train a language model. Implied by model: decoder-lm; set it (YAML or "
        "--kind generative) to train a factory by import path as one.",
    )
    model_name: ModelName = Field(default="lm", description="Registry model to publish to.")
    model: str = Field(
        default=FAMILY,
        description=f"{FAMILY!r} (GPT-2's architecture) or 'package.module:factory': factory(vocab_size=..., "
        "context_length=..., **model_args) returns a causal nn.Module mapping (batch, seq) int64 ids to "
        "(batch, seq, vocab_size) logits (docs/generative.md, 'Your own language model').",
    )
    model_args: dict[str, Any] = Field(
        default_factory=dict,
        description="decoder-lm hyper-parameters (a JSON object on the command line): context_length, dim, "
        "heads, layers, dropout. For a factory: its keyword arguments, context_length required. vocab_size "
        "comes from the tokenizer (see vocab_size).",
    )
    data: str = Field(
        default=REFERENCE_CORPUS,
        description=f"{REFERENCE_CORPUS!r} (the generated reference corpus, offline), a text file (documents "
        "separated by blank lines), a folder of .txt/.md files, a .parquet/.jsonl file with a 'text' column "
        "(one document per row), a folder or an object-store prefix (s3://bucket/prefix, gs://...) of "
        ".parquet/.jsonl files with a 'text' column or one remote such file (read through Ray Data), or "
        "'package.module:loader' returning a list of documents.",
    )
    data_loading: Literal["auto", "memory", "ray_data"] = Field(
        default="auto",
        description="How the workers get the windows: 'memory' (documents read, tokenized and windowed on the "
        "driver, the windows shared through the object store), 'ray_data' (a folder, object-store prefix or "
        "remote file of .parquet/.jsonl with a 'text' column only: split by a hash of each document, tokenized "
        "and windowed in Ray Data, each split's windows materialized in the object store and fed to the "
        "workers as equal dataset shards), 'auto' (ray_data for such table sources whose files total more "
        "than ray_data_threshold_bytes, else memory).",
    )
    ray_data_threshold_bytes: int = Field(
        default=256 * 1024**2, ge=0,
        description="data_loading 'auto': table sources whose files total more bytes than this are streamed.",
    )
    tokenizer_sample_documents: int = Field(
        default=50000, ge=100,
        description="Streamed data (data_loading ray_data): the tokenizer is trained on at most this many "
        "training documents, a seeded uniform sample drawn while the driver reads the text once (memory "
        "loading trains it on every training document; fine-tuning uses the parent's).",
    )
    epochs: int = Field(default=6, ge=1, description="Epochs to train (at most; see patience).")
    batch_size: int = Field(default=16, ge=1, description="Per-worker sequences (of context_length tokens) per micro-step.")
    lr: float = Field(default=2e-3, gt=0.0, description="Peak Adam learning rate.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="Adam weight decay.")
    warmup_fraction: float = Field(default=0.05, ge=0.0, lt=1.0, description="Share of optimizer steps with linear LR warm-up; cosine decay to 0 after it.")
    grad_clip_norm: Optional[float] = Field(default=1.0, gt=0.0, description="Clip the global gradient norm to this value (None: no clipping).")
    patience: Optional[int] = Field(default=None, ge=1, description="Early stopping: stop after this many epochs without a lower validation loss.")
    val_fraction: float = Field(default=0.05, gt=0.0, lt=1.0, description="Share of documents for validation (checkpoint selection).")
    test_fraction: float = Field(default=0.05, gt=0.0, lt=1.0, description="Share of documents for the test perplexity, once.")
    vocab_size: int = Field(default=512, ge=260, description="Byte-level BPE vocabulary (256 bytes + 4 special tokens + merges), trained on the training split.")
    parity_tolerance: float = Field(default=1e-3, gt=0.0, description="Max abs logit diff allowed between torch and onnxruntime (fp32) over the prompt pass and the decode steps.")
    corpus_documents: int = Field(default=20000, ge=100, description=f"Documents generated for data {REFERENCE_CORPUS!r}.")
    corpus_dir: str = Field(default="~/.maas_ray/corpus", description=f"Where data {REFERENCE_CORPUS!r} is written as a text file (reused).")
    max_test_perplexity: Optional[float] = Field(default=None, gt=1.0, description="Refuse to publish above this test perplexity.")
    sample_prompts: list[str] = Field(
        default=["the small cat", "two old farmers"],
        description="Prompts whose greedy continuations are generated after training (the report's samples).",
    )
    sample_tokens: int = Field(default=24, ge=1, description="Tokens generated for each sample prompt (at most; stops at EOS).")
    score_prompts: int = Field(default=64, ge=0, description=f"Held-out prompts scored against the rules of the {REFERENCE_CORPUS!r} corpus (0: none).")

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v != FAMILY and not _IMPORT_PATH.match(v):
            raise ValueError(f"model must be {FAMILY!r} or an import path 'package.module:factory' for a "
                             f"language model, got {v!r}")
        return v

    @field_validator("data")
    @classmethod
    def _data(cls, v: str) -> str:
        if v == REFERENCE_CORPUS or "://" in v or (_IMPORT_PATH.match(v) and not os.path.exists(v)):
            return v
        return os.path.abspath(os.path.expanduser(v))

    @model_validator(mode="after")
    def _resolve_paths(self) -> "LMTrainConfig":
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(f"val_fraction + test_fraction must leave >= 10 % for training, got {self.val_fraction} + {self.test_fraction}")
        refused = [f for f in CLASSIFIER_ONLY if getattr(self, f) != type(self).model_fields[f].get_default(call_default_factory=True)]
        if refused:
            raise ValueError(f"{refused} do not apply to {FAMILY} (classifier fields)")
        if self.data_loading == "ray_data" and not ("://" in self.data or os.path.isdir(self.data)):
            raise ValueError(f"data_loading 'ray_data' needs a folder or object-store prefix of {'/'.join(TABLE_SUFFIXES)} "
                             f"files with a 'text' column (or one remote such file), got data {self.data!r}")
        if self.model == FAMILY:
            try:  # vocab_size is the tokenizer's; anything else in model_args is checked now
                args = DecoderLMArgs.model_validate({**self.model_args, "vocab_size": self.model_args.get("vocab_size", self.vocab_size)})
            except ValidationError as exc:
                raise ValueError(format_validation_error(exc, f"model_args of {FAMILY}")) from exc
            self.model_args = args.model_dump(exclude={"vocab_size"})
        else:  # a factory's own arguments are its business; the two the pipeline passes are ours
            ctx = self.model_args.get("context_length")
            if isinstance(ctx, bool) or not isinstance(ctx, int) or not 2 <= ctx <= 65536:
                raise ValueError(f"model_args of {self.model} need context_length, an int in [2, 65536], got {ctx!r}")
            if "vocab_size" in self.model_args:
                raise ValueError(f"model_args of {self.model} must not set vocab_size ({self.model_args['vocab_size']!r}): "
                                 "the factory gets the trained tokenizer's (set the vocab_size field)")
        self.corpus_dir = os.path.abspath(os.path.expanduser(self.corpus_dir))
        if "://" not in self.storage_path:
            self.storage_path = os.path.abspath(os.path.expanduser(self.storage_path))
        return self

    @property
    def context_length(self) -> int:
        return int(self.model_args["context_length"])

    @classmethod
    def load(cls, path: Optional[str] = None, **overrides: Any) -> "LMTrainConfig":
        """Read a YAML file (optional), apply non-None overrides, validate."""
        return load_config(cls, path, overrides, "language-model training config")


def is_lm_config(path: Optional[str], model_flag: Optional[str] = None, kind_flag: Optional[str] = None) -> bool:
    """Whether ``maas train`` was asked for a language model: ``--model decoder-lm``, ``--kind
    generative``, or a YAML whose ``model`` is decoder-lm or whose ``kind`` is generative (False for
    unreadable files: the loader reports those)."""
    if kind_flag is not None:
        return True  # LMTrainConfig is the only config with a --kind flag; it validates the value
    if model_flag == FAMILY:
        return True
    if not path:
        return False
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and (raw.get("model") == FAMILY or raw.get("kind") == "generative")
