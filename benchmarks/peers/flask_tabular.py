"""The seeds' architecture for a tabular model: Flask on gunicorn, the native model's own
``predict`` on the request's rows, no ONNX, no schema.

    TABULAR_MODELS='{"rf": {"kind": "sklearn", "path": "model.skops"}, "xgb": {"kind": "xgboost", "path": "model.json"}}' \\
        gunicorn -w 1 -b 127.0.0.1:8301 benchmarks.peers.flask_tabular:app

``POST /v1/models/<name>:predict`` takes KServe's v1 body, ``{"instances": [[f0, f1, ...], ...]}``
(one list of numbers per row, in the model's feature order, categories as their index) and
answers ``{"predictions": [...]}``: ``predict_proba`` rows for a scikit-learn classifier,
``predict`` values otherwise; an XGBoost model is a ``Booster`` (``nthread`` from
``TABULAR_NTHREAD``, default 1) over a ``DMatrix``. scikit-learn models load from the
manifest's native extra, ``model.skops`` (``skops.io``, trusting the types the file names).
Each sync worker loads its own copy.
"""

import json
import os

import numpy as np
from flask import Flask, jsonify, request


def _load(kind: str, path: str):
    if kind == "xgboost":
        import xgboost as xgb

        return xgb.Booster(params={"nthread": int(os.environ.get("TABULAR_NTHREAD", "1"))}, model_file=path)
    import skops.io

    return skops.io.load(path, trusted=skops.io.get_untrusted_types(file=path))


MODELS = {name: (spec["kind"], _load(spec["kind"], spec["path"]))
          for name, spec in json.loads(os.environ["TABULAR_MODELS"]).items()}
app = Flask(__name__)


@app.post("/v1/models/<name>:predict")
def predict(name):
    if name not in MODELS:
        return jsonify({"error": f"model {name!r} not found"}), 404
    kind, model = MODELS[name]
    x = np.asarray(request.get_json()["instances"], dtype=np.float32)
    if kind == "xgboost":
        import xgboost as xgb

        out = model.predict(xgb.DMatrix(x))
    elif hasattr(model, "predict_proba"):
        out = model.predict_proba(x)
    else:
        out = model.predict(x)
    return jsonify({"predictions": out.tolist()})
