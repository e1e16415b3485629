"""KServe's scikit-learn and XGBoost model servers (``sklearnserver``, ``xgbserver``), on the
``kserve`` package from PyPI.

KServe publishes those two runtimes only inside its container images, not on PyPI; their code
is two small ``Model`` subclasses. ``SKLearnModel`` and ``XGBoostModel`` below are theirs, as
in kserve/kserve ``python/sklearnserver/sklearnserver/model.py`` and
``python/xgbserver/xgbserver/model.py`` (commit aaac4e2, Apache-2.0), with one change:
``Storage.download(model_dir)`` (the separate ``kserve-storage`` package, which returns a
local directory as it is) is the local directory itself. ``load`` and ``predict`` are
otherwise line for line: joblib for scikit-learn (``PREDICT_PROBA=true`` in the environment
answers probabilities), an ``xgb.Booster`` with ``nthread`` over a ``DMatrix`` of the
``instances`` for XGBoost, behind KServe's own ``ModelServer`` with its defaults.

Runs with the KServe venv's python (kserve pins conflict with Ray's), as the runtimes'
``__main__`` does::

    <kserve python> benchmarks/peers/kserve_tabular.py sklearn --model_dir DIR --model_name rf --http_port 8301
    <kserve python> benchmarks/peers/kserve_tabular.py xgboost --model_dir DIR --model_name xgb --nthread 1

Unknown flags (``--workers``, ``--enable_grpc``...) go to KServe's own parser.
"""

import argparse
import os
import pathlib
import sys
from typing import Dict, Union

import kserve
from kserve import Model
from kserve.errors import InferenceError, ModelMissingError
from kserve.protocol.infer_type import InferRequest, InferResponse
from kserve.utils.utils import get_predict_input, get_predict_response

MODEL_EXTENSIONS = (".joblib", ".pkl", ".pickle")
ENV_PREDICT_PROBA = "PREDICT_PROBA"
BOOSTER_FILE_EXTENSIONS = (".bst", ".json", ".ubj")


class SKLearnModel(Model):
    def __init__(self, name: str, model_dir: str):
        super().__init__(name)
        self.name = name
        self.model_dir = model_dir
        self.ready = False

    def load(self) -> bool:
        import joblib

        model_path = pathlib.Path(self.model_dir)
        model_files = []
        for file in os.listdir(model_path):
            file_path = os.path.join(model_path, file)
            if os.path.isfile(file_path) and file.endswith(MODEL_EXTENSIONS):
                model_files.append(model_path / file)
        if len(model_files) == 0:
            raise ModelMissingError(model_path)
        elif len(model_files) > 1:
            raise RuntimeError(f"More than one model file is detected, Only one is allowed within model_dir: {model_files}")
        self._model = joblib.load(model_files[0])
        self.ready = True
        return self.ready

    def predict(self, payload: Union[Dict, InferRequest], headers: Dict[str, str] = None) -> Union[Dict, InferResponse]:
        try:
            instances = get_predict_input(payload)
            if os.environ.get(ENV_PREDICT_PROBA, "false").lower() == "true" and hasattr(self._model, "predict_proba"):
                result = self._model.predict_proba(instances)
            else:
                result = self._model.predict(instances)
            return get_predict_response(payload, result, self.name)
        except Exception as e:
            raise InferenceError(str(e))


class XGBoostModel(Model):
    def __init__(self, name: str, model_dir: str, nthread: int):
        super().__init__(name)
        self.name = name
        self.model_dir = model_dir
        self.nthread = nthread

    def load(self) -> bool:
        import xgboost as xgb

        model_path = self.model_dir
        model_files = []
        for file in os.listdir(model_path):
            file_path = os.path.join(model_path, file)
            if os.path.isfile(file_path) and file.endswith(BOOSTER_FILE_EXTENSIONS):
                model_files.append(file_path)
        if len(model_files) == 0:
            raise ModelMissingError(model_path)
        elif len(model_files) > 1:
            raise RuntimeError(f"More than one model file is detected, Only one is allowed within model_dir: {model_files}")
        with open(model_files[0], "rb") as f:
            model_bytes = f.read()
        self._booster = xgb.Booster(params={"nthread": self.nthread}, model_file=bytearray(model_bytes))
        self.ready = True
        return self.ready

    def predict(self, payload: Union[Dict, InferRequest], headers: Dict[str, str] = None) -> Union[Dict, InferResponse]:
        import xgboost as xgb

        try:
            instances = get_predict_input(payload)
            dmatrix = xgb.DMatrix(instances, nthread=self.nthread)
            result = self._booster.predict(dmatrix)
            return get_predict_response(payload, result, self.name)
        except Exception as e:
            raise InferenceError(str(e))


def main(argv=None) -> None:
    runtime = (argv if argv is not None else sys.argv[1:])[:1]
    if runtime not in (["sklearn"], ["xgboost"]):
        raise SystemExit("usage: kserve_tabular.py {sklearn,xgboost} --model_dir DIR --model_name NAME [kserve flags]")
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model_dir", required=True, help="A local path to the model directory")
    parser.add_argument("--nthread", default=1, type=int, help="Number of threads to use by XGBoost.")
    args, _ = parser.parse_known_args((argv if argv is not None else sys.argv[1:])[1:])
    if args.configure_logging:
        kserve.logging.configure_logging(args.log_config_file)
    if runtime == ["sklearn"]:
        model = SKLearnModel(args.model_name, args.model_dir)
    else:
        model = XGBoostModel(args.model_name, args.model_dir, args.nthread)
    model.load()
    kserve.ModelServer().start([model])


if __name__ == "__main__":
    main()
