"""Test modules import no other test module (nor a conftest): what they share lives in the
``tests.helpers`` package, and fixtures shared across modules in a conftest.py.

Importing a test module runs its module-level code and re-registers its tests' fixtures in the
importer (test_s3_keys once imported test_s3_registry's moto fixture that way).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parents[1]


def _is_test_module(dotted: str) -> bool:
    last = dotted.rsplit(".", 1)[-1]
    return last.startswith("test_") or last == "conftest"


def imported_test_modules(source: str, package: str) -> list[str]:
    """The test modules (``test_*`` or ``conftest``) that ``source`` imports, as dotted names;
    ``package`` is the dotted package of the module (for relative imports)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_test_module(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            if base and _is_test_module(base):
                found.append(base)
            # `from tests.integration import test_x`: the names are modules
            found += [f"{base}.{alias.name}" for alias in node.names if _is_test_module(alias.name)]
    return found


def files_of_tests() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if p.name.startswith("test_") or p.name == "conftest.py")


def test_no_test_module_imports_another_test_module():
    modules = files_of_tests()
    assert len(modules) > 20 and TESTS / "unit" / "test_test_layout.py" in modules
    offenders = {}
    for path in modules:
        package = ".".join(path.relative_to(TESTS.parent).parent.parts)
        imported = imported_test_modules(path.read_text(encoding="utf-8"), package)
        if imported:
            offenders[str(path.relative_to(TESTS.parent))] = imported
    assert not offenders, f"test modules importing test modules (share through tests/helpers/ or a conftest.py): {offenders}"


def test_every_folder_of_test_modules_is_a_package():
    """tests/unit/test_x.py and tests/integration/test_x.py may share a name only as
    tests.unit.test_x and tests.integration.test_x: outside packages pytest imports both as
    ``test_x`` and stops collecting ("import file mismatch")."""
    folders = {p.parent for p in files_of_tests()}
    missing = sorted(str(f.relative_to(TESTS.parent)) for f in folders if not (f / "__init__.py").is_file())
    assert not missing, f"folders of test modules without __init__.py: {missing}"


def test_helpers_are_a_package_and_no_module_sits_beside_it():
    assert (TESTS / "helpers" / "__init__.py").is_file()
    assert not (TESTS / "helpers.py").exists() and not (TESTS / "load.py").exists()


@pytest.mark.parametrize(
    ("source", "package", "expected"),
    [
        ("from tests.integration.test_hardening import scrape", "tests.integration", ["tests.integration.test_hardening"]),
        ("import tests.unit.test_cli as t", "tests.unit", ["tests.unit.test_cli"]),
        ("from tests.integration import test_s3_registry, conftest", "tests.unit",
         ["tests.integration.test_s3_registry", "tests.integration.conftest"]),
        ("from .test_s3_registry import BUCKET", "tests.integration", ["tests.integration.test_s3_registry"]),
        ("from . import test_s3_registry", "tests.integration", ["tests.integration.test_s3_registry"]),
        ("from ..conftest import HTTP_PORT", "tests.integration", ["tests.conftest"]),
        ("def f():\n    from tests.conftest import HTTP_PORT", "tests.unit", ["tests.conftest"]),
        ("from tests.helpers import linear_onnx\nfrom tests.helpers.s3 import BUCKET\nimport pytest", "tests.unit", []),
        ("from maas_ray.serving import testing_tools", "tests.unit", []),
    ],
)
def test_import_parser(source, package, expected):
    """The parser itself, on made-up sources, so that a parser bug cannot hide an import."""
    assert imported_test_modules(source, package) == expected
