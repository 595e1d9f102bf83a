"""pyproject.toml says what is used: every import is declared where the install that needs it gets it, and
every declared package is imported by something."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
# Distributions whose import name differs from their name (tensorboard is reached through torch's writer).
IMPORT_NAME = {"pyyaml": "yaml", "pillow": "PIL", "scikit-image": "skimage", "tensorboard": "torch.utils.tensorboard"}
TOOLS = {"ruff"}  # run from the command line, never imported
LOCAL = {"qlip"} | {p.stem for p in (ROOT / "tests").glob("*.py")}  # the package and the tests' own modules


def _requirements(specs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", s, maxsplit=1)[0].lower() for s in specs}


def _is_importorskip(node: ast.AST) -> bool:
    """``pytest.importorskip("name")``: an import the test needs, written as a call."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "importorskip"
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
    )


def _imports(folder: Path) -> set[str]:
    """Dotted names of every absolute import under ``folder``, plus the modules of pytest.importorskip calls."""
    names: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
            elif _is_importorskip(node):
                names.add(node.args[0].value)
    return {n for n in names if n.split(".")[0] not in sys.stdlib_module_names and n.split(".")[0] not in LOCAL}


def _used(dist: str, imports: set[str]) -> bool:
    module = IMPORT_NAME.get(dist, dist)
    return any(name == module or name.startswith(module + ".") for name in imports)


def _third_party(imports: set[str]) -> set[str]:
    """The import names that a distribution provides: top-level modules, and torch's tensorboard writer."""
    return {n if n.startswith(IMPORT_NAME["tensorboard"]) else n.split(".")[0] for n in imports}


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _declared_module(dists: set[str], module: str) -> bool:
    return any(IMPORT_NAME.get(d, d) == module for d in dists)


def test_core_dependencies_are_what_the_library_imports(project):
    core = _requirements(project["dependencies"])
    library = _imports(ROOT / "src" / "qlip")
    assert sorted(d for d in core if not _used(d, library)) == []  # declared for everyone, imported by nothing
    extras = set().union(*(_requirements(v) for v in project["optional-dependencies"].values()))
    undeclared = sorted(m for m in _third_party(library) if not _declared_module(core | extras, m))
    assert undeclared == []


def test_every_extra_is_imported_and_dev_covers_the_tests(project):
    extras = {name: _requirements(specs) for name, specs in project["optional-dependencies"].items()}
    everything = _imports(ROOT / "src" / "qlip") | _imports(ROOT / "tests")
    for name, dists in extras.items():
        assert sorted(d for d in dists - TOOLS if not _used(d, everything)) == [], name
    # The documented install is `pip install -e ".[dev]"`: every test import (importorskip included) must come with it.
    installed = _requirements(project["dependencies"]) | extras["dev"]
    missing = sorted(m for m in _third_party(_imports(ROOT / "tests")) if not _declared_module(installed, m))
    assert missing == []
