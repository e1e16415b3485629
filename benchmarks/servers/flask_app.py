"""The plain server: Flask on gunicorn, one request = one onnxruntime run, no batching.

Run as ``gunicorn -w <cores> benchmarks.servers.flask_app:app`` with BENCH_MODEL_PATH
set; each sync worker owns one session with BENCH_THREADS (1) intra-op threads. With
BENCH_RAW (a raw workload's processing spec) it decodes, runs and labels raw inputs
(benchmarks/servers/raw.py).
"""

import os

import numpy as np
import onnxruntime as ort
from flask import Flask, jsonify, request

from benchmarks.servers.raw import RawCodec, label_response

DTYPES = {"FP32": np.float32, "INT64": np.int64}

opts = ort.SessionOptions()
opts.intra_op_num_threads = int(os.environ.get("BENCH_THREADS", "1"))
opts.inter_op_num_threads = 1
session = ort.InferenceSession(os.environ["BENCH_MODEL_PATH"], opts, providers=["CPUExecutionProvider"])
codec = RawCodec.from_file(os.environ["BENCH_RAW"]) if os.environ.get("BENCH_RAW") else None
feed_name = session.get_inputs()[0].name
app = Flask(__name__)


@app.post("/v2/models/<model>/infer")
def infer(model):
    inputs = request.get_json()["inputs"]
    if codec is not None:
        x = codec.preprocess(inputs[0]["data"])
        logits = session.run(None, {feed_name: x})[0]
        return jsonify(label_response(model, codec.postprocess(logits)))
    feeds = {t["name"]: np.asarray(t["data"], dtype=DTYPES[t["datatype"]]).reshape(t["shape"]) for t in inputs}
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, feeds)
    return jsonify({
        "model_name": model,
        "outputs": [
            {"name": n, "datatype": "FP32", "shape": list(a.shape), "data": a.reshape(-1).tolist()}
            for n, a in zip(names, outputs)
        ],
    })
