"""A benchmark's result file is written atomically: a run stopped while writing keeps the previous file whole."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"


def _common():
    spec = importlib.util.spec_from_file_location("bench_common", COMMON)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_stopped_write_keeps_the_previous_result_file(tmp_path, monkeypatch, capsys):
    common = _common()
    out = tmp_path / "result.json"
    common.write_results("bench", {"images_per_s": 1.0}, str(out))
    assert json.loads(out.read_text()) == {"images_per_s": 1.0}

    real_write_text = Path.write_text

    def half_then_stop(self, text, *args, **kwargs):  # the process is stopped halfway through the write
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_stop)
    with pytest.raises(KeyboardInterrupt):
        common.write_results("bench", {"images_per_s": 2.0, "note": "x" * 100}, str(out))
    monkeypatch.undo()
    assert json.loads(out.read_text()) == {"images_per_s": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temporary file left behind
