"""The qlip CLI over real images (scikit-image photographs), including grayscale, RGBA and corrupt files."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from qlip.cli import main
from qlip.factory import create_model
from qlip.tokenfile import read_token_file


def _raw(path):
    """(tensors, metadata) of a safetensors file as stored."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


@pytest.fixture(scope="module")
def model_dir(released_dir):
    return str(released_dir)


def test_models_lists_released_and_small(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("QLIP-B-16-256", "QLIP-B-8-256", "QLIP-L-14-392", "qlip-tiny"):
        assert name in out
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    b16 = next(r for r in rows if r["name"] == "QLIP-B-16-256")
    assert b16["tokens"] == "16x16" and b16["bits"] == 28 and b16["compression_ratio"] == 219.4


def test_encode_decode_round_trip_over_real_images(model_dir, image_files, tmp_path, capsys):
    good = [image_files[k] for k in ("rgb", "jpeg", "gray", "rgba")]
    out = tmp_path / "tokens.safetensors"
    rc = main(["encode", *map(str, good), str(image_files["corrupt"]), "--model", model_dir, "--out", str(out),
               "--batch-size", "3", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 1  # the corrupt file is reported and the run exits non-zero, the good ones are still written
    assert "corrupt.jpg" in captured.err
    tf = read_token_file(out)
    assert tf.tokens.shape == (4, 4, 4) and tf.spec.bits == 8 and tf.spec.grid == 4
    assert tf.keys == [p.name for p in good]
    assert int(tf.tokens.max()) < 2**8

    assert main(["decode", str(out), "--model", model_dir, "--out", str(tmp_path / "dec")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "dec").iterdir())
    assert pngs == sorted(f"{p.stem}.png" for p in good)
    assert Image.open(tmp_path / "dec" / "camera.png").size == (32, 32)

    # decode(encode(x)) written by the CLI equals reconstruct(x) written by the CLI
    assert main(["reconstruct", *map(str, good), "--model", model_dir, "--out", str(tmp_path / "rec")]) == 0
    assert "PSNR" in capsys.readouterr().out
    for p in good:
        a = Image.open(tmp_path / "dec" / f"{p.stem}.png").tobytes()
        assert a == Image.open(tmp_path / "rec" / f"{p.stem}.png").tobytes()


def test_encode_bits_and_decode_them(model_dir, image_files, tmp_path):
    out = tmp_path / "bits.safetensors"
    assert main(["encode", str(image_files["rgb"]), "--model", model_dir, "--out", str(out), "--output", "bits"]) == 0
    tf = read_token_file(out)
    assert tf.tokens.shape == (1, 4, 4, 8) and tf.kind == "bits"
    assert main(["decode", str(out), "--model", model_dir, "--out", str(tmp_path / "d")]) == 0


def test_decode_rejects_wrong_grid_and_out_of_range_indices(model_dir, image_files, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    main(["encode", str(image_files["rgb"]), "--model", model_dir, "--out", str(out)])
    tensors, meta = _raw(out)
    tokens = tensors["indices"]
    bad = tmp_path / "bad.safetensors"
    save_file({"indices": tokens + 256}, str(bad), metadata=meta)
    assert main(["decode", str(bad), "--model", model_dir, "--out", str(tmp_path / "x")]) == 2
    assert "[0, 2**8)" in capsys.readouterr().err
    save_file({"indices": tokens}, str(bad), metadata={**meta, "grid": "8"})
    assert main(["decode", str(bad), "--model", model_dir, "--out", str(tmp_path / "x")]) == 2
    assert "8x8 tokens" in capsys.readouterr().err
    assert main(["decode", str(image_files["rgb"]), "--model", model_dir, "--out", str(tmp_path / "x")]) == 2
    assert "not a readable safetensors token file" in capsys.readouterr().err
    save_file({"x": tokens}, str(bad))
    assert main(["decode", str(bad), "--model", model_dir, "--out", str(tmp_path / "x")]) == 2
    assert "not a qlip token file" in capsys.readouterr().err
    assert load_file(str(out))["indices"].shape == (1, 4, 4)


def test_classify_prints_probabilities(model_dir, image_files, capsys):
    rc = main(["classify", str(image_files["rgb"]), str(image_files["gray"]), "--model", model_dir,
               "--labels", "a dog,a cat,a diagram", "--template", "a photo of {}."])
    assert rc == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 2 and all("%" in ln for ln in lines)
    assert main(["classify", str(image_files["rgb"]), "--model", model_dir, "--labels", "one"]) == 2


def test_user_errors_exit_2_with_a_message(model_dir, image_files, tmp_path, capsys):
    assert main(["encode", str(tmp_path / "missing.png"), "--model", model_dir, "--out", "x.safetensors"]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["encode", str(tmp_path / "empty"), "--model", model_dir, "--out", "x.safetensors"]) == 2
    assert "holds no image files" in capsys.readouterr().err
    rgb = str(image_files["rgb"])
    assert main(["encode", rgb, "--model", "no-such-model", "--out", "x.safetensors"]) == 2
    assert "registered" in capsys.readouterr().err
    assert main(["classify", rgb, "--model", "qlip-tiny", "--labels", "a,b"]) == 2
    assert "without a vocabulary" in capsys.readouterr().err
    assert main(["encode", rgb, "--model", model_dir, "--out", "x.safetensors", "--device", "cuda:7"]) == 2


def test_tokenizer_train_then_use_it_with_a_model(tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue square on the left\na green star at the top\n" * 20)
    assert main(["tokenizer", "train", str(captions), "--vocab-size", "600", "--out", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "tok" / "vocab.json").is_file() and (tmp_path / "tok" / "merges.txt").is_file()
    model = create_model("qlip-tiny")
    from qlip.tokenizer import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert tok.vocab_size <= model.cfg.text.vocab_size
    assert model.encode_text(tok(["a red circle"])[:, :32]).shape == (1, 32)


def test_tokenizer_train_reads_every_caption_source_the_trainer_reads(tmp_path, capsys):
    """Caption lists (CSV, JSONL with a named column), shards, a captioned class folder: their captions, not lines."""
    import json

    from PIL import Image

    from qlip.tokenizer import CLIPTokenizer

    (tmp_path / "img" / "zebra").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "img" / "zebra" / "a.png")
    words = ["quokka", "axolotl", "pangolin"]
    (tmp_path / "pairs.csv").write_text("file,caption\n" + "".join(f"img/zebra/a.png,a {w} asleep\n" for w in words))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"path": "img/zebra/a.png", "desc": f"one {w}"}) + "\n"
                                                  for w in words))  # fmt: skip
    assert main(["data", "write-shards", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "shards")]) == 0
    runs = [([str(tmp_path / "pairs.csv")], 3, "quokka"), ([str(tmp_path / "shards")], 3, "pangolin"),
            ([str(tmp_path / "pairs.jsonl"), "--caption-key", "desc"], 3, "axolotl"),
            ([str(tmp_path / "img"), "--caption-template", "a photo of a {}"], 1, "zebra")]  # fmt: skip
    for i, (source, count, word) in enumerate(runs):
        out = tmp_path / f"tok{i}"
        capsys.readouterr()
        assert main(["tokenizer", "train", *source, "--vocab-size", "600", "--out", str(out)]) == 0, source
        assert f"on {count} captions" in capsys.readouterr().out
        tok = CLIPTokenizer.from_pretrained(out)
        assert len(tok.encode(word)) == 1, (source, word)  # a word of the captions became one token
        assert len(tok.encode("png")) > 1  # image paths (and headers) are not captions: never merged
    assert main(["tokenizer", "train", str(tmp_path / "img"), "--vocab-size", "600", "--out", str(tmp_path / "t")]) == 2
    assert "class folder" in capsys.readouterr().err  # no captions without a template: one line, exit 2
