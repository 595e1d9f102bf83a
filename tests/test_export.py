"""qlip export: ONNX and torch.export graphs of the tokenizer, their manifest, and `qlip export check`."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import torch

from qlip.cli import main
from qlip.export import MANIFEST_NAME, ExportError, check_pt2_archive, sha256_file
from qlip.factory import create_model
from qlip_testing import randomize_


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def qlip_dir(tmp_path_factory):
    """A tiny tokenizer in our own layout (config.json + model.safetensors), random weights."""
    model = randomize_(create_model("qlip-tiny", parts=("vision", "quantizer", "decoder")), seed=1)
    return model.save_pretrained(tmp_path_factory.mktemp("qlip") / "tiny")


@pytest.fixture(scope="module")
def images(image_files):
    return [str(image_files[k]) for k in ("rgb", "jpeg", "gray", "rgba")]


@pytest.fixture(scope="module")
def pt2_export(qlip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "pt2"
    assert main(["export", str(qlip_dir), "--format", "torch-export", "--out", str(out), "--max-batch", "16"]) == 0
    return out


def test_torch_export_round_trip_and_manifest(qlip_dir, pt2_export, images, capsys):
    manifest = json.loads((pt2_export / MANIFEST_NAME).read_text())
    model = create_model(str(qlip_dir))
    assert manifest["format"] == "qlip-export" and manifest["model"] == model.cfg.name
    assert (manifest["image_size"], manifest["grid_size"], manifest["num_bits"]) == (32, 4, 8)
    assert manifest["batch"] == {"min": 1, "max": 16}
    assert manifest["normalization"]["mean"][0] == pytest.approx(0.48145466)
    assert manifest["source"] == str(qlip_dir.resolve())
    assert manifest["source_sha256"] == sha256_file(qlip_dir / "model.safetensors")
    entry = manifest["exports"]["torch-export"]
    assert entry["torch"] == torch.__version__ and entry["opset"] is None
    for graph, name in (("encoder", "encoder.pt2"), ("decoder", "decoder.pt2")):
        f = entry["files"][graph]
        assert f["path"] == name and f["sha256"] == sha256_file(pt2_export / name)
    assert entry["files"]["encoder"]["output"] == {"name": "indices", "shape": ["batch", 4, 4], "dtype": "int64"}
    capsys.readouterr()
    assert main(["export", "check", str(pt2_export), "--images", *images, "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "torch-export: 4 image(s): 0 of 64 tokens differ from PyTorch eager" in out and "OK" in out


def test_exported_graphs_take_any_batch_in_range(qlip_dir, pt2_export):
    from qlip.export import ExportedTokenizer

    model = create_model(str(qlip_dir))
    runner = ExportedTokenizer(pt2_export, "torch-export")
    for b in (1, 5):
        x = torch.randn(b, 3, 32, 32)
        tokens = runner.encode(x)
        assert tokens.dtype == torch.int64 and torch.equal(tokens, model.encode(x))
        assert torch.equal(runner.decode(tokens), model.decode(tokens))
    with pytest.raises(ExportError, match="batch 1 to 16"):
        runner.encode(torch.randn(17, 3, 32, 32))


def test_check_reports_mismatching_tokens_with_exit_1(pt2_export, images, tmp_path, capsys):
    other = randomize_(create_model("qlip-tiny", parts=("vision", "quantizer", "decoder")), seed=7)
    other_dir = other.save_pretrained(tmp_path / "other")
    assert main(["export", "check", str(pt2_export), "--images", *images, "--model", str(other_dir)]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and " 0 of 64 tokens differ" not in out


@pytest.mark.slow
def test_onnx_round_trip_of_a_released_layout_model(released_dir, images, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "export"
    assert main(["export", str(released_dir), "--format", "onnx", "--out", str(out)]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["exports"]["onnx"]["opset"] == 18 and manifest["model"] == "QLIP-tiny"
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(out / "encoder.onnx"))
    assert {o.domain: o.version for o in graph.opset_import}[""] == 18
    assert [i.name for i in graph.graph.input] == ["images"] and [o.name for o in graph.graph.output] == ["indices"]
    capsys.readouterr()
    assert main(["export", "check", str(out), "--images", *images]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("onnx: 4 image(s): 0 of ") and line.endswith("OK")


def test_not_a_model_directory_is_one_error_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["export", str(tmp_path), "--format", "torch-export", "--out", str(tmp_path / "x")]) == 2
    assert "has no config.json" in _error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_a_model_without_decoder_asked_for_the_decoder(tmp_path, capsys):
    encoder_only = create_model("qlip-tiny", parts=("vision", "quantizer")).save_pretrained(tmp_path / "enc")
    assert main(["export", str(encoder_only), "--format", "torch-export", "--out", str(tmp_path / "x")]) == 2
    assert "has no decoder" in _error_line(capsys) and not (tmp_path / "x").exists()


def test_a_batch_size_the_graphs_cannot_take(pt2_export, images, capsys):
    assert main(["export", "check", str(pt2_export), "--images", *images, "--batch-size", "17"]) == 2
    assert "batch 1 to 16" in _error_line(capsys)


def test_files_not_written_by_export_are_never_replaced(qlip_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "encoder.pt2").write_text("the user's own file")
    for extra in ([], ["--overwrite"]):
        argv = ["export", str(qlip_dir), "--format", "torch-export", "--out", str(out), *extra]
        assert main(argv) == 2
        assert "was not written by qlip export" in _error_line(capsys)
    assert (out / "encoder.pt2").read_text() == "the user's own file"
    assert sorted(p.name for p in out.iterdir()) == ["encoder.pt2"]


def test_own_files_are_replaced_only_with_overwrite(qlip_dir, pt2_export, tmp_path, capsys):
    out = shutil.copytree(pt2_export, tmp_path / "out")
    argv = ["export", str(qlip_dir), "--format", "torch-export", "--out", str(out), "--parts", "decoder",
            "--max-batch", "16"]  # fmt: skip
    assert main(argv) == 2
    assert "pass --overwrite" in _error_line(capsys)
    (out / "decoder.pt2").write_bytes(b"stale")
    assert main([*argv, "--overwrite"]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["exports"]["torch-export"]["files"]["decoder"]["sha256"] == sha256_file(out / "decoder.pt2")
    assert manifest["exports"]["torch-export"]["files"]["encoder"]["path"] == "encoder.pt2"  # kept
    other = create_model("qlip-shapes-s", parts=("vision", "quantizer", "decoder")).save_pretrained(tmp_path / "s")
    capsys.readouterr()
    assert main(["export", str(other), "--format", "torch-export", "--out", str(out), "--overwrite"]) == 2
    assert "holds an export of" in _error_line(capsys)
    retrained = randomize_(create_model("qlip-tiny", parts=("vision", "quantizer", "decoder")), seed=2)
    argv = ["export", str(retrained.save_pretrained(tmp_path / "r")), "--format", "torch-export", "--out", str(out),
            "--max-batch", "16"]  # fmt: skip
    assert main(argv) == 2  # same architecture, other weights: not mixed into one folder
    assert "not of these weights" in _error_line(capsys)


def test_a_changed_file_is_refused(pt2_export, tmp_path, images, capsys):
    out = shutil.copytree(pt2_export, tmp_path / "out")
    with open(out / "decoder.pt2", "ab") as f:
        f.write(b"\0")
    capsys.readouterr()
    assert main(["export", "check", str(out), "--images", *images]) == 2
    assert "does not match the sha256" in _error_line(capsys)


def test_a_pt2_archive_that_needs_unpickling_is_refused(tmp_path):
    path = tmp_path / "x.pt2"
    config = {"config": {"w": {"path_name": "weight_0", "use_pickle": True}}}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x/data/weights/model_weights_config.json", json.dumps(config))
    with pytest.raises(ExportError, match="would be unpickled"):
        check_pt2_archive(path)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x/data/sample_inputs/model.pt", b"not a weights-only pickle")
    with pytest.raises(ExportError, match="not plain tensors"):
        check_pt2_archive(path)


def test_check_needs_an_export_folder(tmp_path, images, capsys):
    assert main(["export", "check", str(tmp_path), "--images", *images]) == 2
    assert "qlip-export.json" in _error_line(capsys)
