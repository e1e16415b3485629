"""Generation for ``kind: generative`` versions (decoder language models), without Ray or torch:
the tokenizer (prompts, chat templates, streamed text), per-request sampling, and the
continuous-batching engine over onnxruntime that a serving replica runs.

Use::

    from maas_ray.runtime import create_session
    from maas_ray.serving.generate import EngineConfig, GenerationEngine, LMTokenizer

    loaded = Registry(root).load("lm", files=["tokenizer.json"])
    spec = loaded.manifest.generation
    tokenizer = LMTokenizer.from_bytes(loaded.files["tokenizer.json"], spec)
    engine = GenerationEngine(create_session(loaded.model_bytes), spec, tokenizer, EngineConfig()).start()
    text = ""
    async for chunk in engine.generate(tokenizer.encode("Once upon"), SamplingParams(max_tokens=20)):
        text += chunk.text  # the continuation, as it is made
"""

from maas_ray.serving.generate.engine import EngineConfig, GenerationEngine
from maas_ray.serving.generate.tokenizer import IncrementalDetokenizer, LMTokenizer

__all__ = ["EngineConfig", "GenerationEngine", "IncrementalDetokenizer", "LMTokenizer"]
