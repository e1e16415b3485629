"""Processor plug-ins: the resolver (built-in names and import paths), the one constructor
contract, the declaration checks, the app builder's check, and the import layering."""

from __future__ import annotations

import ast
import itertools
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from maas_ray.errors import ConfigError, InvalidInputError
from maas_ray.registry import Registry
from maas_ray.registry.manifest import Manifest, ProcessorSpec, TensorSpec
from maas_ray.serving import build_app
from maas_ray.serving.config import Limits
from maas_ray.serving.plugins import Postprocessor, Preprocessor, check_tensor
from maas_ray.serving.processors import (
    BUILTINS,
    ClassificationPostprocessor,
    ImagePreprocessor,
    TensorPostprocessor,
    TensorPreprocessor,
    make_postprocessor,
    make_preprocessor,
    resolve_processor,
)
from maas_ray.serving.tabular import RegressionPostprocessor, TabularPreprocessor
from maas_ray.serving.text import TextPreprocessor
from maas_ray.serving.types import RequestInput, RequestSchema
from tests.helpers import linear_onnx
from tests.helpers.apps import bound_deployments
from tests.plugins_example import Argmax, CelsiusToFahrenheit

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
CELSIUS = "tests.plugins_example:CelsiusToFahrenheit"
ARGMAX = "tests.plugins_example:Argmax"
_COUNTER = itertools.count()  # a fresh module name per generated plug-in (imports are cached)


