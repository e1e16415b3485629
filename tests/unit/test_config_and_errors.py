import pickle
from importlib import import_module

import pytest
from pydantic import ValidationError

import maas_ray
from maas_ray import errors
from maas_ray.registry import Manifest, TensorSpec
from maas_ray.train import TrainConfig

pytestmark = pytest.mark.unit


def test_public_api_is_exactly_all():
    import types

    helpers = {"import_module", "Any"}  # subpackages (train, serving, rollout...) are not API names
    public = sorted(n for n in dir(maas_ray) if not n.startswith("_") and n not in helpers
                    and not isinstance(getattr(maas_ray, n, None), types.ModuleType))
    assert sorted(maas_ray.__all__, key=str.lower) == sorted(public, key=str.lower)
    for name in maas_ray.__all__:
        obj = getattr(maas_ray, name)  # a lazy name imports its module now
        assert getattr(obj, "__name__", None) == name, (name, obj)  # the class or function itself
        home = maas_ray._LAZY.get(name, obj.__module__)
        assert obj is getattr(import_module(home), name), (name, home)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 0}, "epochs: Input should be greater than or equal to 1 (got 0)"),
        ({"lr": -1}, "lr: Input should be greater than 0 (got -1)"),
        ({"model_args": {"hidden_sizes": [64, -3]}}, "hidden_sizes must be positive, got [64, -3]"),
        ({"data": "features.xlsx"}, "got 'features.xlsx'"),
        ({"model": "resnet"}, "model must be one of ['mlp', 'cnn', 'text-transformer'] or an import path"),
        ({"model": "cnn", "model_args": {"channel": [3]}}, "model_args of cnn: channel: Extra inputs are not permitted"),
        ({"model": "text-transformer", "model_args": {"dim": 30, "heads": 4}}, "heads must divide dim, got dim=30 heads=4"),
        ({"model_args": "{not json"}, "model_args must be a JSON object, got '{not json'"),
        ({"val_fraction": 0.5, "test_fraction": 0.45}, "must leave >= 10 % for training, got 0.5 + 0.45"),
        ({"mixed_precision": "fp8"}, "mixed_precision: Input should be 'auto', 'off', 'bf16' or 'fp16' (got 'fp8')"),
        ({"grad_accum_steps": 0}, "grad_accum_steps: Input should be greater than or equal to 1 (got 0)"),
        ({"patience": 0}, "patience: Input should be greater than or equal to 1 (got 0)"),
        ({"parent": "digits"}, "parent must look like 'model:version'"),
        ({"model_name": "bad name"}, "invalid model name 'bad name'"),
        ({"epochz": 3}, "epochz: Extra inputs are not permitted"),
    ],
)
def test_train_config_names_field_and_value(overrides, message):
    with pytest.raises(errors.ConfigError) as info:
        TrainConfig.load(None, **overrides)
    assert message in str(info.value)


def test_train_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 5\nmodel_args: {hidden_sizes: [32]}\n")
    cfg = TrainConfig.load(str(path), epochs=7)
    assert cfg.epochs == 7 and cfg.model_args == {"hidden_sizes": [32], "dropout": 0.1}  # defaults filled
    assert TrainConfig.load("deployments/train/digits.yaml").min_test_accuracy == 0.97


def test_manifest_validation_quotes_bad_values():
    with pytest.raises(ValidationError, match="unknown datatype 'FLOAT32'"):
        TensorSpec(name="x", datatype="FLOAT32", shape=[-1, 4])
    with pytest.raises(ValidationError, match=r"invalid shape \[0, 4\]"):
        TensorSpec(name="x", datatype="FP32", shape=[0, 4])
    with pytest.raises(ValidationError, match="sha256 must be 64 lowercase hex digits, got 'abc'"):
        Manifest(
            model="m", version=1, sha256="abc", size_bytes=1,
            inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1])],
            outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1])],
        )


ALL_ERRORS = [getattr(errors, n) for n in errors.__all__]


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_errors_pickle_and_keep_status(cls):
    exc = cls("model 'x' has no version 3")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls and str(back) == str(exc) and back.status_code == cls.status_code
    assert back.to_dict() == {"error": "model 'x' has no version 3"}


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_error_tree_is_whole():
    """Every maas_ray error anywhere in the package is public in errors.py (and so pickle-tested)."""
    import maas_ray.serving.app  # noqa: F401  import the modules that might define their own
    import maas_ray.train.export  # noqa: F401

    public = {c for c in _subclasses(errors.MaasError) if not c.__name__.startswith("_")}
    assert public <= set(ALL_ERRORS), public - set(ALL_ERRORS)
    assert all(c.__module__ == "maas_ray.errors" for c in public)


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_grpc_codes_are_real_status_codes(cls):
    grpc = pytest.importorskip("grpc")
    assert hasattr(grpc.StatusCode, cls.grpc_code)


def test_retryable_errors_keep_retry_after_across_pickle():
    for cls in (errors.RateLimitedError, errors.ModelNotReadyError):
        back = pickle.loads(pickle.dumps(cls("busy", 0.2)))
        assert (back.message, back.retry_after_s, back.retry_after_header()) == ("busy", 0.2, "1")
    assert errors.ModelNotReadyError("loading").retry_after_header() is None


def test_status_codes():
    assert errors.InvalidInputError.status_code == 400
    assert errors.ModelNotFoundError.status_code == errors.VersionNotFoundError.status_code == 404
    assert errors.ModelNotReadyError.status_code == 503
    assert errors.IntegrityError.status_code == 500
