"""README.md's Layout section matches the tree, and the README stays short.

The Layout is a code block of lines like::

    maas_ray/registry/         manifest and store
    maas_ray/serving/          the Serve app:
      types.py                 shared tensor and request types
      processors.py            ...; text.py: the tokenizer
    deployments/               serve YAMLs

A line that starts with a path names it from the repository root; a path ending in ``/``
becomes the folder that the indented lines after it (and other ``*.py`` names on its own
line) are relative to. Every package under maas_ray/ must be named as ``maas_ray/<path>/``,
and every path the Layout names must exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_README_BYTES = 14_000

_PATH = re.compile(r"^[\w.-]+(?:/[\w.-]+)*/?$")  # maas_ray/serving/, types.py, codecs/
_PY_NAME = re.compile(r"(?<![\w./`-])([\w-]+(?:/[\w-]+)*\.py)\b")  # text.py on a description


def layout_section() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Layout\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, "README.md has no '## Layout' section"
    return match.group(1)


def layout_lines() -> list[str]:
    """The Layout's code block lines (the whole section if it has no code block)."""
    section = layout_section()
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", section, flags=re.M | re.S)
    return "\n".join(blocks).splitlines() if blocks else section.splitlines()


def named_paths(lines: list[str]) -> list[str]:
    """Every path the Layout lines name, relative to the repository root."""
    paths: list[str] = []
    folder: str | None = None  # the last top-level folder: where indented names live
    for line in lines:
        if not line.strip():
            continue
        indented = line[0].isspace()
        first, _, rest = line.strip().partition(" ")
        first = first.strip("`")
        if not _PATH.match(first):
            continue
        if indented:
            if folder is None:
                continue
            path = folder + first
        else:
            path = first
            folder = path if path.endswith("/") else None
        paths.append(path)
        if path.startswith("maas_ray/"):
            # other module names in the description ("processors.py ...; text.py: ..."), which
            # live in the folder the line names, or beside the file it names
            here = path if path.endswith("/") else path.rpartition("/")[0] + "/"
            paths.extend(here + name for name in _PY_NAME.findall(rest))
    return paths


def package_dirs() -> list[str]:
    """maas_ray/<path>/ for every package (a folder with __init__.py) under maas_ray/."""
    base = ROOT / "maas_ray"
    return sorted(
        f"maas_ray/{init.parent.relative_to(base).as_posix()}/"
        for init in base.rglob("__init__.py")
        if init.parent != base and "__pycache__" not in init.parts
    )


def test_readme_is_short():
    size = README.stat().st_size
    assert size < MAX_README_BYTES, f"README.md is {size} bytes; keep it under {MAX_README_BYTES} (move detail to docs/)"


def test_every_package_is_in_the_layout():
    section = layout_section()
    missing = [p for p in package_dirs() if p not in section]
    assert not missing, f"packages missing from README.md's Layout section: {missing}"


def test_every_package_has_its_own_layout_line():
    starts = {line.split()[0].strip("`") for line in layout_lines() if line.strip() and not line[0].isspace()}
    missing = [p for p in package_dirs() if p not in starts]
    assert not missing, f"packages without a line of their own in README.md's Layout: {missing}"


def test_every_named_path_exists():
    paths = named_paths(layout_lines())
    assert any(p.startswith("maas_ray/") for p in paths), "the Layout names no maas_ray/ paths"
    missing = [p for p in paths if not ((ROOT / p).is_dir() if p.endswith("/") else (ROOT / p).is_file())]
    assert not missing, f"README.md's Layout names paths that do not exist: {missing}"


def test_parser_reads_indented_and_inline_names():
    """The parser itself, on a made-up Layout, so a README edit cannot hide a parser bug."""
    sample = [
        "maas_ray/errors.py     errors",
        "maas_ray/serving/      the app:",
        "  types.py             types",
        "  codecs/              codecs",
        "  processors.py        base classes; text.py: the tokenizer",
        "maas_ray/serving/codecs/  v2.py (JSON), v1.py",
        "deployments/           YAMLs; see `deployments/x.yaml`, not_checked.py",
        "  ignored.py           (indented under a folder outside maas_ray/: still named)",
    ]
    assert named_paths(sample) == [
        "maas_ray/errors.py",
        "maas_ray/serving/",
        "maas_ray/serving/types.py",
        "maas_ray/serving/codecs/",
        "maas_ray/serving/processors.py",
        "maas_ray/serving/text.py",
        "maas_ray/serving/codecs/",
        "maas_ray/serving/codecs/v2.py",
        "maas_ray/serving/codecs/v1.py",
        "deployments/",
        "deployments/ignored.py",
    ]
