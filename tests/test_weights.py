"""The one weight-file reader and the one key-mapping engine (released QLIP layout and CLIP-family init)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlip
from qlip.factory import create_model
from qlip.weights import (
    CLIP_KEYS,
    RELEASED_KEYS,
    LoadReport,
    WeightFileError,
    load_into,
    qlip_to_released_key,
    read_weight_file,
)

SRC = Path(qlip.__file__).parent


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_model_safetensors_gives_one_clear_error(released_dir, tmp_path, capsys, damage):
    path = tmp_path / "model"
    shutil.copytree(released_dir, path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(WeightFileError) as err:
        create_model(str(path))
    message = str(err.value)
    assert str(weights) in message and "download or export it again" in message and "\n" not in message

    from qlip.cli import main

    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    assert main(["encode", str(image), "--model", str(path), "--out", str(tmp_path / "t.safetensors")]) == 2
    cli_err = capsys.readouterr().err
    assert str(weights) in cli_err and "Traceback" not in cli_err


def test_reader_formats_and_refusals(tmp_path):
    state = {"a": torch.arange(3.0), "b.c": torch.ones(2, 2)}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        got = read_weight_file(tmp_path / name)
        assert sorted(got) == ["a", "b.c"] and torch.equal(got["b.c"], state["b.c"])

    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(WeightFileError, match=r"unknown weight file type '\.npz'"):
        read_weight_file(tmp_path / "w.npz")
    torch.save({"a": torch.zeros(1), "f": Path("/")}, tmp_path / "code.pth")  # pickles a class: refused
    with pytest.raises(WeightFileError, match="code.pth could not be read"):
        read_weight_file(tmp_path / "code.pth")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match="cut.bin could not be read"):
        read_weight_file(tmp_path / "cut.bin")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_weight_file(tmp_path / "nope.safetensors")


def test_one_engine_maps_released_and_openclip_state_dicts(released_dir):
    from test_train_config import _openclip_state

    released = load_file(str(released_dir / "model.safetensors"))
    model = create_model("qlip-tiny")
    torch.manual_seed(0)
    openclip = _openclip_state(model, 32, 32, 32)

    tiny = create_model(str(released_dir), strict=False)  # the same architecture as the released files
    report = load_into(tiny, released, RELEASED_KEYS)
    assert isinstance(report, LoadReport) and report.ok
    assert sorted(report.skipped) == ["vision_decoder.encoder.rope.freqs_sin", "vision_model.encoder.rope.freqs_cos"]
    key = "vision_model.encoder.layers.1.mlp.w2.bias"
    torch.testing.assert_close(tiny.state_dict()["visual.transformer.blocks.1.mlp.w2.bias"], released[key])
    assert qlip_to_released_key("visual.transformer.blocks.1.mlp.w2.bias") == key

    report = load_into(model, openclip, CLIP_KEYS, parts=("visual", "text", "logit_scale"), strict=False)
    assert isinstance(report, LoadReport) and not report.ok
    torch.testing.assert_close(model.state_dict()["text.proj.weight"], openclip["text_projection"].t())
    assert "visual.ln_pre.weight" in report.unplaced


def test_losses_do_not_import_from_eval():
    for path in sorted((SRC / "losses").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                assert not module.startswith(("qlip.eval", "..eval")), f"{path.name} imports {module}"
