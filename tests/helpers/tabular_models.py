"""Small real tabular models (onnx.helper, no training) that follow part A's export contract:
one FP32 input ``input`` [-1, n_features], NaN for a missing value, categorical columns as
the float index of the category; with numpy references for their exact answers."""

from __future__ import annotations

from typing import Any

import numpy as np

COLUMNS: list[dict[str, Any]] = [
    {"name": "age", "dtype": "FP32", "categories": None, "nullable": True},
    {"name": "income", "dtype": "FP32", "categories": None, "nullable": False},
    {"name": "city", "dtype": "BYTES", "categories": ["paris", "lyon", "nice"], "nullable": True},
    {"name": "member", "dtype": "BOOL", "categories": None, "nullable": False},
    {"name": "visits", "dtype": "INT64", "categories": None, "nullable": False},
]
CLASSES = ["no", "yes", "maybe"]


def _weights(n_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(len(COLUMNS), n_out)).astype(np.float32) * 0.1,
            rng.normal(size=(n_out,)).astype(np.float32))


def tabular_onnx(kind: str, seed: int = 0) -> bytes:
    """``classifier``: probabilities (softmax) [-1, 3]; ``regressor``: value [-1, 1]. NaN -> 0
    before a linear layer (as trees route missing values one way)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n_out = len(CLASSES) if kind == "classifier" else 1
    w, b = _weights(n_out, seed)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.zeros((1,), np.float32), "zero")]
    nodes = [helper.make_node("IsNaN", ["input"], ["nan"]),
             helper.make_node("Where", ["nan", "zero", "input"], ["x"]),
             helper.make_node("MatMul", ["x", "W"], ["xw"])]
    if kind == "classifier":
        nodes += [helper.make_node("Add", ["xw", "b"], ["logits"]),
                  helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
        out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", n_out])
    else:
        nodes.append(helper.make_node("Add", ["xw", "b"], ["value"]))
        out = helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch", 1])
    graph = helper.make_graph(
        nodes, kind, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", len(COLUMNS)])], [out],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def publish_tabular(registry: Any, name: str, kind: str, seed: int = 0) -> Any:
    """Publish ``tabular_onnx(kind)`` with the tabular preprocessor and the matching postprocessor."""
    from maas_ray.registry import ProcessorSpec

    post = (ProcessorSpec(name="classification", params={"labels": CLASSES, "apply_softmax": False, "top_k": 2})
            if kind == "classifier" else ProcessorSpec(name="regression", params={}))
    return registry.publish(
        name, tabular_onnx(kind, seed), preprocessor=ProcessorSpec(name="tabular", params={"columns": COLUMNS}),
        postprocessor=post,
    )


def features(rows: dict[str, list]) -> np.ndarray:
    """Columns as requests send them -> the graph's FP32 matrix (missing: NaN or '')."""
    cats = {c["name"]: c["categories"] for c in COLUMNS}
    cols = []
    for c in COLUMNS:
        v = rows[c["name"]]
        if cats[c["name"]]:
            cols.append([cats[c["name"]].index(s) if s else np.nan for s in v])
        else:
            cols.append(np.asarray(v, dtype=np.float64))
    return np.stack([np.asarray(c, dtype=np.float32) for c in cols], axis=1)


def expected(kind: str, rows: dict[str, list], seed: int = 0) -> np.ndarray:
    """Classifier: probabilities (N, 3); regressor: values (N,)."""
    n_out = len(CLASSES) if kind == "classifier" else 1
    w, b = _weights(n_out, seed)
    x = np.nan_to_num(features(rows), nan=0.0)
    z = x @ w + b
    if kind == "classifier":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return z[:, 0]


def random_rows(n: int, seed: int = 0, missing_ages: bool = True) -> dict[str, list]:
    """``n`` valid rows (some missing cities, as ''; and NaN ages unless ``missing_ages`` is
    false: the online codecs refuse NaN for every model), as column lists."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(18, 90, n).round(1)
    if missing_ages:
        age[rng.random(n) < 0.1] = np.nan
    city = np.asarray(COLUMNS[2]["categories"], dtype=object)[rng.integers(0, 3, n)]
    city[rng.random(n) < 0.1] = ""
    return {
        "age": age.tolist(),
        "income": rng.uniform(0, 200, n).round(2).tolist(),
        "city": city.tolist(),
        "member": (rng.random(n) < 0.5).tolist(),
        "visits": rng.integers(0, 50, n).tolist(),
    }


# ---- the other model kinds, for `maas batch` -------------------------------------------------------------
def token_sum_onnx(seq_len: int = 8) -> bytes:
    """A "text model": ids INT64 [-1, seq_len] -> value FP32 [-1, 1], the sum of the token ids."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("ReduceSum", ["f", "axes"], ["value"], keepdims=1)],
        "token_sum",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", seq_len])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch", 1])],
        initializer=[numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


WORDS = {"[PAD]": 0, "[UNK]": 1, "red": 2, "green": 3, "blue": 4}


def word_tokenizer_json() -> bytes:
    """A whitespace word-level tokenizer over WORDS (tokenizers' JSON)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(WORDS, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str().encode()
