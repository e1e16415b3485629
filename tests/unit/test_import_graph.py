"""The package's import graph: no circles, arrows one way, and no torch in serving processes.

Every ``import`` / ``from ... import`` of a ``maas_ray`` module counts, at module level or
inside a function (a lazy import hides a circle at import time, not from the reader), and
under ``if TYPE_CHECKING:`` too (an arrow back up is one whether or not it runs).
"""

from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "maas_ray"

# Packages may import only the ones listed (and themselves): cli -> serving/train/... -> registry -> errors.
ALLOWED = {
    "maas_ray._version": set(),
    "maas_ray.errors": set(),
    "maas_ray.registry": {"maas_ray.errors"},
    "maas_ray.runtime": {"maas_ray.errors"},
    "maas_ray.serving": {"maas_ray.errors", "maas_ray.registry", "maas_ray.runtime"},
    "maas_ray.train": {"maas_ray.errors", "maas_ray.registry", "maas_ray.runtime"},
    "maas_ray.optimize": {"maas_ray.errors", "maas_ray.registry", "maas_ray.runtime", "maas_ray.serving",
                          "maas_ray.train"},
    "maas_ray.rollout": {"maas_ray.errors", "maas_ray.registry", "maas_ray.serving"},
    "maas_ray.batch": {"maas_ray.errors", "maas_ray.registry", "maas_ray.runtime", "maas_ray.serving"},
    "maas_ray.cli": {"maas_ray.errors", "maas_ray.registry", "maas_ray.runtime", "maas_ray.serving",
                     "maas_ray.train", "maas_ray.optimize", "maas_ray.rollout", "maas_ray.batch", "maas_ray"},
    "maas_ray": {"maas_ray.errors", "maas_ray.registry", "maas_ray.serving", "maas_ray.train"},
}

# Within serving, layers from the bottom up: a module imports only from its own layer or below.
SERVING_LAYERS = [
    {"types", "metric_names", "compat"},
    {"codecs", "config", "status", "coalesce", "traffic", "limits", "keys", "metrics", "payload_log"},
    {"processors", "text", "tabular", "plugins", "runner", "cache", "shadow", "shadow_generate", "admission",
     "generate"},
    {"replicas", "generation", "pool", "pool_router"},
    {"versions"},
    {"core"},
    {"http", "grpc", "handle", "http_generate", "grpc_generate"},
    {"ingress"},
    {"app", "client", "deploy", "__init__"},
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The maas_ray modules ``module`` imports (a name imported from a package that is itself a
    module counts as that module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("maas_ray"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("maas_ray"):
                continue
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return out - {module}


def _graph_here() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(p, m, known) for m, p in modules.items()}


@functools.lru_cache(maxsize=1)
def _graph_cached() -> str:
    # Parsed in a fresh interpreter: CPython 3.11 before 3.11.8 keeps the AST converter's
    # recursion depth per interpreter, not per thread, so ``ast.parse`` here raced with threads
    # earlier integration tests left in this process ("AST constructor recursion depth mismatch").
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import {Path(__file__).stem} as g; " \
           "print(json.dumps({m: sorted(e) for m, e in g._graph_here().items()}))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          timeout=120).stdout


def _graph() -> dict[str, set[str]]:
    return {m: set(e) for m, e in json.loads(_graph_cached()).items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_the_package_has_no_import_circle():
    graph = _graph()
    # A package __init__ that re-exports its modules is a circle with them only through the
    # re-export; drop those edges (importing a submodule runs its package first anyway).
    for module, edges in graph.items():
        graph[module] = {e for e in edges if not module.startswith(e + ".")}
    assert _cycles(graph) == []


def test_a_circle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_packages_import_only_downwards():
    wrong = []
    for module, edges in _graph().items():
        mine = _package(module)
        for target in edges:
            other = _package(target)
            if other != mine and other != "maas_ray._version" and other not in ALLOWED[mine]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_serving_modules_import_only_their_layer_or_below():
    layer = {name: i for i, names in enumerate(SERVING_LAYERS) for name in names}
    wrong = []
    for module, edges in _graph().items():
        if not module.startswith("maas_ray.serving"):
            continue
        mine = layer[(module.split(".") + ["__init__"])[2]]
        for target in edges:
            if target.startswith("maas_ray.serving.") and layer[target.split(".")[2]] > mine:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_every_serving_module_has_a_layer():
    names = {m.split(".")[2] for m in _modules() if m.startswith("maas_ray.serving.")}
    assert names - set().union(*SERVING_LAYERS) == set()


# What a serving replica imports: the app builder, every serving module, and a session made
# the way replicas make them (device "auto").
_SERVING_PROCESS = """
import importlib, pkgutil, sys
import onnx
from onnx import TensorProto, helper
{simulate}
import maas_ray.serving
for info in pkgutil.walk_packages(maas_ray.serving.__path__, "maas_ray.serving."):
    importlib.import_module(info.name)
from maas_ray.runtime import create_session
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])
graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
create_session(model.SerializeToString(), device="auto")
print("torch" in sys.modules)
"""

# A GPU runtime as the serving code sees one: onnxruntime-gpu lists CUDA, a device is visible.
_SIMULATED_GPU = """
import os, onnxruntime
os.environ["CUDA_VISIBLE_DEVICES"] = "0"
onnxruntime.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
_session = onnxruntime.InferenceSession
def _cpu_session(model, sess_options=None, providers=None, **kw):  # no CUDA library on this box
    return _session(model, sess_options=sess_options, providers=["CPUExecutionProvider"], **kw)
onnxruntime.InferenceSession = _cpu_session
"""


@pytest.mark.parametrize("runtime", ["cpu", "simulated-gpu"])
def test_a_serving_process_never_imports_torch(runtime):
    code = _SERVING_PROCESS.format(simulate=_SIMULATED_GPU if runtime == "simulated-gpu" else "")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False", "a serving module or session creation imported torch"
