"""The Hugging Face bridge is an optional extra: importing qlip never imports transformers, and a missing
library is one line naming the install command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qlip.hf import HFModelError, load_causal_lm, load_text_encoder


def test_importing_qlip_imports_no_transformers():
    code = ("import sys, qlip, qlip.hf, qlip.generation, qlip.train.tasks.generator, qlip.cli; "
            "qlip.cli.build_parser(); print('transformers' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("load", [load_causal_lm, load_text_encoder])
def test_a_missing_transformers_names_the_extra(monkeypatch, load):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(HFModelError, match=r'pip install "qlip\[hf\]"'):
        load("anything")


def test_a_missing_gguf_reader_names_the_extra(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "gguf", None)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(HFModelError, match=r'needs the gguf package: pip install "qlip\[hf\]"'):
        load_causal_lm(tmp_path / "m.gguf")
