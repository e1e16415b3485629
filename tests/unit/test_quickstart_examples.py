"""``maas quickstart`` reads its YAMLs as package data (``maas_ray.examples``), which are links to
the repository's ``deployments/`` (one source of truth) and real files in a built wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest
import yaml

from maas_ray.cli.quickstart import DEMOS, _train_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "maas_ray" / "examples"


def _yamls(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in [*folder.glob("*.yaml"), *folder.glob("train/*.yaml")])


@pytest.mark.parametrize("model", sorted(DEMOS))
def test_every_demo_yaml_is_found_through_importlib_resources(model):
    demo = DEMOS[model]
    files = resources.files("maas_ray.examples")
    cfg = _train_config(demo, epochs=2)
    assert (cfg.model_name, cfg.epochs) == (demo.name, 2)
    app = yaml.safe_load((files / demo.app_config).read_text())
    assert [a["name"] for a in app["applications"]] == [demo.name]
    assert "port" in app["http_options"]  # the quickstart overrides it


def test_examples_are_links_to_the_deployments_yamls():
    """One source of truth: each example is a relative link to the same file under deployments/
    (add a link there for a YAML the package must ship)."""
    needed = {d.app_config for d in DEMOS.values()} | {f"train/{d.train_config}" for d in DEMOS.values()}
    assert needed <= set(_yamls(EXAMPLES))
    for name in _yamls(EXAMPLES):
        link = EXAMPLES / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link)), name
        assert link.resolve() == (ROOT / "deployments" / name).resolve(), name


def test_a_built_wheel_carries_the_examples_as_files(tmp_path):
    """setuptools copies the links' contents into the wheel: an installed maas_ray has the YAMLs
    without the repository (the quickstart once read them from ``Path(__file__).parents[2]``)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.onnx")
    shutil.copytree(ROOT / "maas_ray", src / "maas_ray", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "deployments", src / "deployments", symlinks=True, ignore=ignore)
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-c", f"import setuptools.build_meta as b; b.build_wheel({str(out)!r})"],
        cwd=src, check=True, capture_output=True, timeout=300,
    )
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = {info.filename: info for info in zf.infolist() if info.filename.startswith("maas_ray/examples/")}
        for name in _yamls(EXAMPLES):
            info = shipped[f"maas_ray/examples/{name}"]
            assert (info.external_attr >> 16) & 0o170000 != 0o120000, f"{name} is a link in the wheel"
            assert zf.read(info) == (ROOT / "deployments" / name).read_bytes(), name
