"""Generative language models: the ``decoder-lm`` family (GPT-2's architecture), its byte-level
BPE tokenizer, the reference corpus, Ray Train DDP on next-token loss, export to ONNX with a KV
cache, parity, and publishing a ``kind: generative`` version (docs/generative.md).

- :mod:`~maas_ray.train.lm.config`: ``LMTrainConfig``, ``DecoderLMArgs`` (no torch)
- :mod:`~maas_ray.train.lm.corpus`: the generated reference language and its scoring rules
- :mod:`~maas_ray.train.lm.tokenizer`: training the tokenizer, special tokens, chat template
- :mod:`~maas_ray.train.lm.data`: documents -> splits of token windows
- :mod:`~maas_ray.train.lm.model`: ``DecoderLM`` (training forward and cached forward)
- :mod:`~maas_ray.train.lm.task`: the LM task of the generic DDP loop (``maas_ray.train.loop``)
- :mod:`~maas_ray.train.lm.export`: the KV-cache ONNX graph, ``GenerationSpec``, parity
- :mod:`~maas_ray.train.lm.publish`: a version in the registry, and loading it back
- :mod:`~maas_ray.train.lm.reference`: sample generations and their scores
- :mod:`~maas_ray.train.lm.pipeline`: ``train_and_publish_lm``, the one-call entry point
"""
