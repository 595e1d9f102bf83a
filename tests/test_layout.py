"""The package's layout: modules talk to each other through public names only."""

from __future__ import annotations

import ast
from pathlib import Path

import qlip

SRC = Path(qlip.__file__).resolve().parent


def _source_dir(path: Path, node: ast.ImportFrom) -> Path:
    """The folder a ``from X import name`` reads ``name`` from when ``name`` is a submodule."""
    if node.level:
        base = path.parent
        for _ in range(node.level - 1):
            base = base.parent
        parts = (node.module or "").split(".") if node.module else []
    else:
        base, parts = SRC.parent, node.module.split(".")
    return base.joinpath(*parts)


def test_no_module_imports_a_private_name_of_another():
    """A leading underscore means "may change without notice": importing one from elsewhere in the package couples
    two files through a detail; make the name public (and documented) instead. Private submodules are fine."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith("qlip")):
                continue
            folder = _source_dir(path, node)
            for alias in node.names:
                name = alias.name
                submodule = (folder / f"{name}.py").is_file() or (folder / name).is_dir()
                if name.startswith("_") and not name.startswith("__") and not submodule:
                    source = "." * node.level + (node.module or "")
                    found.append(f"{path.relative_to(SRC)}: from {source} import {name}")
    assert found == []
