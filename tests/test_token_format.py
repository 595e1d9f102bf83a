"""One token format: `qlip encode` and `qlip tokenize` write it, `qlip decode` reads both; outputs never collide."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from PIL import Image

from qlip.cli import main
from qlip.factory import create_model
from qlip.tokenfile import TokenFileError, TokenSpec, iter_token_files, read_token_file, write_token_file


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    torch.manual_seed(0)
    model = create_model("qlip-tiny")
    path = tmp_path_factory.mktemp("m") / "tiny"
    model.save_pretrained(path)
    return path


def test_decode_reads_tokenize_output_with_captions(tiny_dir, tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["tokenize", "--model", str(tiny_dir), "--data", "shapes:easy", "--count", "6", "--out", str(out),
                 "--batch-size", "4", "--shard-size", "4", "--workers", "0", "--device", "cpu", "--quiet"]) == 0
    files = list(iter_token_files(out))
    assert [len(f) for f in files] == [4, 2]
    assert all(isinstance(c, str) and c for f in files for c in f.captions)
    assert files[0].spec.model == "qlip-tiny" and files[0].spec.fingerprint
    capsys.readouterr()
    assert main(["decode", str(out), "--model", str(tiny_dir), "--out", str(tmp_path / "png"), "--quiet"]) == 0
    assert "wrote 6 image(s)" in capsys.readouterr().out
    pngs = sorted((tmp_path / "png").rglob("*.png"))
    assert len(pngs) == 6 and sorted(p.stem for p in pngs) == sorted(k for f in files for k in f.keys)


def test_token_file_round_trip_and_refusals(tmp_path):
    model = create_model("qlip-tiny", parts=("quantizer", "decoder"))
    spec = TokenSpec.of(model)
    idx = torch.randint(0, 2**spec.bits, (3, spec.grid, spec.grid))
    path = write_token_file(tmp_path / "t.safetensors", idx, spec, keys=["a", "b", "c"], captions=["x", None, "z"])
    tf = read_token_file(path)
    assert torch.equal(tf.tokens, idx) and tf.keys == ["a", "b", "c"] and tf.captions == ["x", None, "z"]
    tf.spec.check(model)
    other = dataclasses.replace(spec, quantizer={**spec.quantizer, "l2_norm": not spec.quantizer["l2_norm"]})
    with pytest.raises(TokenFileError, match="l2_norm"):
        other.check(model)
    with pytest.raises(TokenFileError, match="8x8 tokens"):
        dataclasses.replace(spec, grid=8).check(model)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(TokenFileError, match="not a readable"):
        read_token_file(tmp_path / "junk.safetensors")


def test_outputs_mirror_inputs_and_are_never_overwritten(tiny_dir, tmp_path, capsys):
    src = tmp_path / "in"
    for sub in ("a", "b"):
        (src / sub).mkdir(parents=True)
    img = Image.new("RGB", (40, 40), (200, 30, 30))
    img.save(src / "a" / "x.png")
    img.save(src / "b" / "x.png")  # a class-folder layout: same name in two folders
    img.save(src / "a" / "y.png")
    img.save(src / "a" / "y.jpg")  # same stem, two suffixes
    rec = tmp_path / "rec"
    assert main(["reconstruct", str(src), "--model", str(tiny_dir), "--out", str(rec), "--quiet"]) == 0
    written = sorted(p.relative_to(rec).as_posix() for p in rec.rglob("*.png"))
    assert written == ["a/x.png", "a/y.jpg.png", "a/y.png.png", "b/x.png"]
    before = (rec / "a" / "x.png").stat().st_mtime_ns
    assert main(["reconstruct", str(src), "--model", str(tiny_dir), "--out", str(rec), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (rec / "a" / "x.png").stat().st_mtime_ns == before
    assert main(["reconstruct", str(src), "--model", str(tiny_dir), "--out", str(rec), "--quiet", "--overwrite"]) == 0
    # the input folder is never an output folder
    assert main(["reconstruct", str(src), "--model", str(tiny_dir), "--out", str(src), "--quiet"]) == 2
    assert sorted(p.name for p in (src / "a").iterdir()) == ["x.png", "y.jpg", "y.png"]

    tokens = tmp_path / "t.safetensors"
    assert main(["encode", str(src), "--model", str(tiny_dir), "--out", str(tokens), "--quiet"]) == 0
    assert main(["encode", str(src), "--model", str(tiny_dir), "--out", str(tokens), "--quiet"]) == 2
    assert main(["encode", str(src / "a" / "x.png"), "--model", str(tiny_dir), "--out", str(src / "a" / "x.png")]) == 2
    assert Image.open(src / "a" / "x.png").size == (40, 40)
    dec = tmp_path / "dec"
    assert main(["decode", str(tokens), "--model", str(tiny_dir), "--out", str(dec), "--quiet"]) == 0
    assert sorted(p.relative_to(dec).as_posix() for p in dec.rglob("*.png")) == written
    capsys.readouterr()
    shutil.rmtree(dec / "b")
    assert main(["decode", str(tokens), "--model", str(tiny_dir), "--out", str(dec), "--quiet"]) == 2
    assert not (dec / "b").exists()  # refused before anything was written
