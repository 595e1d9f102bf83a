"""The package's import graph: the command line sits on top (no library module imports it) and there are no
import circles (module-level or inside functions), so every floor can be read and tested from below."""

from __future__ import annotations

import ast
from pathlib import Path

import qlip

ROOT = Path(qlip.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level:
        base = module.split(".")
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    names = [f"{target}.{a.name}" for a in node.names]
    return [target, *names]


def import_graph() -> dict[str, set[str]]:
    """module -> the qlip modules it imports anywhere in its source (entry-point ``__main__`` files excluded)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py") if p.name != "__main__.py"}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                candidates = _resolve(module, path.name == "__init__.py", node)
            else:
                continue
            for c in candidates:
                while c and c not in files:  # "qlip.data.loader.build_dataset" -> "qlip.data.loader"
                    c = c.rpartition(".")[0]
                if c and c != module and c.startswith("qlip"):
                    deps.add(c)
        graph[module] = deps
    return graph


def _is_package_init_of(dep: str, module: str) -> bool:
    """``qlip.data`` imported by ``qlip.data.loader``'s own package: the package's __init__ re-exports, not a layer."""
    return module.startswith(dep + ".")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), ignoring package-__init__ re-export edges."""
    edges = {m: {d for d in ds if not _is_package_init_of(m, d) and not _is_package_init_of(d, m)}
             for m, ds in graph.items()}  # fmt: skip
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_library_module_imports_the_cli():
    graph = import_graph()
    offenders = sorted(m for m, deps in graph.items() if not m.startswith("qlip.cli")
                       and any(d == "qlip.cli" or d.startswith("qlip.cli.") for d in deps))  # fmt: skip
    assert offenders == []


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_checker_sees_a_circle():
    assert cycles({"qlip.a": {"qlip.b"}, "qlip.b": {"qlip.c"}, "qlip.c": {"qlip.a"}, "qlip.d": {"qlip.a"}}) == [
        ["qlip.a", "qlip.b", "qlip.c"]
    ]
    assert "qlip.cli.common" in import_graph()["qlip.cli.codec"]
