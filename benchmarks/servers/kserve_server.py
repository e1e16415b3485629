"""KServe's standalone ModelServer with an onnxruntime model, written as KServe's runtimes are.

Runs in its own venv (kserve's pins conflict with Ray's): ``<kserve python>
kserve_server.py --model_path m.onnx --model_name mlp --http_port 8102 --threads 2``.
Unknown flags (``--workers``, ``--enable_grpc``...) go to kserve's own parser.
``--raw spec.json`` (raw workloads): decode, run and label raw inputs
(benchmarks/servers/raw.py; the venv needs pillow and tokenizers).
"""

import argparse

import numpy as np
import onnxruntime as ort
from kserve import Model, ModelServer, model_server
from kserve.protocol.infer_type import InferOutput, InferResponse
from kserve.utils.utils import generate_uuid, get_predict_response

from benchmarks.servers.raw import RawCodec

parser = argparse.ArgumentParser(parents=[model_server.parser])
parser.add_argument("--model_path", required=True)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--raw", help="a raw workload's processing spec (JSON)")
args, _ = parser.parse_known_args()


class OnnxModel(Model):
    def __init__(self, name: str, path: str, threads: int, raw: str = None) -> None:
        super().__init__(name)
        self.path, self.threads = path, threads
        self.codec = RawCodec.from_file(raw) if raw else None
        self.load()

    def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.ready = True
        return self.ready

    def predict(self, payload, headers=None, response_headers=None):
        x = payload.inputs[0].as_numpy()  # BYTES: an object array of str (JSON) or bytes (binary)
        if self.codec is None:
            return get_predict_response(payload, self.session.run(None, {self.input_name: x})[0], self.name)
        logits = self.session.run(None, {self.input_name: self.codec.preprocess(x.reshape(-1))})[0]
        labels = np.asarray(self.codec.postprocess(logits), dtype=np.object_)
        out = InferOutput(name="label", shape=[len(labels)], datatype="BYTES")
        out.set_data_from_numpy(labels, binary_data=payload.use_binary_outputs)
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id or generate_uuid(),
                             use_binary_outputs=payload.use_binary_outputs)


if __name__ == "__main__":
    ModelServer().start([OnnxModel(args.model_name, args.model_path, args.threads, args.raw)])
