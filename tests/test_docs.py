"""What ships speaks of the project, and every figure in the docs points at a file that is in the repository.

Internal references (issue numbers, sections of an internal spec, notes folders) mean nothing to a user; a result
file named in the docs but not committed makes its figure unverifiable; a parameter count that disagrees with
`qlip models` is wrong on one of the two pages.
"""

from __future__ import annotations

import re
from pathlib import Path

import qlip

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("src", "docs", "configs", "README.md")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".json", ".txt", ".toml", ".cfg"}
INTERNAL = re.compile(r"\bissue \d|spec section|shared/notes|shared/spec|/work/", re.IGNORECASE)


def _shipped_files() -> list[Path]:
    files = []
    for name in SHIPPED:
        path = ROOT / name
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
    return files


def _internal_references(files: list[Path]) -> list[str]:
    hits = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if INTERNAL.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return hits


def test_shipped_text_cites_no_issue_numbers_spec_sections_or_notes():
    hits = _internal_references(_shipped_files())
    assert not hits, "\n".join(hits)


def test_every_result_file_the_docs_name_is_committed():
    """A figure's source is a file in the repository: every results JSON / PNG the README or a doc names exists."""
    pattern = re.compile(r"(?:benchmarks|docs)/results/[\w.-]+\.(?:json|png)")
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name in pattern.findall(doc.read_text(encoding="utf-8")):
            if not (ROOT / name).is_file():
                missing.append(f"{doc.relative_to(ROOT)} names {name}")
    assert not missing, "\n".join(missing)


def test_stated_parameter_count_of_the_demo_model_matches_the_model():
    model = qlip.create_model("qlip-shapes-s")
    expected = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
    pages = [ROOT / "docs" / "training.md", ROOT / "src" / "qlip" / "model_configs" / "qlip-shapes-s.json"]
    stated = {page.name: re.findall(r"\d+(?:\.\d+)?M parameters", page.read_text(encoding="utf-8")) for page in pages}
    assert all(stated.values()), f"each page states the count: {stated}"
    assert all(found == [expected] for found in stated.values()), f"expected {expected!r} everywhere, got {stated}"
