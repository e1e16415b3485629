"""Models whose every item costs tens of milliseconds, one per model kind (a flat MLP input, a
CNN image input, token ids from text), for tests of work-bounded requests. ONNX graphs built with
onnx.helper (no torch), plus a small word-level tokenizer.json for the text one."""

from __future__ import annotations

import numpy as np

from tests.helpers.models import slow_loop

TEXT_VOCAB = ["[PAD]", "[UNK]", "the", "owl", "dog", "cat", "scared", "saw", "a", "bird"]


def _slow_classifier(inputs: list, pre_nodes: list, pre_inits: list, features: str, n_features: int,
                     classes: int, steps: int, width: int) -> bytes:
    """``features`` (B, n_features) -> logits (B, classes), after a Loop of ``steps`` (width x width)
    matmuls per item whose result is added times zero (the cost without changing the answer)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    loop_nodes, loop_inits, same = slow_loop(features, n_features, width, steps, rng)
    inits = [
        *pre_inits,
        *loop_inits,
        numpy_helper.from_array(rng.normal(size=(n_features, classes)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(size=(classes,)).astype(np.float32), "b"),
    ]
    nodes = [*pre_nodes,
             *loop_nodes,
             helper.make_node("MatMul", [same, "W"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], ["logits"])]
    graph = helper.make_graph(nodes, "slow", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def slow_mlp_onnx(in_features: int = 4, classes: int = 3, steps: int = 3000, width: int = 512) -> bytes:
    """input (B, in_features) FP32 -> logits (B, classes); ~0.1 s per item on one core."""
    from onnx import TensorProto, helper

    return _slow_classifier([helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", in_features])],
                            [], [], "input", in_features, classes, steps, width)


def slow_cnn_onnx(classes: int = 10, steps: int = 3000, width: int = 512) -> bytes:
    """input (B, 1, 8, 8) FP32 (what the image preprocessor feeds a CNN) -> logits (B, classes)."""
    from onnx import TensorProto, helper

    return _slow_classifier([helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                            [helper.make_node("Flatten", ["input"], ["flat"], axis=1)], [], "flat", 64, classes,
                            steps, width)


def slow_text_onnx(classes: int = 4, dim: int = 16, steps: int = 3000, width: int = 512) -> bytes:
    """ids (B, S) INT64 -> mean of token embeddings -> logits (B, classes)."""
    from onnx import TensorProto, helper, numpy_helper

    emb = numpy_helper.from_array(np.random.default_rng(5).normal(size=(len(TEXT_VOCAB), dim)).astype(np.float32),
                                  "emb")
    return _slow_classifier([helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                            [helper.make_node("Gather", ["emb", "ids"], ["tokens"]),
                             helper.make_node("ReduceMean", ["tokens"], ["pooled"], axes=[1], keepdims=0)],
                            [emb], "pooled", dim, classes, steps, width)


def word_tokenizer_json() -> bytes:
    """A whitespace word-level tokenizer over :data:`TEXT_VOCAB` (Hugging Face tokenizers format)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(TEXT_VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str().encode()
