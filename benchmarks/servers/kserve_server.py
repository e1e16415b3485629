"""KServe's standalone ModelServer with an onnxruntime model, written as KServe's runtimes are.

Runs in its own venv (kserve's pins conflict with Ray's): ``<kserve python>
kserve_server.py --model_path m.onnx --model_name mlp --http_port 8102 --threads 2``.
Unknown flags (``--workers``, ``--enable_grpc``...) go to kserve's own parser.
"""

import argparse

import onnxruntime as ort
from kserve import Model, ModelServer, model_server
from kserve.utils.utils import get_predict_response

parser = argparse.ArgumentParser(parents=[model_server.parser])
parser.add_argument("--model_path", required=True)
parser.add_argument("--threads", type=int, default=2)
args, _ = parser.parse_known_args()


class OnnxModel(Model):
    def __init__(self, name: str, path: str, threads: int) -> None:
        super().__init__(name)
        self.path, self.threads = path, threads
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
        x = payload.inputs[0].as_numpy()
        result = self.session.run(None, {self.input_name: x})[0]
        return get_predict_response(payload, result, self.name)


if __name__ == "__main__":
    ModelServer().start([OnnxModel(args.model_name, args.model_path, args.threads)])