def manifest(pre="tensor", post="tensor", pre_params=None, post_params=None, dtype="FP32") -> Manifest:
    return Manifest(
        model="m", version=1, sha256="0" * 64, size_bytes=1,
        inputs=[TensorSpec(name="input", datatype=dtype, shape=[-1, 4])],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 3])],
        preprocessor=ProcessorSpec(name=pre, params=pre_params or {}),
        postprocessor=ProcessorSpec(name=post, params=post_params or {}),
    )


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """Write a module (``name``, ``source``) to an importable folder; returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


# --- the resolver -------------------------------------------------------------------------


def test_builtins_are_plugins_of_the_same_kind():
    assert BUILTINS["preprocessor"] == {
        "tensor": TensorPreprocessor, "image": ImagePreprocessor, "text": TextPreprocessor,
        "tabular": TabularPreprocessor}
    assert BUILTINS["postprocessor"] == {"tensor": TensorPostprocessor, "classification": ClassificationPostprocessor,
                                         "regression": RegressionPostprocessor}
    for kind, base in (("preprocessor", Preprocessor), ("postprocessor", Postprocessor)):
        for name, cls in BUILTINS[kind].items():
            assert issubclass(cls, base) and cls.name == name
            assert resolve_processor(kind, name) is cls
    # a built-in by its import path is the same class
    assert resolve_processor("preprocessor", "maas_ray.serving.text:TextPreprocessor") is TextPreprocessor


def test_resolves_import_paths():
    assert resolve_processor("preprocessor", CELSIUS) is CelsiusToFahrenheit
    assert resolve_processor("postprocessor", ARGMAX) is Argmax


@pytest.mark.parametrize(
    ("kind", "name", "message"),
    [
        ("preprocessor", "imag", "unknown preprocessor 'imag'; built-ins: ['image', 'tabular', 'tensor', 'text'], "
                                 "or a plug-in as 'package.module:Class'"),
        ("postprocessor", "nope", "unknown postprocessor 'nope'; built-ins: ['classification', 'regression', 'tensor']"),
        ("preprocessor", "tests.plugins_example:", "preprocessor 'tests.plugins_example:': not an import path"),
        ("preprocessor", "a:b:c", "preprocessor 'a:b:c': not an import path of the form 'package.module:Class'"),
        ("preprocessor", "my pkg:X", "preprocessor 'my pkg:X': not an import path"),
        ("preprocessor", "no_such_pkg.mod:X",
         "preprocessor 'no_such_pkg.mod:X': cannot import module 'no_such_pkg.mod': ModuleNotFoundError: "
         "No module named 'no_such_pkg'"),
        ("preprocessor", "tests.plugins_example:Celsius",
         "preprocessor 'tests.plugins_example:Celsius': 'tests.plugins_example' has no attribute 'Celsius'"),
        ("preprocessor", "tests.plugins_example:Argmax.nope",
         "'tests.plugins_example:Argmax' has no attribute 'nope'"),
        ("preprocessor", "tests.plugins_example:check_tensor",
         "preprocessor 'tests.plugins_example:check_tensor': not a class but function"),
        ("preprocessor", ARGMAX,
         "preprocessor 'tests.plugins_example:Argmax': Argmax does not subclass maas_ray.serving.plugins.Preprocessor"),
        ("postprocessor", CELSIUS, "CelsiusToFahrenheit does not subclass maas_ray.serving.plugins.Postprocessor"),
        ("postprocessor", "maas_ray.serving.config:Limits", "Limits does not subclass"),
    ],
)
def test_resolver_errors_name_the_value(kind, name, message):
    with pytest.raises(ConfigError) as info:
        resolve_processor(kind, name)
    assert message in str(info.value)


def test_resolver_reports_modules_that_fail_to_import_and_classes_without_call(plugin_module):
    broken = plugin_module("broken_plugin", "raise RuntimeError('out of coffee')\n")
    with pytest.raises(ConfigError, match=r"cannot import module 'broken_plugin': RuntimeError: out of coffee"):
        resolve_processor("preprocessor", f"{broken}:X")
    lazy = plugin_module("lazy_plugin", """
        from maas_ray.serving.plugins import Preprocessor
        class Lazy(Preprocessor):
            request_inputs = []
    """)
    with pytest.raises(ConfigError, match=r"'lazy_plugin:Lazy': Lazy does not define __call__"):
        resolve_processor("preprocessor", f"{lazy}:Lazy")
    with pytest.raises(ValueError, match="kind must be one of"):
        resolve_processor("processor", "tensor")


# --- the contract -------------------------------------------------------------------------


def test_one_constructor_for_every_processor():
    """cls(manifest, params, *, limits, files): built-ins included; limits/files keyword-only."""
    m = manifest()
    limits = Limits(max_image_pixels=99)
    for cls in (TensorPreprocessor, TensorPostprocessor, ClassificationPostprocessor):
        proc = cls(m, {}, limits=limits, files={"labels.txt": b"a"})
        assert proc.limits is limits and proc.files == {"labels.txt": b"a"} and proc.params == {}
        assert proc.inputs == m.inputs and proc.outputs == m.outputs and proc.manifest is m
        with pytest.raises(TypeError):
            cls(m, {}, limits)  # keyword-only
    assert TensorPreprocessor(m, {}).limits == Limits() and TensorPreprocessor(m, {}).files == {}
    img = ImagePreprocessor(m, {"height": 2, "width": 2}, limits=limits, files={})
    assert img.limits.max_image_pixels == 99
    assert issubclass(TextPreprocessor, Preprocessor)


def test_plugins_get_params_limits_and_files(plugin_module):
    name = plugin_module("recording_plugin", """
        from maas_ray.serving.plugins import Postprocessor, TensorSpec
        class Labels(Postprocessor):
            def __init__(self, manifest, params, *, limits=None, files=None):
                super().__init__(manifest, params, limits=limits, files=files)
                self.labels = self.files[self.params["file"]].decode().split()
                self.response_outputs = [TensorSpec(name="label", datatype="BYTES", shape=[-1])]
            def __call__(self, outputs):
                import numpy as np
                return {"label": np.asarray(self.labels, dtype=object)[outputs["logits"].argmax(1)]}
    """)
    spec = ProcessorSpec(name=f"{name}:Labels", params={"file": "labels.txt"})
    limits = Limits(max_image_pixels=7)
    post = make_postprocessor(manifest(), spec, limits=limits, files={"labels.txt": b"cat dog owl"})
    assert post.limits is limits
    assert post({"logits": np.array([[0, 2, 1], [5, 0, 0]], np.float32)})["label"].tolist() == ["dog", "cat"]
    failed = rf"postprocessor '{name}:Labels' for m:1 failed to start: KeyError: 'labels.txt'"
    with pytest.raises(ConfigError, match=failed):
        make_postprocessor(manifest(), spec)  # no files given: an empty mapping


def test_the_example_plugins_end_to_end_without_ray():
    m = manifest(pre=CELSIUS, post=ARGMAX, pre_params={"input_name": "celsius"})
    pre, post = make_preprocessor(m), make_postprocessor(m)
    assert pre.request_inputs == [RequestInput("celsius", ("FP32",), [-1, 4])]
    assert [(t.name, t.datatype, t.shape) for t in post.response_outputs] == [
        ("logits", "FP32", [-1, 3]), ("argmax", "INT64", [-1])]
    assert RequestSchema.of(pre, post) == RequestSchema({"celsius": frozenset({"FP32"})}, ("logits", "argmax"))
    feeds = pre({"celsius": np.array([[0, 100, -40, 37]], np.float32)}, strict_dtypes=True)
    np.testing.assert_allclose(feeds["input"], [[32, 212, -40, 98.6]], rtol=1e-6)
    assert feeds["input"].dtype == np.float32
    v1 = pre({"celsius": np.array([[0.0, 1.0, 2.0, 3.0]])}, strict_dtypes=False)["input"]  # float64 from JSON
    assert v1.dtype == np.float32
    with pytest.raises(InvalidInputError, match=r"'celsius': expected shape \[-1, 4\] \(-1 = any\), got \[1, 3\]"):
        pre({"celsius": np.zeros((1, 3), np.float32)}, strict_dtypes=True)
    with pytest.raises(InvalidInputError, match="temperatures must be finite"):
        pre({"celsius": np.full((1, 4), np.nan, np.float32)}, strict_dtypes=True)
    logits = np.array([[0.1, 0.9, 0.0], [3, 2, 1]], np.float32)
    out = post({"logits": logits})
    assert out["argmax"].dtype == np.int64 and out["argmax"].tolist() == [1, 0] and out["logits"] is logits
    with pytest.raises(ConfigError, match="CelsiusToFahrenheit needs one FP32 model input"):
        make_preprocessor(manifest(pre=CELSIUS, dtype="INT64"))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("pass", "declares no request_inputs"),
        ("request_inputs = []", "request_inputs is empty"),
        ("request_inputs = 'input'", "request_inputs must be a list of RequestInput"),
        ("request_inputs = [('input', ('FP32',), [-1, 4])]", "request_inputs must hold RequestInputs, got tuple"),
        ("request_inputs = [RequestInput('x', ('FP32',), [-1]), RequestInput('x', ('INT64',), [-1])]",
         "request_inputs names 'x' twice"),
        ("request_inputs = [RequestInput('x', ('FLOAT',), [-1])]", "request_inputs 'x' has datatypes ['FLOAT']"),
        ("request_inputs = [RequestInput('x', (), [-1])]", "request_inputs 'x' has datatypes []"),
        ("request_inputs = [RequestInput('x', ('FP32',), [0])]", "request_inputs 'x' has shape [0]"),
        ("@property\ndef request_inputs(self): raise KeyError('oops')", "request_inputs raised KeyError"),
        ("def __init__(self, manifest, params, *, limits=None, files=None): int(params['n'])",
         "failed to start: KeyError: 'n'"),
    ],
)
def test_bad_declarations_fail_at_load_naming_the_plugin(plugin_module, body, message):
    source = "\n".join([
        "from maas_ray.serving.plugins import Preprocessor, RequestInput",
        "class Pre(Preprocessor):",
        *("    " + line for line in body.splitlines()),
        "    def __call__(self, tensors, *, strict_dtypes):",
        "        return tensors",
    ])
    name = plugin_module(f"declaring_plugin_{next(_COUNTER)}", source)
    with pytest.raises(ConfigError) as info:
        make_preprocessor(manifest(pre=f"{name}:Pre"))
    assert f"preprocessor '{name}:Pre'" in str(info.value) and message in str(info.value)


def test_check_tensor_is_the_shared_shape_and_dtype_check():
    spec = TensorSpec(name="x", datatype="INT64", shape=[-1, 2])
    assert check_tensor(spec, np.array([[1.0, 2.0]])).dtype == np.int64
    with pytest.raises(InvalidInputError, match="fractional"):
        check_tensor(spec, np.array([[1.5, 2.0]]))


# --- the app builder ------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path):
    Registry(str(tmp_path)).publish("m", linear_onnx())
    return str(tmp_path)


def _args(root: str, **model) -> dict:
    return {"registry_root": root, "models": [{"name": "m", "versions": [{"version": 1}], **model}]}


@pytest.mark.parametrize(
    ("field", "name", "message"),
    [
        ("preprocessor", "no_such_pkg.mod:Pre",
         "app args: models.0.preprocessor: preprocessor 'no_such_pkg.mod:Pre': cannot import module 'no_such_pkg.mod'"),
        ("preprocessor", "tests.plugins_example:Nope",
         "app args: models.0.preprocessor: preprocessor 'tests.plugins_example:Nope': "
         "'tests.plugins_example' has no attribute 'Nope' (for m:1)"),
        ("postprocessor", CELSIUS, "app args: models.0.postprocessor: postprocessor 'tests.plugins_example:"
                                   "CelsiusToFahrenheit': CelsiusToFahrenheit does not subclass"),
    ],
)
def test_build_app_resolves_plugins(root, field, name, message):
    with pytest.raises(ConfigError) as info:
        build_app(_args(root, **{field: {"name": name}}))
    assert message in str(info.value)


def test_build_app_accepts_plugins_from_the_manifest_and_the_args(root):
    built = bound_deployments(build_app(_args(root, preprocessor={"name": CELSIUS}, postprocessor={"name": ARGMAX})))
    model = built["Ingress"].init_kwargs["args"]["models"][0]  # what the ingress replica builds the pipeline from
    assert (model["preprocessor"]["name"], model["postprocessor"]["name"]) == (CELSIUS, ARGMAX)
    Registry(root).publish("m", linear_onnx(), preprocessor=ProcessorSpec(name="tests.plugins_example:Gone"))
    with pytest.raises(ConfigError, match=r"models.0.preprocessor: .*has no attribute 'Gone' \(for m:2\)"):
        build_app({"registry_root": root, "models": [{"name": "m", "versions": [{"version": 2}]}]})


# --- layering and docs ----------------------------------------------------------------------


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at top level) for every ``from maas_ray... import`` / ``import maas_ray...``."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, id(node) in top))
        elif isinstance(node, ast.Import):
            found.extend((a.name, id(node) in top) for a in node.names)
    return [(m, t) for m, t in found if m.startswith("maas_ray")]


def test_processors_have_no_import_loop():
    serving = ROOT / "maas_ray" / "serving"
    for name in ("plugins.py", "processors.py", "text.py"):
        imports = _imports(serving / name)
        assert all(top for _, top in imports), f"{name} imports maas_ray lazily: {imports}"
        assert not any(m.startswith(("maas_ray.serving.protocol", "maas_ray.serving.codecs")) for m, _ in imports)
    assert not any(m == "maas_ray.serving.processors" for m, _ in _imports(serving / "text.py"))
    assert {m for m, _ in _imports(serving / "plugins.py")} <= {
        "maas_ray.errors", "maas_ray.registry.manifest", "maas_ray.serving.config", "maas_ray.serving.types"}
    source = (serving / "processors.py").read_text() + (serving / "text.py").read_text()
    assert not re.search(r"^Tensors\s*=|^class RequestInput", source, flags=re.M)  # from types.py


def test_docs_show_the_example_module_as_it_is():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    source = (ROOT / "tests" / "plugins_example.py").read_text()
    code = source[source.index("from __future__"):]
    blocks = re.findall(r"^```python\n(.*?)^```", doc, flags=re.M | re.S)
    assert code in blocks, "docs/plugins.md's example differs from tests/plugins_example.py"
