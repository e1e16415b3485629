import json

import pytest

from maas_ray.cli import main
from tests.helpers import linear_onnx

pytestmark = pytest.mark.unit


def test_publish_list_describe_alias(tmp_path, capsys):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(linear_onnx())
    reg = str(tmp_path / "reg")
    assert main(["models", "publish", "lin", str(onnx_file), "--registry", reg,
                 "--postprocessor", "classification", "--postprocessor-params", '{"top_k": 2}']) == 0
    assert main(["models", "alias", "lin", "production", "1", "--registry", reg]) == 0
    assert main(["models", "list", "--registry", reg]) == 0
    assert main(["models", "list", "lin", "--registry", reg]) == 0
    out = capsys.readouterr().out
    assert "published lin:1" in out and "lin:production -> 1" in out and "lin:1" in out and "production" in out
    assert main(["models", "describe", "lin", "production", "--registry", reg]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["postprocessor"] == {"name": "classification", "params": {"top_k": 2}}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["models", "describe", "nope"], "error: model 'nope' does not exist"),
        (["train", "--epochs", "0"], "error: training config: epochs: Input should be greater than or equal to 1 (got '0')"),
        (["train", "--model-args", '{"hidden_sizes": [64, -1]}'], "hidden_sizes must be positive, got [64, -1]"),
        (["train", "--config", "missing.yaml"], "error: cannot read training config 'missing.yaml'"),
    ],
)
def test_errors_are_one_line_and_exit_non_zero(tmp_path, capsys, argv, message):
    assert main([*argv, "--registry", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
